"""Monitor channels in the store (api/console.py, state/console.py): a channel made through
one nanod is opened through another nanod on the same store, once only, and not after it
expired; the store keeps only SHA-256 of a channel id. Two `Server`s run in this process
on one database with data directories of their own, as two replicas would.

The console is a local TCP listener standing in for a guest's VNC server (it greets like
one and echoes what it gets), reached through an opener like the local-cell one of
reconciler/console.py; the real VNC path is tests/integration/test_guests_real.py.
"""

from __future__ import annotations

import asyncio
import socket
import socketserver
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from tornado.websocket import websocket_connect

from api import console as console_api
from nanod import config
from state.identity import token_digest
from state.models import Guest, MonitorChannel
from tests.api.guest_helpers import create_guest, make_pool
from tests.conftest import TEST_SETTINGS, Api

GREETING = b"RFB 003.008\n"


class _Display(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(GREETING)
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass


@pytest.fixture
def display() -> Iterator[int]:
    """A stand-in VNC server on loopback, in a thread: greets, then echoes; yields its
    port."""
    listener = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Display)
    listener.daemon_threads = True
    thread = threading.Thread(target=listener.serve_forever, daemon=True)
    thread.start()
    yield listener.server_address[1]
    listener.shutdown()
    listener.server_close()
    thread.join()


def local_opener(cell: str, port: int) -> socket.socket:
    """What reconciler/console.py gives for a local cell: a socket to the display."""
    return socket.create_connection(("127.0.0.1", port), timeout=5)


@pytest.fixture
def other(settings: dict[str, Any], tmp_path: Any, io_loop: Any, server: Any) -> Iterator[Any]:
    """A second nanod on the store of `server`, with a data directory of its own.

    Both share this process's one database handle (state.db.db), which the second
    `open_database` points at a connection pool of its own: a transaction of the first
    nanod open at that moment would never end, so its audit writes land first."""
    from nanod.server import Server

    server.ctx.audit.flush()
    srv = Server(config.load(None, config.merge(TEST_SETTINGS, {
        "data_dir": str(tmp_path / "other"), "database": settings["database"],
        "reconciler": {"enabled": False}})))
    srv.listen("127.0.0.1", 0)
    yield srv
    io_loop.run_sync(srv.shutdown)


@pytest.fixture
def consoles(server: Any, other: Any) -> None:
    for srv in (server, other):  # as if their reconcilers were on
        srv.ctx.extras["open_console"] = local_opener
    assert server.settings["replicas"]["id"] != other.settings["replicas"]["id"]


async def running_guest(api: Api, port: int) -> str:
    await make_pool(api)
    gid = await create_guest(api)
    # what the guest reconciler records for a running guest with a display
    Guest.update(cell="cell-a", observed={"running": True, "display_port": port}).where(
        Guest.id == gid).execute()
    return gid


def socket_url(srv: Any, token: str, *, under_api: bool = False) -> str:
    return (f"ws://127.0.0.1:{srv.port}{'/api/v1' if under_api else ''}"
            f"/monitor_channels/{token}")


async def refused(url: str) -> int | None:
    conn = await websocket_connect(url)
    assert await conn.read_message() is None
    return conn.close_code


@pytest.mark.gen_test(timeout=60)
async def test_a_channel_made_through_one_nanod_opens_through_another(
        api, server, other, consoles, display):
    gid = await running_guest(api, display)
    chan = await api.ok("POST", "/monitor_channels/", {"guest": gid})
    assert chan["protocol"] == "vnc" and len(chan["id"]) == 24

    # only its digest is stored
    row = MonitorChannel.get()
    assert row.token_hash == token_digest(chan["id"]) != chan["id"]
    assert (row.guest, row.cell, row.port) == (gid, "cell-a", display)

    conn = await websocket_connect(socket_url(other, chan["id"], under_api=True))
    assert await conn.read_message() == GREETING
    await conn.write_message(b"\x03\x00key", binary=True)
    assert await conn.read_message() == b"\x03\x00key"
    assert MonitorChannel.select().count() == 0  # taken

    # single use, through either nanod
    assert await refused(socket_url(server, chan["id"])) == 4404
    assert await refused(socket_url(other, chan["id"])) == 4404
    conn.close()


@pytest.mark.gen_test(timeout=60)
async def test_two_websockets_racing_for_one_channel_on_two_nanods(
        api, server, other, consoles, display):
    gid = await running_guest(api, display)
    for _ in range(5):
        token = (await api.ok("POST", "/monitor_channels/", {"guest": gid}))["id"]
        conns = await asyncio.gather(websocket_connect(socket_url(server, token)),
                                     websocket_connect(socket_url(other, token)))
        first = await asyncio.gather(*(c.read_message() for c in conns))
        assert sorted(first, key=lambda m: m is None) == [GREETING, None]
        assert sorted(c.close_code or 0 for c in conns) == [0, 4404]
        for c in conns:
            c.close()


@pytest.mark.gen_test(timeout=60)
async def test_an_expired_channel_is_refused_and_swept(
        api, server, other, consoles, display, monkeypatch):
    gid = await running_guest(api, display)
    monkeypatch.setattr(console_api, "CHANNEL_TTL", 0.3)
    stale = (await api.ok("POST", "/monitor_channels/", {"guest": gid}))["id"]
    await asyncio.sleep(0.6)
    assert await refused(socket_url(other, stale)) == 4404

    # an expired channel nobody came for is removed when the next one is made
    await api.ok("POST", "/monitor_channels/", {"guest": gid})
    await asyncio.sleep(0.6)
    fresh = (await api.ok("POST", "/monitor_channels/", {"guest": gid}))["id"]
    assert [r.token_hash for r in MonitorChannel.select()] == [token_digest(fresh)]


@pytest.mark.gen_test(timeout=60)
async def test_a_nanod_without_consoles_says_so_for_a_channel_of_another(
        api, server, other, display):
    server.ctx.extras["open_console"] = local_opener  # `other` has no reconciler
    gid = await running_guest(api, display)
    token = (await api.ok("POST", "/monitor_channels/", {"guest": gid}))["id"]
    conn = await websocket_connect(socket_url(other, token))
    assert await conn.read_message() is None
    assert conn.close_code == 4503


def test_take_channel_gives_a_channel_to_one_taker_only(database, tmp_path):
    """Threads racing in one process: the DELETE ... RETURNING hands the row to one."""
    from state.db import open_database
    from state.store import Store

    open_database(database)
    store = Store(data_dir=str(tmp_path))
    def race(token: str, takers: int = 4) -> list[Any]:
        got: list[Any] = []
        barrier = threading.Barrier(takers)

        def take() -> None:
            barrier.wait()
            got.append(store.take_channel(token))

        threads = [threading.Thread(target=take) for _ in range(takers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return got

    for _ in range(10):
        got = race(store.open_channel("g", "c", 5900, 15))
        assert sorted(got, key=lambda g: g is None) == [
            {"guest": "g", "cell": "c", "port": 5900}, None, None, None]
    assert store.take_channel("never-made") is None
    expired = store.open_channel("g", "c", 5900, -1.0)
    assert store.take_channel(expired) is None
    assert MonitorChannel.select().count() == 0

