"""Failover on the second host (scripts/second-host): a compute pool with `failover: true` on
shared storage (a directory bind-mounted at one path in both hosts), this host's libvirtd
(cell 'local-g') and the second host's; guests run on the second host, which then hangs
(every process SIGSTOPped: TCP accepted, nothing answers).

- fenced: nanod's fence command (the setting `fencing.commands`) is `scripts/second-host
  kill`, a stand-in for an IPMI power-off; the auto_start guest starts on this host only
  after the fence killed the second host's processes (its console counts from 0000 here),
  the other guest is defined here and stays stopped, the log names the fence and each
  move; when the second host is powered on again (its libvirtd comes back with both
  stale definitions), nanod destroys and undefines them before using the cell;
- no fence: a fence command that succeeds without fencing anything (`true`) is what a
  broken fence looks like: nanod starts the guest here while the hung host's copy still
  holds the disk, and the start is refused by the disk's lock (virtlockd's lease on the
  second host, QEMU's image lock), so there are never two writers; once the host is really
  killed the guest starts here.
"""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest

from reconciler.naming import names
from tests.api.test_compute import until
from tests.conftest import reconciling, sqlite_only
from tests.helpers.second_host import SCRIPT, SecondHost
from tests.integration.test_guests_real import cell  # noqa: F401 (fixture)
from tests.integration.test_migration_real import (
    SHARED,
    counter_guest,
    counters,
    counting,
    h2,  # noqa: F401 (fixture)
    host_log,
)

pytestmark = pytest.mark.integration
database = pytest.fixture(name="database")(sqlite_only)  # cells and libvirt, not backends
FENCE = {"test_a_hung_cell_is_fenced_before_its_guests_start_here": "kill",
         "test_without_a_real_fence_the_disk_lock_refuses_a_second_copy": "true"}


@pytest.fixture
def settings(settings, second_host: SecondHost, request):
    settings["ssh"].update(key_dir=str(Path(second_host.state["key_file"]).parent),
                           connect_timeout=2, command_timeout=5)
    fence = [str(SCRIPT), "kill", "--name", second_host.name] \
        if FENCE[request.function.__name__] == "kill" else ["true"]
    settings["fencing"] = {"commands": {second_host.name: fence}, "default": [],
                           "timeout_seconds": 30}
    # a hung cell is offline after 3 failed probes; a call waits 10 s for it (a cell busy
    # starting a TCG guest on a loaded machine must not look hung)
    settings = reconciling(settings, probe_seconds=1, offline_after=3)
    settings["reconciler"]["libvirt_timeout_seconds"] = 10
    return settings


async def failover_pool(api, second_host: SecondHost) -> None:
    await api.ok("POST", f"/storage_pools/{SHARED}", {"type": "dir",
                                                    "target": str(second_host.shared)})
    await api.ok("PUT", "/compute_pools/gp", {"storage": SHARED, "failover": True})

    async def storage_ready():
        for name in ("local-g", second_host.name):
            rec = await api.ok("GET", f"/cells/{name}")
            pools = [p for p in rec["status"]["observed"].get("storage_pools", [])
                     if SHARED in p["name"] and not p.get("error")]
            if not pools:
                return None
        return True

    await until(storage_ready, timeout=60, what="shared storage on both cells")


async def guest_on_h2(api, tmp_path, name, *, auto_start: bool, h2_name: str) -> str:
    gid = await counter_guest(api, tmp_path, name, start=False, on=h2_name,
                              auto_start=auto_start)
    await api.ok("POST", f"/instances/{gid}", {})

    async def running():
        item = await api.ok("GET", f"/guests/{gid}")
        return item if item["running"] else None

    try:
        await until(running, timeout=60, what=f"{name} running on the second host")
    except AssertionError:
        items = await api.ok("GET", "/resource_status/")
        raise AssertionError([i for i in items if i.get("id") == gid]) from None
    return gid


def domain_on(conn: libvirt.virConnect, gid: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByName(names().domain(gid))
    except libvirt.libvirtError:
        return None


async def logs(api) -> list[str]:
    return [e["content"] for e in (await api.ok("GET", "/logs/?limit=50"))["logs"]]


@pytest.mark.gen_test(timeout=420)
async def test_a_hung_cell_is_fenced_before_its_guests_start_here(
        api, system, h2, second_host, tmp_path):  # noqa: F811
    await failover_pool(api, second_host)
    runs = await guest_on_h2(api, tmp_path, "runs", auto_start=True, h2_name=h2)
    waits = await guest_on_h2(api, tmp_path, "waits", auto_start=False, h2_name=h2)
    assert domain_on(system, runs) is None

    second_host.freeze()

    async def started_here():
        dom = domain_on(system, runs)
        return dom if dom is not None and dom.isActive() else None

    await until(started_here, timeout=120, what="the auto_start guest started on this host")
    # started only after the fence: the second host's processes were all gone by then
    assert second_host.condition() == "killed"
    lines = await logs(api)
    assert any(f"cell {h2} fenced by {SCRIPT}" in line for line in lines), lines
    assert any("failover: guest runs" in line and "to local-g (started" in line
               for line in lines), lines
    fresh = await counting(host_log(runs), what="the failed-over guest counting here")
    assert fresh[0] <= 1  # a new boot: it starts counting again

    async def defined_stopped():
        dom = domain_on(system, waits)
        return dom if dom is not None and not dom.isActive() else None

    await until(defined_stopped, timeout=60, what="the other guest defined here, stopped")
    item = await api.ok("GET", f"/guests/{waits}")
    assert item["cell"] == "local-g" and item["running"] is False
    record = await api.ok("GET", f"/cells/{h2}")
    fenced = [c for c in record["status"]["conditions"] if c["type"] == "Fenced"]
    assert fenced and fenced[0]["status"] is True

    # the second host, powered off, still holds both definitions on its disk
    defined = Path(second_host.state["root"]) / "etc" / "qemu"
    assert {f"{names().domain(g)}.xml" for g in (runs, waits)} <= \
        {p.name for p in defined.glob("*.xml")}
    back = second_host.up()  # powered on: its libvirtd defines them again
    conn = libvirt.open(back.uri())
    try:
        async def stale_gone():
            left = [g for g in (runs, waits) if domain_on(conn, g) is not None]
            return not left or None

        await until(stale_gone, timeout=120, what="the stale copies removed on the second host")
    finally:
        conn.close()
    assert (await started_here()) is not None  # still running here, its disk intact
    assert (second_host.shared / names().volume(runs, 0)).exists()
    lines = await logs(api)
    assert any("stale copy of guest" in line and runs in line for line in lines), lines
    for gid in (runs, waits):
        await api.ok("DELETE", f"/guests/{gid}", {"force": True})


@pytest.mark.gen_test(timeout=420)
async def test_without_a_real_fence_the_disk_lock_refuses_a_second_copy(
        api, system, h2, second_host, tmp_path):  # noqa: F811
    await failover_pool(api, second_host)
    gid = await guest_on_h2(api, tmp_path, "locked", auto_start=True, h2_name=h2)
    second_host.freeze()

    async def refused_here():
        items = await api.ok("GET", "/resource_status/")
        (status,) = [i for i in items if i["kind"] == "Guest" and i["id"] == gid]
        text = " ".join(c["message"] for c in status["conditions"]) + " " + \
            (status.get("last_error") or "")
        item = await api.ok("GET", f"/guests/{gid}")
        return text if item["cell"] == "local-g" and "lock" in text.lower() else None

    await until(refused_here, timeout=120, what="the start here refused by the disk's lock")
    # never two copies: QEMU here was refused the disk before the guest's code ran (libvirt
    # may show it starting for a moment); its console here printed nothing
    log = host_log(gid)
    assert not (log.exists() and counters(log.read_bytes())), log.read_bytes()[-200:]
    # a real fence now: the lock goes with the hung host's processes, the guest starts here
    second_host.kill()

    async def running_here():
        dom = domain_on(system, gid)
        return dom if dom is not None and dom.isActive() else None

    await until(running_here, timeout=120, what="the guest running here after the kill")
    await api.ok("DELETE", f"/guests/{gid}", {"force": True})
    second_host.up()
