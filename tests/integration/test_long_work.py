"""Long work has a lane of its own (reconciler/longwork.py): with one reconciler worker
and one long-work thread, a guest whose system disk comes from a large image waits for the
image to be streamed to the real local cell (its status says so, with how far it got),
while another guest's power change goes through at once, before the stream has ended.

With the stream on the worker, as before the lane existed, the start of the other guest
waited for the whole stream, its read-back and the copy of the volume."""

from __future__ import annotations

import subprocess

import pytest

from tests.api.test_compute import until
from tests.api.test_images import create, sha1, upload
from tests.conftest import reconciling, sqlite_only
from tests.integration.test_guests_real import (  # noqa: F401  (fixtures)
    cell,
    created,
    guest_body,
    instance,
)

pytestmark = pytest.mark.integration
MiB = 1 << 20
BIG = 1024 * MiB


database = pytest.fixture(name="database")(sqlite_only)  # threads, not backends


@pytest.fixture
def settings(settings):
    return reconciling(settings, workers=1, long_workers=1)


async def ready_condition(api, guest_id):
    for item in await api.ok("GET", "/resource_status/"):
        if item["kind"] == "Guest" and item["id"] == guest_id:
            return next((c for c in item["conditions"] if c["type"] == "Ready"), None)
    return None


def plain(name, **extra):
    body = guest_body(name, modules=[], **extra)
    del body["cloud_init"]
    return body


@pytest.mark.gen_test(timeout=300)
async def test_a_power_change_does_not_wait_for_an_image_stream(api, cell, tmp_path):  # noqa: F811
    quick = (await api.ok("POST", "/guests/", plain("quick", disks=[16 * MiB])))["id"]
    await created(api, quick)

    image = tmp_path / "big.qcow2"  # every byte allocated: the stream carries all of them
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=full",
                    str(image), str(BIG)], check=True)
    data = image.read_bytes()
    disk_id = await create(api, "disk", "big-disk", description="large", tags=["test"])
    reply = await upload(api, "disk", disk_id, data, checksum=sha1(data), filename="big.qcow2")
    assert reply.code == 0, reply.message
    del data

    big = (await api.ok("POST", "/guests/", plain("from-big", disks=[BIG],
                                                   from_image=disk_id)))["id"]

    async def streaming():
        cond = await ready_condition(api, big)
        return cond if cond and cond["reason"] == "LongWorkRunning" else None
    cond = await until(streaming, timeout=60, what="the image stream under way")
    assert cond["status"] is False
    assert f"send disk image {disk_id} to cell local-g" in cond["message"]

    await api.ok("POST", f"/instances/{quick}", {})
    await instance(api, quick, running=True)
    still = await ready_condition(api, big)
    assert (await api.call("GET", f"/guests/{big}")).data["created"] is False, \
        "the big guest was made before the other one started: nothing was shown"
    print(f"the other guest runs while: {still['message']}")

    data = await created(api, big)  # and the stream ends, the guest is made
    assert data["from_image"] == disk_id

    async def done():  # the pass that made it records its conditions when it ends
        cond = await ready_condition(api, big)
        return cond if cond and cond["reason"] != "LongWorkRunning" else None
    await until(done, timeout=30, what="the long work no longer reported")
    await api.ok("DELETE", f"/instances/{quick}", {"reboot": False, "force": True})
