"""Group quotas through the API (state/quotas.py, api/quotas.py), on SQLite and PostgreSQL:
limits and usage as GET /user_groups/{name}/quota shows them, refusals of guest creates,
batches, resizes, image clones and uploads that would pass a quota (409, naming the quota,
the request and the usage, with nothing made), who may read and change a quota, and 20
parallel creates against a quota of 10 guests making exactly 10.

The reconciler is off (the `server` fixture): guests stay rows in phase "creating", which
is what quotas count (tests/api/guest_helpers.py records what the reconciler would)."""

from __future__ import annotations

import asyncio
import os

import pytest

from state.models import BatchTask, Guest, Image, Quota
from tests.api.guest_helpers import (
    GIB,
    create_guest,
    guest_body,
    make_pool,
    mark_created,
    user_session,
)
from tests.api.test_images import create, iso_payload, make_iso, upload
from tests.api.test_images_files import temp_files

QUOTA = "/user_groups/admin/quota"
UNLIMITED = {"cores": 0, "memory": 0, "disk": 0, "guests": 0, "image_storage": 0}


def batch_body(count: int) -> dict:
    body = guest_body("unused", name_rule="order", name_prefix="b", count=count)
    del body["name"]
    return body


@pytest.mark.gen_test
async def test_limits_and_usage_are_shown_and_zero_is_unlimited(api, server):
    await make_pool(api)
    assert await api.ok("GET", QUOTA) == {"group": "admin", "limits": UNLIMITED,
                                          "usage": UNLIMITED}
    await create_guest(api, "g1")
    await create_guest(api, "g2", cores=4, memory=4 * GIB, disks=[10 * GIB, 5 * GIB])
    media = await create(api, "media", "m1")
    iso = make_iso()
    assert (await upload(api, "media", media, iso)).code == 0

    data = await api.ok("PUT", QUOTA, {"cores": 8, "guests": 5})
    assert data["limits"] == {**UNLIMITED, "cores": 8, "guests": 5}
    usage = {"cores": 6, "memory": 6 * GIB, "disk": 25 * GIB, "guests": 2,
             "image_storage": len(iso)}
    assert data["usage"] == usage
    # a PUT changes what it names and keeps the rest
    data = await api.ok("PUT", QUOTA, {"memory": 64 * GIB, "guests": 0})
    assert data["limits"] == {**UNLIMITED, "cores": 8, "memory": 64 * GIB}
    assert (await api.ok("GET", QUOTA))["usage"] == usage
    # the seed's group reply keeps its shape
    assert set(await api.ok("GET", "/user_groups/admin")) == {"name", "display", "role",
                                                              "member"}

    bad = await api.call("PUT", QUOTA, {"cores": -1, "colour": 1})
    assert bad.code == 400 and "cores" in bad.message and "colour" in bad.message
    missing = await api.call("GET", "/user_groups/nobody/quota")
    assert missing.code == 404 and "no user group named 'nobody'" in missing.message

    assert await api.ok("DELETE", QUOTA, {}) == ""
    assert (await api.ok("GET", QUOTA))["limits"] == UNLIMITED
    assert Quota.select().count() == 0


@pytest.mark.gen_test
async def test_a_create_past_a_quota_is_refused_naming_quota_request_and_usage(api, server):
    await make_pool(api)
    await api.ok("PUT", QUOTA, {"guests": 2, "cores": 5})
    await create_guest(api, "g1")  # 2 cores

    over = await api.call("POST", "/guests/", guest_body("g2", cores=4))
    assert over.code == 409, over.message
    assert "creating guest 'g2'" in over.message
    assert "quota of user group 'admin'" in over.message
    assert "cores quota 5 cores: 2 cores used, the request asks 4 cores more" in over.message
    assert "guests quota" not in over.message  # 1 + 1 <= 2: not exceeded
    assert [g.name for g in Guest.select()] == ["g1"]

    await create_guest(api, "g2", cores=3)  # exactly the limit
    full = await api.call("POST", "/guests/", guest_body("g3", cores=1))
    assert full.code == 409
    assert "guests quota 2 guests: 2 guests used, the request asks 1 guests more" in full.message
    assert "cores quota 5 cores: 5 cores used" in full.message  # both named at once
    assert Guest.select().count() == 2
    assert (await api.ok("GET", QUOTA))["usage"]["guests"] == 2

    # a deleting guest holds its share until its row is gone
    g1 = Guest.get(Guest.name == "g1").id
    await api.ok("DELETE", f"/guests/{g1}", {"force": True})
    assert (await api.call("POST", "/guests/", guest_body("g3", cores=1))).code == 409
    server.store.finish_guest_delete(g1)  # what the reconciler does once it is gone
    await create_guest(api, "g3", cores=1)

    # other groups are not limited by admin's quota
    other = await user_session(api, "bob")
    body = guest_body("bob1", owner="", group="", cores=4)
    reply = await api.call("POST", "/guests/", body, session=other)
    assert reply.code == 0, reply.message


@pytest.mark.gen_test
async def test_a_batch_past_a_quota_makes_none_of_its_guests(api, server):
    await make_pool(api)
    await api.ok("PUT", QUOTA, {"guests": 4, "memory": 7 * GIB})
    await create_guest(api, "g1")  # 2 GiB
    refused = await api.call("POST", "/batch/create_guest/", batch_body(3))
    assert refused.code == 409
    assert "a batch of 3 guests would exceed the quota of user group 'admin'" in refused.message
    assert "memory quota 7516192768 bytes (7.00 GiB): 2147483648 bytes (2.00 GiB) used, the " \
           "request asks 6442450944 bytes (6.00 GiB) more" in refused.message
    assert Guest.select().count() == 1 and BatchTask.select().count() == 0
    reply = await api.call("POST", "/batch/create_guest/", batch_body(2))
    assert (reply.status, reply.code) == (202, 0), reply.message
    assert Guest.select().count() == 3
    assert (await api.ok("GET", QUOTA))["usage"]["memory"] == 6 * GIB


@pytest.mark.gen_test
async def test_resizes_that_grow_past_a_quota_are_refused_shrinks_pass(api, server):
    await make_pool(api)
    gid = await create_guest(api, "g1")  # 2 cores, 2 GiB, [10 GiB]
    mark_created(server, gid)
    await api.ok("PUT", QUOTA, {"cores": 3, "memory": 3 * GIB, "disk": 12 * GIB})

    cores = await api.call("PUT", f"/guests/{gid}/cores", {"cores": 4})
    assert cores.code == 409
    assert "growing guest 'g1' to 4 cores" in cores.message
    assert "cores quota 3 cores: 2 cores used, the request asks 2 cores more" in cores.message
    memory = await api.call("PUT", f"/guests/{gid}/memory", {"memory": 4 * GIB})
    assert memory.code == 409 and "memory quota" in memory.message
    disk = await api.call("PUT", f"/guests/{gid}/disks/resize/0", {"size": 13 * GIB})
    assert disk.code == 409 and "disk quota 12884901888 bytes" in disk.message
    spec = Guest.get_by_id(gid).spec
    assert (spec["cores"], spec["memory"], spec["disks"]) == (2, 2 * GIB, [10 * GIB])

    await api.ok("PUT", f"/guests/{gid}/cores", {"cores": 3})  # up to the limit
    await api.ok("PUT", f"/guests/{gid}/disks/resize/0", {"size": 12 * GIB})
    # a limit lowered below the usage refuses growth, never a shrink
    await api.ok("PUT", QUOTA, {"cores": 1})
    assert (await api.call("PUT", f"/guests/{gid}/memory", {"memory": 3 * GIB})).code == 0
    await api.ok("PUT", f"/guests/{gid}/cores", {"cores": 2})
    assert (await api.call("PUT", f"/guests/{gid}/cores", {"cores": 3})).code == 409
    assert (await api.ok("GET", QUOTA))["usage"]["cores"] == 2


@pytest.mark.gen_test
async def test_image_storage_quota_refuses_uploads_and_clones(api, server):
    iso = make_iso()
    await api.ok("PUT", QUOTA, {"image_storage": len(iso) + 1000})
    first = await create(api, "media", "m1")
    assert (await upload(api, "media", first, iso)).code == 0
    # the same file again replaces the current one: it asks nothing more
    assert (await upload(api, "media", first, iso)).code == 0

    second = await create(api, "media", "m2")  # an empty image asks nothing
    refused = await upload(api, "media", second, iso)
    assert refused.code == 409, refused.message
    assert f"uploading {len(iso)} bytes" in refused.message and "'m2'" in refused.message
    assert (f"image_storage quota {len(iso) + 1000} bytes: {len(iso)} bytes used"
            in refused.message)
    row = Image.get_by_id(second)
    assert (row.version, row.size) == (0, 0)
    assert (await api.ok("GET", QUOTA))["usage"]["image_storage"] == len(iso)

    # a clone reserves its source's system disk size from its request on
    await make_pool(api)
    gid = await create_guest(api, "g1", disks=[GIB])
    mark_created(server, gid)
    clone = await api.call("POST", "/disk_images/", {"name": "c1", "guest": gid})
    assert clone.code == 409
    assert f"cloning disk image 'c1' from guest '{gid}'" in clone.message
    assert "the request asks 1073741824 bytes (1.00 GiB) more" in clone.message
    assert Image.select().where(Image.kind == "disk").count() == 0
    await api.ok("PUT", QUOTA, {"image_storage": 2 * GIB})
    clone = await api.call("POST", "/disk_images/", {"name": "c1", "guest": gid})
    assert (clone.status, clone.code) == (202, 0), clone.message
    assert (await api.ok("GET", QUOTA))["usage"]["image_storage"] == len(iso) + GIB
    again = await api.call("POST", "/disk_images/", {"name": "c2", "guest": gid})
    assert again.code == 409 and f"{len(iso) + GIB} bytes" in again.message


@pytest.mark.gen_test(timeout=60)
async def test_parallel_uploads_of_one_group_never_pass_its_quota_together(api, server):
    """Each file fits alone, not both: whether the second is refused while it arrives or
    by the commit (which checks again, in its transaction), exactly one is kept."""
    one, two = iso_payload(300_000), iso_payload(300_000)
    await api.ok("PUT", QUOTA, {"image_storage": 500_000})
    ids = [await create(api, "media", "u1"), await create(api, "media", "u2")]
    replies = await asyncio.gather(upload(api, "media", ids[0], one),
                                   upload(api, "media", ids[1], two))
    assert sorted(r.code for r in replies) == [0, 409], [(r.code, r.message) for r in replies]
    assert "image_storage quota 500000 bytes" in next(r for r in replies if r.code).message
    assert sorted(Image.get_by_id(i).version for i in ids) == [0, 1]
    assert (await api.ok("GET", QUOTA))["usage"]["image_storage"] == 300_000
    files = os.listdir(os.path.join(server.settings["data_dir"], "images", "media"))
    assert len(files) == 1  # the refused file was not kept


@pytest.mark.gen_test(timeout=60)
async def test_an_upload_announced_past_the_quota_is_refused_before_it_is_read(api, server):
    await api.ok("PUT", QUOTA, {"image_storage": 1000})
    image = await create(api, "media", "big")
    refused = await upload(api, "media", image, iso_payload(3 << 20))
    assert refused.code == 409, refused.message
    assert "uploading 2" in refused.message and "image_storage quota 1000 bytes" in refused.message
    assert Image.get_by_id(image).version == 0
    assert temp_files(server.settings) == []


@pytest.mark.gen_test
async def test_image_moves_and_imports_count_against_the_receiving_group(api, server):
    iso = make_iso()
    await user_session(api, "erin")  # group erin_group
    await api.ok("PUT", "/user_groups/erin_group/quota", {"image_storage": 100})
    image = await create(api, "media", "m1")
    assert (await upload(api, "media", image, iso)).code == 0
    moved = await api.call("PUT", f"/media_images/{image}", {"group": "erin_group"})
    assert moved.code == 409
    assert "moving media image 'm1' into user group 'erin_group'" in moved.message
    assert Image.get_by_id(image).group == "admin"

    await api.ok("PATCH", "/media_images/", {})  # makes the import directories
    folder = os.path.join(server.settings["data_dir"], "import", "media")
    with open(os.path.join(folder, "team.iso"), "wb") as fh:
        fh.write(iso)
    result = await api.ok("PATCH", "/media_images/", {"owner": "erin", "group": "erin_group"})
    assert result["imported"] == []
    assert "importing media image 'team' would exceed the quota of user group " \
           "'erin_group'" in result["skipped"][0]["reason"]
    assert os.listdir(folder) == ["team.iso"]  # left for the operator


@pytest.mark.gen_test
async def test_members_read_their_quota_administrators_change_it(api, server):
    member = await user_session(api, "carol")  # group carol_group: instance, visibility
    outsider = await user_session(api, "dave")
    await api.ok("PUT", "/user_groups/carol_group/quota", {"guests": 3})
    own = await api.call("GET", "/user_groups/carol_group/quota", session=member)
    assert own.code == 0 and own.data["limits"]["guests"] == 3
    other = await api.call("GET", "/user_groups/carol_group/quota", session=outsider)
    assert other.code == 403 and other.data is None
    change = await api.call("PUT", "/user_groups/carol_group/quota", {"guests": 30},
                            session=member)
    assert change.code == 403 and "'user'" in change.message
    drop = await api.call("DELETE", "/user_groups/carol_group/quota", {}, session=member)
    assert drop.code == 403
    assert (await api.ok("GET", "/user_groups/carol_group/quota"))["limits"]["guests"] == 3

    # the quota goes with its group
    await api.ok("DELETE", "/user_groups/carol_group/members/carol")
    await api.ok("DELETE", "/user_groups/carol_group")
    assert Quota.select().where(Quota.group == "carol_group").count() == 0


@pytest.mark.gen_test(timeout=120)
async def test_twenty_parallel_creates_against_a_quota_of_ten_make_ten(api, server, figure):
    await make_pool(api)
    await api.ok("PUT", QUOTA, {"guests": 10})
    replies = await asyncio.gather(*(api.call("POST", "/guests/", guest_body(f"p{i}"))
                                     for i in range(20)))
    made = [r for r in replies if r.code == 0]
    refused = [r for r in replies if r.code == 409]
    assert len(made) == 10 and len(refused) == 10, [(r.code, r.message) for r in replies]
    assert all("guests quota 10 guests: 10 guests used" in r.message for r in refused)
    assert Guest.select().count() == 10
    assert (await api.ok("GET", QUOTA))["usage"]["guests"] == 10
    database = server.settings["database"].split(":", 1)[0]
    figure(f"quota ({database}): 20 parallel creates against a quota of 10 guests made "
           f"{len(made)}, refused {len(refused)}")
