"""The temp file of an upload (state.images.UploadFile) on a real filesystem: every byte
lands where it belongs whatever the pieces look like (read-only bytes, views at aligned
and odd addresses, tiny and stage-sized pieces), bytes whose address lines up with their
place in the file are written without a copy, the buffered fallback (a filesystem that
refuses O_DIRECT) writes the same file, and a discarded upload leaves nothing behind."""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import uuid
from typing import Any

import pytest

import state.images
from state.images import MEDIA, ImageFiles, UploadFile

ALIGN = UploadFile.ALIGN


def iso_bytes(size: int, seed: int) -> bytes:
    """Random bytes with the ISO 9660 signature where the media sniff looks for it."""
    data = bytearray(random.Random(seed).randbytes(size))
    data[32769:32774] = b"CD001"
    return bytes(data)


def receive(files: ImageFiles, pieces: list[bytes | memoryview]) -> tuple[UploadFile, str]:
    """Write and hash `pieces` as the API's lanes do (one block per piece, every write
    waited for before the next block), then finish; returns the upload and its SHA-1."""
    upload = UploadFile(files, MEDIA, str(uuid.uuid4()))
    for piece in pieces:
        for write in upload.write([piece]):
            write.result()
        upload.digest([piece])
    return upload, upload.finish(None)


def file_bytes(upload: UploadFile) -> bytes:
    with open(upload.path, "rb") as fh:
        return fh.read()


@pytest.fixture
def files(tmp_path: Any) -> ImageFiles:
    return ImageFiles(str(tmp_path / "images"), imports=str(tmp_path / "import"),
                      replica="r1")


@pytest.fixture
def small_stage(monkeypatch: pytest.MonkeyPatch) -> int:
    """A stage of a few pages, so that tests fill it many times over."""
    monkeypatch.setattr(UploadFile, "STAGE_BYTES", 4 * ALIGN)
    return 4 * ALIGN


def odd_pieces(data: bytes, seed: int) -> list[bytes | memoryview]:
    """`data` cut into pieces of every shape: bytes, views of a bytearray, views of an
    mmap at odd offsets, 1-byte pieces, pieces bigger than the stage."""
    rng = random.Random(seed)
    pieces: list[bytes | memoryview] = []
    at = 0
    while at < len(data):
        size = rng.choice([1, 7, ALIGN - 1, ALIGN, ALIGN + 1, 3 * ALIGN + 5, 40_000, 70_000])
        chunk = data[at:at + size]
        shape = rng.randrange(3)
        if shape == 0:
            pieces.append(chunk)
        elif shape == 1:
            pieces.append(memoryview(bytearray(b"xx" + chunk))[2:])
        else:
            offset = rng.randrange(ALIGN)
            buf = mmap.mmap(-1, offset + len(chunk))
            buf[offset:] = chunk
            pieces.append(memoryview(buf)[offset:])
        at += len(chunk)
    return pieces


@pytest.mark.parametrize("seed", range(4))
def test_every_byte_lands_in_place_whatever_the_pieces(files, small_stage, seed):
    data = iso_bytes(300_000 + seed * 12_345, seed)
    upload, sha1 = receive(files, odd_pieces(data, seed))
    assert upload.direct
    assert file_bytes(upload) == data
    assert sha1 == hashlib.sha1(data).hexdigest() and upload.size == len(data)


def test_aligned_bytes_are_written_without_a_copy(files):
    """A receive buffer that puts each file byte at an address aligned like its offset:
    only the edges between buffers (short, unaligned) are copied."""
    data = iso_bytes(3 * (1 << 20) + 1234, 7)
    pieces: list[bytes | memoryview] = []
    at = 0
    for size in (1_000_000, 1_000_001, 999_999, len(data)):
        chunk = data[at:at + size]
        if not chunk:
            break
        begin = at % ALIGN  # as the API places a buffer
        buf = mmap.mmap(-1, begin + len(chunk))
        buf[begin:] = chunk
        pieces.append(memoryview(buf)[begin:])
        at += len(chunk)
    upload, sha1 = receive(files, pieces)
    assert file_bytes(upload) == data and sha1 == hashlib.sha1(data).hexdigest()
    assert upload.copied < len(pieces) * ALIGN


def test_buffered_when_the_filesystem_refuses_o_direct(files, monkeypatch):
    monkeypatch.setattr(state.images, "_set_direct", lambda fd, on: False)
    data = iso_bytes(200_000, 3)
    upload, sha1 = receive(files, odd_pieces(data, 3))
    assert not upload.direct
    assert file_bytes(upload) == data and sha1 == hashlib.sha1(data).hexdigest()


def test_a_short_file_ends_with_a_buffered_tail(files):
    data = iso_bytes(32774 + 5, 1)  # shorter than two pages past the signature
    upload, _ = receive(files, [data])
    assert file_bytes(upload) == data


def test_discarded_upload_leaves_no_file(files):
    upload = UploadFile(files, MEDIA, str(uuid.uuid4()))
    buf = mmap.mmap(-1, 1 << 20)
    writes = upload.write([memoryview(buf)])
    assert os.path.exists(upload.path)
    upload.discard()
    assert all(write.done() for write in writes)
    assert not os.path.exists(upload.path)
    upload.discard()  # twice is fine
