"""Image files to and from libvirt storage volumes on a cell, through libvirt streams
(virStorageVolUpload / virStorageVolDownload), checked by size and SHA-1.

Called by the image reconciler (from worker threads: every function blocks) to place the
current version of a media or disk image on a cell before guests use it, and to pull a
volume back to the management node (a disk image cloned from a guest). The bytes travel
over the libvirt connection itself, so a local (`qemu:///system`) and a remote
(`qemu+ssh://...`) cell work the same and no file share is needed.

How a volume is made: it is created empty (`<capacity>0</capacity>`, format raw) with
storageVolCreateXML and the file is streamed into it; libvirt then probes the content and
records it as `qcow2` (disk images) or raw/iso (media), which `upload_volume` checks
against `fmt`. Creating it as qcow2 up front does not work: libvirt formats a fresh qcow2
(~192 KiB of header and tables) that an upload overwrites but never truncates, so an image
smaller than that would keep a tail of stale bytes. After the upload the volume is read
back through a download stream and its size and SHA-1 compared with the file's.

Volumes we create are named `nano-...` (the names prefix, reconciler/naming.py; ownership, ARCHITECTURE.md §3); an existing volume
of that name is replaced (a leftover of an interrupted attempt). Errors come out as ours:
NotFound (no such pool or volume), Conflict (pool not active), Unavailable (cell
unreachable; retried), Permanent (the driver cannot stream volumes, a verification
failed, an I/O error on the cell). The libvirt test driver (`test:///`) cannot stream
volumes at all: it gives Permanent, and the volume it created is removed again.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import queue
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from typing import Literal, TypeVar

import libvirt

from reconciler import naming
from reconciler.drivers.libvirt_hv import LibvirtHypervisor
from state.errors import Conflict, Invalid, NanoError, NotFound, Permanent

T = TypeVar("T")
Format = Literal["raw", "qcow2"]
Target = LibvirtHypervisor | str
_ACCEPTED = {"raw": ("raw", "iso"), "qcow2": ("qcow2",)}


@contextlib.contextmanager
def _hypervisor(target: Target) -> Iterator[LibvirtHypervisor]:
    """The given hypervisor, or one opened for a URI and closed afterwards."""
    if isinstance(target, LibvirtHypervisor):
        yield target
        return
    hv = LibvirtHypervisor(target)
    try:
        yield hv
    finally:
        hv.close()


def _no_streams(exc: libvirt.libvirtError) -> bool:
    return exc.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT


def _volume_xml(name: str) -> str:
    root = ET.Element("volume")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "capacity", unit="bytes").text = "0"
    ET.SubElement(ET.SubElement(root, "target"), "format", type="raw")
    return ET.tostring(root, encoding="unicode")


def _volume_format(vol: libvirt.virStorageVol) -> str:
    fmt = ET.fromstring(vol.XMLDesc(0)).find("target/format")
    return fmt.get("type", "raw") if fmt is not None else "raw"


def _settle(pool: libvirt.virStoragePool, timeout: float = 30.0) -> None:
    """Wait for the pool refresh libvirt runs in the background after an upload stream
    closes: until it is over, the pool refuses refreshes ("asynchronous jobs running")
    and the volume's size and format are stale. Returning before would hand that race
    to the caller."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pool.refresh(0)
            return
        except libvirt.libvirtError as exc:
            if "asynchronous jobs" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def _lookup_pool(conn: libvirt.virConnect, pool_name: str) -> libvirt.virStoragePool:
    pool = conn.storagePoolLookupByName(pool_name)
    if not pool.isActive():
        raise Conflict(f"storage pool {pool_name} is not active")
    return pool


def _digest_stream(stream: libvirt.virStream, sink: Callable[[bytes], object] | None = None
                   ) -> tuple[int, str]:
    """Receive a download stream to its end: (size, sha1), each block also to `sink`."""
    digest = hashlib.sha1()
    size = 0

    def take(_stream: libvirt.virStream, data: bytes, _opaque: None) -> int:
        nonlocal size
        digest.update(data)
        size += len(data)
        if sink is not None:
            sink(data)
        return len(data)

    stream.recvAll(take, None)
    stream.finish()
    return size, digest.hexdigest()


def volume_digest(target: Target, pool_name: str, volume_name: str) -> tuple[int, str]:
    """Size and SHA-1 of a volume's content, read through a download stream."""
    with _hypervisor(target) as hv:
        def read(conn: libvirt.virConnect) -> tuple[int, str]:
            vol = _lookup_pool(conn, pool_name).storageVolLookupByName(volume_name)
            stream = conn.newStream(0)
            vol.download(stream, 0, 0, 0)
            return _digest_stream(stream)

        return _streaming(hv, f"read volume {pool_name}/{volume_name}", read)


def _streaming(hv: LibvirtHypervisor, what: str, fn: Callable[[libvirt.virConnect], T]) -> T:
    """hv.call with a clearer message when the driver has no volume streams."""
    def guarded(conn: libvirt.virConnect) -> T:
        try:
            return fn(conn)
        except libvirt.libvirtError as exc:
            if _no_streams(exc):
                raise Permanent(f"{what}: the libvirt driver of {hv.uri} cannot stream "
                                f"volumes ({exc.get_error_message()})") from exc
            raise

    return hv.call(what, guarded, timeout=None)  # long work: no limit (module docstring)


def upload_volume(target: Target, pool_name: str, volume_name: str, path: str, *,
                  fmt: Format, verify: bool = True,
                  progress: Callable[[int, int], None] | None = None) -> tuple[int, str]:
    """Copy the file at `path` into volume `volume_name` of pool `pool_name` (created, or
    replaced when it exists); returns (size, sha1) of what the volume holds.

    `fmt` is what the volume must be once written: "raw" for ISO media, "qcow2" for disk
    images; a file that libvirt does not see as such is refused (and the volume removed).
    With `verify` (the default) the volume is read back and compared by size and SHA-1.
    `progress(sent, size)` is told of every block sent."""
    naming.names().require_owned(volume_name, "write volume")
    if "/" in volume_name:
        raise Invalid(f"refusing to write volume {volume_name!r}: '/' in its name")
    if fmt not in _ACCEPTED:
        raise Invalid(f"unknown volume format {fmt!r}: use raw or qcow2")
    what = f"upload {path} to volume {pool_name}/{volume_name}"
    with open(path, "rb") as fh, _hypervisor(target) as hv:
        size = os.fstat(fh.fileno()).st_size

        def send(conn: libvirt.virConnect) -> tuple[int, str]:
            pool = _lookup_pool(conn, pool_name)
            with contextlib.suppress(libvirt.libvirtError):
                pool.storageVolLookupByName(volume_name).delete(0)
            vol = pool.createXML(_volume_xml(volume_name), 0)
            digest = hashlib.sha1()
            sent = 0

            def read(_stream: libvirt.virStream, nbytes: int, _opaque: None) -> bytes:
                nonlocal sent
                data = fh.read(min(nbytes, size - sent))
                digest.update(data)
                sent += len(data)
                if progress is not None:
                    progress(sent, size)
                return data

            try:
                fh.seek(0)  # a retry on a fresh connection starts over
                stream = conn.newStream(0)
                vol.upload(stream, 0, size, 0)
                stream.sendAll(read, None)
                stream.finish()
            except BaseException:
                with contextlib.suppress(libvirt.libvirtError):
                    vol.delete(0)
                raise
            _settle(pool)
            return sent, digest.hexdigest()

        sent = _streaming(hv, what, send)
        try:
            fmt_seen = hv.call(
                f"read volume {pool_name}/{volume_name}",
                lambda conn: _volume_format(
                    _lookup_pool(conn, pool_name).storageVolLookupByName(volume_name)),
            )
            if fmt_seen not in _ACCEPTED[fmt]:
                raise Permanent(f"{what}: libvirt sees the volume as {fmt_seen}, not {fmt}")
            if verify:
                held = volume_digest(hv, pool_name, volume_name)
                if held != sent:
                    raise Permanent(
                        f"{what}: the volume holds {held[0]} bytes with SHA-1 {held[1]}, "
                        f"the file has {sent[0]} bytes with SHA-1 {sent[1]}"
                    )
        except NanoError:
            delete_volume(hv, pool_name, volume_name)
            raise
        return sent


def download_volume(target: Target, pool_name: str, volume_name: str, path: str, *,
                    progress: Callable[[int, int], None] | None = None,
                    expected: int = 0) -> tuple[int, str]:
    """Copy a volume's content into a new file at `path` (written to a temp file in the
    same directory, synced, then moved into place); returns (size, sha1).
    `progress(received, expected)` is told of every block received (an exception it raises
    aborts the stream)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix=".volume-", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out, _hypervisor(target) as hv:
            def receive(conn: libvirt.virConnect) -> tuple[int, str]:
                vol = _lookup_pool(conn, pool_name).storageVolLookupByName(volume_name)
                out.seek(0)
                out.truncate()  # a retry starts over
                stream = conn.newStream(0)
                vol.download(stream, 0, 0, 0)
                if progress is None:
                    return _digest_stream(stream, out.write)

                def sink(data: bytes) -> None:
                    out.write(data)
                    progress(out.tell(), max(expected, out.tell()))

                return _digest_stream(stream, sink)

            result = _streaming(hv, f"download volume {pool_name}/{volume_name} to {path}",
                                receive)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    return result


def delete_volume(target: Target, pool_name: str, volume_name: str) -> None:
    """Remove a volume we own; a missing one is fine."""
    naming.names().require_owned(volume_name, "delete volume")
    with _hypervisor(target) as hv, contextlib.suppress(NotFound):
        hv.call(f"delete volume {pool_name}/{volume_name}",
                lambda conn: conn.storagePoolLookupByName(pool_name)
                .storageVolLookupByName(volume_name).delete(0))


class _OtherEndFailed(Permanent):
    """One end of a copy stopped because the other failed (that one's error is the cause)."""


def copy_volume(source: LibvirtHypervisor, source_pool: str, target: LibvirtHypervisor,
                target_pool: str, volume_name: str, *,
                progress: Callable[[int, int], None] | None = None,
                digest_on_target: Callable[[str], tuple[int, str]] | None = None
                ) -> tuple[int, str]:
    """Copy a volume from one cell to another through two libvirt streams (a download on
    the source piped into an upload on the target, 16 MiB in flight at most): the target
    volume is created empty (or replaced), then its size and SHA-1 are compared with what
    the source sent: computed on the target cell itself by `digest_on_target(path)` when
    given (a `sha1sum` there: no second trip over the network), else read back through a
    download stream. Returns (size, sha1). A cold migration's disk copy."""
    naming.names().require_owned(volume_name, "copy volume")
    chunks: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=16)
    failed = threading.Event()
    total = source.call(f"size of volume {source_pool}/{volume_name}", lambda conn: _lookup_pool(
        conn, source_pool).storageVolLookupByName(volume_name).info()[2])

    def put(item: bytes | BaseException) -> None:
        while not failed.is_set():
            try:
                chunks.put(item, timeout=1.0)
                return
            except queue.Full:
                continue
        raise _OtherEndFailed("the other end of the copy failed")

    def receive(conn: libvirt.virConnect) -> tuple[int, str]:
        try:
            vol = _lookup_pool(conn, source_pool).storageVolLookupByName(volume_name)
            stream = conn.newStream(0)
            vol.download(stream, 0, 0, 0)
            result = _digest_stream(stream, put)
            put(b"")
            return result
        except BaseException as exc:
            failed.set()
            with contextlib.suppress(queue.Full):
                chunks.put_nowait(exc)
            raise

    def send(conn: libvirt.virConnect) -> int:
        pool = _lookup_pool(conn, target_pool)
        with contextlib.suppress(libvirt.libvirtError):
            pool.storageVolLookupByName(volume_name).delete(0)
        vol = pool.createXML(_volume_xml(volume_name), 0)
        sent = 0

        def read(_stream: libvirt.virStream, _nbytes: int, _opaque: None) -> bytes:
            nonlocal sent
            while True:
                try:
                    item = chunks.get(timeout=1.0)
                    break
                except queue.Empty:
                    if failed.is_set():
                        raise _OtherEndFailed("the source of the copy failed") from None
            if isinstance(item, BaseException):
                raise _OtherEndFailed(f"reading the source volume failed: {item}")
            sent += len(item)
            if progress is not None:
                progress(sent, max(total, sent))
            return item

        try:
            stream = conn.newStream(0)
            vol.upload(stream, 0, 0, 0)
            stream.sendAll(read, None)
            stream.finish()
        except BaseException:
            failed.set()
            with contextlib.suppress(libvirt.libvirtError):
                vol.delete(0)
            raise
        _settle(pool)
        return sent

    what = f"copy volume {volume_name} from {source.uri} to {target.uri}"
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="volume-copy") as pair:
        reading = pair.submit(_streaming, source, what, receive)
        writing = pair.submit(_streaming, target, what, send)
        concurrent.futures.wait((reading, writing))
    # the error that stopped the copy, not the other end's "it stopped": a transient one
    # (a cell not answering) or a lost lease stays what it is instead of Permanent
    errors = [e for e in (reading.exception(), writing.exception()) if e is not None]
    if errors:
        raise next((e for e in errors if not isinstance(e, _OtherEndFailed)), errors[0])
    sent_by_source = reading.result()
    if digest_on_target is not None:
        path = target.call(f"path of volume {target_pool}/{volume_name}", lambda conn: (
            _lookup_pool(conn, target_pool).storageVolLookupByName(volume_name).path()))
        held = digest_on_target(path)
    else:
        held = volume_digest(target, target_pool, volume_name)
    if held != sent_by_source:
        delete_volume(target, target_pool, volume_name)
        raise Permanent(f"{what}: the copy holds {held[0]} bytes with SHA-1 {held[1]}, the "
                        f"source sent {sent_by_source[0]} bytes with SHA-1 {sent_by_source[1]}")
    return sent_by_source
