"""Request bodies over the limit, sent over a real socket to a real nanod: a JSON route
answers a body announced too large (Content-Length) before the client has sent it, with
the envelope's 400 and `Connection: close`, and closes the connection: writes after the
answer fail, so the server is no longer reading. A chunked body is answered and cut off as
soon as it passes the limit. Every route of the table refuses an announced oversized body
without reading it; only the image upload routes take more than `api.max_json_bytes`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpclient import TCPClient

from tests.api.route_walk import fill, handled_methods, walked_routes
from tests.api.test_images import BOUNDARY, create, file_path, make_iso, upload

MIB = 1 << 20
HUGE = 100 * MIB  # what the oversized requests announce; they never send it
LIMIT = 1 * MIB  # api.max_json_bytes by default
BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")


async def connect(server: Any) -> IOStream:
    return await TCPClient().connect("127.0.0.1", server.port)


def head(method: str, path: str, *, session: str = "", extra: str = "") -> bytes:
    lines = [f"{method} /api/v1{path} HTTP/1.1", "Host: 127.0.0.1",
             "Content-Type: application/json"]
    if session:
        lines.append(f"Nano-Session: {session}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def parse(response: bytes) -> tuple[str, dict[str, str], dict[str, Any]]:
    """(status line, headers in lower case, envelope) of one HTTP/1.1 response."""
    top, _, body = response.partition(b"\r\n\r\n")
    status, *lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return status, headers, json.loads(body)


async def answer_without_sending_the_body(server: Any, method: str, path: str, length: int, *,
                                          session: str = "", sent: bytes = b"",
                                          content_type: str = "") -> bytes:
    """Announce `length` bytes, send only `sent`, and read until the server closes: the
    whole answer. Fails when the server waits for the body instead (it never comes)."""
    stream = await connect(server)
    try:
        extra = f"Content-Length: {length}\r\n"
        request = head(method, path, session=session, extra=extra)
        if content_type:
            request = request.replace(b"Content-Type: application/json",
                                      f"Content-Type: {content_type}".encode())
        await stream.write(request + sent)
        try:
            return await asyncio.wait_for(stream.read_until_close(), 10)
        except TimeoutError:
            raise AssertionError(f"{method} {path}: no answer and no close while "
                                 f"{length - len(sent)} announced bytes were never sent") from None
    finally:
        stream.close()


async def server_stopped_reading(stream: IOStream, budget: int = 64 * MIB) -> int:
    """Write up to `budget` bytes after the answer; returns how many went out before the
    connection refused them (a server still reading would take them all)."""
    piece, written = b"x" * MIB, 0
    try:
        while written < budget:
            await stream.write(piece)
            written += len(piece)
    except StreamClosedError:
        return written
    raise AssertionError(f"the server took {written} more bytes after it answered")


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("route", ["login", "authenticated"])
async def test_announced_oversized_json_body_is_refused_before_it_is_sent(api, server, route):
    method, path, session = (("POST", "/sessions/", "") if route == "login"
                             else ("POST", "/roles/big", api.session))
    stream = await connect(server)
    reading = asyncio.ensure_future(stream.read_until_close())
    await stream.write(head(method, path, session=session, extra=f"Content-Length: {HUGE}\r\n")
                       + b'{"menu": [' + b'"x", ' * 100)
    response = await asyncio.wait_for(reading, 10)  # the server closed: we sent ~600 bytes
    status, headers, doc = parse(response)
    assert status == "HTTP/1.1 200 OK"  # errors keep HTTP 200 (COMPATIBILITY.md)
    assert headers["connection"] == "close"
    assert doc["error_code"] == 400 and doc["data"] is None
    assert "too large" in doc["message"] and str(LIMIT) in doc["message"]
    assert "api.max_json_bytes" in doc["message"]
    sent_after = await server_stopped_reading(stream)
    assert sent_after < 64 * MIB
    stream.close()
    # nothing was made, and the server serves the next connection as before
    assert await api.ok("GET", "/roles/") == ["super"]


@pytest.mark.gen_test(timeout=60)
async def test_chunked_json_body_is_cut_off_once_past_the_limit(api, server):
    stream = await connect(server)
    reading = asyncio.ensure_future(stream.read_until_close())
    await stream.write(head("POST", "/roles/big", session=api.session,
                            extra="Transfer-Encoding: chunked\r\n"))
    piece = b" " * (64 << 10)
    written = 0
    try:
        while not reading.done() and written < HUGE:
            await stream.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            written += len(piece)
            await asyncio.sleep(0)
    except StreamClosedError:
        pass  # the server closed while we were still sending: what we want
    response = await asyncio.wait_for(reading, 10)
    # the socket buffers on both sides take a few MiB before a writer notices the close
    assert written < HUGE / 4, f"the client sent {written} bytes before the answer"
    status, headers, doc = parse(response)
    assert status == "HTTP/1.1 200 OK" and headers["connection"] == "close"
    assert doc["error_code"] == 400 and "too large" in doc["message"]
    if not stream.closed():
        await server_stopped_reading(stream)
    stream.close()
    assert await api.ok("GET", "/roles/") == ["super"]


SMALL_LIMIT = 4096
"""api.max_json_bytes of the server in test_the_limit_is_exact_and_a_setting."""


@pytest.fixture
def settings(settings: dict[str, Any], request: pytest.FixtureRequest) -> dict[str, Any]:
    settings["images"]["max_upload_bytes"] = 4 * MIB
    if request.function.__name__ == "test_the_limit_is_exact_and_a_setting":
        settings["api"]["max_json_bytes"] = SMALL_LIMIT
    return settings


@pytest.mark.gen_test(timeout=60)
async def test_the_limit_is_exact_and_a_setting(api, server):
    """A body of exactly the limit is read and parsed; one byte more is refused. The limit
    is the setting api.max_json_bytes (4096 for this test's nanod)."""
    body = json.dumps({"menu": ["dashboard"]}).encode()
    exact = body + b" " * (SMALL_LIMIT - len(body))
    reply = await api.call("POST", "/roles/padded", raw=exact)
    assert reply.code == 0, reply.message
    assert await api.ok("GET", "/roles/padded") == {"menu": ["dashboard"]}
    reply = await api.call("POST", "/roles/over", raw=exact + b" ")
    assert reply.code == 400 and f"at most {SMALL_LIMIT} bytes" in reply.message
    assert await api.ok("GET", "/roles/") == ["padded", "super"]


@pytest.mark.gen_test(timeout=60)
async def test_only_image_uploads_take_large_bodies(api, server):
    image_id = await create(api, "media", "big")
    iso = make_iso(payload=b"\x5a" * (2 * MIB))  # more than a JSON body may be
    reply = await upload(api, "media", image_id, iso)
    assert reply.code == 0, reply.message
    assert reply.data["size"] == len(iso)
    # the same route's JSON methods, and the image's own route, keep the JSON limit
    padded = json.dumps({"description": "d"}).encode() + b" " * (2 * MIB)
    for method, path in (("PUT", f"/media_images/{image_id}"),
                         ("DELETE", file_path("media", image_id))):
        reply = await api.call(method, path, raw=padded)
        assert reply.code == 400 and "request body too large" in reply.message, (method, path)
    # an upload announced over images.max_upload_bytes is refused before it is sent, too
    response = await answer_without_sending_the_body(
        server, "POST", file_path("media", image_id), HUGE, session=api.session,
        content_type=f"multipart/form-data; boundary={BOUNDARY}")
    _, headers, doc = parse(response)
    assert doc["error_code"] == 400 and "the file is too large" in doc["message"]
    assert headers["connection"] == "close"
    data = await api.ok("GET", f"/media_images/{image_id}")
    assert data["size"] == len(iso)  # the stored version is untouched


@pytest.mark.gen_test(timeout=120)
async def test_every_route_refuses_an_announced_oversized_body_unread(api, server):
    """The route table walked (tests/api/test_envelope.py's walk): each method that takes
    a body, announced one byte over its limit and never sent, is answered at once. Without
    a session: the size is checked first, so no request gets further."""
    tried = 0
    for pattern, handler in walked_routes(server):
        uploads = pattern.endswith("/file/?") or "_image_files/" in pattern
        for method in handled_methods(handler):
            if method not in BODY_METHODS:
                continue
            path = fill(pattern)
            limit = 4 * MIB + MIB if uploads and method == "POST" else LIMIT
            response = await answer_without_sending_the_body(server, method, path, limit + 1)
            _, headers, doc = parse(response)
            assert doc["error_code"] == 400 and "too large" in doc["message"], (method, path, doc)
            assert headers["connection"] == "close", (method, path)
            tried += 1
    print(f"{tried} (route, method) pairs refused an oversized body unread")
    assert tried > 60


@pytest.mark.gen_test(timeout=60)
async def test_a_client_gone_half_way_leaves_no_request_waiting(api, server):
    """A body announced and never finished: when the client goes away, the request is
    over (no handler task waits for the rest for ever)."""
    def waiting() -> list[asyncio.Task]:
        return [t for t in asyncio.all_tasks()
                if "RequestHandler._execute" in getattr(t.get_coro(), "__qualname__", "")]

    before = len(waiting())
    stream = await connect(server)
    await stream.write(head("POST", "/roles/half", session=api.session,
                            extra="Content-Length: 1000\r\n") + b'{"menu": [')
    for _ in range(100):
        if len(waiting()) > before:
            break
        await asyncio.sleep(0.02)
    assert len(waiting()) == before + 1  # the handler waits for the body
    stream.close()
    for _ in range(250):
        if len(waiting()) == before and server.ctx.extras.get("inflight", 0) == 0:
            break
        await asyncio.sleep(0.02)
    assert len(waiting()) == before and server.ctx.extras.get("inflight", 0) == 0
    assert await api.ok("GET", "/roles/") == ["super"]


@pytest.mark.gen_test(timeout=60)
async def test_routes_outside_the_envelope_keep_the_servers_small_limit(api, server):
    """The console websocket is no JSON route of ours and reads no body: Tornado itself
    refuses one announced over api.max_json_bytes (a bare 400, before reading it) instead
    of buffering it in memory; OPTIONS (CORS preflight) is refused with the envelope."""
    stream = await connect(server)
    await stream.write(f"GET /monitor_channels/none HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       f"Content-Length: {HUGE}\r\n\r\n".encode() + b"x" * 100)
    response = await asyncio.wait_for(stream.read_until_close(), 10)
    assert response.startswith(b"HTTP/1.1 400")
    response = await answer_without_sending_the_body(server, "OPTIONS", "/roles/", HUGE)
    _, headers, doc = parse(response)
    assert doc["error_code"] == 400 and headers["connection"] == "close"
