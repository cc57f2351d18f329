"""Migration through the API between two real libvirt daemons: this host's (cell
'local-g') and the second host's (scripts/second-host, reached over qemu+ssh://).

- live, local storage: a running guest whose boot sector prints an increasing counter on
  its serial console every 100 ms moves with its disk copied; on the target the counter
  goes on from where it was (it never started again), the domain runs there only,
  persistent, and the source holds neither the domain nor its volumes;
- live, shared storage (a directory bind-mounted at one path in both hosts, the NFS
  stand-in): the same, and the disk file is the same file, never copied;
- cold: a stopped guest with two disks moves; each target volume holds byte for byte what
  the source volume held (SHA-1 over libvirt streams), and the source's volumes are gone.

The counter guest is a boot sector, not the Debian image of tests/integration/
test_realos.py: it shows continuity every 100 ms without a minute of TCG boot per test.
"""

from __future__ import annotations

import re
from pathlib import Path

import libvirt
import pytest

from reconciler.drivers.volumes import volume_digest
from reconciler.naming import names
from tests.api.test_compute import until
from tests.api.test_images import create as create_image
from tests.api.test_images import sha1, upload
from tests.conftest import TEST_NAMES_PREFIX as PREFIX
from tests.conftest import reconciling, sqlite_only
from tests.helpers.bootsector import counter_disk
from tests.helpers.second_host import SecondHost
from tests.integration.conftest import remove_cell_leftovers
from tests.integration.test_guests_real import (  # noqa: F401 (fixtures)
    cell,
    created,
    guest_body,
    instance,
)

pytestmark = pytest.mark.integration
MiB = 1 << 20
COUNTER = re.compile(rb"^([0-9A-F]{4})\r?$", re.M)
database = pytest.fixture(name="database")(sqlite_only)  # cells and libvirt, not backends
SHARED = "shared-s"  # the storage pool of the shared-storage test


@pytest.fixture
def settings(settings, second_host: SecondHost):
    settings["ssh"]["key_dir"] = str(Path(second_host.state["key_file"]).parent)
    return reconciling(settings, probe_seconds=0.5, offline_after=3)


@pytest.fixture
def h2(api, io_loop, server, system, cell, second_host: SecondHost):  # noqa: F811
    """The second host as a cell of compute pool 'gp' beside 'local-g'; afterwards every
    libvirt object nanod made on it is removed."""
    name = second_host.name
    conn = libvirt.open(second_host.uri())
    remove_cell_leftovers(conn, f"{PREFIX}-{name}")
    conn.close()

    async def setup():
        await api.ok("POST", f"/cells/{name}", second_host.body)

        async def alive():
            return (await api.ok("GET", f"/cells/{name}"))["alive"] or None

        try:
            await until(alive, timeout=60, what="the second host's cell alive")
        except AssertionError:
            record = await api.ok("GET", f"/cells/{name}")
            raise AssertionError(f"cell {name} not alive: {record['status']}") from None
        await api.ok("POST", f"/compute_pool_cells/gp/{name}", {})

    io_loop.run_sync(setup)
    yield name
    if server.controller:
        server.controller.stop(10.0)
    remove_cell_leftovers(system, names().shared_pool(SHARED))  # of the shared-storage tests
    if second_host.condition() == "frozen":  # a failover test that stopped half way
        second_host.kill()
    if second_host.condition() == "killed":
        second_host.up()
    conn = libvirt.open(second_host.uri())  # anew: a failover test powers the host off and on
    remove_cell_leftovers(conn, f"{PREFIX}-{name}")
    remove_cell_leftovers(conn, names().shared_pool(SHARED))
    conn.close()


async def counter_guest(api, tmp_path, name, *, disks=(64 * MiB,), start=True,
                        on="local-g", **extra):
    image = counter_disk(tmp_path / f"{name}.qcow2")
    data = image.read_bytes()
    image_id = await create_image(api, "disk", f"{name}-counter")
    reply = await upload(api, "disk", image_id, data, checksum=sha1(data),
                         filename=f"{name}.qcow2")
    assert reply.code == 0, reply.message
    body = guest_body(name, modules=[], disks=list(disks), from_image=image_id,
                      cell=on, **extra)
    del body["cloud_init"]
    gid = (await api.ok("POST", "/guests/", body))["id"]
    await created(api, gid)
    if start:
        await api.ok("POST", f"/instances/{gid}", {})
        await instance(api, gid, True)
    return gid


def counters(text: bytes) -> list[int]:
    return [int(m, 16) for m in COUNTER.findall(text)]


def host_log(gid: str) -> Path:
    return Path(f"/var/log/libvirt/qemu/{names().domain(gid)}-serial.log")


def h2_log(second_host: SecondHost, gid: str) -> Path:
    return Path(second_host.state["root"]) / "log" / "qemu" / f"{names().domain(gid)}-serial.log"


async def counting(path: Path, above: int = -1, what: str = "the counter") -> list[int]:
    async def seen():
        values = counters(path.read_bytes()) if path.exists() else []
        return values if values and values[-1] > above + 3 else None

    return await until(seen, timeout=60, what=what)


async def migrate(api, gid: str, target: str, *, timeout: float = 240) -> dict:
    reply = await api.call("POST", "/migrations/", {
        "source_pool": "gp", "source_cell": "local-g", "target_cell": target,
        "instances": [gid]})
    assert (reply.status, reply.code) == (202, 0), reply.message
    mid = reply.data["id"]
    seen: list[tuple[int, dict]] = []

    async def finished():
        status = await api.call("GET", f"/migrations/{mid}")
        seen.append((status.status, status.data))
        return status.data if status.data["finished"] else None

    done = await until(finished, timeout=timeout, what=f"migration {mid} finished")
    assert seen[-1][0] == 200 and "error" not in done, done
    assert all(code == 201 and "progress" in data for code, data in seen[:-1])
    listed = await api.ok("GET", "/migrations/")
    assert [m["id"] for m in listed] == [mid]
    return done


def on_host(system: libvirt.virConnect, gid: str) -> bool:
    try:
        system.lookupByName(names().domain(gid))
        return True
    except libvirt.libvirtError:
        return False


async def where(api, gid):
    return await api.ok("GET", f"/guests/{gid}")


@pytest.mark.gen_test(timeout=420)
async def test_live_migration_with_local_disks_keeps_the_guest_running(
        api, system, h2, second_host, tmp_path):  # noqa: F811
    gid = await counter_guest(api, tmp_path, "livelocal")
    before = await counting(host_log(gid), what="the counter on this host")

    done = await migrate(api, gid, h2)
    assert done["guests"][0]["mode"] == "live"
    after = await counting(h2_log(second_host, gid), above=before[-1],
                           what="the counter on the second host")
    # it went on counting: the first value the target printed follows what the source
    # printed (a restarted guest would begin at 0000)
    assert after[0] >= before[-1] and after == sorted(after), (before[-5:], after[:5])
    assert not on_host(system, gid)
    conn = libvirt.open(second_host.uri())
    try:
        dom = conn.lookupByName(names().domain(gid))
        assert dom.isActive() and dom.isPersistent()
        pool = conn.storagePoolLookupByName(f"{PREFIX}-{h2}")
        pool.refresh(0)
        assert names().volume(gid, 0) in pool.listVolumes()
    finally:
        conn.close()
    local = system.storagePoolLookupByName(f"{PREFIX}-local-g")
    local.refresh(0)
    assert not [v for v in local.listVolumes() if gid in v]

    async def converged_there():
        item = await where(api, gid)
        return item if item["cell"] == h2 and item["running"] else None

    guest = await until(converged_there, timeout=60, what="the guest reported on the target")
    assert guest["pool"] == "gp"
    await api.ok("DELETE", f"/guests/{gid}", {"force": True})


@pytest.mark.gen_test(timeout=420)
async def test_live_migration_on_shared_storage_copies_no_disk(
        api, system, h2, second_host, tmp_path):  # noqa: F811
    await api.ok("POST", f"/storage_pools/{SHARED}", {"type": "dir",
                                                    "target": str(second_host.shared)})
    await api.ok("PUT", "/compute_pools/gp", {"storage": SHARED, "network": "",
                                              "failover": False})

    async def storage_ready():  # both cells mounted the shared storage
        for name in ("local-g", h2):
            rec = await api.ok("GET", f"/cells/{name}")
            pools = [p for p in rec["status"]["observed"].get("storage_pools", [])
                     if SHARED in p["name"]]
            if not pools or pools[0].get("error"):
                return None
        return True

    await until(storage_ready, timeout=60, what="shared storage ready on both cells")
    gid = await counter_guest(api, tmp_path, "liveshared")
    disk = second_host.shared / names().volume(gid, 0)
    assert disk.exists()
    inode = disk.stat().st_ino
    before = await counting(host_log(gid), what="the counter on this host")

    await migrate(api, gid, h2)
    after = await counting(h2_log(second_host, gid), above=before[-1],
                           what="the counter on the second host")
    assert after[0] >= before[-1]
    assert not on_host(system, gid)
    assert disk.stat().st_ino == inode  # the same file: nothing was copied
    await api.ok("DELETE", f"/guests/{gid}", {"force": True})
    await until(lambda: _gone(api, gid), timeout=60, what="guest deleted")
    assert not disk.exists()


async def _gone(api, gid):
    return (await api.call("GET", f"/guests/{gid}")).code == 404 or None


@pytest.mark.gen_test(timeout=420)
async def test_cold_migration_copies_both_disks_byte_for_byte(
        api, system, h2, second_host, tmp_path):  # noqa: F811
    gid = await counter_guest(api, tmp_path, "cold", disks=(64 * MiB, 32 * MiB), start=False)
    vols = [names().volume(gid, 0), names().volume(gid, 1)]
    local = f"{PREFIX}-local-g"
    source = {v: volume_digest("qemu:///system", local, v) for v in vols}
    assert source[vols[0]] != source[vols[1]]

    done = await migrate(api, gid, h2)
    assert done["guests"][0]["mode"] == "cold"
    target = {v: volume_digest(second_host.uri(), f"{PREFIX}-{h2}", v) for v in vols}
    assert target == source
    pool = system.storagePoolLookupByName(local)
    pool.refresh(0)
    assert not [v for v in pool.listVolumes() if gid in v]
    assert not on_host(system, gid)
    conn = libvirt.open(second_host.uri())
    try:
        dom = conn.lookupByName(names().domain(gid))
        assert dom.isPersistent() and not dom.isActive()
        xml = dom.XMLDesc(0)
        for vol in vols:  # its disks in the target's pool
            assert f"<source pool='{PREFIX}-{h2}' volume='{vol}'" in xml, xml
    finally:
        conn.close()
    # started on its new cell, through the API, it runs there
    await api.ok("POST", f"/instances/{gid}", {})
    await counting(h2_log(second_host, gid), what="the moved guest counting on the target")
    await api.ok("DELETE", f"/guests/{gid}", {"force": True})


@pytest.mark.gen_test(timeout=420)
async def test_draining_the_cell_moves_its_running_guest_live(
        api, system, h2, second_host, tmp_path):  # noqa: F811
    gid = await counter_guest(api, tmp_path, "drained")
    before = await counting(host_log(gid), what="the counter on this host")
    await api.ok("PUT", "/cells/local-g", {"drain": True})

    async def drained():
        drain = (await api.ok("GET", "/cells/local-g"))["drain"]
        return drain if drain["finished"] else None

    drain = await until(drained, timeout=240, what="the cell drained")
    assert "error" not in drain and drain["progress"] == 100
    after = await counting(h2_log(second_host, gid), above=before[-1],
                           what="the counter on the second host")
    assert after[0] >= before[-1]
    assert not on_host(system, gid)
    late = guest_body("late", modules=[], cell="local-g")
    del late["cloud_init"]
    refused = await api.call("POST", "/guests/", late)
    assert refused.code == 409 and "local-g" in refused.message
    await api.ok("DELETE", f"/guests/{gid}", {"force": True})
