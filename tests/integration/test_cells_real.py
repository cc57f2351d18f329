"""Cells on the real local libvirtd: one reached as qemu:///system with facts from a local
shell, one reached over a real sshd (paramiko facts, `qemu+ssh://` libvirt). Faults: the
sshd dies (cell offline) and comes back (recovery); a real netfs pool fails on this
machine (no NFS client) and is reported, not hidden.
"""

from __future__ import annotations

import os
import platform

import libvirt
import pytest

from tests.api.test_compute import until
from tests.conftest import TEST_NAMES_PREFIX as PREFIX
from tests.conftest import reconciling
from tests.helpers.sshd import SSHD, start_sshd

pytestmark = pytest.mark.integration


def _system_libvirt() -> libvirt.virConnect:
    try:
        return libvirt.open("qemu:///system")
    except libvirt.libvirtError as exc:
        pytest.skip(f"qemu:///system is not reachable here: {exc}")


@pytest.fixture
def settings(settings, tmp_path):
    settings["ssh"]["key_dir"] = str(tmp_path)  # the test sshds' client keys live under it
    return reconciling(settings, probe_seconds=0.5, offline_after=2)


@pytest.fixture
def libvirt_pools(server):
    """Remove the libvirt pools a test's cells created on the real libvirtd, once the
    server's reconciler has stopped (else it would make them again)."""
    conn = _system_libvirt()
    before = set(conn.listStoragePools() + conn.listDefinedStoragePools())
    yield conn
    if server.controller:
        server.controller.stop(10.0)
    mine = {f"{PREFIX}-local-t", f"{PREFIX}-local-n", f"{PREFIX}-remote", f"{PREFIX}-shared-nfs-x",
            f"{PREFIX}-x1", f"{PREFIX}-x2", f"{PREFIX}-shared-dirshare"}
    for name in set(conn.listStoragePools() + conn.listDefinedStoragePools()) - before:
        if name not in mine:  # other tests' pools (run in parallel) are theirs
            continue
        pool = conn.storagePoolLookupByName(name)
        if pool.isActive():
            pool.destroy()
        pool.undefine()
    conn.close()


async def cell_record(api, name, check, what):
    async def probe():
        rec = await api.ok("GET", f"/cells/{name}")
        return rec if check(rec) else None

    return await until(probe, timeout=30, what=what)


@pytest.mark.gen_test(timeout=90)
async def test_local_cell_facts_and_storage(api, tmp_path, libvirt_pools):
    images = tmp_path / "images"
    await api.ok("POST", "/cells/local-t", {"libvirt_uri": "qemu:///system", "virt_type": "qemu",
                                            "storage_path": str(images)})
    rec = await cell_record(api, "local-t", lambda r: r["alive"], "local cell alive")
    facts = rec["status"]["observed"]["facts"]
    assert facts["cpus"] == os.cpu_count()
    assert facts["kernel"] == platform.release()
    assert facts["libvirt"] and facts["qemu"]
    assert facts["memory_total"] > facts["memory_available"] > 0

    pool = libvirt_pools.storagePoolLookupByName(f"{PREFIX}-local-t")
    assert pool.isActive() and f"<path>{images}</path>" in pool.XMLDesc()
    assert images.is_dir()

    await api.ok("POST", "/compute_pools/real", {})
    await api.ok("POST", "/compute_pool_cells/real/local-t", {})
    stat = await api.ok("GET", "/compute_cell_status/real/local-t")
    assert stat["max_cpu"] >= 1 and stat["max_disk"] > 0 and stat["max_memory"] > 0
    await api.ok("DELETE", "/compute_pool_cells/real/local-t", {})
    await api.ok("DELETE", "/compute_pools/real")
    # unregistering removes the cell's own (empty) libvirt pool, never the files in it
    await api.ok("DELETE", "/cells/local-t")
    assert (await api.call("GET", "/cells/local-t")).code == 404
    assert f"{PREFIX}-local-t" not in libvirt_pools.listStoragePools() + \
        libvirt_pools.listDefinedStoragePools()
    assert images.is_dir()


@pytest.mark.gen_test(timeout=90)
async def test_a_pool_that_cannot_move_is_reported_and_the_cell_stays_alive(
        api, tmp_path, libvirt_pools):
    """storage_path changed while the old pool still holds a volume (a guest's disk): the
    pool cannot move; the cell still answers (alive), StorageReady says why and how out;
    put back, all is well again. The volume is never touched."""
    old, new = tmp_path / "old", tmp_path / "new"
    await api.ok("POST", "/cells/local-t", {"libvirt_uri": "qemu:///system", "virt_type": "qemu",
                                            "storage_path": str(old)})
    await cell_record(api, "local-t", lambda r: r["alive"], "local cell alive")
    pool = libvirt_pools.storagePoolLookupByName(f"{PREFIX}-local-t")
    vol = pool.createXML(f"<volume><name>{PREFIX}-held</name><capacity>1048576</capacity>"
                         "<target><format type='raw'/></target></volume>", 0)
    try:
        await api.ok("PUT", "/cells/local-t", {"storage_path": str(new)})

        def stuck(rec):
            conds = {c["type"]: c for c in rec["status"]["conditions"]}
            return rec["status"]["observed_generation"] == rec["generation"] and \
                conds.get("StorageReady", {}).get("status") is False
        rec = await cell_record(api, "local-t", stuck, "the move reported")
        conds = {c["type"]: c for c in rec["status"]["conditions"]}
        assert rec["alive"] is True
        assert conds["CellReachable"]["status"] is True
        assert conds["Ready"]["status"] is False and conds["Ready"]["reason"] == "StorageFailed"
        message = conds["StorageReady"]["message"]
        assert f"cannot move storage pool {PREFIX}-local-t to {new}" in message
        assert "still holds 1 volume(s)" in message and "put storage_path back" in message
        assert (old / f"{PREFIX}-held").exists()

        await api.ok("PUT", "/cells/local-t", {"storage_path": str(old)})
        rec = await cell_record(api, "local-t", lambda r: not stuck(r) and r["status"][
            "observed_generation"] == r["generation"], "back at the old path")
        conds = {c["type"]: c for c in rec["status"]["conditions"]}
        assert conds["StorageReady"]["status"] is True and conds["Ready"]["status"] is True
    finally:
        vol.delete(0)
    await api.ok("DELETE", "/cells/local-t")


@pytest.mark.gen_test(timeout=90)
async def test_nfs_storage_pool_failure_is_reported(api, tmp_path, libvirt_pools):
    """No NFS kernel client here: the netfs pool cannot start; the cell says why."""
    await api.ok("POST", "/storage_pools/nfs-x", {"type": "nfs", "host": "127.0.0.1",
                                                  "target": "/nonexistent-export"})
    await api.ok("POST", "/compute_pools/nfsp", {"storage": "nfs-x"})
    await api.ok("POST", "/cells/local-n", {"libvirt_uri": "qemu:///system", "virt_type": "qemu",
                                            "storage_path": str(tmp_path / "img")})
    await cell_record(api, "local-n", lambda r: r["alive"], "cell alive")
    await api.ok("POST", "/compute_pool_cells/nfsp/local-n", {})

    async def reported():
        st = await api.ok("GET", "/compute_pool_cells/nfsp/local-n")
        return st["storage"] or None

    storage = await until(reported, timeout=30, what="netfs pool reported")
    assert storage[0]["name"] == f"{PREFIX}-shared-nfs-x"
    assert storage[0]["attached"] is False and storage[0]["error"]
    rec = await api.ok("GET", "/cells/local-n")
    conds = {c["type"]: c for c in rec["status"]["conditions"]}
    assert conds["StorageReady"]["status"] is False
    assert conds["StorageReady"]["message"]
    await api.ok("DELETE", "/compute_pool_cells/nfsp/local-n", {})


@pytest.mark.gen_test(timeout=120)
async def test_ssh_cell_goes_offline_and_recovers(api, tmp_path, libvirt_pools, server):
    if not os.access(SSHD, os.X_OK):
        pytest.skip(f"{SSHD} missing: apt-get install openssh-server")
    _system_libvirt().close()
    sshd_dir = tmp_path / "sshd"
    sshd = start_sshd(sshd_dir)
    try:
        await api.ok("POST", "/cells/remote", {
            "address": "127.0.0.1", "virt_type": "qemu",
            "ssh": {"user": "root", "port": sshd.port, "key_file": sshd.key_file},
            "storage_path": str(tmp_path / "remote-images"),
        })
        rec = await cell_record(api, "remote", lambda r: r["alive"], "ssh cell alive")
        assert rec["libvirt_uri"].startswith(f"qemu+ssh://root@127.0.0.1:{sshd.port}/system")
        facts = rec["status"]["observed"]["facts"]
        assert facts["cpus"] == os.cpu_count() and facts["kernel"] == platform.release()
        known = (tmp_path / "data" / "known_hosts").read_text()
        assert f"[127.0.0.1]:{sshd.port}" in known  # host key pinned on first contact
        assert libvirt_pools.storagePoolLookupByName(f"{PREFIX}-remote").isActive()

        await api.ok("POST", "/compute_pools/rp", {})
        await api.ok("POST", "/compute_pool_cells/rp/remote", {})

        sshd.stop()
        rec = await cell_record(api, "remote", lambda r: not r["alive"], "cell offline")
        assert rec["status"]["phase"] == "offline" and rec["status"]["last_error"]
        zone = await api.ok("GET", "/compute_zone_status/")
        assert zone["cells"] == [1, 0]

        sshd = start_sshd(sshd_dir, port=sshd.port)
        rec = await cell_record(api, "remote", lambda r: r["alive"], "cell back online")
        conds = {c["type"]: c["status"] for c in rec["status"]["conditions"]}
        assert conds["CellReachable"] is True and conds["Ready"] is True
        assert (await api.ok("GET", "/compute_zone_status/"))["cells"] == [0, 1]
        await api.ok("DELETE", "/compute_pool_cells/rp/remote", {})
    finally:
        sshd.stop()


@pytest.mark.gen_test(timeout=120)
async def test_shared_directory_pool_between_two_cells(api, tmp_path, libvirt_pools, qemu_dir):
    """The stand-in for NFS here (no NFS client in this kernel): a storage pool of type
    `dir` on a directory both cells see. Both cells attach it, and a guest of the pool
    keeps its disk there, where either cell finds it."""
    shared = qemu_dir / "shared"
    await api.ok("POST", "/storage_pools/dirshare", {"type": "dir", "target": str(shared)})
    await api.ok("POST", "/compute_pools/sp", {"storage": "dirshare"})
    for name in ("x1", "x2"):
        await api.ok("POST", f"/cells/{name}", {"libvirt_uri": "qemu:///system",
                                                "virt_type": "qemu",
                                                "storage_path": str(qemu_dir / name)})
        await cell_record(api, name, lambda r: r["alive"], f"cell {name} alive")
        await api.ok("POST", f"/compute_pool_cells/sp/{name}", {})

    async def attached(name):
        st = await api.ok("GET", f"/compute_pool_cells/sp/{name}")
        return st["storage"] if st["storage"] and st["storage"][0]["attached"] else None

    for name in ("x1", "x2"):
        assert await until(lambda n=name: attached(n), timeout=30,
                           what=f"{name} attached") == [{"name": f"{PREFIX}-shared-dirshare",
                                                        "attached": True}]
    assert (await api.ok("GET", "/compute_cell_status/sp/x1/storages/"))["mode"] == "dir"

    gid = (await api.ok("POST", "/guests/", {
        "name": "on-shared", "pool": "sp", "cores": 1, "memory": 64 << 20,
        "disks": [32 << 20], "auto_start": False, "template": "", "modules": []}))["id"]

    async def created():
        reply = await api.call("GET", f"/guests/{gid}")
        return reply.data if reply.status == 200 else None

    await until(created, timeout=60, what="guest on shared storage created")
    assert (shared / f"{PREFIX}-{gid}-disk0").is_file()
    await api.ok("DELETE", f"/guests/{gid}", {"force": True})

    async def gone():
        return (await api.call("GET", f"/guests/{gid}")).code == 404

    await until(gone, timeout=60, what="guest deleted")
    assert not (shared / f"{PREFIX}-{gid}-disk0").exists()
    for name in ("x1", "x2"):
        await api.ok("DELETE", f"/compute_pool_cells/sp/{name}", {})

