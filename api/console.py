"""Monitor channels: `POST /monitor_channels/` makes a one-time channel to a running
guest's VNC/SPICE console, and the websocket end (`/monitor_channels/{id}`, also under
/api/v1) pipes the display's bytes as binary frames (noVNC-compatible).

The channel id is the credential of the websocket (the portal's noVNC sends no session);
it is single use and expires after 15 s unused. The bytes come from an opener wired by
nanod/server.py (reconciler/console.py): this module imports no driver.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import tornado.iostream
import tornado.websocket
from tornado.ioloop import IOLoop

from api.base import AppContext, NanoHandler, contract
from state.errors import NanoError, Unavailable

log = logging.getLogger("nano.api.console")
CHANNEL_TTL = 15.0
CHUNK = 1 << 20


@dataclass(frozen=True)
class Channel:
    guest: str
    cell: str
    port: int
    expires: float


class Channels:
    """One-time channels in memory (a restart of nanod forgets them: they live 15 s)."""

    def __init__(self) -> None:
        self._items: dict[str, Channel] = {}
        self._lock = threading.Lock()

    def add(self, channel: Channel) -> str:
        token = secrets.token_urlsafe(18)
        with self._lock:
            now = time.monotonic()
            self._items = {k: v for k, v in self._items.items() if v.expires > now}
            self._items[token] = channel
        return token

    def take(self, token: str) -> Channel | None:
        with self._lock:
            channel = self._items.pop(token, None)
        if channel is None or channel.expires < time.monotonic():
            return None
        return channel


def channels(ctx: AppContext) -> Channels:
    return ctx.extras.setdefault("channels", Channels())


class MonitorChannelsHandler(NanoHandler):
    menu = "instance"

    @contract(data="monitor_channel_opened", body="monitor_channel")
    def post(self) -> None:
        guest = self.body()["guest"]
        target = self.store.console_target(self.session, guest)
        if "open_console" not in self.ctx.extras:
            raise Unavailable("consoles need the reconciler, which is disabled in this nanod")
        token = channels(self.ctx).add(Channel(target["guest"], target["cell"], target["port"],
                                               time.monotonic() + CHANNEL_TTL))
        self.audit(f"opened a monitor channel to guest {target['name']} ({guest})")
        self.reply({"id": token, "protocol": target["protocol"], "username": "",
                    "password": target["secret"]})


class MonitorSocket(tornado.websocket.WebSocketHandler):
    """The websocket end of a channel: VNC bytes both ways as binary frames."""

    def initialize(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.pipe: Any = None
        self.stream: tornado.iostream.IOStream | None = None
        self.closed = False

    def check_origin(self, origin: str) -> bool:
        return True  # the single-use channel id is the credential, not the origin

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        # noVNC of the original portal offers none: answer none; pick binary when offered
        return "binary" if "binary" in subprotocols else None

    async def open(self, token: str) -> None:
        channel = channels(self.ctx).take(token)
        if channel is None:
            self.close(4404, "unknown or expired monitor channel")
            return
        opener = self.ctx.extras["open_console"]
        try:
            self.pipe = await IOLoop.current().run_in_executor(
                self.ctx.executor, opener, channel.cell, channel.port)
        except NanoError as exc:
            log.info("console of guest %s: %s", channel.guest, exc.message)
            self.close(4503, exc.message[:120])
            return
        if isinstance(self.pipe, socket.socket):
            # a local cell: read the display's socket on the IOLoop itself
            self.stream = tornado.iostream.IOStream(self.pipe)
            IOLoop.current().spawn_callback(self._pump_stream)
            return
        loop = IOLoop.current()
        threading.Thread(target=self._pump, args=(loop,), daemon=True,
                         name=f"console-{channel.guest[:8]}").start()

    async def _pump_stream(self) -> None:
        """Display -> browser for a socket: no thread, flow control through the
        websocket's own write futures."""
        try:
            while not self.closed:
                data = await self.stream.read_bytes(CHUNK, partial=True)
                await self.write_message(data, binary=True)
        except (tornado.iostream.StreamClosedError, tornado.websocket.WebSocketClosedError):
            pass
        self._ended()

    def _pump(self, loop: IOLoop) -> None:
        """Display -> browser, on a thread of its own (the pipe's recv blocks)."""
        try:
            while not self.closed:
                data = self.pipe.recv(CHUNK)
                if not data:
                    break
                loop.add_callback(self._forward, data)
        except OSError:
            pass
        finally:
            loop.add_callback(self._ended)

    def _forward(self, data: bytes) -> None:
        if not self.closed:
            try:
                self.write_message(data, binary=True)
            except tornado.websocket.WebSocketClosedError:
                self.closed = True

    def _ended(self) -> None:
        if not self.closed:
            self.close(1000, "console closed")

    async def on_message(self, message: str | bytes) -> None:
        if self.pipe is None:
            return
        data = message if isinstance(message, bytes) else message.encode()
        if self.stream is not None:
            try:
                await self.stream.write(data)
            except tornado.iostream.StreamClosedError:
                self.close(1011, "console connection lost")
            return
        try:
            await IOLoop.current().run_in_executor(self.ctx.executor, self.pipe.sendall, data)
        except OSError:
            self.close(1011, "console connection lost")

    def on_close(self) -> None:
        self.closed = True
        if self.stream is not None:
            self.stream.close()
        elif self.pipe is not None:
            try:
                self.pipe.close()
            except OSError:
                pass


ROUTES = [
    (r"/monitor_channels", MonitorChannelsHandler),
    (r"/monitor_channels/([^/]+)", MonitorSocket),
]
ROOT_ROUTES = [(r"/monitor_channels/([^/]+)/?", MonitorSocket)]
