"""A real `nanod serve` process, stopped with SIGTERM and started again: sessions, users and
logs survive; the shutdown is clean (exit 0, "shutting down" in the log); the log file
never holds a password or a session token. And one killed (SIGKILL) in the middle of an
upload: after the restart the image is as before and the cut upload left nothing.

Runs on SQLite (the default file under --data-dir) and on PostgreSQL (--database).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tornado.httpclient
from tornado.tcpclient import TCPClient

from tests.api.identity_helpers import PASSWORD, login_as
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
from tests.conftest import ADMIN, ADMIN_PASSWORD, Api, write_nanod_config

NANOD = str(Path(sys.executable).with_name("nanod"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Nanod:
    """One `nanod serve` child process; its stdout and stderr go to a file beside the data."""

    def __init__(self, data_dir: Path, port: int, database: str | None) -> None:
        conf = write_nanod_config(data_dir.parent / "nanod.yaml")  # the tests' names
        self.args = [NANOD, "serve", "--config", str(conf), "--data-dir", str(data_dir),
                     "--listen", f"127.0.0.1:{port}"]
        if database:
            self.args += ["--database", database]
        self.url = f"http://127.0.0.1:{port}"
        self.output = data_dir.parent / "nanod.out"
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        client = tornado.httpclient.AsyncHTTPClient()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"nanod exited early:\n{self.output.read_text()}"
            try:
                await client.fetch(self.url + "/api/v1/system/", request_timeout=2)
                return
            except (OSError, tornado.httpclient.HTTPClientError):
                await asyncio.sleep(0.1)
        raise AssertionError(f"nanod did not answer within 30 s:\n{self.output.read_text()}")

    async def stop(self) -> int:
        """SIGTERM, then the exit code (killed and failed after 20 s)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"nanod ignored SIGTERM:\n{self.output.read_text()}")
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def nanod(tmp_path, database):
    """A nanod child on a free port; SQLite means the default file under --data-dir."""
    pg = database if database.startswith("postgres") else None
    daemon = Nanod(tmp_path / "data", free_port(), pg)
    yield daemon
    daemon.kill()


@pytest.mark.gen_test(timeout=120)
async def test_sessions_users_and_logs_survive_a_restart(nanod, tmp_path):
    await nanod.start()
    api = Api(nanod.url)
    await api.ok("POST", "/system/", {"user": ADMIN, "password": ADMIN_PASSWORD}, session="")
    admin = await api.login()
    await api.ok("POST", "/users/bob", {"password": PASSWORD, "nick": "Bob"})
    await api.ok("POST", "/user_groups/admin/members/bob")
    bob = await login_as(api, "bob")
    await api.ok("POST", "/logs/", {"content": "written before the restart"})
    logs_before = await api.ok("GET", "/logs/?limit=100")
    # a failed login and an error on a path that carries a token: both reach the log file
    assert (await api.call("POST", "/sessions/", {"user": "bob", "password": "Wr0ngGuess"},
                           session="")).code == 401
    assert (await api.call("GET", f"/sessions/{bob}", session="")).code == 401

    assert await nanod.stop() == 0
    await nanod.start()

    # the same tokens still work: sessions are stored, not held in memory
    assert await api.ok("GET", "/users/", session=admin) == [ADMIN, "bob"]
    assert await api.ok("GET", "/users/bob", session=admin) == {"nick": "Bob", "mail": ""}
    mine = await api.ok("GET", f"/sessions/{bob}", session=bob)
    assert mine["user"] == "bob" and mine["group"] == "admin"
    await api.ok("PUT", f"/sessions/{bob}", session=bob)
    # passwords too, and the log kept every entry
    await login_as(api, "bob")
    logs_after = await api.ok("GET", "/logs/?limit=100", session=admin)
    assert logs_after["total"] >= logs_before["total"] + 2  # failed login, bob's new login
    kept = {e["id"]: e["content"] for e in logs_after["logs"]}
    assert all(kept.get(e["id"]) == e["content"] for e in logs_before["logs"])
    assert "written before the restart" in kept.values()

    assert await nanod.stop() == 0

    log_file = tmp_path / "data" / "nanod.log"
    text = log_file.read_text()
    assert text.count("shutting down") == 2
    assert " 401 " in text or "-> 401" in text  # the failed requests were logged ...
    for secret in (ADMIN_PASSWORD, PASSWORD, "Wr0ngGuess", admin, bob):
        assert secret not in text  # ... without a password or a session token
    if nanod.args.count("--database") == 0:
        assert (tmp_path / "data" / "nano.db").exists()
    assert os.path.getsize(log_file) > 0


@pytest.mark.gen_test(timeout=120)
async def test_an_upload_cut_off_by_a_kill_leaves_nothing_behind(nanod, tmp_path):
    """nanod is killed (SIGKILL) half way through an upload: after the restart the image
    has its previous file and progress, and the temp file of the cut upload is gone, as
    is a previous version that a stop right after an upload's answer would leave."""
    await nanod.start()
    api = Api(nanod.url)
    await api.ok("POST", "/system/", {"user": ADMIN, "password": ADMIN_PASSWORD}, session="")
    await api.login()
    image_id = await create(api, "media", "m")
    first, old = make_iso(payload=b"first\n"), make_iso()
    assert (await upload(api, "media", image_id, first)).code == 0
    assert (await upload(api, "media", image_id, old)).code == 0
    media = tmp_path / "data" / "images" / "media"
    for _ in range(100):  # version 1 goes just after the second answer
        if sorted(p.name for p in media.iterdir()) == [f"{image_id}.2.iso"]:
            break
        await asyncio.sleep(0.05)
    (media / f"{image_id}.1.iso").write_bytes(first)  # as if nanod had stopped before that

    body = multipart([("image", "new.iso", make_iso(payload=os.urandom(3 << 20)))])
    stream = await TCPClient().connect("127.0.0.1", int(nanod.url.rsplit(":", 1)[1]))
    await stream.write(
        request_head(api, file_path("media", image_id), f"Content-Length: {len(body)}\r\n")
        + body[:len(body) // 2])
    await asyncio.sleep(0.6)  # progress is stored at most every 0.5 s
    await stream.write(body[len(body) // 2:len(body) // 2 + 4096])
    for _ in range(100):
        if 0 < (await api.ok("GET", f"/media_images/{image_id}"))["progress"] < 100:
            break
        await asyncio.sleep(0.05)
    temp = tmp_path / "data" / "images" / "tmp"  # tmp/<replica id>/*.part

    def temp_files() -> list[str]:
        return [p.name for p in temp.rglob("*") if p.is_file()]

    assert temp_files() != []  # the upload is under way

    nanod.kill()
    stream.close()
    assert temp_files() != []  # what a crash leaves
    await nanod.start()

    assert temp_files() == []
    assert sorted(p.name for p in media.iterdir()) == [f"{image_id}.2.iso"]
    data = await api.ok("GET", f"/media_images/{image_id}")
    assert (data["created"], data["size"], data["checksum"], data["progress"]) == (
        True, len(old), sha1(old), 100)
    assert (await download(api, file_path("media", image_id))).body == old
    assert await nanod.stop() == 0
    assert "removed 2 file(s) of unfinished or replaced uploads left by the last stop" in (
        tmp_path / "data" / "nanod.log").read_text()


@pytest.mark.gen_test(timeout=60)
async def test_a_second_nanod_on_the_same_data_dir_is_refused(nanod, tmp_path):
    await nanod.start()
    assert nanod.proc is not None
    second = subprocess.run(
        [NANOD, "serve", "--data-dir", str(tmp_path / "data"), "--listen",
         f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=30)
    assert second.returncode != 0
    assert f"another nanod (pid {nanod.proc.pid}) serves {tmp_path / 'data'}" in second.stderr
    assert await nanod.stop() == 0
    await nanod.start()  # the lock went with the first process
    assert await nanod.stop() == 0
