"""Uploads when several replicas share one image directory (state/images.py): an upload is
marked with its replica (`Image.uploader`) from its start to its commit or abort, writes
its temp file under tmp/<replica>/, and is refused while another live replica uploads to
the same image; start-up recovery (`recover_uploads`) settles and cleans up only the
uploads of this replica and of replicas that are gone, and removes young files of no
current version only when no other replica is live.

Two or three `Store`s on one database stand for the replicas (each with its replica id,
its own data directory and the shared image directory); a live replica is one whose
heartbeat (state/leases.py) is within its TTL, a gone one's heartbeat is made old.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from state.db import open_database
from state.errors import Busy
from state.identity import SessionInfo
from state.images import MEDIA, UploadFile
from state.models import ControlReplica, Image
from state.store import Store
from tests.state.test_upload_file import iso_bytes

ADMIN = SessionInfo(token="t", handle="h", user="admin", group="admin", menu=("media",),
                    address="127.0.0.1", timeout=180, expires=time.time() + 3600)
HOUR = 3600.0


@pytest.fixture
def replicas(database: str, tmp_path: Path) -> dict[str, Store]:
    """Stores of replicas a, b and c on one database and one image directory."""
    open_database(database)
    return {r: Store(data_dir=str(tmp_path / r), image_dir=str(tmp_path / "images"),
                     replica=r) for r in "abc"}


def live(store: Store, replica: str) -> None:
    store.heartbeat(replica, address="", host="h", pid=1, started_at=time.time(), ttl=30.0)


def gone(store: Store, replica: str) -> None:
    """A replica that stopped heartbeating long ago (killed, not a clean stop)."""
    live(store, replica)
    ControlReplica.update(heartbeat_at=time.time() - 10 * HOUR).where(
        ControlReplica.id == replica).execute()


def new_image(store: Store, *, version: int = 0, **fields: Any) -> str:
    image_id = str(uuid.uuid4())
    Image.create(id=image_id, kind="media", name=f"m-{image_id[:8]}", owner="admin",
                 group="admin", version=version, **{"progress": 100 if version else 0,
                                                    **fields})
    if version:
        store_file(store, image_id, version)
    return image_id


def store_file(store: Store, image_id: str, version: int, *, age: float = 0.0) -> Path:
    files = store.image_files()
    files.ensure()
    path = Path(files.path(MEDIA, image_id, version))
    path.write_bytes(b"v%d" % version)
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return path


def start_upload(store: Store, image_id: str, progress: int = 40) -> UploadFile:
    """An upload that has begun and received some bytes, as the API runs it."""
    target = store.begin_upload(MEDIA, image_id, ADMIN)
    assert target["id"] == image_id
    upload = UploadFile(store.image_files(), MEDIA, image_id)
    data = iso_bytes(64 << 10, seed=len(image_id))
    for write in upload.write([data]):
        write.result()
    upload.digest([data])
    store.record_upload_progress(image_id, progress)
    return upload


def row(image_id: str) -> tuple[int, str, int]:
    image = Image.get_by_id(image_id)
    return image.progress, image.uploader, image.version


def test_an_upload_is_marked_with_its_replica_until_it_commits_or_aborts(replicas):
    a = replicas["a"]
    image_id = new_image(a)
    upload = start_upload(a, image_id)
    assert row(image_id) == (40, "a", 0)
    assert Path(upload.path).parent == Path(a.image_dir) / "tmp" / "a"
    version = a.commit_upload(MEDIA, image_id, 0, upload, upload.finish(None),
                              a.image_files())
    assert row(image_id) == (100, "", 1) and version == 1
    assert Path(a.image_files().path(MEDIA, image_id, 1)).is_file()

    upload = start_upload(a, image_id, progress=30)
    assert row(image_id) == (30, "a", 1)
    upload.discard()
    a.abort_upload(image_id)
    assert row(image_id) == (100, "", 1)
    a.record_upload_progress(image_id, 60)  # a progress write late after its abort
    assert row(image_id) == (100, "", 1)


def test_a_live_replicas_upload_is_not_started_again_elsewhere(replicas):
    a, b = replicas["a"], replicas["b"]
    live(a, "a")
    live(a, "b")
    image_id = new_image(a, version=1)
    start_upload(b, image_id)
    with pytest.raises(Busy, match="running on replica b"):
        a.begin_upload(MEDIA, image_id, ADMIN)
    assert row(image_id) == (40, "b", 1)
    a.record_upload_progress(image_id, 90)  # not a's upload
    a.abort_upload(image_id)
    assert row(image_id) == (40, "b", 1)

    gone(a, "b")  # b was killed during its upload: a may upload now
    start_upload(a, image_id, progress=10)
    assert row(image_id) == (10, "a", 1)


def test_recovery_at_start_leaves_a_live_replicas_upload_alone(replicas, tmp_path):
    a, b, c = replicas["a"], replicas["b"], replicas["c"]
    live(a, "b")  # b runs on
    gone(a, "c")  # c was killed
    # a is restarting: its row is whatever its last heartbeat left (here, none)
    running = new_image(a)  # b's upload, under way
    b_upload = start_upload(b, running, progress=40)
    cut_c = new_image(a, version=1)  # c's upload, cut off by its death
    start_upload(c, cut_c, progress=60)
    cut_a = new_image(a)  # a's own upload, cut off by its restart
    start_upload(a, cut_a, progress=70)
    cloning = new_image(a, source_guest="g1", progress=30)  # the reconciler resumes it
    replaced = new_image(a, version=2)
    young = store_file(a, replaced, 1)  # b may be about to commit it... or left by a stop
    old = store_file(a, new_image(a, version=3), 2, age=2 * HOUR)
    legacy = Path(a.image_dir) / "tmp" / "x.part"  # a nanod before tmp/<replica>/
    legacy.write_bytes(b"old")
    temp = Path(a.image_dir) / "tmp"
    assert sorted(p.name for p in temp.iterdir()) == ["a", "b", "c", "x.part"]

    removed = a.recover_uploads()

    assert row(running) == (40, "b", 0)  # untouched, and so is its temp file
    assert Path(b_upload.path).is_file()
    assert row(cut_c) == (100, "", 1) and row(cut_a) == (0, "", 0)
    assert row(cloning) == (30, "", 0)
    assert young.is_file() and not old.exists()  # b is live: only old leftovers go
    assert sorted(p.name for p in temp.iterdir()) == ["a", "b"]  # c's dir is gone
    assert list((temp / "a").iterdir()) == []
    assert len(removed) == 4  # the temp files of a and c, x.part, the old version

    # b's upload goes on to its end as if nothing happened
    version = b.commit_upload(MEDIA, running, 0, b_upload, b_upload.finish(None),
                              b.image_files())
    assert row(running) == (100, "", 1) and version == 1

    # b stops cleanly, a restarts again: alone now, every leftover goes at once
    a.leave("b")
    start_upload(b, new_image(a), progress=5)  # a file b left behind (killed after all)
    assert a.recover_uploads() and not young.exists()
    assert sorted(p.name for p in temp.iterdir()) == ["a"]


def test_a_sync_removes_only_stale_temp_files_of_any_replica(replicas):
    a = replicas["a"]
    live(a, "b")
    files = a.image_files()
    temp = Path(a.image_dir) / "tmp"
    fresh = temp / "b" / "x.part"  # b's upload under way
    stale = temp / "c" / "y.part"  # c died long ago
    for path in (fresh, stale):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"part")
    os.utime(stale, (time.time() - 2 * HOUR, time.time() - 2 * HOUR))
    assert files.cleanup(MEDIA, {}) == ["y.part"]
    assert fresh.is_file() and not stale.exists()
