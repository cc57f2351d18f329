"""Media (ISO) and disk (qcow2) images: metadata in the store, files on the management node.

Called by the image routes (`api/images.py`), by nanod/server.py at start
(`recover_uploads`), by the image reconciler (reconciler/images.py, clones from guests) and
through state/replicas.py by the guest reconciler, which sends the current version of an
image to cells (`reconciler/drivers/volumes.py`).

Files (`ImageFiles`): under the images directory (setting `image_dir`, DATA_DIR/images by
default; one directory, NFS in production, shared by the replicas of a store):

    media/<id>.<version>.iso             the current file of a media image
    disk/<id>.<version>.qcow2            the current file of a disk image
    tmp/<replica>/<id>.<random>.part     uploads being received by one replica (same
                                         filesystem: the finished file is moved into
                                         place with os.replace)

and under each nanod's own data directory:

    import/media/*.iso                   dropped here by an operator, imported by
    import/disk/*.qcow2                  PATCH /media_images/ and PATCH /disk_images/

A file is never named after anything a client sent: only our ids and versions. A version
is installed complete or not at all, so a failed or interrupted upload leaves the previous
version as it was; each completed upload bumps `Image.version` and removes the previous
file (a download in progress keeps reading it through its open descriptor).

Visibility (COMPATIBILITY.md): a caller sees an image it owns, or one of its own group when
the group's `media_image_visible`/`disk_image_visible` flag is on; every image function
takes the caller's `SessionInfo` and answers "not found" for images it may not see.
Names are unique per kind within a group.

Several replicas share the image directory. Concurrent uploads to one image are refused
(the API's in-process guard; across replicas `Image.uploader`, set by `begin_upload` and
cleared by the commit or the abort), and the version bump is conditional (`WHERE version
= base`), so metadata never describes a file that another upload replaced. A replica
starting up (`recover_uploads`) settles only its own uploads and those of replicas that
are gone, removes only their temp directories, and leaves young files alone while
another replica is live.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import re
import stat
import tempfile
import time
import uuid
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import peewee

from state.db import db
from state.errors import Busy, Conflict, Invalid, NotFound
from state.identity import NAME_RULE, SessionInfo, check_name, format_time
from state.models import Guest, Image, User, UserGroup, now
from state.quotas import Usage

log = logging.getLogger(__name__)

HASH_CHUNK = 1 << 20
MAX_TAGS = 32
MAX_TAG_LENGTH = 64
MAX_DESCRIPTION = 4096
STALE_SECONDS = 3600.0
"""Temp files and unreferenced files older than this are removed by a sync: younger ones
may belong to an upload that is finishing right now."""

_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_STORED = re.compile(r"^(?P<id>[0-9a-f-]{36})\.(?P<version>\d+)\.(?P<ext>iso|qcow2)$")
_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ImageKind:
    """What differs between media and disk images."""

    name: str  # "media" | "disk"
    label: str  # for messages
    ext: str  # file extension in the store and in the import directory
    flag: str  # the group visibility flag
    menu: str  # the menu tag needed to change images of this kind

    def sniff(self, head: bytes) -> str | None:
        """Why a file starting with `head` (at least `HEAD_BYTES`) is not of this kind."""
        if self.name == "disk":
            if head[:4] != b"QFI\xfb":
                return "not a qcow2 file (its first bytes are not the qcow2 magic 'QFI\\xfb')"
            return None
        if head[32769:32774] != b"CD001":
            return "not an ISO 9660 image (no 'CD001' volume descriptor at offset 32769)"
        return None


HEAD_BYTES = 32774
MEDIA = ImageKind("media", "media image", "iso", "media_image_visible", "media")
DISK = ImageKind("disk", "disk image", "qcow2", "disk_image_visible", "image")
KINDS = {k.name: k for k in (MEDIA, DISK)}


def image_status(row: Image) -> dict[str, Any]:
    """The API's ImageStatus (+ the `checksum` extension) of one image row."""
    return {
        "id": row.id,
        "name": row.name,
        "owner": row.owner,
        "group": row.group,
        "description": row.description,
        "tags": list(row.tags or []),
        "created": row.version > 0,
        "progress": row.progress,
        "create_time": format_time(row.created_at),
        "modify_time": format_time(row.modified_at),
        "size": row.size,
        "checksum": row.checksum,
        **({"error": row.last_error} if row.last_error else {}),
    }


def check_tags(tags: list[str]) -> list[str]:
    out: list[str] = []
    for tag in tags:
        tag = tag.strip()
        if not tag or len(tag) > MAX_TAG_LENGTH or "," in tag or "\x00" in tag:
            raise Invalid(
                f"invalid tag {tag!r}: tags are 1-{MAX_TAG_LENGTH} characters without commas"
            )
        if tag not in out:
            out.append(tag)
    if len(out) > MAX_TAGS:
        raise Invalid(f"too many tags: at most {MAX_TAGS}")
    return out


def import_name(filename: str, ext: str) -> str | None:
    """The image name for an imported file: its stem with odd characters replaced by '_'
    (spaces, non-ASCII, anything a name may not hold); None if nothing usable is left."""
    stem = filename[: -len(ext) - 1]
    name = _NAME_BAD.sub("_", stem).strip("._-")[:64].strip("._-")
    return name if NAME_RULE.match(name or "") else None


# -- files --------------------------------------------------------------------------------


def sha1_of(fd: int) -> str:
    """SHA-1 hex of an open file from its start (blocking: call from a worker thread)."""
    digest = hashlib.sha1()
    offset = 0
    while True:
        block = os.pread(fd, HASH_CHUNK, offset)
        if not block:
            return digest.hexdigest()
        digest.update(block)
        offset += len(block)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for `fd`; False when the filesystem does not allow it."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError:
        return False
    return True


def _address(view: memoryview) -> int:
    """Where `view`'s bytes are in memory; -1 for read-only memory (bytes), which is
    never taken as aligned."""
    if view.readonly:
        return -1
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class ImageFiles:
    """The image directories (see the module docstring): the images root `root` (setting
    `image_dir`, one directory shared by the replicas of a store), the import directories
    under `imports` (DATA_DIR/import, each nanod's own), and this replica's temp directory
    tmp/<replica>/ (tmp/ itself for a nanod without a replica id)."""

    def __init__(self, root: str, *, imports: str, replica: str = "") -> None:
        self.root = os.path.abspath(root)
        self.temp_root = os.path.join(self.root, "tmp")
        self.tmp = os.path.join(self.temp_root, replica) if replica else self.temp_root
        self.imports = os.path.abspath(imports)

    def kind_dir(self, kind: ImageKind) -> str:
        return os.path.join(self.root, kind.name)

    def import_dir(self, kind: ImageKind) -> str:
        return os.path.join(self.imports, kind.name)

    def ensure(self) -> None:
        for path in (self.tmp, self.kind_dir(MEDIA), self.kind_dir(DISK),
                     self.import_dir(MEDIA), self.import_dir(DISK)):
            os.makedirs(path, mode=0o750, exist_ok=True)

    def path(self, kind: ImageKind, image_id: str, version: int) -> str:
        if not _ID.match(image_id) or version < 1:
            raise ValueError(f"not an image id/version: {image_id!r} {version}")
        return os.path.join(self.kind_dir(kind), f"{image_id}.{version}.{kind.ext}")

    def temp(self, image_id: str) -> tuple[int, str]:
        """A new private temp file for an upload: (fd, path). Opened O_EXCL by mkstemp."""
        self.ensure()
        try:
            return tempfile.mkstemp(prefix=f"{image_id}.", suffix=".part", dir=self.tmp)
        except FileNotFoundError:  # removed by another replica that took this one for gone
            os.makedirs(self.tmp, mode=0o750, exist_ok=True)
            return tempfile.mkstemp(prefix=f"{image_id}.", suffix=".part", dir=self.tmp)

    def install(self, kind: ImageKind, image_id: str, version: int, temp_path: str) -> str:
        """Move a complete, synced temp file into place atomically; returns its path."""
        final = self.path(kind, image_id, version)
        os.replace(temp_path, final)
        _fsync_dir(self.kind_dir(kind))
        return final

    def remove(self, kind: ImageKind, image_id: str, *, except_version: int = 0) -> None:
        """Remove the files of an image (all versions but `except_version`)."""
        try:
            names = os.listdir(self.kind_dir(kind))
        except FileNotFoundError:
            return
        for name in names:
            match = _STORED.match(name)
            if match and match["id"] == image_id and int(match["version"]) != except_version:
                _unlink(os.path.join(self.kind_dir(kind), name))

    def cleanup(self, kind: ImageKind, current: dict[str, int],
                keep_temp: Collection[str] = (), *,
                older_than: float = STALE_SECONDS) -> list[str]:
        """Remove leftovers of crashes: temp files (this replica's and every other's) and
        files of no current version. Only files older than `older_than` seconds go, so
        that an upload finishing now, here or on another replica, is safe (its temp file
        is written to at least every upload_idle_seconds, and a new version is moved
        into place moments before its transaction commits)."""
        return (self.clear_temp(keep_temp, older_than=older_than)
                + self.clear_versions(kind, current, older_than=older_than))

    def clear_temp(self, keep: Collection[str] = (), *, older_than: float = STALE_SECONDS,
                   spare: Collection[str] = (), drop_dirs: bool = False) -> list[str]:
        """Remove the temp files (`*.part`) under tmp/, loose ones and those in the
        directories of replicas not in `spare`, that are older than `older_than` seconds
        and not in `keep`; with `drop_dirs` (replicas known gone) their emptied
        directories go too. Returns the names removed."""
        removed: list[str] = []
        cutoff = time.time() - older_than
        folders = [self.temp_root]
        for name, folder in self.temp_dirs().items():
            if name not in spare:
                folders.append(folder)
        for folder in folders:
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.name.endswith(".part") and entry.path not in keep and \
                        _stale_file(entry.path, cutoff):
                    _unlink(entry.path)
                    removed.append(entry.name)
            if drop_dirs and folder not in (self.temp_root, self.tmp):
                with contextlib.suppress(OSError):  # not empty: still in use, or odd files
                    os.rmdir(folder)
        return removed

    def temp_dirs(self) -> dict[str, str]:
        """The temp directories of replicas under tmp/: replica id -> path."""
        try:
            return {e.name: e.path for e in os.scandir(self.temp_root)
                    if e.is_dir(follow_symlinks=False)}
        except FileNotFoundError:
            return {}

    def clear_versions(self, kind: ImageKind, current: dict[str, int], *,
                       older_than: float = STALE_SECONDS) -> list[str]:
        """Remove the files of `kind` that are not an image's current version (`current`:
        id -> version) and are older than `older_than` seconds. Returns the names removed."""
        removed: list[str] = []
        cutoff = time.time() - older_than
        try:
            entries = list(os.scandir(self.kind_dir(kind)))
        except FileNotFoundError:
            return removed
        for entry in entries:
            match = _STORED.match(entry.name)
            if not match or match["ext"] != kind.ext:
                continue
            if current.get(match["id"]) == int(match["version"]):
                continue
            if _stale_file(entry.path, cutoff):
                _unlink(entry.path)
                removed.append(entry.name)
        return removed


def _stale_file(path: str, cutoff: float) -> bool:
    """A regular file last changed at or before `cutoff` (epoch seconds)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_mtime <= cutoff


class UploadFile:
    """One upload being received into a private temp file.

    `write` (to the file) and `digest` (size, SHA-1, header for the sniff) take the same
    blocks in the same order; each blocks and may run in a worker thread of its own, so
    the hash of one block overlaps the write of the next and nothing is read back.

    Where the filesystem allows it the file is written with O_DIRECT, which wants the
    memory, the file offset and the length aligned (ALIGN). Bytes whose address lines up
    with their place in the file (the API reads uploads into page-aligned buffers placed
    so that they do) go to the disk straight from the caller's memory; the others, and
    the short edges between, are copied into an aligned stage first. The writes run in
    DISK_THREADS threads of the upload's own, at their offsets, so the disk always has
    the next one while a thread that finished waits for the GIL (with one thread, a
    busy interpreter nearly halved the disk's speed here).

    Buffered writes of a big file were slow here and very uneven (the kernel allocating,
    dirtying and writing back a page cache as big as the file: 0.3 to 2.6 s per GiB,
    where direct writes took 0.55 to 0.65 s); with O_DIRECT a big upload no longer
    pushes everything else out of memory, and the final fsync has nothing left to flush.
    Elsewhere (tmpfs, say) writes are buffered, and every WRITEBACK_BYTES the written
    range is handed to the kernel's writeback and dropped from the page cache."""

    WRITEBACK_BYTES = 32 << 20
    STAGE_BYTES = 8 << 20
    ALIGN = 4096
    DISK_THREADS = 2

    def __init__(self, files: ImageFiles, kind: ImageKind, image_id: str) -> None:
        self.kind = kind
        self.fd, self.path = files.temp(image_id)
        self.size = 0
        self.copied = 0  # bytes that went through the stage (direct mode)
        self._written = 0
        self._synced_to = 0
        self._sha1 = hashlib.sha1()
        self._head = bytearray()
        self._stage: mmap.mmap | None = None
        self._staged = 0
        self._offset = 0  # where the next direct write goes
        self._disk: ThreadPoolExecutor | None = None
        self._writes: list[Future[None]] = []  # direct writes not known to be over
        self.direct = _set_direct(self.fd, True)
        """Written with O_DIRECT (see the class docstring)."""
        if self.direct:
            self._stage = mmap.mmap(-1, self.STAGE_BYTES)  # page aligned
            self._disk = ThreadPoolExecutor(self.DISK_THREADS, thread_name_prefix="upload-disk")

    def write(self, pieces: list[bytes | memoryview]) -> list[Future[None]]:
        """Append `pieces` to the file. Direct writes are only started: the futures
        returned end once they are on the disk, and until then the pieces' memory must
        not change. Raises the error of an earlier write that failed."""
        if self._stage is None:
            self._write_buffered(pieces)
            return []
        self._check_writes()
        started = len(self._writes)
        for piece in pieces:
            view = memoryview(piece)
            while view:
                view = self._write_direct(view)
        self._written += sum(len(p) for p in pieces)
        return self._writes[started:]

    def _check_writes(self) -> None:
        """Forget the writes that are over; raise the error of one that failed."""
        over = [w for w in self._writes if w.done()]
        self._writes = [w for w in self._writes if not w.done()]
        for write in over:
            write.result()

    def _write_direct(self, view: memoryview) -> memoryview:
        """Write or stage the start of `view`; returns the rest."""
        assert self._stage is not None
        align, staged = self.ALIGN, self._staged
        if staged % align == 0 and len(view) >= align and _address(view) % align == 0:
            if staged:
                self._write_stage()
            length = len(view) - len(view) % align
            self._start_write(view[:length])
            return view[length:]
        # Stage up to the next aligned length only, so that the rest may go directly.
        room = align - staged % align if staged % align else self.STAGE_BYTES - staged
        n = min(len(view), room)
        self._stage[staged:staged + n] = view[:n]
        self._staged += n
        self.copied += n
        if self._staged == self.STAGE_BYTES:
            self._write_stage()
        return view[n:]

    def _start_write(self, view: memoryview) -> None:
        assert self._disk is not None
        self._writes.append(self._disk.submit(_pwrite_all, self.fd, view, self._offset))
        self._offset += len(view)

    def _write_stage(self) -> None:
        """Start writing the staged bytes (a multiple of ALIGN); a new stage takes over,
        this one is the write's until it is over."""
        assert self._stage is not None
        self._start_write(memoryview(self._stage)[:self._staged])
        self._stage, self._staged = mmap.mmap(-1, self.STAGE_BYTES), 0

    def _write_buffered(self, pieces: list[bytes | memoryview]) -> None:
        """Append `pieces` with one writev (no joining copy)."""
        total = sum(len(p) for p in pieces)
        written = os.writev(self.fd, pieces)
        if written < total:  # short write (rare): finish it piece by piece
            rest = memoryview(b"".join(pieces))[written:]
            while rest:
                rest = rest[os.write(self.fd, rest):]
        self._written += total
        if self._written - self._synced_to >= self.WRITEBACK_BYTES:
            os.posix_fadvise(self.fd, self._synced_to, self._written - self._synced_to,
                             os.POSIX_FADV_DONTNEED)
            self._synced_to = self._written

    def _flush_stage(self) -> None:
        """Finish the direct writes: those in flight, then the stage, its aligned part
        directly and the tail buffered."""
        if self._stage is None:
            return
        staged, stage = self._staged, self._stage
        aligned = staged - staged % self.ALIGN
        if aligned:
            self._staged = aligned
            self._write_stage()
        self._stop_disk()
        self._check_writes()
        _set_direct(self.fd, False)
        _pwrite_all(self.fd, memoryview(stage)[aligned:staged], self._offset)
        self._stage = None

    def _stop_disk(self) -> None:
        """Wait for the direct writes: the fd must outlive them."""
        if self._disk is not None:
            self._disk.shutdown(wait=True)
            self._disk = None

    def digest(self, pieces: list[bytes | memoryview]) -> None:
        """Count and hash `pieces` (the same as given to `write`, in the same order)."""
        for data in pieces:
            self._sha1.update(data)
            if len(self._head) < HEAD_BYTES:
                self._head += data[: HEAD_BYTES - len(self._head)]
            self.size += len(data)

    def finish(self, checksum: str | None) -> str:
        """Sync and close the file and check it; returns its SHA-1. Raises Invalid (and
        leaves the temp file for `discard`) when it is not what it should be."""
        self._flush_stage()
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        if self.size == 0:
            raise Invalid("the uploaded file is empty")
        problem = self.kind.sniff(bytes(self._head))
        if problem:
            raise Invalid(f"the uploaded file is {problem}")
        sha1 = self._sha1.hexdigest()
        if checksum is not None and checksum != sha1:
            raise Invalid(
                f"checksum mismatch: the received file has SHA-1 {sha1}, the 'checksum' field "
                f"says {checksum}; the image keeps its previous file"
            )
        return sha1

    def discard(self) -> None:
        """Forget the upload: close and remove the temp file (safe to call twice)."""
        self._stop_disk()
        self._stage = None
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        _unlink(self.path)


def visible_images(kind: ImageKind, session: SessionInfo) -> peewee.Expression:
    """The images of `kind` `session` may see and change: its own, and its group's when
    the group's flag for the kind is on (administrators included)."""
    cond = Image.owner == session.user
    if session.group and session.visibility.get(kind.flag):
        cond = cond | (Image.group == session.group)
    return (Image.kind == kind.name) & cond


# -- the store mixin -------------------------------------------------------------------------


class ImageStore:
    """Mixin of `state.store.Store`: media and disk images."""

    data_dir: str = ""
    image_dir: str = ""  # "" = DATA_DIR/images
    replica: str = ""  # this nanod's replica id (state/leases.py)

    def _other_live_replicas(self) -> list[str]:
        """The replicas of this store that are live (state/leases.py), but this one."""
        live = self.live_replicas()  # type: ignore[attr-defined]
        return [r for r in live if r != self.replica]

    def image_files(self) -> ImageFiles:
        """This nanod's view of the image files: the images root (setting `image_dir`,
        shared by the replicas), DATA_DIR/import, and this replica's temp directory."""
        return ImageFiles(self.image_dir or os.path.join(self.data_dir, "images"),
                          imports=os.path.join(self.data_dir, "import"), replica=self.replica)

    # -- reading --------------------------------------------------------------------------

    @staticmethod
    def _visible(kind: ImageKind, session: SessionInfo) -> peewee.Expression:
        return visible_images(kind, session)

    def _image(self, kind: ImageKind, image_id: str, session: SessionInfo) -> Image:
        row = None
        if _ID.match(image_id):  # anything else cannot be ours (and may hold a NUL)
            row = Image.get_or_none((Image.id == image_id) & self._visible(kind, session))
        if row is None:
            raise NotFound(f"no {kind.label} with id {image_id!r} that you can see")
        return row

    def list_images(self, kind: ImageKind, session: SessionInfo,
                    tags: Collection[str] = ()) -> list[dict[str, Any]]:
        """The images of `kind` the caller sees, by name; with `tags`, those carrying any
        of them."""
        rows = Image.select().where(self._visible(kind, session)).order_by(Image.name, Image.id)
        wanted = set(tags)
        return [image_status(r) for r in rows if not wanted or wanted & set(r.tags or [])]

    def image(self, kind: ImageKind, image_id: str, session: SessionInfo) -> dict[str, Any]:
        return image_status(self._image(kind, image_id, session))

    def image_file(self, kind: ImageKind, image_id: str, session: SessionInfo) -> dict[str, Any]:
        """What a download needs: name, version, size, checksum; NotFound until uploaded."""
        row = self._image(kind, image_id, session)
        if row.version < 1:
            raise NotFound(f"{kind.label} {row.name!r} has no file yet: upload one first")
        return {"name": row.name, "version": row.version, "size": row.size,
                "checksum": row.checksum}

    # -- owner and group ------------------------------------------------------------------

    def _assign(self, session: SessionInfo, owner: str | None,
                group: str | None) -> tuple[str, str]:
        """Owner and group of a new or moved image. Default: the caller and its group.
        Only administrators (menu tag 'user') may hand images to other users or groups:
        otherwise anyone could take names in another group's namespace."""
        owner = owner or session.user
        group = group or session.group
        check_name("owner", owner)
        if group:
            check_name("group", group)
        admin = session.allows("user")
        if owner != session.user and not admin:
            raise Invalid(f"you may not give an image to {owner!r}: leave 'owner' empty or "
                          "ask an administrator")
        if group != session.group and not admin:
            raise Invalid(f"you may not put an image into group {group!r}: use your own "
                          f"group {session.group!r} or ask an administrator")
        if not User.select().where(User.name == owner).exists():
            raise NotFound(f"no user named {owner!r} to own the image")
        if not group:
            raise Invalid("an image needs a group: the owner belongs to none, give 'group'")
        if not UserGroup.select().where(UserGroup.name == group).exists():
            raise NotFound(f"no user group named {group!r}")
        return owner, group

    @staticmethod
    def _check_unique(kind: ImageKind, group: str, name: str, *, but: str = "") -> None:
        query = Image.select().where((Image.kind == kind.name) & (Image.group == group)
                                     & (Image.name == name) & (Image.id != but))
        if query.exists():
            raise Conflict(f"a {kind.label} named {name!r} already exists in group {group!r}: "
                           "choose another name")

    # -- changes --------------------------------------------------------------------------

    def create_image(self, kind: ImageKind, spec: dict[str, Any], session: SessionInfo) -> str:
        """A new image without a file (upload one next), or, when `spec` names a `guest`
        (checked by `check_clone_source`), a clone of that guest's system disk for the image
        reconciler to make; returns its id. A clone reserves its source's system disk size
        of the group's image storage quota (state/quotas.py) from this transaction on."""
        check_name(kind.label, spec["name"])
        owner, group = self._assign(session, spec.get("owner"), spec.get("group"))
        description = _description(spec.get("description", ""))
        tags = check_tags(spec.get("tags", []))
        image_id = str(uuid.uuid4())
        source = spec.get("guest") or ""
        clone: dict[str, Any] = {}
        if source:
            clone = {"source_guest": source, "progress": 0, "phase": "cloning"}
        try:
            with db.atomic():
                if source:
                    guest = Guest.get_or_none(Guest.id == source)
                    if guest is None:  # deleted since check_clone_source saw it
                        raise NotFound(f"no guest {source!r} to clone a disk image from")
                    disks = (guest.spec or {}).get("disks") or [0]
                    self.check_quota(  # type: ignore[attr-defined]
                        group, Usage(image_storage=int(disks[0])),
                        f"cloning {kind.label} {spec['name']!r} from guest {source!r}")
                self._check_unique(kind, group, spec["name"])
                Image.create(id=image_id, kind=kind.name, name=spec["name"], owner=owner,
                             group=group, description=description, tags=tags, **clone)
        except peewee.IntegrityError:  # a concurrent create took the name
            self._check_unique(kind, group, spec["name"])
            raise
        return image_id

    def modify_image(self, kind: ImageKind, image_id: str, spec: dict[str, Any],
                     session: SessionInfo) -> str:
        """Change name, owner, group, description or tags; returns the (new) name."""
        with db.atomic():
            row = self._image(kind, image_id, session)
            name = spec.get("name") or row.name
            check_name(kind.label, name)
            owner, group = row.owner, row.group
            if spec.get("owner") or spec.get("group"):
                owner, group = self._assign(session, spec.get("owner") or row.owner,
                                            spec.get("group") or row.group)
            if group != row.group:  # its file moves to the other group's image storage
                self.check_quota(  # type: ignore[attr-defined]
                    group, Usage(image_storage=row.size),
                    f"moving {kind.label} {row.name!r} into user group {group!r}")
            self._check_unique(kind, group, name, but=row.id)
            row.name, row.owner, row.group = name, owner, group
            if "description" in spec:
                row.description = _description(spec["description"])
            if "tags" in spec:
                row.tags = check_tags(spec["tags"])
            row.generation += 1
            row.modified_at = now()
            row.save()
        return name

    def delete_image(self, kind: ImageKind, image_id: str, session: SessionInfo,
                     files: ImageFiles) -> str:
        """Remove an image and its files; returns its name. Blocking (file removal)."""
        with db.atomic():
            row = self._image(kind, image_id, session)
            row.delete_instance()
        files.remove(kind, image_id)
        return row.name

    # -- uploads ----------------------------------------------------------------------------

    def begin_upload(self, kind: ImageKind, image_id: str, session: SessionInfo) -> dict:
        """The image a file is about to be uploaded to: {id, name, version}; it is marked
        as uploaded by this replica (`Image.uploader`) until the upload commits or aborts.
        Busy while another live replica uploads to it (one process refuses a second upload
        of its own before it gets here: api/images.py)."""
        row = self._image(kind, image_id, session)
        query = Image.update(progress=0, uploader=self.replica).where(Image.id == row.id)
        others = self._other_live_replicas()
        if others:  # one statement: of two replicas starting at once, one gets it
            query = query.where((Image.uploader == self.replica)
                                | Image.uploader.not_in(others))
        if query.execute() != 1:
            holder = Image.get_or_none(Image.id == row.id)
            if holder is None:
                raise NotFound(f"the {kind.label} was deleted")
            raise Busy(f"an upload of {kind.label} {row.name!r} is running on replica "
                       f"{holder.uploader}: wait for it to finish")
        return {"id": row.id, "name": row.name, "version": row.version}

    def recover_uploads(self, files: ImageFiles | None = None) -> list[str]:
        """At start, before any request: the uploads this replica ran when it stopped
        (killed, crashed), and those of replicas that are gone (no heartbeat within their
        TTL, state/leases.py), are over. Their images' progress goes back to what the
        current file says and their temp directories go, so a big upload cut off by a
        crash leaves neither a stuck percentage nor gigabytes of files; uploads of live
        replicas are left alone. Files of no current version (a stop between an upload's
        answer and their removal) go too: all of them when no other replica is live,
        else only those older than STALE_SECONDS, for another replica may be between
        moving a new version into place and committing it. Clones from guests are left
        alone: the reconciler resumes them. Returns the files removed."""
        files = files or self.image_files()
        others = self._other_live_replicas()
        settled = peewee.Case(None, [(Image.version > 0, 100)], 0)
        cloning = (Image.source_guest != "") & (Image.version == 0)
        over = ~cloning & ((Image.progress != settled) | (Image.uploader != ""))
        if others:
            over = over & Image.uploader.not_in(others)
        Image.update(progress=settled, uploader="").where(over).execute()
        removed = files.clear_temp(older_than=0, spare=others, drop_dirs=True)
        for kind in (MEDIA, DISK):
            current = {row.id: row.version for row in
                       Image.select(Image.id, Image.version).where(Image.kind == kind.name)}
            removed += files.clear_versions(kind, current,
                                            older_than=STALE_SECONDS if others else 0)
        return removed

    def record_upload_progress(self, image_id: str, progress: int) -> None:
        """Progress of this replica's upload (none once it aborted or another took over)."""
        Image.update(progress=max(0, min(99, progress))).where(
            (Image.id == image_id) & (Image.uploader == self.replica)).execute()

    def abort_upload(self, image_id: str) -> None:
        """This replica's upload failed: progress back to what the current file says, the
        image free for the next upload."""
        settled = peewee.Case(None, [(Image.version > 0, 100)], 0)
        Image.update(progress=settled, uploader="").where(
            (Image.id == image_id) & (Image.uploader == self.replica)).execute()

    def commit_upload(self, kind: ImageKind, image_id: str, base_version: int, upload: UploadFile,
                      sha1: str, files: ImageFiles) -> int:
        """Install a finished upload as version base_version + 1; returns the new version.
        The previous file stays for the caller to drop with `files.remove(...,
        except_version=version)` once it has answered: removing a big file takes a while
        (a sync removes it too, should nanod stop in between). Blocking: call from a
        worker thread."""
        version = base_version + 1
        final = ""
        try:
            # The quota check, the file's move into place and the version bump in one
            # transaction: two uploads of one group cannot both pass its quota.
            with db.atomic():
                row = Image.get_or_none(Image.id == image_id)
                if row is not None:
                    self.check_quota(  # type: ignore[attr-defined]
                        row.group, Usage(image_storage=upload.size - row.size),
                        f"uploading {upload.size} bytes to {kind.label} {row.name!r} (its "
                        f"current file has {row.size})")
                final = files.install(kind, image_id, version, upload.path)
                changed = (
                    Image.update(version=version, size=upload.size, checksum=sha1,
                                 progress=100, modified_at=now(),
                                 generation=Image.generation + 1,
                                 uploader=peewee.Case(None, [(Image.uploader == self.replica,
                                                              "")], Image.uploader))
                    .where((Image.id == image_id) & (Image.version == base_version))
                    .execute()
                )
        except BaseException:
            if final:
                _unlink(final)
            raise
        if changed != 1:
            _unlink(final)
            if Image.get_or_none(Image.id == image_id) is None:
                raise NotFound(f"the {kind.label} was deleted during the upload")
            raise Conflict(f"another upload of this {kind.label} finished first: try again")
        return version

    # -- sync ---------------------------------------------------------------------------------

    def sync_images(self, kind: ImageKind, session: SessionInfo, files: ImageFiles, *,
                    owner: str | None = None, group: str | None = None,
                    busy: Collection[str] = (), busy_temp: Collection[str] = ()
                    ) -> dict[str, list]:
        """Import the `*.<ext>` files of the import directory, drop images whose file is
        gone from the store, clean stale leftovers. Blocking: call from a worker thread.

        Imported files are moved (hard link + unlink, or copy when linking is not allowed)
        into the store and named by id; the import file's own name only becomes the image
        name, sanitised. Symlinks, non-regular files, hidden files (a leading '.': copy
        under such a name, then rename) and files that are not of the kind are skipped
        and stay where they are. Images still waiting for their first upload (and those
        in `busy`) are never dropped."""
        owner, group = self._assign(session, owner, group)
        store_dir_existed = os.path.isdir(files.kind_dir(kind))
        files.ensure()
        imported: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        folder = files.import_dir(kind)
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            shown = os.fsdecode(entry.name).encode("utf-8", "backslashreplace").decode()
            if entry.name.startswith("."):
                continue  # hidden: possibly still being copied
            if not entry.name.lower().endswith("." + kind.ext):
                skipped.append({"file": shown, "reason": f"not a *.{kind.ext} file"})
                continue
            try:
                result = self._import_one(kind, files, entry.path, entry.name, owner, group)
            except (Invalid, Conflict) as exc:
                skipped.append({"file": shown, "reason": exc.message})
                continue
            except OSError as exc:
                skipped.append({"file": shown, "reason": f"cannot import: {exc.strerror}"})
                continue
            imported.append({"file": shown, **result})
        removed = []
        current: dict[str, int] = {}
        for row in Image.select(Image.id, Image.name, Image.version).where(
            Image.kind == kind.name
        ):
            current[row.id] = row.version
            if row.version < 1 or row.id in busy or not store_dir_existed:
                continue
            if not os.path.exists(files.path(kind, row.id, row.version)):
                if Image.delete().where((Image.id == row.id)
                                        & (Image.version == row.version)).execute():
                    removed.append({"id": row.id, "name": row.name})
                    log.warning("%s %s (%s): its file is gone; removed", kind.label, row.name,
                                row.id)
        cleaned = files.cleanup(kind, current, busy_temp)
        return {"imported": imported, "skipped": skipped, "removed": removed,
                "cleaned": cleaned}

    def _import_one(self, kind: ImageKind, files: ImageFiles, path: str, filename: str,
                    owner: str, group: str) -> dict[str, Any]:
        name = import_name(os.fsdecode(filename), kind.ext)
        if name is None:
            raise Invalid("no usable image name in the file name")
        self._check_unique(kind, group, name)
        # O_NOFOLLOW: a symlink fails here, whatever it points to; O_NONBLOCK: a FIFO
        # does not hang the sync. The checks below run on what was opened, not the name.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise Invalid("symbolic links are not imported") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Invalid("not a regular file")
            problem = kind.sniff(os.pread(fd, HEAD_BYTES, 0))
            if problem:
                raise Invalid(f"the file is {problem}")
            image_id = str(uuid.uuid4())
            final = files.path(kind, image_id, 1)
            try:
                # Link the very inode we opened and checked, not whatever the name holds now.
                os.link(f"/proc/self/fd/{fd}", final)
                sha1, size = sha1_of(fd), st.st_size
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.ENOENT):
                    raise
                sha1, size = _copy_into(fd, final, files)
            try:
                with db.atomic():
                    self._check_unique(kind, group, name)
                    self.check_quota(  # type: ignore[attr-defined]
                        group, Usage(image_storage=size), f"importing {kind.label} {name!r}")
                    Image.create(id=image_id, kind=kind.name, name=name, owner=owner,
                                 group=group, version=1, size=size, checksum=sha1, progress=100,
                                 tags=[], description="")
            except BaseException:
                _unlink(final)
                raise
        finally:
            os.close(fd)
        try:  # the import name goes only if it still names the file we imported
            now_st = os.lstat(path)
            if (now_st.st_dev, now_st.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(path)
        except FileNotFoundError:
            pass
        return {"id": image_id, "name": name, "size": size, "checksum": sha1}


def _copy_into(fd: int, final: str, files: ImageFiles) -> tuple[str, int]:
    """Copy an open file into the store (when a hard link is not possible); (sha1, size)."""
    out_fd, temp = tempfile.mkstemp(suffix=".part", dir=files.tmp)
    digest = hashlib.sha1()
    size = 0
    try:
        while True:
            block = os.pread(fd, HASH_CHUNK, size)
            if not block:
                break
            digest.update(block)
            view = memoryview(block)
            while view:
                view = view[os.write(out_fd, view):]
            size += len(block)
        os.fsync(out_fd)
    except BaseException:
        os.close(out_fd)
        _unlink(temp)
        raise
    os.close(out_fd)
    os.replace(temp, final)
    return digest.hexdigest(), size


def _description(value: str) -> str:
    if len(value) > MAX_DESCRIPTION:
        raise Invalid(f"description too long: at most {MAX_DESCRIPTION} characters")
    if "\x00" in value:
        raise Invalid("description may not contain NUL characters")
    return value
