"""libvirt lifecycle events drive guest reconciles: with polling and resync slowed to ten
minutes, a domain stopped behind nanod's back (virsh destroy) is seen within seconds, reported
as drift and started again (its last request was "running")."""

from __future__ import annotations

import time

import pytest

from tests.api.test_compute import until
from tests.conftest import TEST_NAMES_PREFIX as PREFIX
from tests.conftest import reconciling
from tests.integration.test_guests_real import (  # noqa: F401  (fixtures)
    cell,
    created,
    guest_body,
    instance,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(settings):
    return reconciling(settings, resync_seconds=600, probe_seconds=600, guest_poll_seconds=600)


@pytest.mark.gen_test(timeout=200)
async def test_status_follows_a_domain_stopped_outside_nanod(api, cell, system):  # noqa: F811
    body = guest_body("ev1", modules=[])
    del body["cloud_init"]
    gid = (await api.ok("POST", "/guests/", body))["id"]
    await created(api, gid)
    await api.ok("POST", f"/instances/{gid}", {})
    await instance(api, gid, True)

    dom = system.lookupByName(f"{PREFIX}-{gid}")
    first_id = dom.ID()
    dom.destroy()  # behind nanod's back
    started = time.monotonic()

    async def corrected():
        for item in await api.ok("GET", "/resource_status/"):
            if item["id"] == gid:
                drifted = next(c for c in item["conditions"] if c["type"] == "Drifted")
                return "stopped outside nano (destroyed)" in drifted["message"] or None
        return None

    await until(corrected, timeout=60, what="the destroy reported and corrected")
    took = time.monotonic() - started
    assert took < 30, f"the event was followed only after {took:.1f} s"
    assert dom.isActive() and dom.ID() != first_id
    assert (await instance(api, gid, True))["running"] is True
    await api.ok("DELETE", f"/guests/{gid}", {"force": True})
