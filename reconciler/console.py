"""Byte pipes to guests' consoles: VNC listens on its cell's loopback, reached directly for
a local cell and through an SSH tunnel (paramiko direct-tcpip) for a remote one.

`make_console_opener(store, connections)` is wired by nanod/server.py into the API's
context; the websocket proxy (api/console.py) calls the opener from a worker thread and
gets an object with blocking `recv(n)`, `sendall(data)` and `close()`.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, Protocol

from reconciler.cells import CellConnections
from state.errors import NotFound, Unavailable


class Pipe(Protocol):
    def recv(self, size: int) -> bytes: ...
    def sendall(self, data: bytes) -> Any: ...
    def close(self) -> None: ...


def make_console_opener(store: Any, connections: CellConnections
                        ) -> Callable[[str, int], Pipe]:
    def open_console(cell_name: str, port: int) -> Pipe:
        spec = store.cell_spec(cell_name)
        if spec is None:
            raise NotFound(f"cell {cell_name!r} is not registered")
        if spec.local:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            except OSError as exc:
                raise Unavailable(f"console of {cell_name}:{port}: {exc.strerror}") from None
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        link = connections.link(spec)
        return link.shell.open_tunnel("127.0.0.1", port)

    return open_console
