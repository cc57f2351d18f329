"""libvirt lifecycle events drive guest status: with polling and resync slowed to a minute,
a domain stopped behind nanod's back (virsh destroy) shows as stopped within seconds."""

from __future__ import annotations

import time

import pytest

from tests.api.test_compute import until
from tests.integration.test_guests_real import (  # noqa: F401  (fixtures)
    cell,
    created,
    guest_body,
    instance,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(settings):
    settings["reconciler"] = {"enabled": True, "workers": 4, "resync_seconds": 600,
                              "probe_seconds": 600, "offline_after": 3,
                              "guest_poll_seconds": 600}
    return settings


@pytest.mark.gen_test(timeout=200)
async def test_status_follows_a_domain_stopped_outside_nanod(api, cell, system):  # noqa: F811
    body = guest_body("ev1", modules=[])
    del body["cloud_init"]
    gid = (await api.ok("POST", "/guests/", body))["id"]
    await created(api, gid)
    await api.ok("POST", f"/instances/{gid}", {})
    await instance(api, gid, True)

    system.lookupByName(f"nano-{gid}").destroy()  # behind nanod's back
    started = time.monotonic()
    data = await instance(api, gid, False)
    took = time.monotonic() - started
    assert data["running"] is False
    assert took < 30, f"status followed the event only after {took:.1f} s"
    # nanod respects a guest that stopped: it does not start it again by itself
    await until(lambda: _still_stopped(system, gid), timeout=3, what="still stopped")
    await api.ok("DELETE", f"/guests/{gid}", {"force": True})


async def _still_stopped(conn, gid):
    return not conn.lookupByName(f"nano-{gid}").isActive()
