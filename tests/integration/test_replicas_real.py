"""Two `nanod serve` replicas on one PostgreSQL store and the real local libvirtd as their
one cell: the replica that holds the cell's lease is killed (SIGKILL); the other takes the
cell over within the TTL plus one renewal, and a power change asked through it reaches the
real QEMU domain the dead replica had defined (one domain for the guest, before and after).
"""

from __future__ import annotations

import time

import pytest

from tests.api.test_replicas import RENEW, TTL, admin_apis, small, until
from tests.conftest import PG_URL, _postgres, postgres_schema_url
from tests.conftest import TEST_NAMES_PREFIX as PREFIX
from tests.helpers.replicas import Replicas
from tests.integration.conftest import remove_cell_leftovers

pytestmark = pytest.mark.integration
SETTINGS = {
    "replicas": {"lease_ttl_seconds": TTL, "renew_seconds": RENEW},
    "reconciler": {"enabled": True, "workers": 4, "resync_seconds": 5, "probe_seconds": 1,
                   "offline_after": 3, "guest_poll_seconds": 1, "stop_grace_seconds": 3},
}
CELL = "local-rr"


@pytest.fixture
def replicas(tmp_path, system):
    if not PG_URL:
        pytest.skip("several replicas need PostgreSQL: set NANO_TEST_POSTGRES=postgresql://... "
                    "(.ci/run starts a server and sets it)")
    remove_cell_leftovers(system, f"{PREFIX}-{CELL}")  # of a run that failed before
    schema, url = postgres_schema_url()
    group = Replicas(tmp_path, url, SETTINGS)
    yield group
    group.stop()
    remove_cell_leftovers(system, f"{PREFIX}-{CELL}")
    _postgres(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def domains_of(system, guest_id: str) -> list:
    return [d for d in system.listAllDomains() if d.name() == f"{PREFIX}-{guest_id}"]


@pytest.mark.gen_test(timeout=300)
async def test_a_killed_owner_of_the_real_cell_is_taken_over(replicas, system, qemu_dir):
    await replicas.start(2)
    apis = await admin_apis(replicas)
    await apis[0].ok("POST", "/compute_pools/rp", {"storage": "", "network": "",
                                                   "failover": False})
    await apis[1].ok("POST", f"/cells/{CELL}", {"libvirt_uri": "qemu:///system",
                                               "virt_type": "qemu",
                                               "storage_path": str(qemu_dir / "pool")})
    await apis[0].ok("POST", f"/compute_pool_cells/rp/{CELL}", None)

    async def alive():
        return (await apis[0].ok("GET", f"/cells/{CELL}"))["alive"]
    await until(alive, timeout=60, what="the real cell alive")
    body = small("rg", pool="rp")
    body["disks"] = [32 << 20]
    guest = (await apis[1].ok("POST", "/guests/", body))["id"]

    async def created():
        return (await apis[0].ok("GET", f"/guests/{guest}"))["created"]
    await until(created, timeout=120, what="the guest created")
    assert len(domains_of(system, guest)) == 1 and not domains_of(system, guest)[0].isActive()

    async def owner(through=apis[0]):
        for r in await through.ok("GET", "/replicas/"):
            if r["alive"] and CELL in r["cells"]:
                return r["id"]
        return None
    first = await until(owner, timeout=30, what="an owner of the cell")
    victim = next(r for r in replicas.members if r.id == first)
    survivor = next(r for r in replicas.members if r.id != first)
    api = apis[replicas.members.index(survivor)]
    victim.kill()
    killed = time.monotonic()

    async def taken():
        return (await owner(api)) == survivor.id
    await until(taken, timeout=3 * TTL, every=0.1, what="the survivor holding the cell")
    takeover = time.monotonic() - killed
    assert takeover <= TTL + RENEW + 2.0, f"takeover took {takeover:.1f} s"

    await api.ok("POST", f"/instances/{guest}", {})  # start, through the new owner

    async def running():
        data = await api.ok("GET", f"/instances/{guest}")
        doms = domains_of(system, guest)
        return data["running"] and len(doms) == 1 and doms[0].isActive()
    await until(running, timeout=90, what="the real domain running")
    await api.ok("DELETE", f"/instances/{guest}", {"reboot": False, "force": True})

    async def stopped():
        doms = domains_of(system, guest)
        return len(doms) == 1 and not doms[0].isActive()
    await until(stopped, timeout=60, what="the real domain stopped")
    print(f"real cell taken over after kill -9 in {takeover:.2f} s")
