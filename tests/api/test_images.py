"""Image metadata through the API: create, read, modify, delete, searches by tag, the
contract statuses, names unique per group, clone-from-guest refusals, and visibility for
two users in one group and one in another (users and groups created through the API).

Also holds the helpers of tests/api/test_images_files.py (real ISO and qcow2 files,
multipart bodies, raw downloads)."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import uuid
from typing import Any

import pycdlib
import pytest
import tornado.httpclient

from tests.conftest import Api

PASSWORD = "Us3rPassword"
BOUNDARY = "nanoTestBoundary0123456789"


# -- helpers ---------------------------------------------------------------------------------


def make_iso(label: str = "NANOTEST", payload: bytes = b"hello from nano\n") -> bytes:
    """A small, real ISO 9660 image built with pycdlib."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, vol_ident=label)
    iso.add_fp(io.BytesIO(payload), len(payload), "/HELLO.TXT;1", joliet_path="/hello.txt")
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def iso_payload(size: int) -> bytes:
    """`size` random bytes with the ISO 9660 signature where the media sniff looks: big
    test files without building a real ISO of that size."""
    data = bytearray(os.urandom(size))
    data[32769:32774] = b"CD001"
    return bytes(data)


def make_qcow2(tmp_path: Any, size: str = "16M") -> bytes:
    """A small, real qcow2 image made by qemu-img."""
    path = os.path.join(str(tmp_path), f"disk-{uuid.uuid4().hex}.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, size], check=True)
    try:
        with open(path, "rb") as fh:
            return fh.read()
    finally:
        os.unlink(path)


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def multipart(fields: list[tuple[str, str | None, bytes]], boundary: str = BOUNDARY) -> bytes:
    out = []
    for name, filename, content in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.append(f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode())
        if filename:
            out.append(b"Content-Type: application/octet-stream\r\n")
        out.append(b"\r\n" + content + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out)


def file_path(kind: str, image_id: str) -> str:
    return f"/{kind}_images/{image_id}/file/"


def request_head(api: Api, path: str, extra: str) -> bytes:
    """The head of a raw multipart POST to `path`, with the header lines `extra` (each
    ending in CRLF), for tests that send the body themselves."""
    return (f"POST /api/v1{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nNano-Session: {api.session}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n{extra}\r\n").encode()


async def upload(api: Api, kind: str, image_id: str, data: bytes, *,
                 checksum: str | None = None, checksum_first: bool = False,
                 filename: str = "image.bin", path: str | None = None) -> Any:
    fields: list[tuple[str, str | None, bytes]] = [("image", filename, data)]
    if checksum is not None:
        entry = ("checksum", None, checksum.encode())
        fields = [entry, *fields] if checksum_first else [*fields, entry]
    return await api.call(
        "POST", path or file_path(kind, image_id), raw=multipart(fields),
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )


async def download(api: Api, path: str, headers: dict[str, str] | None = None,
                   method: str = "GET") -> tornado.httpclient.HTTPResponse:
    return await api.http.fetch(
        api.base + path, method=method, raise_error=False, request_timeout=60,
        headers={"Nano-Session": api.session, **(headers or {})},
    )


async def create(api: Api, kind: str, name: str, **spec: Any) -> str:
    data = await api.ok("POST", f"/{kind}_images/", {"name": name, **spec})
    return data["id"]


async def make_user(admin: Api, name: str, group: str,
                    menu: tuple[str, ...] = ("media", "image", "visibility")) -> Api:
    """A user in `group` (created with a role of `menu` if new), logged in: made through
    the API the way an administrator would."""
    role = f"role_{group}"
    if (await admin.call("GET", f"/roles/{role}")).code == 404:
        await admin.ok("POST", f"/roles/{role}", {"menu": list(menu)})
    if (await admin.call("GET", f"/user_groups/{group}")).code == 404:
        await admin.ok("POST", f"/user_groups/{group}", {"display": group, "role": [role]})
    await admin.ok("POST", f"/users/{name}", {"password": PASSWORD})
    await admin.ok("POST", f"/user_groups/{group}/members/{name}")
    client = Api(admin.base[: -len("/api/v1")])
    await client.login(name, PASSWORD)
    return client


# -- metadata ----------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_media_image_create_get_modify_delete(api):
    image_id = await create(api, "media", "centos7_64_minimal", description="some desc",
                            tags=["linux", "64bit"])
    data = await api.ok("GET", f"/media_images/{image_id}")
    assert data["name"] == "centos7_64_minimal" and data["owner"] == "admin"
    assert data["group"] == "admin" and data["tags"] == ["linux", "64bit"]
    assert data["created"] is False and data["size"] == 0 and data["checksum"] == ""
    assert set(data) >= {"id", "name", "owner", "group", "description", "tags", "created",
                         "progress", "create_time", "modify_time", "size", "checksum"}
    listed = await api.ok("GET", "/media_images/")
    assert [i["id"] for i in listed] == [image_id]
    assert await api.ok("GET", "/media_image_search/") == listed

    await api.ok("PUT", f"/media_images/{image_id}", {"name": "centos7", "description": "d2",
                                                        "tags": ["x"]})
    data = await api.ok("GET", f"/media_images/{image_id}")
    assert (data["name"], data["description"], data["tags"]) == ("centos7", "d2", ["x"])

    await api.ok("DELETE", f"/media_images/{image_id}")
    gone = await api.call("GET", f"/media_images/{image_id}")
    assert gone.code == 404 and "no media image" in gone.message
    assert await api.ok("GET", "/media_images/") == []
    logs = (await api.ok("GET", "/logs/", session=None))["logs"]
    texts = " | ".join(entry["content"] for entry in logs)
    assert "created media image centos7_64_minimal" in texts
    assert "modified media image centos7" in texts and "deleted media image centos7" in texts


@pytest.mark.gen_test
async def test_disk_image_statuses_follow_the_contract(api, tmp_path):
    reply = await api.call("POST", "/disk_images/", {"name": "empty", "tags": ["a"]})
    assert reply.status == 200 and reply.code == 0 and set(reply.data) == {"id"}
    image_id = reply.data["id"]
    # an empty disk image nobody works on: 200 with created false (202 is for work under
    # way: a clone from a guest, an upload being received)
    empty = await api.call("GET", f"/disk_images/{image_id}")
    assert empty.status == 200 and empty.code == 0 and empty.data["created"] is False
    assert empty.data["progress"] == 0
    assert [i["created"] for i in await api.ok("GET", "/disk_images/")] == [False]
    await api.ok("POST", "/disk_images/", {"name": "empty2"})
    qcow = make_qcow2(tmp_path)
    assert (await upload(api, "disk", image_id, qcow)).code == 0
    done = await api.call("GET", f"/disk_images/{image_id}")
    assert done.status == 200 and done.data["created"] is True
    assert done.data["progress"] == 100 and done.data["size"] == len(qcow)
    assert done.data["checksum"] == sha1(qcow)


@pytest.mark.gen_test
async def test_names_are_unique_per_group_and_validated(api):
    await create(api, "media", "dup")
    again = await api.call("POST", "/media_images/", {"name": "dup"})
    assert again.code == 409 and "already exists in group 'admin'" in again.message
    # the same name is fine for the other kind
    await create(api, "disk", "dup")
    other = await create(api, "media", "other")
    clash = await api.call("PUT", f"/media_images/{other}", {"name": "dup"})
    assert clash.code == 409
    for bad in ("../etc", "a b", "", "x" * 65, "semi;colon"):
        reply = await api.call("POST", "/media_images/", {"name": bad})
        assert reply.code == 400, bad
    bad_tag = await api.call("POST", "/media_images/", {"name": "t", "tags": ["a,b"]})
    assert bad_tag.code == 400 and "without commas" in bad_tag.message


@pytest.mark.gen_test
async def test_disk_image_search_by_tags(api):
    a = await create(api, "disk", "a", tags=["linux", "64bit"])
    b = await create(api, "disk", "b", tags=["windows", "64bit"])
    c = await create(api, "disk", "c", tags=["bsd"])

    async def search(query: str) -> set[str]:
        return {i["id"] for i in await api.ok("GET", f"/disk_image_search/{query}")}

    assert await search("") == {a, b, c}
    assert await search("?tags=linux") == {a}
    assert await search("?tags=linux&tags=windows") == {a, b}
    assert await search("?tags=linux,bsd") == {a, c}
    assert await search("?tags=64bit") == {a, b}
    assert await search("?tags=nothing") == set()
    # media images are not disk images
    assert await api.ok("GET", "/media_image_search/?tags=linux") == []


@pytest.mark.gen_test
async def test_clone_from_guest_needs_a_created_stopped_guest(api):
    """The clone itself runs on a real cell (tests/integration/test_images_real.py)."""
    missing = await api.call("POST", "/disk_images/", {"name": "c1", "guest": "nope"})
    assert missing.code == 404 and "no guest 'nope'" in missing.message
    from state.models import Guest

    Guest.create(id="g-1", name="vm1", pool="p", owner="admin", group="admin")
    creating = await api.call("POST", "/disk_images/", {"name": "c1", "guest": "g-1"})
    assert creating.code == 409 and "not created yet" in creating.message
    Guest.update(observed={"created": True, "running": True}).where(Guest.id == "g-1").execute()
    running = await api.call("POST", "/disk_images/", {"name": "c1", "guest": "g-1"})
    assert running.code == 409 and "stop it" in running.message
    assert await api.ok("GET", "/disk_image_search/") == []

    # stopped: the clone is accepted, and its image answers 202 while the clone is
    # pending (no reconciler runs here, so it stays pending), beside an empty image's 200
    Guest.update(observed={"created": True, "running": False}).where(
        Guest.id == "g-1").execute()
    cloning = await api.call("POST", "/disk_images/", {"name": "c1", "guest": "g-1"})
    assert cloning.status == 202 and cloning.code == 0, cloning.message
    pending = await api.call("GET", f"/disk_images/{cloning.data['id']}")
    assert pending.status == 202 and pending.code == 0
    assert pending.data["created"] is False and pending.data["progress"] == 0
    empty_id = (await api.ok("POST", "/disk_images/", {"name": "e1"}))["id"]
    empty = await api.call("GET", f"/disk_images/{empty_id}")
    assert empty.status == 200 and empty.data["created"] is False


@pytest.mark.gen_test(timeout=30)
async def test_visibility_for_two_users_in_two_groups(api, tmp_path):
    alice = await make_user(api, "alice", "g1")
    bob = await make_user(api, "bob", "g1")
    carol = await make_user(api, "carol", "g2")
    media = await create(alice, "media", "m1", tags=["t"])
    disk = await create(alice, "disk", "d1", tags=["t"])
    iso = make_iso()
    assert (await upload(alice, "media", media, iso)).code == 0

    async def sees(user: Api) -> tuple[bool, bool]:
        m = {i["id"] for i in await user.ok("GET", "/media_image_search/")}
        d = {i["id"] for i in await user.ok("GET", "/disk_image_search/?tags=t")}
        return media in m, disk in d

    assert await sees(alice) == (True, True)
    assert await sees(bob) == (False, False)
    assert await sees(carol) == (False, False)
    assert await sees(api) == (False, False)  # admin of another group: not the owner either

    # Every image route applies it, not only the searches.
    for user in (bob, carol):
        for method, path, body in (
            ("GET", f"/media_images/{media}", None),
            ("PUT", f"/media_images/{media}", {"description": "x"}),
            ("DELETE", f"/media_images/{media}", None),
            ("GET", f"/disk_images/{disk}", None),
            ("PUT", f"/disk_images/{disk}", {"description": "x"}),
            ("DELETE", f"/disk_images/{disk}", None),
        ):
            reply = await user.call(method, path, body)
            assert reply.code == 404, (method, path, reply)
        assert (await download(user, file_path("media", media))).code == 200  # HTTP...
        assert b'"error_code": 404' in (await download(user, file_path("media", media))).body
        assert (await upload(user, "media", media, iso)).code == 404

    # bob turns his group's media flag on: he sees alice's media image, not her disk image
    await bob.ok("PUT", "/resource_visibilities/", {"media_image_visible": True})
    assert await sees(bob) == (True, False)
    assert (await download(bob, file_path("media", media))).body == iso
    await bob.ok("PUT", "/resource_visibilities/", {"media_image_visible": True,
                                                   "disk_image_visible": True})
    assert await sees(bob) == (True, True)
    await bob.ok("PUT", f"/disk_images/{disk}", {"description": "edited by bob"})
    # carol's group flags do not open g1's images to her
    await carol.ok("PUT", "/resource_visibilities/", {"media_image_visible": True,
                                                     "disk_image_visible": True})
    assert await sees(carol) == (False, False)

    # names are unique per group: bob (g1) cannot take m1, carol (g2) can
    taken = await bob.call("POST", "/media_images/", {"name": "m1"})
    assert taken.code == 409
    await create(carol, "media", "m1")
    # a user may not place images into another group, an administrator may
    refused = await alice.call("POST", "/media_images/", {"name": "x", "group": "g2"})
    assert refused.code == 400 and "group 'g2'" in refused.message
    refused = await alice.call("POST", "/media_images/", {"name": "x", "owner": "carol"})
    assert refused.code == 400
    given = await create(api, "media", "for_alice", owner="alice", group="g1")
    assert given in {i["id"] for i in await alice.ok("GET", "/media_images/")}


@pytest.mark.gen_test(timeout=30)
async def test_changing_images_needs_the_menu_tag(api):
    viewer = await make_user(api, "viewer", "readers", menu=("dashboard",))
    refused = await viewer.call("POST", "/media_images/", {"name": "v"})
    assert refused.code == 403 and "'media'" in refused.message
    refused = await viewer.call("POST", "/disk_images/", {"name": "v"})
    assert refused.code == 403 and "'image'" in refused.message
    refused = await viewer.call("PATCH", "/disk_images/", {})
    assert refused.code == 403
    assert await viewer.ok("GET", "/media_images/") == []
