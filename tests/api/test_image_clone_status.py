"""A disk image cloned from a guest names what it waits for in its own conditions: the
image reconciler run on the real store (no cell is reached while it waits), and the clone
seen through GET /resource_status/ like any client sees it."""

from __future__ import annotations

import pytest

from reconciler.contract import Key, set_condition
from reconciler.images import ImageReconciler
from tests.api.guest_helpers import create_guest, make_pool, mark_created, set_running


async def image_status(api, image_id):
    for item in await api.ok("GET", "/resource_status/"):
        if item["id"] == image_id:
            return item
    raise AssertionError(f"image {image_id} has no status")


def ready(item):
    return next(c for c in item["conditions"] if c["type"] == "Ready")


@pytest.mark.gen_test
async def test_a_clone_names_the_guest_it_waits_for(api, server):
    await make_pool(api)
    gid = await create_guest(api, name="source")
    mark_created(server, gid)
    reply = await api.call("POST", "/disk_images/", {"name": "copy", "guest": gid})
    assert reply.status == 202, reply.message
    image_id = reply.data["id"]
    images = ImageReconciler(server.store, connections=None, enqueue=lambda key: None)

    set_running(server, gid, True)  # started after the clone was asked for
    images.reconcile(Key("image", image_id))
    item = await image_status(api, image_id)
    assert item["phase"] == "waiting"
    assert (ready(item)["status"], ready(item)["reason"]) == (False, "GuestRunning")
    assert "guest source is running: stop it" in ready(item)["message"]
    # waiting is not failing: the image itself says 202 (work under way) and no error
    reply = await api.call("GET", f"/disk_images/{image_id}")
    assert reply.status == 202 and "error" not in reply.data, reply.data

    # the guest is stopped but cannot converge: the clone repeats the guest's own reason
    set_running(server, gid, False)
    await api.ok("PUT", f"/guests/{gid}/cores", {"cores": 3})
    stuck = set_condition([], "Ready", False, "NetworkNotReady",
                          "waiting for network default to start the guest: Unable to find "
                          "'dnsmasq' binary", "2026-12-06 10:00:00")
    server.store.record_guest_observed(gid, conditions=stuck)
    images.reconcile(Key("image", image_id))
    item = await image_status(api, image_id)
    assert ready(item)["reason"] == "WaitingForGuest"
    assert ready(item)["message"] == (
        "waiting for guest source to converge: NetworkNotReady: waiting for network default "
        "to start the guest: Unable to find 'dnsmasq' binary")
