"""Two nanods (replicas) on one store and one image directory (setting `image_dir`): an
image uploaded through one is downloaded through the other, no image file lands in a data
directory, and a replica starting up while the other is half way through an upload leaves
that upload alone (state/images.py `recover_uploads`): it finishes, and the other serves
the new version.

The replica that uploads is made live by writing its heartbeat here, as
reconciler/leases.py does in a nanod whose reconciler runs (these nanods run without one).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tornado.tcpclient import TCPClient

from nanod import config
from state.models import Image
from tests.api.test_images import (
    create,
    download,
    file_path,
    make_iso,
    multipart,
    request_head,
    sha1,
    upload,
)
from tests.api.test_images_files import temp_files
from tests.conftest import ADMIN, ADMIN_PASSWORD, TEST_SETTINGS, Api


def replica_settings(tmp_path: Path, name: str, database: str) -> dict[str, Any]:
    return config.load(None, config.merge(TEST_SETTINGS, {
        "data_dir": str(tmp_path / name), "database": database,
        "image_dir": str(tmp_path / "shared-images"), "reconciler": {"enabled": False}}))


@pytest.fixture
def settings(tmp_path: Path, database: str) -> dict[str, Any]:
    return replica_settings(tmp_path, "a", database)


@pytest.fixture
def start_other(settings: dict[str, Any], tmp_path: Path, io_loop: Any, server: Any
                ) -> Iterator[Callable[[], Any]]:
    """Starts a second nanod, replica of `server` (same store, same image directory)."""
    from nanod.server import Server

    started: list[Server] = []

    def start() -> Server:
        # both share this process's database handle, which the new nanod points at a new
        # connection pool: the first one's audit writes land before that
        server.ctx.audit.flush()
        srv = Server(replica_settings(tmp_path, "b", settings["database"]))
        srv.listen("127.0.0.1", 0)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        io_loop.run_sync(srv.shutdown)


async def login(srv: Any) -> Api:
    client = Api(f"http://127.0.0.1:{srv.port}")
    await client.login(ADMIN, ADMIN_PASSWORD)
    return client


@pytest.mark.gen_test(timeout=60)
async def test_an_image_uploaded_through_one_replica_downloads_through_another(
        api, server, settings, start_other, tmp_path):
    other = await login(start_other())
    image_id = await create(api, "media", "shared")
    iso = make_iso(payload=b"shared between replicas\n")
    assert (await upload(api, "media", image_id, iso)).code == 0
    got = await download(other, file_path("media", image_id))
    assert got.code == 200 and got.body == iso
    assert got.headers["Signature"] == sha1(iso)
    assert sorted(os.listdir(tmp_path / "shared-images" / "media")) == [f"{image_id}.1.iso"]
    assert not (tmp_path / "a" / "images").exists() and not (tmp_path / "b" / "images").exists()


@pytest.mark.gen_test(timeout=60)
async def test_a_replica_starting_up_leaves_a_live_replicas_upload_alone(
        api, server, settings, start_other):
    replica = settings["replicas"]["id"]
    server.store.heartbeat(replica, address="", host="test", pid=os.getpid(),
                           started_at=time.time(), ttl=60.0)
    image_id = await create(api, "media", "busy")
    iso = make_iso(payload=os.urandom(2 << 20))
    body = multipart([("image", "busy.iso", iso)])
    stream = await TCPClient().connect("127.0.0.1", server.port)
    half = len(body) // 2
    await stream.write(request_head(api, file_path("media", image_id),
                                    f"Content-Length: {len(body)}\r\n") + body[:half])
    await asyncio.sleep(0.6)  # progress is stored at most every 0.5 s
    await stream.write(body[half:half + 4096])
    for _ in range(100):
        if Image.get_by_id(image_id).progress > 0:
            break
        await asyncio.sleep(0.05)
    assert Image.get_by_id(image_id).uploader == replica
    partial = temp_files(settings)
    assert len(partial) == 1

    other_server = start_other()  # its start-up recovery runs now
    assert temp_files(settings) == partial
    busy = Image.get_by_id(image_id)
    assert (busy.uploader, busy.progress > 0) == (replica, True)
    other = await login(other_server)
    refused = await upload(other, "media", image_id, make_iso())
    assert refused.code != 0 and f"running on replica {replica}" in refused.message

    await stream.write(body[half + 4096:])
    head = await stream.read_until(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    reply = json.loads(await stream.read_bytes(length))
    stream.close()
    assert reply["error_code"] == 0, reply
    assert reply["data"]["version"] == 1 and reply["data"]["checksum"] == sha1(iso)
    assert (await download(other, file_path("media", image_id))).body == iso
    done = Image.get_by_id(image_id)
    assert (done.uploader, done.progress) == ("", 100)
    assert temp_files(settings) == []
