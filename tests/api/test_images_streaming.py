"""How an upload's body is read: a body with a Content-Length bigger than all the receive
buffers together (the ring wraps several times, the file starts at an odd place), sent
after an `Expect: 100-continue`; a chunked body (read by Tornado, piece by piece); and
the connection after an upload, which must go on with the next request exactly where
the body ended (the handler reads a claimed body itself, Tornado is told it is empty);
and a client that stops sending half way, which is cut off after
`images.upload_idle_seconds`."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from tornado.tcpclient import TCPClient

from api.images import RECEIVE_BUFFER, RECEIVE_BUFFERS
from tests.api.test_images import (
    BOUNDARY,
    create,
    download,
    file_path,
    iso_payload,
    multipart,
    request_head,
    sha1,
)
from tests.api.test_images_files import temp_files

BIG = RECEIVE_BUFFER * RECEIVE_BUFFERS * 5 // 4 + 12_345


@pytest.fixture
def settings(settings: dict[str, Any]) -> dict[str, Any]:
    settings["images"]["max_upload_bytes"] = 2 * BIG
    settings["images"]["upload_idle_seconds"] = 1.0
    return settings


async def read_response(stream: Any) -> tuple[bytes, dict]:
    head = await stream.read_until(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return head, json.loads(await stream.read_bytes(length))


@pytest.mark.gen_test(timeout=60)
async def test_a_body_bigger_than_the_receive_ring_arrives_whole(api):
    image_id = await create(api, "media", "big")
    data = iso_payload(BIG)
    # an odd-length field first: the file starts at no particular alignment
    body = multipart([("checksum", None, sha1(data).encode() + b" "), ("image", "b.iso", data)])
    response = await api.http.fetch(
        api.base + file_path("media", image_id), method="POST", body=body, raise_error=False,
        expect_100_continue=True, request_timeout=60, headers={
            "Nano-Session": api.session,
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    doc = json.loads(response.body)
    assert doc["error_code"] == 0, doc["message"]
    assert doc["data"] == {"version": 1, "size": len(data), "checksum": sha1(data)}
    got = await download(api, file_path("media", image_id))
    assert got.body == data and got.headers["Signature"] == sha1(data)


@pytest.mark.gen_test(timeout=60)
async def test_a_chunked_body_is_stored_whole(api, server):
    image_id = await create(api, "media", "chunked")
    data = iso_payload(5 << 20)
    body = multipart([("image", "c.iso", data)])
    stream = await TCPClient().connect("127.0.0.1", server.port)
    await stream.write(request_head(api, file_path("media", image_id),
                                    "Transfer-Encoding: chunked\r\n"))
    for offset in range(0, len(body), 100_000):
        piece = body[offset:offset + 100_000]
        await stream.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
    await stream.write(b"0\r\n\r\n")
    head, doc = await read_response(stream)
    stream.close()
    assert head.startswith(b"HTTP/1.1 200") and doc["error_code"] == 0, doc["message"]
    assert doc["data"]["checksum"] == sha1(data)
    assert (await download(api, file_path("media", image_id))).body == data


@pytest.mark.gen_test(timeout=60)
async def test_the_connection_goes_on_with_the_next_request_after_an_upload(api, server):
    image_id = await create(api, "media", "kept")
    data = iso_payload(3 << 20)
    body = multipart([("image", "k.iso", data)])
    stream = await TCPClient().connect("127.0.0.1", server.port)
    # the next request is sent at once behind the body (pipelined)
    await stream.write(
        request_head(api, file_path("media", image_id), f"Content-Length: {len(body)}\r\n")
        + body + (f"GET /api/v1/media_images/{image_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
           f"Nano-Session: {api.session}\r\n\r\n").encode())
    _, uploaded = await read_response(stream)
    _, image = await read_response(stream)
    stream.close()
    assert uploaded["error_code"] == 0 and uploaded["data"]["checksum"] == sha1(data)
    assert image["error_code"] == 0
    assert (image["data"]["name"], image["data"]["checksum"]) == ("kept", sha1(data))


@pytest.mark.gen_test(timeout=60)
async def test_a_client_that_stops_sending_is_cut_off(api, server, settings):
    image_id = await create(api, "media", "stalled")
    body = multipart([("image", "s.iso", iso_payload(2 << 20))])
    stream = await TCPClient().connect("127.0.0.1", server.port)
    await stream.write(
        request_head(api, file_path("media", image_id), f"Content-Length: {len(body)}\r\n")
        + body[:len(body) // 2])
    started = time.monotonic()
    closed = await asyncio.wait_for(stream.read_until_close(), 20)  # the server hangs up
    assert closed == b""
    assert time.monotonic() - started >= 0.9
    for _ in range(100):
        if not server.ctx.extras["images"].uploading and not temp_files(settings):
            break
        await asyncio.sleep(0.05)
    assert not server.ctx.extras["images"].uploading and temp_files(settings) == []
    data = await api.ok("GET", f"/media_images/{image_id}")
    assert (data["created"], data["progress"]) == (False, 0)
