"""Image files through the API with real ISO (pycdlib) and qcow2 (qemu-img) files: upload and
download on both path styles, checksums before or after the file, mismatches and wrong
files refused with the previous version intact, an upload cut off half way by the client,
oversized uploads, range downloads, hostile file names, deletion, and the import sync."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from typing import Any

import pytest
from tornado.iostream import StreamClosedError
from tornado.tcpclient import TCPClient

from api.images import RangeNotSatisfiable, parse_range
from state.models import Image
from tests.api.test_images import (
    BOUNDARY,
    create,
    download,
    file_path,
    make_iso,
    make_qcow2,
    make_user,
    multipart,
    request_head,
    sha1,
    upload,
)

LIMIT = 4 << 20  # max_upload_bytes in these tests


@pytest.fixture
def settings(settings: dict[str, Any]) -> dict[str, Any]:
    settings["images"]["max_upload_bytes"] = LIMIT
    return settings


def store_files(settings: dict[str, Any], kind: str) -> list[str]:
    folder = os.path.join(settings["data_dir"], "images", kind)
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def temp_files(settings: dict[str, Any]) -> list[str]:
    """The temp files of uploads: images/tmp/<replica id>/*.part (state/images.py)."""
    folder = os.path.join(settings["image_dir"], "tmp")
    return sorted(name for _, _, names in os.walk(folder) for name in names)


async def eventually(check: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.05)


# -- upload and download -----------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_media_upload_and_download_on_both_path_styles(api, settings):
    image_id = await create(api, "media", "tiny")
    iso = make_iso()
    reply = await upload(api, "media", image_id, iso, path=f"/media_image_files/{image_id}")
    assert reply.code == 0, reply.message
    assert reply.data == {"version": 1, "size": len(iso), "checksum": sha1(iso)}
    for path in (f"/media_images/{image_id}/file/", f"/media_images/{image_id}/file",
                 f"/media_image_files/{image_id}"):
        got = await download(api, path)
        assert got.code == 200 and got.body == iso
        assert got.headers["Signature"] == sha1(iso)
        assert int(got.headers["Content-Length"]) == len(iso)
        assert got.headers["Content-Disposition"] == 'attachment; filename="tiny.iso"'
    head = await download(api, file_path("media", image_id), method="HEAD")
    assert head.code == 200 and head.body == b"" and head.headers["Signature"] == sha1(iso)
    data = await api.ok("GET", f"/media_images/{image_id}")
    assert (data["created"], data["size"], data["checksum"]) == (True, len(iso), sha1(iso))
    assert store_files(settings, "media") == [f"{image_id}.1.iso"]
    assert temp_files(settings) == []

    # a second upload replaces the file: new version, old file gone (just after the answer)
    iso2 = make_iso(payload=b"second version\n" * 1000)
    assert (await upload(api, "media", image_id, iso2)).code == 0
    assert (await download(api, f"/media_image_files/{image_id}")).body == iso2
    await eventually(lambda: store_files(settings, "media") == [f"{image_id}.2.iso"])


@pytest.mark.gen_test(timeout=30)
async def test_disk_upload_with_checksum_before_or_after_the_file(api, tmp_path, settings):
    image_id = await create(api, "disk", "centos7")
    qcow = make_qcow2(tmp_path, "16M")
    after = await upload(api, "disk", image_id, qcow, checksum=sha1(qcow))
    assert after.code == 0, after.message
    qcow2 = make_qcow2(tmp_path, "32M")
    before = await upload(api, "disk", image_id, qcow2, checksum=sha1(qcow2).upper(),
                          checksum_first=True, path=f"/disk_image_files/{image_id}")
    assert before.code == 0, before.message and before.data["version"] == 2
    got = await download(api, f"/disk_images/{image_id}/file/")
    assert got.body == qcow2 and got.headers["Signature"] == sha1(qcow2)


@pytest.mark.gen_test(timeout=30)
async def test_checksum_mismatch_is_refused_and_the_previous_version_stays(api, tmp_path,
                                                                          settings):
    image_id = await create(api, "disk", "d")
    first = make_qcow2(tmp_path, "16M")
    assert (await upload(api, "disk", image_id, first)).code == 0
    second = make_qcow2(tmp_path, "64M")
    for checksum_first in (False, True):
        reply = await upload(api, "disk", image_id, second, checksum="0" * 40,
                             checksum_first=checksum_first)
        assert reply.code == 400 and "checksum mismatch" in reply.message
        assert sha1(second) in reply.message
    bad = await upload(api, "disk", image_id, second, checksum="not-a-sha1")
    assert bad.code == 400 and "not a SHA-1" in bad.message
    data = await api.ok("GET", f"/disk_images/{image_id}")
    assert (data["checksum"], data["size"], data["progress"]) == (sha1(first), len(first), 100)
    assert (await download(api, file_path("disk", image_id))).body == first
    assert store_files(settings, "disk") == [f"{image_id}.1.qcow2"]
    assert temp_files(settings) == []


@pytest.mark.gen_test(timeout=30)
async def test_wrong_files_and_fields_get_clear_errors(api, tmp_path, settings):
    disk = await create(api, "disk", "d")
    media = await create(api, "media", "m")
    iso, qcow = make_iso(), make_qcow2(tmp_path)
    reply = await upload(api, "disk", disk, iso)
    assert reply.code == 400 and "not a qcow2 file" in reply.message
    reply = await upload(api, "media", media, qcow)
    assert reply.code == 400 and "not an ISO 9660 image" in reply.message
    reply = await upload(api, "media", media, b"")
    assert reply.code == 400 and "empty" in reply.message
    wrong_field = multipart([("file", "x.iso", iso)])
    reply = await api.call("POST", file_path("media", media), raw=wrong_field, headers={
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert reply.code == 400 and "field 'image'" in reply.message
    no_file = multipart([("checksum", None, sha1(iso).encode())])
    reply = await api.call("POST", file_path("media", media), raw=no_file, headers={
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert reply.code == 400 and "field 'image'" in reply.message
    reply = await api.call("POST", file_path("media", media), raw=iso,
                           headers={"Content-Type": "application/octet-stream"})
    assert reply.code == 400 and "multipart/form-data" in reply.message
    truncated = multipart([("image", "x.iso", iso)])[:-20]
    reply = await api.call("POST", file_path("media", media), raw=truncated, headers={
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert reply.code == 400 and "closing boundary" in reply.message
    missing = await download(api, file_path("media", media))
    assert json.loads(missing.body)["error_code"] == 404
    assert "no file yet" in json.loads(missing.body)["message"]
    for image, kind in ((disk, "disk"), (media, "media")):
        data = await api.ok("GET", f"/{kind}_images/{image}")
        assert data["created"] is False and data["progress"] == 0
    assert store_files(settings, "disk") == [] and store_files(settings, "media") == []
    assert temp_files(settings) == []


@pytest.mark.gen_test(timeout=30)
async def test_client_disconnecting_half_way_leaves_the_previous_version(api, server, settings):
    image_id = await create(api, "media", "m")
    old = make_iso()
    assert (await upload(api, "media", image_id, old)).code == 0
    new = make_iso(payload=os.urandom(3 << 20))
    body = multipart([("image", "new.iso", new)])
    half = len(body) // 2
    stream = await TCPClient().connect("127.0.0.1", server.port)
    await stream.write(request_head(api, file_path("media", image_id),
                                    f"Content-Length: {len(body)}\r\n") + body[:half])
    await eventually(lambda: len(temp_files(settings)) == 1)
    await asyncio.sleep(0.6)  # progress is stored at most every 0.5 s
    await stream.write(body[half:half + 4096])

    async def progress() -> int:
        return (await api.ok("GET", f"/media_images/{image_id}"))["progress"]

    for _ in range(100):
        if 0 < await progress() < 100:
            break
        await asyncio.sleep(0.05)
    assert 40 <= await progress() <= 60
    busy = await upload(api, "media", image_id, old)
    assert busy.code == 422 and "already running" in busy.message

    stream.close()  # the client goes away half way
    await eventually(lambda: temp_files(settings) == [])
    await eventually(lambda: not server.ctx.extras["images"].uploading)
    data = await api.ok("GET", f"/media_images/{image_id}")
    assert (data["checksum"], data["size"], data["progress"]) == (sha1(old), len(old), 100)
    got = await download(api, file_path("media", image_id))
    assert got.body == old and got.headers["Signature"] == sha1(old)
    assert store_files(settings, "media") == [f"{image_id}.1.iso"]
    # the image is free again
    assert (await upload(api, "media", image_id, new)).code == 0


@pytest.mark.gen_test(timeout=30)
async def test_progress_of_a_first_upload_and_reset_when_cut_off(api, server, settings,
                                                                 tmp_path):
    image_id = await create(api, "disk", "d")
    qcow = make_qcow2(tmp_path) + os.urandom(3 << 20)  # header sniffing only reads the start
    body = multipart([("image", "d.qcow2", qcow)])
    stream = await TCPClient().connect("127.0.0.1", server.port)
    quarter = len(body) // 4
    await stream.write(request_head(api, file_path("disk", image_id),
                                    f"Content-Length: {len(body)}\r\n") + body[:quarter])
    await asyncio.sleep(0.6)
    await stream.write(body[quarter:quarter + 4096])
    for _ in range(100):  # progress is written in the background: it arrives soon
        reply = await api.call("GET", f"/disk_images/{image_id}")
        if reply.data["progress"] >= 20:
            break
        await asyncio.sleep(0.05)
    assert reply.status == 202 and reply.data["created"] is False
    assert 20 <= reply.data["progress"] <= 30
    # the upload runs on this replica, its temp file in the replica's own temp directory
    replica = settings["replicas"]["id"]
    assert Image.get_by_id(image_id).uploader == replica
    assert os.listdir(os.path.join(settings["image_dir"], "tmp")) == [replica]
    stream.close()
    await eventually(lambda: temp_files(settings) == [])
    await eventually(lambda: not server.ctx.extras["images"].uploading)
    # the upload is over: an empty image again, 200 with created false
    reply = await api.call("GET", f"/disk_images/{image_id}")
    assert reply.status == 200 and reply.data["created"] is False
    assert reply.data["progress"] == 0 and reply.data["size"] == 0
    assert Image.get_by_id(image_id).uploader == ""


# -- size limit ----------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_oversized_upload_announced_by_content_length(api, settings):
    image_id = await create(api, "media", "big")
    body = multipart([("image", "big.iso", make_iso(payload=os.urandom(LIMIT + (2 << 20))))])
    response = await api.http.fetch(
        api.base + file_path("media", image_id), method="POST", body=body, raise_error=False,
        expect_100_continue=True, headers={
            "Nano-Session": api.session,
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    doc = json.loads(response.body)
    assert doc["error_code"] == 400 and "too large" in doc["message"]
    assert str(LIMIT) in doc["message"]
    data = await api.ok("GET", f"/media_images/{image_id}")
    assert data["created"] is False and data["size"] == 0
    assert store_files(settings, "media") == [] and temp_files(settings) == []


@pytest.mark.gen_test(timeout=30)
async def test_oversized_upload_without_content_length_is_cut_off(api, server, settings):
    """Chunked: the size is only known by counting; the server answers as soon as the file
    passes the limit and closes the connection."""
    image_id = await create(api, "media", "big")
    body = multipart([("image", "big.iso", make_iso(payload=os.urandom(LIMIT + (2 << 20))))])
    stream = await TCPClient().connect("127.0.0.1", server.port)
    await stream.write(request_head(api, file_path("media", image_id),
                                    "Transfer-Encoding: chunked\r\n"))
    received = b""
    reading = asyncio.ensure_future(stream.read_until_close())
    try:
        for offset in range(0, len(body), 64 << 10):
            piece = body[offset:offset + (64 << 10)]
            await stream.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        await stream.write(b"0\r\n\r\n")
    except StreamClosedError:
        pass
    try:
        received = await asyncio.wait_for(reading, 10)
    except StreamClosedError:
        received = b""
    assert received.startswith(b"HTTP/1.1 200")
    doc = json.loads(received.split(b"\r\n\r\n", 1)[1])
    assert doc["error_code"] == 400 and "too large" in doc["message"]
    await eventually(lambda: temp_files(settings) == [])
    data = await api.ok("GET", f"/media_images/{image_id}")
    assert data["created"] is False and data["progress"] == 0
    assert store_files(settings, "media") == []


# -- ranges --------------------------------------------------------------------------------------


def test_parse_range():
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=-1000", 100) == (0, 99)
    assert parse_range("bytes=50-1000", 100) == (50, 99)
    for bad in ("bytes=100-", "bytes=5-2", "bytes=-0", "bytes=-", "items=0-1", "bytes=0-1,3-4",
                "bytes=a-b"):
        with pytest.raises(RangeNotSatisfiable):
            parse_range(bad, 100)


@pytest.mark.gen_test(timeout=30)
async def test_range_downloads(api):
    image_id = await create(api, "media", "r")
    iso = make_iso(payload=os.urandom(300_000))
    assert (await upload(api, "media", image_id, iso)).code == 0
    path = file_path("media", image_id)
    size = len(iso)
    for header, first, last in (("bytes=0-99", 0, 99), ("bytes=32768-", 32768, size - 1),
                                ("bytes=-1000", size - 1000, size - 1),
                                (f"bytes=100-{size + 50}", 100, size - 1)):
        got = await download(api, path, {"Range": header})
        assert got.code == 206, header
        assert got.headers["Content-Range"] == f"bytes {first}-{last}/{size}"
        assert got.body == iso[first:last + 1]
        assert int(got.headers["Content-Length"]) == last - first + 1
        assert got.headers["Signature"] == sha1(iso)  # of the whole file
    for header in (f"bytes={size}-", "bytes=9-3", "bytes=0-1,5-6", "lines=1-2"):
        got = await download(api, path, {"Range": header})
        assert got.code == 416, header
        assert got.headers["Content-Range"] == f"bytes */{size}"
        assert json.loads(got.body)["error_code"] == 400


# -- hostile names -----------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_client_file_names_never_reach_the_file_system(api, settings):
    target = "/tmp/nano-evil-upload.iso"
    if os.path.exists(target):
        os.unlink(target)
    image_id = await create(api, "media", "m")
    iso = make_iso()
    for filename in ("../../../../../../tmp/nano-evil-upload.iso", "/tmp/nano-evil-upload.iso",
                     "..\\..\\evil.iso", "a\r\nX-Injected: 1.iso", "."):
        reply = await upload(api, "media", image_id, iso, filename=filename)
        assert reply.code == 0, (filename, reply.message)
    assert not os.path.exists(target)
    await eventually(lambda: store_files(settings, "media") == [f"{image_id}.5.iso"])
    got = await download(api, file_path("media", image_id))
    assert got.headers["Content-Disposition"] == 'attachment; filename="m.iso"'
    # hostile ids in the path find nothing
    for bad in ("..%2F..%2Fetc%2Fpasswd", "%2E%2E", image_id + "%00"):
        reply = await api.call("GET", f"/media_images/{bad}/file/")
        assert reply.code == 404, bad


@pytest.mark.gen_test(timeout=30)
async def test_deleting_an_image_removes_its_files(api, tmp_path, settings):
    keep = await create(api, "disk", "keep")
    drop = await create(api, "disk", "drop")
    for image_id in (keep, drop):
        assert (await upload(api, "disk", image_id, make_qcow2(tmp_path))).code == 0
    await api.ok("DELETE", f"/disk_images/{drop}")
    assert store_files(settings, "disk") == [f"{keep}.1.qcow2"]
    reply = await api.call("GET", file_path("disk", drop))
    assert reply.code == 404


# -- sync ------------------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_sync_imports_dropped_files_safely(api, settings, tmp_path):
    alice = await make_user(api, "alice", "g1")
    waiting = await create(api, "media", "waiting")  # never uploaded: sync must keep it
    lost = await create(api, "media", "lost")
    assert (await upload(api, "media", lost, make_iso())).code == 0
    os.unlink(os.path.join(settings["data_dir"], "images", "media", f"{lost}.1.iso"))

    first = (await api.ok("PATCH", "/media_images/", {}))  # creates the import directories
    assert [r["id"] for r in first["removed"]] == [lost]
    folder = os.path.join(settings["data_dir"], "import", "media")
    good, odd = make_iso(label="GOOD"), make_iso(label="ODD", payload=b"odd")
    with open(os.path.join(folder, "Good.ISO"), "wb") as fh:
        fh.write(good)
    with open(os.path.join(folder, "odd name ü (1).iso").encode(), "wb") as fh:
        fh.write(odd)
    with open(os.path.join(folder, "garbage.iso"), "wb") as fh:
        fh.write(b"not an iso at all" * 4000)
    with open(os.path.join(folder, ".copying.iso"), "wb") as fh:
        fh.write(good)
    with open(os.path.join(folder, "readme.txt"), "w") as fh:
        fh.write("hi")
    outside = tmp_path / "outside.iso"
    outside.write_bytes(good)
    os.symlink(outside, os.path.join(folder, "link.iso"))
    os.mkfifo(os.path.join(folder, "fifo.iso"))
    os.mkdir(os.path.join(folder, "dir.iso"))
    with open(os.path.join(folder, "waiting.iso"), "wb") as fh:  # name taken in group g1 later
        fh.write(good)

    result = await api.ok("PATCH", "/media_images/", {"owner": "alice", "group": "g1"})
    imported = {i["name"]: i for i in result["imported"]}
    assert set(imported) == {"Good", "odd_name_1", "waiting"}
    skipped = {s["file"]: s["reason"] for s in result["skipped"]}
    assert "not an ISO 9660" in skipped["garbage.iso"]
    assert "symbolic links" in skipped["link.iso"]
    assert "not a regular file" in skipped["fifo.iso"] and "dir.iso" in skipped
    assert "readme.txt" in skipped and ".copying.iso" not in skipped
    assert result["removed"] == []
    assert sorted(os.listdir(folder)) == sorted(
        [".copying.iso", "dir.iso", "fifo.iso", "garbage.iso", "link.iso", "readme.txt"])
    assert outside.read_bytes() == good  # the symlink's target is untouched

    listed = {i["name"]: i for i in await alice.ok("GET", "/media_images/")}
    assert set(listed) == set(imported)
    got = await download(alice, file_path("media", imported["Good"]["id"]))
    assert got.body == good and got.headers["Signature"] == sha1(good)
    assert listed["Good"]["owner"] == "alice" and listed["Good"]["group"] == "g1"
    # the image waiting for its upload is still there
    assert (await api.ok("GET", f"/media_images/{waiting}"))["created"] is False
    for name in os.listdir(os.path.join(settings["data_dir"], "images", "media")):
        assert stat.S_ISREG(os.lstat(os.path.join(settings["data_dir"], "images", "media",
                                                  name)).st_mode)

    # a name already taken in the group is skipped, the file stays for the operator
    with open(os.path.join(folder, "Good.iso"), "wb") as fh:
        fh.write(good)
    again = await api.ok("PATCH", "/media_images/", {"owner": "alice", "group": "g1"})
    assert again["imported"] == [] and "already exists" in {
        s["file"]: s["reason"] for s in again["skipped"]}["Good.iso"]


@pytest.mark.gen_test(timeout=30)
async def test_sync_imports_disk_images_for_the_caller(api, settings, tmp_path):
    await api.ok("PATCH", "/disk_images/")
    folder = os.path.join(settings["data_dir"], "import", "disk")
    qcow = make_qcow2(tmp_path)
    with open(os.path.join(folder, "base.qcow2"), "wb") as fh:
        fh.write(qcow)
    with open(os.path.join(folder, "cd.qcow2"), "wb") as fh:
        fh.write(make_iso())
    result = await api.ok("PATCH", "/disk_images/")
    assert [i["name"] for i in result["imported"]] == ["base"]
    assert "not a qcow2" in result["skipped"][0]["reason"]
    image = (await api.ok("GET", "/disk_image_search/"))[0]
    assert (image["owner"], image["group"], image["created"]) == ("admin", "admin", True)
    assert image["checksum"] == sha1(qcow)
    reply = await api.call("GET", f"/disk_images/{image['id']}")
    assert reply.status == 200
    assert (await download(api, file_path("disk", image["id"]))).body == qcow
