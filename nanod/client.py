"""A small synchronous client of the Nano v1 REST API, for the manifest commands
(`nanod apply`, `get`, `delete`, `export`, `drift`: nanod/client_cli.py).

Where to connect and as whom comes from flags, then the environment (NANO_URL, NANO_USER,
NANO_PASSWORD), then a client file (~/.config/nano/client.yaml or $NANO_CLIENT_CONFIG with
keys url, user, password). The session token lives in memory only: it is never written to
disk. Errors are the API's envelope codes raised as `ApiError`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_URL = "http://127.0.0.1:5870"
SESSION_HEADER = "Nano-Session"
TIMEOUT = 120.0
STREAM_TIMEOUT = 60.0  # s without a byte of an event stream (it sends one every 15 s)


class ClientError(Exception):
    """The client cannot work: no credentials, server unreachable, not a Nano server."""


@dataclass
class ApiError(Exception):
    """The API answered an error envelope (error_code != 0)."""

    code: int
    message: str
    method: str = ""
    path: str = ""

    def __str__(self) -> str:
        return f"{self.message} (error {self.code} on {self.method} {self.path})"


@dataclass(frozen=True)
class ClientConfig:
    url: str
    user: str
    password: str
    source: str = ""  # where user and password came from, for error messages

    @classmethod
    def resolve(cls, *, url: str | None = None, user: str | None = None,
                password: str | None = None, environ: dict[str, str] | None = None
                ) -> ClientConfig:
        """Flags first, then NANO_URL/NANO_USER/NANO_PASSWORD, then the client file."""
        env = os.environ if environ is None else environ
        path = Path(env.get("NANO_CLIENT_CONFIG")
                    or Path(env.get("HOME", "~")).expanduser() / ".config/nano/client.yaml")
        file: dict[str, Any] = {}
        if path.is_file():
            try:
                loaded = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ClientError(f"{path}: not valid YAML: {exc}") from None
            if not isinstance(loaded, dict):
                raise ClientError(f"{path}: want a mapping with keys url, user, password")
            file = loaded

        def pick(flag: str | None, var: str, key: str, default: str = "") -> tuple[str, str]:
            if flag:
                return flag, "flags"
            if env.get(var):
                return env[var], "environment"
            if file.get(key) not in (None, ""):
                return str(file[key]), str(path)
            return default, ""

        url_value, _ = pick(url, "NANO_URL", "url", DEFAULT_URL)
        user_value, source = pick(user, "NANO_USER", "user")
        password_value, _ = pick(password, "NANO_PASSWORD", "password")
        return cls(url_value.rstrip("/"), user_value, password_value, source)


@dataclass(frozen=True)
class Reply:
    status: int
    code: int
    message: str
    data: Any
    etag: str = ""  # the resource's generation, quoted, on a GET of one that has one


class NanoClient:
    """Talks to one nanod; logs in on first use and again once when a session expires."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        base = config.url
        self.base = base if base.endswith("/api/v1") else base + "/api/v1"
        self._session = ""
        self.login_group = ""

    # -- plumbing -------------------------------------------------------------------------

    def _send(self, method: str, path: str, body: bytes | Iterator[bytes] | None,
              headers: dict[str, str]) -> Reply:
        request = urllib.request.Request(self.base + path, data=body, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                status, raw = response.status, response.read()
                tag = response.headers.get("ETag", "")
        except urllib.error.HTTPError as exc:
            status, raw, tag = exc.code, exc.read(), ""
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(f"cannot reach nanod at {self.config.url}: {reason} (set --url, "
                              "NANO_URL or url in the client file)") from None
        try:
            doc = json.loads(raw or b"{}")
        except ValueError:
            raise ClientError(f"{method} {path}: HTTP {status}, not a Nano reply: "
                              f"{raw[:200]!r}") from None
        if not isinstance(doc, dict) or "error_code" not in doc:
            raise ClientError(f"{method} {path}: HTTP {status}, not a Nano envelope")
        return Reply(status, int(doc["error_code"]), str(doc.get("message", "")),
                     doc.get("data"), tag)

    def login(self) -> None:
        if not self.config.user or not self.config.password:
            raise ClientError("no credentials: give --user and --password, set NANO_USER and "
                              "NANO_PASSWORD, or write them in ~/.config/nano/client.yaml")
        body = json.dumps({"user": self.config.user, "password": self.config.password,
                           "nonce": secrets.token_hex(8)}).encode()
        reply = self._send("POST", "/sessions/", body, {"Content-Type": "application/json"})
        if reply.code != 0:
            raise ClientError(f"login as {self.config.user!r} failed: {reply.message}")
        self._session = reply.data["session"]
        self.login_group = reply.data.get("group", "")

    def call(self, method: str, path: str, body: Any = None, *,
             raw: bytes | Iterator[bytes] | None = None,
             headers: dict[str, str] | None = None) -> Reply:
        """One request; the reply whatever its error code (login is automatic)."""
        if not self._session:
            self.login()
        for attempt in (1, 2):
            hdrs = {"Content-Type": "application/json", SESSION_HEADER: self._session,
                    **(headers or {})}
            payload = raw if raw is not None else (
                json.dumps(body).encode() if body is not None
                else b"" if method in ("POST", "PUT", "PATCH", "DELETE") else None)
            reply = self._send(method, path, payload, hdrs)
            if reply.code == 401 and attempt == 1 and raw is None:
                self.login()
                continue
            return reply
        return reply

    def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        """One request that must succeed; returns `data`, raises ApiError otherwise."""
        reply = self.call(method, path, body, **kw)
        if reply.code != 0:
            raise ApiError(reply.code, reply.message, method, path)
        return reply.data

    def get(self, path: str) -> Any:
        """GET `path`; None when the API answers 404 (no such resource)."""
        return self.get_tagged(path)[0]

    def get_tagged(self, path: str) -> tuple[Any, str]:
        """GET `path` and the ETag of what it read ("" when the resource has none); None
        when the API answers 404. The ETag goes back as If-Match on the update, so a
        change made by someone else in between is refused, not overwritten."""
        reply = self.call("GET", path)
        if reply.code == 404:
            return None, ""
        if reply.code != 0:
            raise ApiError(reply.code, reply.message, "GET", path)
        return reply.data, reply.etag

    def open_stream(self, path: str, headers: dict[str, str]
                    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse] | None:
        """GET `path` as a stream (Server-Sent Events): the connection and its response to
        read lines from, or None when this nanod does not serve `path` (an older one). A
        plain connection rather than urlopen, so `close_stream` can end a read in
        progress. The server sends a comment every 15 s, so a read that waits
        STREAM_TIMEOUT means it is gone."""
        if not self._session:
            self.login()
        url = urllib.parse.urlsplit(self.base + path)
        kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        for attempt in (1, 2):
            conn = kind(url.hostname or "", url.port, timeout=STREAM_TIMEOUT)
            try:
                conn.request("GET", url.path + (f"?{url.query}" if url.query else ""),
                             headers={SESSION_HEADER: self._session, **headers})
                response = conn.getresponse()
            except OSError as exc:
                conn.close()
                raise ClientError(f"cannot reach nanod at {self.config.url}: {exc}") from None
            if response.getheader("Content-Type", "").startswith("text/event-stream"):
                return conn, response
            try:  # not a stream: the envelope says why
                doc = json.loads(response.read() or b"{}")
            finally:
                conn.close()
            code, message = int(doc.get("error_code", -1)), str(doc.get("message", ""))
            if code == 401 and attempt == 1:
                self.login()
                continue
            if code == 404 and message.startswith("no route"):
                return None
            raise ApiError(code, message, "GET", path)
        return None

    @staticmethod
    def close_stream(conn: http.client.HTTPConnection) -> None:
        """End a stream from `open_stream`, also while another thread reads it."""
        if conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()

    def has_route(self, path: str) -> bool:
        """Whether this nanod serves `path` (a 404 "no route" means it is not built yet)."""
        reply = self.call("GET", path)
        return not (reply.code == 404 and reply.message.startswith("no route"))

    def upload(self, path: str, file_path: Path, *, field: str = "image",
               fields: dict[str, str] | None = None) -> Any:
        """POST a file as multipart/form-data (streamed from disk, never read whole)."""
        boundary = "nano-" + secrets.token_hex(12)
        head = b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
            f"{value}\r\n".encode()
            for name, value in (fields or {}).items()
        )
        head += (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                 f'filename="{file_path.name}"\r\nContent-Type: application/octet-stream'
                 f"\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        size = len(head) + file_path.stat().st_size + len(tail)

        def chunks() -> Iterator[bytes]:
            yield head
            with file_path.open("rb") as handle:
                while block := handle.read(1 << 20):
                    yield block
            yield tail

        return self.ok("POST", path, raw=chunks(), headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(size),
        })
