"""Monitor channels: `POST /monitor_channels/` makes a one-time channel to a running
guest's VNC/SPICE console, and the websocket end (`/monitor_channels/{id}`, also under
/api/v1) pipes the display's bytes as binary frames (noVNC-compatible).

The channel id is the credential of the websocket (the portal's noVNC sends no session);
it is single use and expires after 15 s unused. Channels are kept in the store
(state/console.py), so a channel made through one replica of nanod may be opened through
any other on the same store. The bytes come from an opener wired by nanod/server.py
(reconciler/console.py): this module imports no driver.

Close codes of the websocket: 4404 no such channel (unknown, used or expired), 4503 the
console cannot be reached (the cell, or no reconciler in this nanod), 1011 the store could
not be read or the console connection was lost, 1000 the console closed.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

import tornado.iostream
import tornado.websocket
from tornado.ioloop import IOLoop

from api.base import AppContext, NanoHandler, contract
from state.errors import NanoError, Unavailable

log = logging.getLogger("nano.api.console")
CHANNEL_TTL = 15.0
CHUNK = 1 << 20


class MonitorChannelsHandler(NanoHandler):
    menu = "instance"

    @contract(data="monitor_channel_opened", body="monitor_channel")
    def post(self) -> None:
        guest = self.body()["guest"]
        target = self.store.console_target(self.session, guest)
        if "open_console" not in self.ctx.extras:
            raise Unavailable("consoles need the reconciler, which is disabled in this nanod")
        token = self.store.open_channel(target["guest"], target["cell"], target["port"],
                                        CHANNEL_TTL)
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
        try:  # in the store lane, as every store call of the API: never on the IOLoop
            channel = await IOLoop.current().run_in_executor(
                self.ctx.store_lane, self.ctx.store.take_channel, token)
        except Exception as exc:  # noqa: BLE001  (the store is unreachable: say so)
            log.warning("monitor channel lookup failed: %s", exc)
            self.close(1011, "monitor channel lookup failed")
            return
        if channel is None:
            self.close(4404, "unknown or expired monitor channel")
            return
        opener = self.ctx.extras.get("open_console")
        if opener is None:  # made by a replica with consoles, reached on one without
            self.close(4503, "consoles need the reconciler, which is disabled in this nanod")
            return
        try:
            self.pipe = await IOLoop.current().run_in_executor(
                self.ctx.executor, opener, channel["cell"], channel["port"])
        except NanoError as exc:
            log.info("console of guest %s: %s", channel["guest"], exc.message)
            self.close(4503, exc.message[:120])
            return
        if isinstance(self.pipe, socket.socket):
            # a local cell: read the display's socket on the IOLoop itself
            self.stream = tornado.iostream.IOStream(self.pipe)
            IOLoop.current().spawn_callback(self._pump_stream)
            return
        loop = IOLoop.current()
        threading.Thread(target=self._pump, args=(loop,), daemon=True,
                         name=f"console-{channel['guest'][:8]}").start()

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
