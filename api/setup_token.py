"""Who may claim a fresh nanod: the first `POST /system/` creates the first administrator,
so it is accepted only from the management node itself (a loopback peer, not relayed by
a proxy) or with the one-time setup token.

`nanod serve` (nanod/server.py) issues the token when it starts without an administrator:
it writes it to DATA_DIR/setup-token (mode 0600) and logs it, and `POST /system/`
(api/identity.py) checks the `Nano-Setup-Token` header against it. The token is spent
(forgotten, its file removed) once the first administrator exists; a restart issues a
new one while there is none. `nanod init` opens the store directly and needs no token.

Logging the token adds no way in: whoever can read nanod's log is on the management node
and could claim it over loopback anyway.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import os
import secrets

from tornado.httputil import HTTPServerRequest

from state.errors import Forbidden

log = logging.getLogger("nano")

HEADER = "Nano-Setup-Token"
FILE_NAME = "setup-token"
# A request carrying one of these came through a proxy: its loopback peer is the proxy,
# not the client, so it needs the token like any remote client.
FORWARDING_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


def from_loopback(request: HTTPServerRequest) -> bool:
    """Whether the TCP peer of `request` is this host, talking to nanod directly.

    nanod does not trust forwarding headers (its HTTP server runs without `xheaders`), so
    `remote_ip` is the socket's peer address."""
    if any(name in request.headers for name in FORWARDING_HEADERS):
        return False
    try:
        address = ipaddress.ip_address(request.remote_ip or "")
    except ValueError:
        return False  # e.g. a Unix socket: no address to judge by
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class SetupToken:
    """The one-time credential of the first `POST /system/` from another host."""

    def __init__(self, path: str, value: str | None) -> None:
        self.path = path
        self.value = value

    @classmethod
    def issue(cls, data_dir: str, *, ready: bool) -> SetupToken:
        """A new token written to DATA_DIR/setup-token (0600) and logged, or, when the
        system already has an administrator (`ready`), none, and a stale file removed."""
        path = os.path.join(data_dir, FILE_NAME)
        token = cls(path, None)
        if ready:
            token.spend()
            return token
        token.value = secrets.token_urlsafe(24)  # 192 random bits
        partial = f"{path}.{os.getpid()}.tmp"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file left behind
            os.write(fd, f"{token.value}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, path)
        # the path, never the token: whoever reads the log must not be able to claim it
        log.warning(
            "no administrator yet: claim this nanod with POST /api/v1/system/ from this host, "
            "or from another one with the header %s set to the token in %s (mode 0600, "
            "readable by root), or run `nanod init`", HEADER, path)
        return token

    def admit(self, request: HTTPServerRequest) -> None:
        """Pass a loopback request, or one carrying the token; refuse (403) the rest."""
        if from_loopback(request):
            return
        given = request.headers.get(HEADER, "")
        if self.value and given and hmac.compare_digest(given.encode(), self.value.encode()):
            return
        why = "a wrong" if given else "no"
        raise Forbidden(
            f"POST /system/ from {request.remote_ip} with {why} {HEADER} header: send the "
            f"setup token that `nanod serve` wrote to its data directory ({FILE_NAME}) and "
            "its log, or claim the system from the management node itself, or run "
            "`nanod init` there")

    def spend(self) -> None:
        """Forget the token and remove its file: an administrator exists now."""
        self.value = None
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)
