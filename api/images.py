"""Routes of the seed's "Image APIs" group: media images (ISO) and disk images (qcow2),
their searches, their files (upload and download) and the import sync.

Semantics: ../shared/api/COMPATIBILITY.md. Files are reached both at the documented
`/media_image_files/{id}`, `/disk_image_files/{id}` and at the original's
`/media_images/{id}/file/`, `/disk_images/{id}/file/`.

Uploads (POST, multipart/form-data, the file in field `image`, optionally its SHA-1 hex in
`checksum`, before or after the file) are streamed. A body with a Content-Length (curl -F,
browsers, the portal) is read by the handler itself, straight from the connection into a
ring of page-aligned buffers (`_claim_body`, `_read_claimed_body`); a chunked body comes
through Tornado's `data_received`. `api.multipart` cuts the body in place as it arrives
(file bytes leave it as views, not copies), and each buffer's file bytes go to two lanes
of the upload's own (`FileLanes`): one writes them to a private temp file (O_DIRECT,
straight from the buffer: `state.images.UploadFile`), the other updates the SHA-1. A
buffer is refilled only once both lanes are done with it, so memory stays at the ring's
size whatever the file size. Only when the whole body has arrived and checked out
(multipart complete, qcow2/ISO header sniffed, checksum equal) is the file synced and
moved into place (`state.images.ImageFiles.install`, os.replace); the previous version's
file is removed after the answer. The size limit `settings["images"]["max_upload_bytes"]`
is enforced from Content-Length before a byte is read, by the connection while
streaming, and by counting file bytes. A failure or a client that goes away leaves the
previous version as it was and no temp file.

Downloads (GET/HEAD) stream the current version in 4 MiB blocks (next block read in the
pool while the previous one is sent), with Content-Length, `Signature: <sha1>` (of the
whole file) and single-range `Range: bytes=` support (206; 416 when not satisfiable).

Sync (PATCH /media_images/, PATCH /disk_images/, body `{owner?, group?}`, default the
caller and its group) imports the `*.iso` / `*.qcow2` files an operator dropped into
`<data_dir>/import/media/` and `<data_dir>/import/disk/` (copy under a hidden name, e.g.
`.x.iso.tmp`, then rename: hidden files are not imported) and drops images whose file
is gone from the store, never one still waiting for its upload.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import mmap
import os
import re
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast

from tornado import gen
from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError

from api.base import DOWNLOAD, UPLOAD, AppContext, Contract, NanoHandler, Resource, contract
from api.multipart import (
    MultipartError,
    MultipartParser,
    PartData,
    PartEnd,
    PartStart,
    parse_boundary,
)
from reconciler.contract import Key
from state.errors import Busy, Internal, Invalid, NanoError, NotFound
from state.identity import SessionInfo
from state.images import DISK, MEDIA, ImageFiles, ImageKind, UploadFile
from state.quotas import ImageRoom

log = logging.getLogger("nano.api.images")
WRITE_BLOCK = 4 << 20
"""File bytes gathered before they are handed to the thread pool (written and hashed)."""
SEND_BLOCK = 4 << 20
"""Bytes read per step of a download."""
SEND_BUFFERS = 4
"""Buffers per download: one piece going out, the others read ahead."""
RECEIVE_BUFFER = 8 << 20
"""Size of each buffer a body with a Content-Length is read into."""
RECEIVE_BUFFERS = 4
"""Buffers per upload: one being filled while the others are written and hashed."""
IN_FLIGHT = 3
"""Blocks of a chunked body handed to the lanes and not yet written and hashed."""
RECEIVE_CHUNK = 1 << 20
"""Bytes read from the socket and handed to data_received at once (chunked bodies)."""
ALIGN = UploadFile.ALIGN
"""File bytes are placed in the receive buffers at addresses aligned like their offsets
in the file, modulo this (the temp file's O_DIRECT alignment)."""
MULTIPART_SLACK = 1 << 20
"""Body bytes allowed beyond max_upload_bytes: boundaries, part headers, the checksum."""
PROGRESS_SECONDS = 0.5
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class FileLanes:
    """Writes and hashes the blocks of one upload in two threads of its own, each lane
    in order (a one-thread executor each), so that the disk write of one block, the hash
    of the next and the receipt of a third overlap; the shared API pool stays free.

    A block is handed in with the `slot` of the receive buffer its bytes live in (None
    for bytes nobody reuses); `wait` returns once no job reads a slot any more, or once
    at most `keep` blocks are in flight, and raises the first error of a job it waited
    for (a full disk)."""

    def __init__(self, upload: UploadFile) -> None:
        self.upload = upload
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="upload-write")
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="upload-hash")
        self._blocks: deque[tuple[int | None, list[asyncio.Future[Any]]]] = deque()

    def submit(self, block: list[bytes | memoryview], slot: int | None) -> None:
        self._blocks.append((slot, [
            asyncio.wrap_future(self._writer.submit(self.upload.write, block)),
            asyncio.wrap_future(self._hasher.submit(self.upload.digest, block)),
        ]))

    async def wait(self, *, slot: int | None = None, keep: int = 0) -> None:
        def busy() -> bool:
            if slot is not None:
                return any(used == slot for used, _ in self._blocks)
            return len(self._blocks) > keep

        while self._blocks and busy():
            for job in self._blocks.popleft()[1]:
                for write in await job or ():  # write: the direct writes it started
                    await asyncio.wrap_future(write)

    def close(self, then: Callable[[], None] | None = None) -> asyncio.Future[Any] | None:
        """Stop taking blocks; `then` runs in a worker thread once the jobs in flight are
        over (it may wait for the upload's disk writes: not on the loop). Returns a future
        done once `then` ran (its error, if any, as the result: it is logged), so that an
        answer can wait for it."""
        self._writer.shutdown(wait=False, cancel_futures=True)
        self._hasher.shutdown(wait=False, cancel_futures=True)
        jobs = [job for _, block in self._blocks for job in block]
        self._blocks.clear()
        if then is None:
            return None
        loop = asyncio.get_running_loop()
        over: asyncio.Future[Any] = loop.create_future()

        def ran(future: asyncio.Future[Any]) -> None:
            exc = future.exception()
            if exc is not None:
                log.warning("cleaning up an abandoned upload failed: %s", exc)
            over.set_result(exc)

        asyncio.gather(*jobs, return_exceptions=True).add_done_callback(
            lambda _f: loop.run_in_executor(None, then).add_done_callback(ran))
        return over


@dataclass
class ImagesShared:
    """Per process: the image directories and the uploads running now."""

    files: ImageFiles
    uploading: set[str] = field(default_factory=set)  # image ids
    temps: set[str] = field(default_factory=set)  # temp file paths in use


def shared(handler: NanoHandler) -> ImagesShared:
    state = handler.ctx.extras.get("images")
    if state is None:
        state = ImagesShared(handler.store.image_files())
        handler.ctx.extras["images"] = state
    return state


def max_upload_bytes(handler: NanoHandler) -> int:
    return int(handler.ctx.settings.get("images", {}).get("max_upload_bytes", 64 << 30))


def upload_idle_seconds(handler: NanoHandler) -> float:
    """An upload that receives nothing for this long is abandoned, its connection closed."""
    return float(handler.ctx.settings.get("images", {}).get("upload_idle_seconds", 60))


def query_tags(handler: NanoHandler) -> list[str]:
    """`?tags=a&tags=b` and `?tags=a,b` alike."""
    return [t.strip() for raw in handler.get_query_arguments("tags") for t in raw.split(",")
            if t.strip()]


class RangeNotSatisfiable(Exception):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte, inclusive, of a single `Range: bytes=` header; None without one.
    Raises RangeNotSatisfiable for ranges we cannot serve (malformed, several, or outside
    the file)."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if not match or (not match[1] and not match[2]):
        raise RangeNotSatisfiable(f"unsupported Range {header!r}: use one 'bytes=FIRST-LAST'")
    if not match[1]:  # suffix: the last N bytes
        length = int(match[2])
        if length == 0 or size == 0:
            raise RangeNotSatisfiable("empty suffix range")
        return max(0, size - length), size - 1
    first = int(match[1])
    last = int(match[2]) if match[2] else size - 1
    if first >= size or last < first:
        raise RangeNotSatisfiable(f"range {first}-{last} is outside the file of {size} bytes")
    return first, min(last, size - 1)


class ImageRoute(NanoHandler):
    """Base of the image routes; `kind` says media or disk, `menu` the tag to change."""

    kind: ImageKind = MEDIA

    @property
    def caller(self) -> SessionInfo:
        assert self.session is not None  # prepare() refuses requests without a session
        return self.session

    @property
    def files(self) -> ImageFiles:
        return shared(self).files


# -- searches and metadata -----------------------------------------------------------------


class ImageSearchHandler(ImageRoute):
    @contract(data="image_list", query=("tags",))
    def get(self) -> None:
        self.reply(self.store.list_images(self.kind, self.caller, query_tags(self)))


class ImagesHandler(ImageRoute):
    creates = True

    @contract(data="image_list", query=("tags",))
    def get(self) -> None:
        self.reply(self.store.list_images(self.kind, self.caller, query_tags(self)))

    @contract(data="created_id", body="image_create")
    def post(self) -> None:
        spec = self.body()
        if spec.get("guest"):
            self.store.check_clone_source(spec["guest"], self.caller)
        image_id = self.store.create_image(self.kind, spec, self.caller)
        if spec.get("guest"):
            # cloned from a stopped guest's system disk by the reconciler: 202 + progress
            self.ctx.enqueue(Key("image", image_id))
            self.audit(f"cloning {self.kind.label} {spec['name']} ({image_id}) from guest "
                       f"{spec['guest']}")
            self.reply({"id": image_id}, status=202)
            return
        self.audit(f"created {self.kind.label} {spec['name']} ({image_id})")
        self.reply({"id": image_id})

    @contract(data="image_sync_result", body="image_sync")
    async def patch(self) -> None:
        spec = self.body()
        state = shared(self)
        result = await self.stored(
            lambda: self.store.sync_images(
                self.kind, self.caller, state.files, owner=spec.get("owner"),
                group=spec.get("group"), busy=set(state.uploading), busy_temp=set(state.temps),
            )
        )
        for item in result["imported"]:
            self.ctx.enqueue(Key("image", item["id"]))
        for item in result["removed"]:
            self.ctx.enqueue(Key("image", item["id"]))
        self.audit(
            f"synchronized {self.kind.label}s: imported {len(result['imported'])}, skipped "
            f"{len(result['skipped'])}, removed {len(result['removed'])}"
        )
        self.reply(result)


class ImageHandler(ImageRoute):
    resource = Resource("image")

    @contract(data="image_info")
    def get(self, image_id: str) -> None:
        data = self.store.image(self.kind, image_id, self.caller)
        # Contract: a disk image answers 202 while work on its first file is under way (a
        # clone from a guest still to be made, or an upload being received), 200
        # otherwise: an empty image nobody works on is 200 with created false.
        working = self.kind is DISK and not data["created"] and (
            self.store.clone_job(image_id) is not None or image_id in shared(self).uploading)
        self.reply(data, status=202 if working else 200)

    @contract(data="nothing", body="image_modify")
    def put(self, image_id: str) -> None:
        name = self.store.modify_image(self.kind, image_id, self.body(),
                                       self.caller)
        self.audit(f"modified {self.kind.label} {name} ({image_id})")
        self.reply()

    @contract(data="nothing", body="no_fields")
    async def delete(self, image_id: str) -> None:
        self.body()  # an empty or JSON body; nothing in it is used
        name = await self.stored_write(self.store.delete_image, self.kind, image_id,
                                       self.caller, self.files)
        self.ctx.enqueue(Key("image", image_id))
        self.audit(f"deleted {self.kind.label} {name} ({image_id})")
        self.reply()


# -- files --------------------------------------------------------------------------------


class ImageFileHandler(ImageRoute):
    """GET/HEAD download and POST upload of an image's file."""

    def initialize(self, ctx: AppContext, route: str = "unmatched") -> None:
        super().initialize(ctx, route)
        self._upload: UploadFile | None = None
        self._parser: MultipartParser | None = None
        self._target: dict[str, Any] = {}
        self._field: str | None = None
        self._seen_file = False
        self._checksum: bytearray | None = None
        self._blocks: list[bytes | memoryview] = []
        self._blocked = 0
        self._lanes: FileLanes | None = None
        self._discarded: asyncio.Future[Any] | None = None  # an abandoned temp file's removal
        self._failure: NanoError | None = None
        self._receiving = False
        self._received = 0
        self._file_bytes = 0
        self._expected = 0
        self._claimed: int | None = None
        self._slot: int | None = None  # the receive buffer being filled (claimed bodies)
        self._run: tuple[object, int, int] = (None, 0, -1)  # last file piece: chunk, start, end
        self._progress = (0, 0.0)
        self._room: ImageRoom | None = None  # the group's image storage quota, if any

    # -- upload -----------------------------------------------------------------------

    def body_limit(self) -> int:
        """The one route with large bodies: an upload (POST) may carry the file and the
        multipart around it; every other method takes JSON as any route."""
        if self.request.method == "POST":
            return max_upload_bytes(self) + MULTIPART_SLACK
        return super().body_limit()

    def body_too_large(self) -> str:
        if self.request.method != "POST":
            return super().body_too_large()
        return (f"the file is too large: images may have at most {max_upload_bytes(self)} "
                "bytes (settings images.max_upload_bytes); nothing was stored")

    async def prepare(self) -> None:
        await super().prepare()  # a body announced over body_limit() is refused there
        if self.request.method != "POST":
            return
        limit = max_upload_bytes(self)
        try:
            boundary = parse_boundary(self.request.headers.get("Content-Type", ""))
        except MultipartError as exc:
            raise Invalid(str(exc)) from None
        image_id = self.path_args[0]
        state = shared(self)
        await self.stored(self.store.image, self.kind, image_id, self.caller)  # or NotFound
        if image_id in state.uploading:
            raise Busy(f"an upload of {self.kind.label} {image_id} is already running: wait "
                       "for it to finish")
        # the group's image storage quota (state/quotas.py): a body announced larger
        # than the room plus the multipart around a file is refused before a byte is read;
        # the file's bytes are counted against it as they arrive, and the commit checks
        # again (in its transaction)
        self._room = await self.stored(self.store.image_room, image_id)
        length = self.request.headers.get("Content-Length", "")
        if self._room is not None and length.isdigit() and \
                int(length) > self._room.room + MULTIPART_SLACK:
            raise self._room.refusal(int(length) - MULTIPART_SLACK, self.kind.label)
        target = await self.stored(self.store.begin_upload, self.kind, image_id, self.caller)
        self._tune_connection()
        self.http_connection.set_max_body_size(limit + MULTIPART_SLACK)
        length = self.request.headers.get("Content-Length", "")
        self._expected = int(length) if length.isdigit() else 0
        self._parser = MultipartParser(boundary)
        self._target = target
        try:
            self._upload = UploadFile(state.files, self.kind, target["id"])
        except OSError as exc:
            await self.stored(self.store.abort_upload, target["id"])
            raise Internal(f"cannot receive the upload: {exc.strerror}") from exc
        self._lanes = FileLanes(self._upload)
        state.uploading.add(target["id"])
        state.temps.add(self._upload.path)
        self._receiving = True
        self._claim_body()

    def _claim_body(self) -> None:
        """A body with a Content-Length (curl -F, browsers, the portal) is read by `post`
        itself, straight from the connection into two alternating buffers
        (IOStream.read_into): no copy into Tornado's buffer, none into bytes objects, and
        one trip through the loop per socket read rather than per 1 MiB piece. Tornado is
        told the body is empty, so it reads none of it (it still answers an `Expect:
        100-continue`), and after our response it reads the next request on the
        connection exactly where the body ended: every byte goes through the same
        IOStream, in order. A chunked body comes through `data_received` instead."""
        headers = self.request.headers
        length = headers.get("Content-Length", "")
        if "Transfer-Encoding" in headers or not length.isdigit():
            return
        self._claimed = int(length)
        headers["Content-Length"] = "0"

    def _tune_connection(self) -> None:
        """Read this upload in RECEIVE_CHUNK pieces rather than Tornado's 64 KiB: sixteen
        times fewer trips through the loop for the same bytes. Only this connection's
        parameters change (a copy), not the server's."""
        conn = self.http_connection
        if conn.params.chunk_size < RECEIVE_CHUNK:
            conn.params = copy.copy(conn.params)
            conn.params.chunk_size = RECEIVE_CHUNK
        if conn.stream is not None:
            conn.stream.read_chunk_size = max(conn.stream.read_chunk_size, RECEIVE_CHUNK)

    async def data_received(self, chunk: bytes) -> None:  # type: ignore[override]
        if self._parser is None:
            return super().data_received(chunk)
        await self._consume(chunk, 0, len(chunk))
        return None

    async def _read_claimed_body(self, length: int) -> bool:
        """Read the `length` bytes of a claimed body (`_claim_body`) and consume them as
        they arrive. A ring of buffers is filled in turn, each by as many reads as the
        socket gives, each read parsed in place; when a buffer is full, what it holds of
        the file goes to the lanes (`FileLanes`) and reading goes on in the next one,
        once the lanes no longer read it.

        The buffers are page aligned (anonymous mmaps), and while the file arrives each
        buffer is filled from an offset that puts every file byte at an address that is,
        modulo ALIGN, its offset in the file: the temp file's O_DIRECT writes then take
        the bytes from here, without copying them (`state.images.UploadFile`).

        A refused upload reads (and drops) the rest of the body, so the answer comes after
        it and the connection stays usable. Returns False when the client went away or sent
        nothing for `upload_idle_seconds` (the connection is closed then)."""
        stream = self.http_connection.stream
        idle = timedelta(seconds=upload_idle_seconds(self))
        size = min(RECEIVE_BUFFER, length)
        ring = [mmap.mmap(-1, size + ALIGN) for _ in range(RECEIVE_BUFFERS if length > size else 1)]
        turn, begin, filled, left = 0, 0, 0, length
        try:
            while left:
                buf = ring[turn]
                if filled == 0:
                    if self._lanes is not None:
                        try:
                            await self._lanes.wait(slot=turn)
                        except OSError as exc:  # writing the temp file failed (a full disk)
                            self._refuse(Internal(f"cannot store the uploaded file: {exc.strerror}"))
                    begin = self._next_file_offset() % ALIGN
                self._slot = turn
                room = min(size - filled, left)
                at = begin + filled
                window = memoryview(buf)[at:at + room]  # read_into takes any writable buffer
                reading = stream.read_into(cast(bytearray, window), partial=True)
                try:
                    got = await gen.with_timeout(idle, reading, quiet_exceptions=StreamClosedError)
                except StreamClosedError:
                    return False
                except gen.TimeoutError:
                    stream.close()
                    return False
                await self._consume(buf, at, at + got, held_in_place=filled > 0)
                filled, left = filled + got, left - got
                # The file began in this buffer, at an address that does not line up: go on
                # in the next buffer, placed so that it does.
                misplaced = self._next_file_offset() % ALIGN != (begin + filled) % ALIGN
                if filled == size or (misplaced and self._field == "image"):
                    if self._receiving and self._failure is None:
                        await self._flush_file_block()
                    turn, filled = (turn + 1) % len(ring), 0
        except Exception:
            # A fault of ours with the rest of the body unread: the connection must not
            # read that rest as a request. (Errors of the upload itself are refusals, and
            # the body is read to its end.)
            stream.close()
            raise
        return True

    def _next_file_offset(self) -> int:
        """Where in the file the next body byte goes, if it is file content: the file
        bytes given out so far plus those the parser holds back (a possible delimiter
        start, content unless a delimiter follows). 0 outside the file's part."""
        if self._field != "image" or self._parser is None:
            return 0
        return self._file_bytes + self._parser.withheld

    async def _consume(self, data: bytes | mmap.mmap, start: int, end: int, *,
                       held_in_place: bool = False) -> None:
        """Parse body bytes `data[start:end]`; the file's bytes go on to the temp file and
        the hash. Errors refuse the upload (`_refuse`), the rest of the body is dropped."""
        if self._failure is not None or not self._receiving:
            return  # a refused upload: the rest of the body is read and dropped
        assert self._parser is not None
        self._received += end - start
        try:
            for event in self._parser.feed(data, start, end, held_in_place=held_in_place):
                if not self._receiving:
                    break
                if isinstance(event, PartData):
                    await self._part_data(event.data, data, event.at)
                elif isinstance(event, PartStart):
                    self._part_start(event)
                elif isinstance(event, PartEnd):
                    self._field = None
        except MultipartError as exc:
            self._refuse(Invalid(f"malformed multipart body: {exc}"))
        except NanoError as exc:
            self._refuse(exc)
        except OSError as exc:  # writing the temp file failed (a full disk)
            self._refuse(Internal(f"cannot store the uploaded file: {exc.strerror}"))
        self._report_progress()

    def _part_start(self, part: PartStart) -> None:
        if part.name == "image":
            if self._seen_file:
                raise Invalid("the multipart body carries two 'image' fields: send one file")
            self._seen_file = True
        elif part.name == "checksum":
            self._checksum = bytearray()
        else:
            raise Invalid(f"unexpected multipart field {part.name!r}: send the file in the "
                          "field 'image' (and optionally its SHA-1 hex in 'checksum')")
        self._field = part.name

    async def _part_data(self, data: bytes | memoryview, chunk: object, at: int) -> None:
        """File or checksum bytes `data`: `chunk[at:]` when `at` >= 0 (see PartData)."""
        if self._field == "checksum":
            assert self._checksum is not None
            self._checksum += data
            if len(self._checksum) > 256:
                raise Invalid("the 'checksum' field must be a SHA-1 in hex (40 characters)")
            return
        self._file_bytes += len(data)
        if self._room is not None and self._file_bytes > self._room.room:
            raise self._room.refusal(self._file_bytes, self.kind.label)  # the rest is dropped
        if self._file_bytes > max_upload_bytes(self):
            if self._claimed is not None:
                # the rest of a claimed body is short (MULTIPART_SLACK): read it, answer
                raise Invalid(self.body_too_large())
            # A chunked body may go on for ever: answer now; the connection closes.
            self._abandon()
            self.refuse_body()
            return
        if self._blocks and at >= 0 and self._run[0] is chunk and self._run[2] == at:
            # right after the previous piece in the same buffer: one view for both, so
            # the file is written in big pieces
            start = self._run[1]
            self._blocks[-1] = memoryview(cast(mmap.mmap, chunk))[start:at + len(data)]
        else:
            self._blocks.append(data)
            start = at
        self._run = (chunk, start, at + len(data)) if at >= 0 else (None, 0, -1)
        self._blocked += len(data)
        if self._slot is None and self._blocked >= WRITE_BLOCK:  # chunked (see _flush_...)
            await self._flush_file_block()

    async def _flush_file_block(self) -> None:
        """Hand the gathered file bytes to the lanes, tagged with the receive buffer they
        live in: a claimed body's once per buffer, a chunked body's every WRITE_BLOCK.
        Those are Tornado's own bytes; for them the lanes are only waited for when
        IN_FLIGHT blocks are pending, which bounds the memory."""
        if not self._blocked or self._lanes is None:
            return
        block, self._blocks, self._blocked = self._blocks, [], 0
        self._lanes.submit(block, self._slot)
        if self._slot is None:
            await self._lanes.wait(keep=IN_FLIGHT)

    def _report_progress(self) -> None:
        """Progress in the store at most once per percent and per PROGRESS_SECONDS."""
        if not self._expected or not self._receiving:
            return
        percent = min(99, self._received * 100 // self._expected)
        last_percent, last_time = self._progress
        moment = time.monotonic()
        if percent > last_percent and moment - last_time >= PROGRESS_SECONDS:
            self._progress = (percent, moment)
            self.in_background(self.store.record_upload_progress, self._target["id"], percent)

    def _refuse(self, error: NanoError) -> None:
        """An error in the middle of the body: drop what was received, read the rest of
        the body without keeping it, and answer `error` once it has arrived."""
        self._failure = error
        self._abandon()

    def _abandon(self) -> None:
        """Forget the upload: temp file removed (after a write in flight), progress reset,
        the image free for the next upload. The image's current file is untouched."""
        if not self._receiving:
            return
        self._receiving = False
        upload, lanes = self._upload, self._lanes
        self._blocks, self._blocked, self._lanes = [], 0, None
        state = shared(self)
        if upload is not None:
            state.temps.discard(upload.path)
            if lanes is not None:  # the temp file goes once the lanes are done with it
                self._discarded = lanes.close(then=upload.discard)
            else:
                upload.discard()
        # the image may be gone by then: the upload is forgotten either way
        self.in_background(self.store.abort_upload, self._target["id"], quiet=True)
        # The image is free for the next upload once its reset has landed: a reader then
        # sees the reset, and a late reset cannot undo the next upload's start.
        assert self._background is not None
        loop, image_id = IOLoop.current(), self._target.get("id", "")
        self._background.add_done_callback(
            lambda _f: loop.add_callback(state.uploading.discard, image_id))

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self._abandon()  # the client went away half way: nothing of it is kept

    def on_finish(self) -> None:
        self._abandon()
        super().on_finish()

    @contract(data="upload_result", body=UPLOAD)
    async def post(self, image_id: str) -> None:
        try:
            await self._receive(image_id)
        except BaseException:
            self._abandon()  # refused before the commit (a malformed checksum, say)
            raise
        finally:
            # a failed upload is reset, and its temp file gone, before the answer
            await self.background_settled()
            if self._discarded is not None:
                await self._discarded

    async def _receive(self, image_id: str) -> None:
        if self._claimed is not None and not await self._read_claimed_body(self._claimed):
            return  # the client went away; on_connection_close abandoned the upload
        if self._finished:  # answered while the body was arriving (too large)
            return
        if self._failure is not None:
            raise self._failure
        if not self._receiving or self._parser is None or self._upload is None:
            raise Invalid("the upload was abandoned")
        try:
            self._parser.close()
        except MultipartError as exc:
            raise Invalid(f"malformed multipart body: {exc}") from None
        if not self._seen_file:
            raise Invalid("no file in the body: send it in the multipart field 'image'")
        checksum = None
        if self._checksum is not None:
            checksum = self._checksum.decode("ascii", "replace").strip().lower()
            if not _SHA1.match(checksum):
                raise Invalid(f"checksum {checksum[:64]!r} is not a SHA-1 in hex (40 characters)")
        upload, lanes = self._upload, self._lanes
        assert lanes is not None
        try:
            await self._flush_file_block()
            await lanes.wait()
        except OSError as exc:
            raise Internal(f"cannot store the uploaded file: {exc.strerror}") from exc
        # The whole body is here: from now on a disconnect no longer abandons the upload
        # (the pool is working on the file); this method cleans up on failure itself.
        self._receiving = False
        lanes.close()
        self._lanes = None
        # the store lane has several threads: a progress write still in flight must land
        # before the commit, or it would take the finished image back below 100
        await self.background_settled()
        try:
            sha1 = await self.blocking(upload.finish, checksum)
            version = await self.stored(self.store.commit_upload, self.kind,
                                        self._target["id"], self._target["version"], upload,
                                        sha1, self.files)
        except BaseException as exc:
            self._receiving = True
            self._abandon()
            if isinstance(exc, OSError):
                raise Internal(f"cannot store the uploaded file: {exc.strerror}") from exc
            raise
        state = shared(self)
        state.uploading.discard(self._target["id"])
        state.temps.discard(upload.path)
        self.ctx.enqueue(Key("image", self._target["id"]))
        self.ctx.metrics.transferred("upload", upload.size)
        self.audit(f"uploaded version {version} of {self.kind.label} {self._target['name']} "
                   f"({upload.size} bytes, SHA-1 {sha1})")
        self.reply({"version": version, "size": upload.size, "checksum": sha1})
        # the previous version goes after the answer (a download may still read it)
        self.ctx.executor.submit(self.files.remove, self.kind, self._target["id"],
                                 except_version=version)

    # -- download ---------------------------------------------------------------------

    @contract(data=DOWNLOAD)
    async def get(self, image_id: str) -> None:
        await self._download(image_id, send_body=True)

    async def head(self, image_id: str) -> None:
        await self._download(image_id, send_body=False)

    async def _download(self, image_id: str, *, send_body: bool) -> None:
        fd, info = await self._open(image_id)
        try:
            size = os.fstat(fd).st_size
            try:
                wanted = parse_range(self.request.headers.get("Range"), size)
            except RangeNotSatisfiable as exc:
                self._unsatisfiable(size, str(exc))
                return
            first, last = wanted if wanted else (0, size - 1)
            length = max(0, last - first + 1)
            if wanted:
                self.set_status(206)
                self.set_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.set_header("Content-Type", "application/octet-stream")
            self.set_header("Content-Length", str(length))
            self.set_header("Accept-Ranges", "bytes")
            self.set_header("Signature", info["checksum"])
            self.set_header("ETag", f'"{info["checksum"]}"')
            self.set_header("Content-Disposition",
                            f'attachment; filename="{info["name"]}.{self.kind.ext}"')
            if not send_body or length == 0:
                self.finish()
                return
            await self._send(fd, first, length)
        finally:
            os.close(fd)

    async def _open(self, image_id: str) -> tuple[int, dict[str, Any]]:
        # A new version may land between reading the row and opening its file: look again.
        for _ in range(3):
            info = await self.stored(self.store.image_file, self.kind, image_id, self.caller)
            path = self.files.path(self.kind, image_id, info["version"])
            try:
                return await self.blocking(_open_read, path), info
            except FileNotFoundError:
                continue
        raise NotFound(f"the file of {self.kind.label} {info['name']!r} is missing from the "
                       "image store: upload it again (a sync removes such images)")

    async def _send(self, fd: int, offset: int, length: int) -> None:
        """Send `length` bytes from `offset`. SEND_BLOCK pieces are read in the pool into a
        ring of SEND_BUFFERS buffers, up to all but one ahead of the piece going out, and
        handed to the connection as views: no new bytes object per piece (fresh memory
        was slow to touch here: a download reading into new objects took twice as long),
        and the disk and the socket stay busy. Returns with no read in flight (the caller
        closes `fd`).

        The reads go through the page cache: O_DIRECT reads (as uploads write) were
        slower here, about 1 s per GiB whether the file was cached or not, where a cached
        file is sent in 0.25 s and an uncached one in 0.5 to 1.3 s."""
        loop = IOLoop.current()
        end = offset + length
        blocks = -(-length // SEND_BLOCK)
        ring = [mmap.mmap(-1, SEND_BLOCK) for _ in range(min(SEND_BUFFERS, blocks))]
        reads: deque[tuple[mmap.mmap, int, asyncio.Future[int]]] = deque()
        ahead = offset  # where the next read starts

        def read_into(buf: mmap.mmap) -> None:
            nonlocal ahead
            count = min(SEND_BLOCK, end - ahead)
            reads.append((buf, count, loop.run_in_executor(self.ctx.executor, _read_block, fd,
                                                           buf, ahead, count)))
            ahead += count

        self.flush()  # the headers
        for buf in ring[:max(1, len(ring) - 1)]:
            read_into(buf)
        spare = ring[len(reads):]
        try:
            while reads:
                buf, count, reading = reads.popleft()
                got = await reading
                if got < count:  # the file shrank under us: cut the response short
                    self.http_connection.stream.close()
                    return
                if ahead < end and spare:
                    read_into(spare.pop())
                # one write at a time: the connection resolves only its latest write
                # (a view is fine: the IOStream sends it without a copy)
                await self.http_connection.write(cast(bytes, memoryview(buf)[:got]))
                self.ctx.metrics.transferred("download", got)
                if ahead < end:
                    read_into(buf)
        except StreamClosedError:  # the client went away
            return
        finally:
            for _, _, reading in reads:  # the reads in flight end before fd is closed
                await asyncio.wait([reading])
        self.finish()

    def _unsatisfiable(self, size: int, message: str) -> None:
        self.set_header("Content-Range", f"bytes */{size}")
        self.send_envelope(400, message, None, status=416)


def _open_read(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _read_block(fd: int, buf: mmap.mmap, offset: int, count: int) -> int:
    """Read `count` bytes at `offset` into the start of `buf`; returns how many came."""
    with memoryview(buf) as view:
        return os.preadv(fd, [view[:count]], offset)


# -- per kind ---------------------------------------------------------------------------


class MediaSearchHandler(ImageSearchHandler):
    kind = MEDIA


class MediaImagesHandler(ImagesHandler):
    kind, menu = MEDIA, MEDIA.menu


class MediaImageHandler(ImageHandler):
    kind, menu = MEDIA, MEDIA.menu


class MediaFileHandler(ImageFileHandler):
    kind, menu = MEDIA, MEDIA.menu
    # the seed's path is /media_image_files/{id}; /media_images/{id}/file is ours
    contracts = {
        "GET": Contract(data=DOWNLOAD, extension=(r"/media_images/([^/]+)/file",)),
        "POST": Contract(data="upload_result", body=UPLOAD,
                         extension=(r"/media_images/([^/]+)/file",)),
    }


class DiskSearchHandler(ImageSearchHandler):
    kind = DISK


class DiskImagesHandler(ImagesHandler):
    kind, menu = DISK, DISK.menu
    contracts = {
        "GET": Contract(data="image_list", query=("tags",), extension=True),
        "POST": Contract(data="created_id", body="disk_image_create"),  # may name a guest
    }


class DiskImageHandler(ImageHandler):
    kind, menu = DISK, DISK.menu


class DiskFileHandler(ImageFileHandler):
    kind, menu = DISK, DISK.menu
    # the seed has POST /disk_image_files/{id} only
    contracts = {
        "GET": Contract(data=DOWNLOAD, extension=True),
        "POST": Contract(data="upload_result", body=UPLOAD,
                         extension=(r"/disk_images/([^/]+)/file",)),
    }


ROUTES = [
    (r"/media_image_search", MediaSearchHandler),
    (r"/media_images", MediaImagesHandler),
    (r"/media_images/([^/]+)", MediaImageHandler),
    (r"/media_images/([^/]+)/file", MediaFileHandler),
    (r"/media_image_files/([^/]+)", MediaFileHandler),
    (r"/disk_image_search", DiskSearchHandler),
    (r"/disk_images", DiskImagesHandler),
    (r"/disk_images/([^/]+)", DiskImageHandler),
    (r"/disk_images/([^/]+)/file", DiskFileHandler),
    (r"/disk_image_files/([^/]+)", DiskFileHandler),
]
