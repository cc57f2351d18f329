"""Compute pools, cells, storage pools and statistics through the API, with the reconciler
running against simulated cells (libvirt test driver, one `test:///<file>` per cell; facts
read with a local shell).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import TEST_NAMES_PREFIX as PREFIX
from tests.conftest import reconciling
from tests.helpers.testdriver import write_test_cell


@pytest.fixture
def settings(settings):
    return reconciling(settings, probe_seconds=0.5, offline_after=2)


async def until(check, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def register(api, tmp_path, name, *, cpus=8, memory_gib=16, domains=0, **extra):
    cell = write_test_cell(tmp_path / f"{name}.xml", cpus=cpus,
                           memory_kib=memory_gib * 1024 * 1024, domains=domains, **extra)
    body = {"libvirt_uri": cell.uri, "virt_type": "qemu",
            "storage_path": str(tmp_path / f"{name}-images")}
    await api.ok("POST", f"/cells/{name}", body)

    async def alive():
        rec = await api.ok("GET", f"/cells/{name}")
        return rec if rec["alive"] else None

    return await until(alive, what=f"cell {name} alive")


@pytest.mark.gen_test(timeout=60)
async def test_pool_with_cells_and_statistics(api, tmp_path):
    await register(api, tmp_path, "cell-a", cpus=8, memory_gib=16, domains=3)
    await register(api, tmp_path, "cell-b", cpus=4, memory_gib=8, domains=2, owned=False)
    unallocated = await api.ok("GET", "/compute_pool_cells/")
    assert [c["name"] for c in unallocated] == ["cell-a", "cell-b"]
    assert all(c["alive"] and c["enabled"] and c["address"] for c in unallocated)

    await api.ok("POST", "/compute_pools/p1", {"storage": "", "network": "", "failover": False})
    await api.ok("POST", "/compute_pool_cells/p1/cell-a", None)
    await api.ok("POST", "/compute_pool_cells/p1/cell-b/")
    assert await api.ok("GET", "/compute_pool_cells/") == []
    pool = await api.ok("GET", "/compute_pools/p1")
    assert pool == {"name": "p1", "enabled": True, "cells": 2, "storage": "", "network": "",
                    "failover": False}

    cells = await api.ok("GET", "/compute_cell_status/p1/")
    by_name = {c["name"]: c for c in cells}
    assert by_name["cell-a"]["max_cpu"] == 8 and by_name["cell-b"]["max_cpu"] == 4
    assert by_name["cell-a"]["cpu_usage"] == 3  # three running 1-vCPU domains
    assert by_name["cell-a"]["max_memory"] == 16 * 1024**3
    assert by_name["cell-a"]["available_memory"] == 16 * 1024**3 - 3 * 128 * 1024**2
    assert by_name["cell-a"]["max_disk"] > 0 and by_name["cell-a"]["available_disk"] > 0

    pool_stat = await api.ok("GET", "/compute_pool_status/p1")
    assert pool_stat["max_cpu"] == 12 and pool_stat["cpu_usage"] == 5
    assert pool_stat["cells"] == [0, 2] and pool_stat["instances"] == [0, 0, 0, 0]
    zone = await api.ok("GET", "/compute_zone_status/")
    assert zone["pools"] == [0, 1] and zone["cells"] == [0, 2]
    assert zone["max_cpu"] == 12 and len(zone["start_time"]) == 19

    # the domains nanod does not own are listed and never touched
    rec = await api.ok("GET", "/cells/cell-b")
    assert rec["status"]["observed"]["unowned_domains"] == ["d0", "d1"]
    conds = {c["type"]: c["status"] for c in rec["status"]["conditions"]}
    assert conds["Ready"] is True and conds["CellReachable"] is True

    status = await api.ok("GET", "/compute_pool_cells/p1/cell-a")
    assert status["alive"] is True and status["storage"] == []
    assert await api.ok("GET", "/instance_status/p1/") == []
    assert await api.ok("GET", "/instance_status/p1/cell-a/") == []

    async def pool_ready():
        items = await api.ok("GET", "/resource_status/")
        pool = next(i for i in items if i["kind"] == "ComputePool" and i["name"] == "p1")
        ready = {c["type"]: c for c in pool["conditions"]}.get("Ready")
        # both cells counted (the pool's status is derived again as each cell reports)
        return ready if ready and ready["message"] == "2 of 2 cells online" else None

    ready = await until(pool_ready, what="compute pool p1 ready with both cells")
    assert ready["status"] is True and ready["reason"] == "AllCellsOnline"

    await api.ok("PUT", "/compute_pool_cells/p1/cell-b", {"enable": False})
    assert {c["name"]: c["enabled"] for c in await api.ok("GET", "/compute_pool_cells/p1")} \
        == {"cell-a": True, "cell-b": False}

    refused = await api.call("DELETE", "/compute_pools/p1")
    assert refused.code == 409 and "cell-a" in refused.message
    await api.ok("DELETE", "/compute_pool_cells/p1/cell-a", {})
    await api.ok("DELETE", "/compute_pool_cells/p1/cell-b", {})
    await api.ok("DELETE", "/compute_pools/p1")
    assert await api.ok("GET", "/compute_pools/") == []


@pytest.mark.gen_test(timeout=60)
async def test_cell_storage_path_is_a_real_dir_pool(api, tmp_path):
    await register(api, tmp_path, "cell-s")
    await api.ok("POST", "/compute_pools/p2", {})
    await api.ok("POST", "/compute_pool_cells/p2/cell-s", {})
    storages = await api.ok("GET", "/compute_cell_status/p2/cell-s/storages/")
    assert storages == {"mode": "local", "system": [str(tmp_path / "cell-s-images")],
                        "data": [str(tmp_path / "cell-s-images")]}
    new_path = tmp_path / "elsewhere"
    await api.ok("PUT", "/compute_cell_status/p2/cell-s/storages", {"default": str(new_path)})

    async def moved():
        rec = await api.ok("GET", "/cells/cell-s")
        pools = rec["status"]["observed"].get("storage_pools", [])
        return [p for p in pools if p.get("path") == str(new_path) and p["active"]]

    await until(moved, what="storage pool moved to the new path")
    bad = await api.call("PUT", "/compute_cell_status/p2/cell-s/storages", {"default": "rel/x"})
    assert bad.code == 400 and "absolute" in bad.message


@pytest.mark.gen_test(timeout=60)
async def test_unreachable_cell_cannot_join_a_pool(api, tmp_path):
    await api.ok("POST", "/cells/ghost", {"libvirt_uri": f"test://{tmp_path}/missing.xml",
                                          "virt_type": "qemu"})
    await api.ok("POST", "/compute_pools/p3", {})
    refused = await api.call("POST", "/compute_pool_cells/p3/ghost", {})
    assert refused.code == 409 and "unreachable" in refused.message
    rec = await api.ok("GET", "/cells/ghost")
    assert rec["alive"] is False and rec["status"]["last_error"]
    conds = {c["type"]: c for c in rec["status"]["conditions"]}
    assert conds["CellReachable"]["status"] is False and conds["CellReachable"]["message"]


@pytest.mark.gen_test(timeout=60)
async def test_cell_in_another_pool_is_refused(api, tmp_path):
    await register(api, tmp_path, "cell-x")
    await api.ok("POST", "/compute_pools/pa", {})
    await api.ok("POST", "/compute_pools/pb", {})
    await api.ok("POST", "/compute_pool_cells/pa/cell-x", {})
    refused = await api.call("POST", "/compute_pool_cells/pb/cell-x", {})
    assert refused.code == 409 and "pa" in refused.message
    gone = await api.call("DELETE", "/cells/cell-x")
    assert gone.code == 409 and "remove it from the pool first" in gone.message
    await api.ok("DELETE", "/compute_pool_cells/pa/cell-x", {})
    await api.ok("DELETE", "/cells/cell-x")  # the reconciler removes its pool, then the record
    assert (await api.call("GET", "/cells/cell-x")).code == 404
    assert (await api.call("DELETE", "/cells/cell-x")).code == 404


@pytest.mark.gen_test(timeout=60)
async def test_storage_pools_and_refusals(api, tmp_path):
    body = {"type": "nfs", "host": "nfs.example", "target": "/export/nano"}
    await api.ok("POST", "/storage_pools/nfs1", body)
    assert await api.ok("GET", "/storage_pools/nfs1") == {"type": "nfs", "host": "nfs.example",
                                                          "target": "/export/nano"}
    assert (await api.call("POST", "/storage_pools/nfs1", body)).code == 409
    ceph = await api.call("POST", "/storage_pools/c1", {**body, "type": "ceph"})
    assert ceph.code == 400 and "type" in ceph.message
    missing = await api.call("POST", "/storage_pools/c2", {"type": "nfs"})
    assert missing.code == 400 and "target" in missing.message
    no_host = await api.call("POST", "/storage_pools/c2", {"type": "nfs", "target": "/e"})
    assert no_host.code == 400 and "host" in no_host.message
    relative = await api.call("POST", "/storage_pools/c2", {"type": "dir", "target": "x/y"})
    assert relative.code == 400 and "absolute" in relative.message

    await api.ok("POST", "/compute_pools/shared", {"storage": "nfs1"})
    in_use = await api.call("PUT", "/storage_pools/nfs1", {**body, "host": "other"})
    assert in_use.code == 409 and "shared" in in_use.message
    assert (await api.call("DELETE", "/storage_pools/nfs1")).code == 409

    # a cell joining the pool gets a netfs pool (the test driver simulates the mount;
    # the real NFS path is in tests/integration/test_local_cell.py)
    await register(api, tmp_path, "cell-n")
    await api.ok("POST", "/compute_pool_cells/shared/cell-n", {})

    async def reported():
        st = await api.ok("GET", "/compute_pool_cells/shared/cell-n")
        return st["storage"] or None

    storage = await until(reported, what="shared storage reported")
    assert storage == [{"name": f"{PREFIX}-shared-nfs1", "attached": True}]
    rec = await api.ok("GET", "/cells/cell-n")
    netfs = [p for p in rec["status"]["observed"]["storage_pools"] if p["shared"]]
    assert netfs[0]["path"] == f"/var/lib/{PREFIX}/mnt/nfs1" and netfs[0]["active"] is True

    await api.ok("DELETE", "/compute_pool_cells/shared/cell-n", {})
    await api.ok("PUT", "/compute_pools/shared", {"storage": "", "failover": False})
    await api.ok("PUT", "/storage_pools/nfs1", {**body, "host": "other"})
    await api.ok("DELETE", "/storage_pools/nfs1")


@pytest.mark.gen_test
async def test_unknown_references_and_validation(api):
    assert (await api.call("POST", "/compute_pools/p", {"storage": "nope"})).code == 404
    assert (await api.call("POST", "/compute_pools/p", {"network": "nope"})).code == 404
    bad = await api.call("POST", "/compute_pools/p", {"failover": "yes"})
    assert bad.code == 400 and "failover" in bad.message
    assert (await api.call("GET", "/compute_pools/none")).code == 404
    assert (await api.call("POST", "/compute_pool_cells/none/c", {})).code == 404
    bad_cell = await api.call("POST", "/cells/c1", {"virt_type": "xen"})
    assert bad_cell.code == 400 and "virt_type" in bad_cell.message
    remote = await api.call("POST", "/cells/c2", {"ssh": {"user": "root"}})
    assert remote.code == 400 and "address" in remote.message
