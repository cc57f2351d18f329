"""Guests on a simulated cell (libvirt's test driver, `test:///<file>.xml`) through a real
nanod with its reconcilers running: the whole lifecycle the README offers these cells for
(create, start, stop, delete), conditions derived from what was observed, and the refusals
of what such a cell cannot do at all (no volume streams: guests from images or with
cloud-init) made at once, as a failed guest with the reason, never retried every minute.
"""

from __future__ import annotations

import pytest

from tests.api.guest_helpers import guest_body
from tests.api.test_compute import register, until
from tests.conftest import reconciling

MiB = 1 << 20


@pytest.fixture
def settings(settings):
    return reconciling(settings, resync_seconds=2, probe_seconds=0.5, offline_after=2, guest_poll_seconds=0.5)


async def sim_pool(api, tmp_path, name="sim-1"):
    await register(api, tmp_path, name, cpus=8, memory_gib=16)
    await api.ok("POST", "/compute_pools/simp", {"storage": "", "network": "",
                                                  "failover": False})
    await api.ok("POST", f"/compute_pool_cells/simp/{name}", None)


def small(name, **extra):
    return guest_body(name, pool="simp", cores=1, memory=256 * MiB, disks=[64 * MiB], **extra)


async def status_of(api, guest_id):
    for item in await api.ok("GET", "/resource_status/"):
        if item["kind"] == "Guest" and item["id"] == guest_id:
            return item
    return None


def condition(item, kind):
    return next((c for c in item["conditions"] if c["type"] == kind), None)


async def ready(api, guest_id, *, running: bool):
    seen = []

    async def check():
        item = await status_of(api, guest_id)
        seen[:] = [item]
        cond = condition(item, "Ready") if item else None
        if not cond or not cond["status"] or item["observed_generation"] < item["generation"]:
            return None
        data = await api.ok("GET", f"/instances/{guest_id}")
        return item if data["running"] is running else None
    try:
        return await until(check, timeout=30, what=f"guest Ready and running={running}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last status: {seen}") from None


@pytest.mark.gen_test(timeout=120)
async def test_a_guest_lives_and_dies_on_a_test_driver_cell(api, tmp_path):
    await sim_pool(api, tmp_path)
    gid = (await api.ok("POST", "/guests/", small("sim-g1")))["id"]
    item = await ready(api, gid, running=False)
    assert item["phase"] == "stopped"
    assert condition(item, "Drifted")["status"] is False

    await api.ok("POST", f"/instances/{gid}", {})
    item = await ready(api, gid, running=True)
    assert item["phase"] == "running"
    await api.ok("PUT", f"/guests/{gid}/cores", {"cores": 2})  # waits for a restart
    async def restart_pending():
        item = await status_of(api, gid)
        cond = condition(item, "RestartRequired")
        return item if cond and cond["status"] and \
            item["observed_generation"] == item["generation"] else None
    item = await until(restart_pending, timeout=30, what="RestartRequired")
    assert condition(item, "Ready")["status"] is False
    assert condition(item, "Ready")["reason"] == "RestartRequired"
    assert "vcpus 1 -> 2" in condition(item, "Ready")["message"]

    await api.ok("DELETE", f"/instances/{gid}", {"reboot": False, "force": True})
    item = await ready(api, gid, running=False)  # stopped: the new cores are in effect
    assert condition(item, "RestartRequired")["status"] is False

    await api.ok("DELETE", f"/guests/{gid}", {"force": True})

    async def gone():
        return (await api.call("GET", f"/guests/{gid}")).code == 404
    await until(gone, timeout=20, what="guest deleted (undefined without NVRAM flags)")


@pytest.mark.gen_test(timeout=120)
async def test_what_a_test_driver_cell_cannot_do_fails_at_once(api, tmp_path):
    await sim_pool(api, tmp_path)
    body = small("sim-ci", modules=["cloud-init"],
                 cloud_init={"root_enabled": True, "admin_name": "nano",
                             "admin_secret": "Secret-pass1", "data_path": "/opt/data"})
    gid = (await api.ok("POST", "/guests/", body))["id"]

    async def failed():
        reply = await api.call("GET", f"/guests/{gid}")
        return reply if reply.data.get("error") else None
    reply = await until(failed, timeout=10, what="the creation refused")
    assert reply.status == 201 and reply.data["created"] is False
    assert "cannot receive volume data" in reply.data["error"]
    assert "cloud-init seed" in reply.data["error"]
    item = await status_of(api, gid)
    assert item["phase"] == "failed"
    ready_cond = condition(item, "Ready")
    assert (ready_cond["status"], ready_cond["reason"]) == (False, "MissingCapability")
    # failed for this spec: no further attempt (the record stays as it was)
    before = item["conditions"]
    await until(lambda: _later(2.5), timeout=5, what="a few reconcile periods")
    assert (await status_of(api, gid))["conditions"] == before
    # and it can be deleted, leaving nothing
    await api.ok("DELETE", f"/guests/{gid}", {"force": True})

    async def gone():
        return (await api.call("GET", f"/guests/{gid}")).code == 404
    await until(gone, timeout=20, what="failed guest deleted")


async def _later(seconds: float) -> bool:
    import asyncio

    await asyncio.sleep(seconds)
    return True


@pytest.mark.gen_test(timeout=120)
async def test_a_clone_from_a_test_driver_cell_fails_at_once(api, tmp_path):
    await sim_pool(api, tmp_path)
    gid = (await api.ok("POST", "/guests/", small("sim-src")))["id"]
    await ready(api, gid, running=False)
    image = (await api.ok("POST", "/disk_images/", {"name": "sim-copy", "guest": gid}))["id"]

    async def failed():
        for item in await api.ok("GET", "/resource_status/"):
            if item["id"] == image and item["phase"] == "failed":
                return item
        return None
    item = await until(failed, timeout=20, what="the clone refused")
    cond = condition(item, "Ready")
    assert (cond["status"], cond["reason"]) == (False, "CloneFailed")
    assert "cannot stream volumes" in cond["message"]
    await _later(2.5)  # not tried again
    again = [i for i in await api.ok("GET", "/resource_status/") if i["id"] == image][0]
    assert again["conditions"] == item["conditions"]


@pytest.mark.gen_test(timeout=120)
async def test_a_guest_waiting_on_its_network_says_so_and_so_does_its_cell(api, tmp_path):
    await register(api, tmp_path, "sim-nonet", cpus=8, memory_gib=16, default_network=False)
    await api.ok("POST", "/compute_pools/simp", {"storage": "", "network": "",
                                                  "failover": False})
    await api.ok("POST", "/compute_pool_cells/simp/sim-nonet", None)

    async def cell_not_ready():
        for item in await api.ok("GET", "/resource_status/"):
            if item["kind"] == "Cell" and item["name"] == "sim-nonet":
                cond = condition(item, "Ready")
                return cond if cond and cond["reason"] == "NetworkNotReady" else None
        return None
    cond = await until(cell_not_ready, timeout=20, what="cell not Ready for its network")
    assert cond["status"] is False and "default network is not defined" in cond["message"]

    gid = (await api.ok("POST", "/guests/", small("sim-wait")))["id"]

    async def created():
        return (await api.call("GET", f"/guests/{gid}")).status == 200
    await until(created, timeout=20, what="guest created (a domain needs no network)")
    await api.ok("POST", f"/instances/{gid}", {})

    async def waiting():
        item = await status_of(api, gid)
        cond = condition(item, "Ready") if item else None
        return cond if cond and cond["reason"] == "NetworkNotReady" else None
    cond = await until(waiting, timeout=20, what="guest waiting on its network")
    assert "waiting for network default to start the guest" in cond["message"]
    assert (await api.ok("GET", f"/instances/{gid}"))["running"] is False


@pytest.mark.gen_test(timeout=60)
async def test_resource_status_says_which_kinds_a_reconciler_watches(api, tmp_path):
    """`watched` in GET /resource_status/ comes from the running controller: guests are
    converged by one, batch tasks by none (so `nanod drift` does not wait on them)."""
    await sim_pool(api, tmp_path)
    gid = (await api.ok("POST", "/guests/", small("sim-w")))["id"]
    await api.ok("POST", "/batch/stop_guest/", {"guest": [gid]})
    items = await api.ok("GET", "/resource_status/")
    watched = {item["kind"]: item["watched"] for item in items}
    assert watched["Guest"] is True and watched["Cell"] is True, watched
    assert watched["BatchTask"] is False, watched
