"""Placement through the API, with the reconciler running against a simulated cell
(libvirt test driver, `test:///<file>`, facts read with a local shell): a batch of 40
one-core guests on a 2-core cell is refused at the default ratio (4 vCPUs per core) with
a message naming the short resource and how the cell's room is counted, and accepted
whole once the cell's own `overcommit` allows 40 vCPUs; the guests then count the same
once the reconciler has created them as while they were pending, and a resize grows a
guest only into room its cell has left."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.guest_helpers import GIB
from tests.api.test_compute import until
from tests.conftest import reconciling
from tests.helpers.testdriver import write_test_cell


@pytest.fixture
def settings(settings):
    return reconciling(settings, probe_seconds=0.5, offline_after=2)


def one_core_batch(count: int) -> dict[str, Any]:
    return {"name_rule": "order", "name_prefix": "small", "count": count, "owner": "admin",
            "group": "admin", "pool": "p", "cores": 1, "memory": GIB // 4, "disks": [GIB],
            "auto_start": False, "from_image": "", "template": "", "modules": []}


async def two_core_cell(api: Any, tmp_path: Any) -> dict[str, Any]:
    """Cell cell-a: a simulated 2-CPU host with 64 GiB, alive in compute pool p."""
    cell = write_test_cell(tmp_path / "cell-a.xml", cpus=2, memory_kib=64 * 1024 * 1024)
    await api.ok("POST", "/cells/cell-a", {"libvirt_uri": cell.uri, "virt_type": "qemu",
                                           "storage_path": str(tmp_path / "images")})

    async def alive() -> Any:
        rec = await api.ok("GET", "/cells/cell-a")
        return rec if rec["alive"] and rec["status"]["observed"].get("stats") else None

    rec = await until(alive, timeout=60, what="cell-a alive")
    await api.ok("POST", "/compute_pools/p", {"storage": "", "network": "", "failover": False})
    await api.ok("POST", "/compute_pool_cells/p/cell-a")
    return rec["status"]["observed"]["stats"]


@pytest.mark.gen_test(timeout=180)
async def test_a_batch_of_forty_one_core_guests_on_a_two_core_cell(api, tmp_path):
    stats = await two_core_cell(api, tmp_path)
    assert stats["max_cpu"] == 2 and stats["max_memory"] == 64 * GIB
    assert stats["max_disk"] >= 40 * GIB, stats  # the disks are not what is short here

    refused = await api.call("POST", "/batch/create_guest/", one_core_batch(40))
    assert refused.code == 409
    assert refused.message.startswith(
        "batch of 40 guests: room for 8 only: no cell in compute pool 'p' has 1 core free "
        "(best: cell-a with 0 cores free, 8 of 8 cores promised: 2 host cores x "
        "overcommit.cpu 4): raise the cell's ratio (PUT /cells/cell-a"), refused.message
    assert await api.ok("GET", "/guest_search/?pool=p") == []  # all or none

    bad = await api.call("PUT", "/cells/cell-a", {"overcommit": {"cpu": 0, "cores": 20}})
    assert bad.code == 400
    assert "overcommit.cpu" in bad.message and "cores" in bad.message, bad.message
    await api.ok("PUT", "/cells/cell-a", {"overcommit": {"cpu": 20}})
    assert (await api.ok("GET", "/cells/cell-a"))["spec"]["overcommit"] == {"cpu": 20}

    accepted = await api.call("POST", "/batch/create_guest/", one_core_batch(40))
    assert (accepted.status, accepted.code) == (202, 0), accepted.message
    guests = await api.ok("GET", "/guest_search/?pool=p")
    assert len(guests) == 40 and {g["cell"] for g in guests} == {"cell-a"}

    one_more = {**one_core_batch(1), "name": "one-more"}
    del one_more["name_rule"], one_more["name_prefix"], one_more["count"]
    full = await api.call("POST", "/guests/", one_more)
    assert full.code == 409 and "40 of 40 cores promised" in full.message, full.message

    # the reconciler creates the guests on the simulated cell; created, they count the same
    async def all_created() -> bool:
        found = await api.ok("GET", "/guest_search/?pool=p")
        return all(g["created"] for g in found)

    await until(all_created, timeout=120, what="the 40 guests created")
    still_full = await api.call("POST", "/guests/", one_more)
    assert still_full.code == 409 and "40 of 40 cores promised" in still_full.message
    first = next(g for g in guests if g["name"] == "small_0")
    grow = await api.call("PUT", f"/guests/{first['id']}/cores", {"cores": 2})
    assert grow.code == 409
    assert grow.message == (
        "cell 'cell-a' has no room to grow guest 'small_0' to 2 cores: 0 cores free of 1 core "
        "needed (40 of 40 cores promised: 2 host cores x overcommit.cpu 20)")
    await api.ok("PUT", "/cells/cell-a", {"overcommit": {"cpu": 21}})
    await api.ok("PUT", f"/guests/{first['id']}/cores", {"cores": 2})
