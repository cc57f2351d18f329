"""A nanod killed with SIGKILL in the middle of a migration, then started again: the move
completes (or rolls back), never left half, with the domain defined on exactly one cell.

A real nanod process, this host's libvirtd (cell 'local-k') and the second host's
(scripts/second-host). The guest's disk carries 24 MiB of random data after a counter boot
sector, and live migrations are held to 2 MiB/s (setting
reconciler.migration_bandwidth_mib), so the move is under way for seconds when nanod dies:

- live: nanod dies while libvirt copies the disk and memory (the migration's progress seen
  between 0 and 100); libvirt's peer-to-peer job goes on without it and the restarted
  nanod finds the guest on the target (or still moving, and waits), removes the source's
  volumes and records the migration finished; the counter never went back to 0000;
- cold: nanod dies while the disks are streamed; the restarted nanod copies again (a copy
  it did not see verified is not trusted), defines the guest on the target and removes it
  from the source.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import libvirt
import pytest

from nanod import config
from reconciler.naming import names
from state.db import close_database
from tests.api.test_compute import until
from tests.api.test_images import create as create_image
from tests.api.test_images import sha1, upload
from tests.conftest import ADMIN, ADMIN_PASSWORD, TEST_SETTINGS, Api, write_nanod_config
from tests.conftest import TEST_NAMES_PREFIX as PREFIX
from tests.helpers.bootsector import counter_disk
from tests.helpers.second_host import SecondHost
from tests.integration.conftest import remove_cell_leftovers
from tests.integration.test_faults import free_port, serve
from tests.integration.test_migration_real import counters, h2_log, host_log

pytestmark = pytest.mark.integration
MiB = 1 << 20


def prepare(data: Path, qemu_dir: Path, second_host: SecondHost) -> None:
    from nanod.server import open_store

    store = open_store(config.load(None, config.merge(TEST_SETTINGS, {"data_dir": str(data)})))
    store.init_system(ADMIN, ADMIN_PASSWORD)
    store.register_cell("local-k", {"libvirt_uri": "qemu:///system", "virt_type": "qemu",
                                    "storage_path": str(qemu_dir / "pool")})
    store.create_pool("kp", {})
    close_database()
    write_nanod_config(data / "nanod.yaml", {
        "ssh": {"key_dir": str(Path(second_host.state["key_file"]).parent)},
        "reconciler": {"workers": 4, "resync_seconds": 2, "probe_seconds": 1,
                       "offline_after": 3, "guest_poll_seconds": 2, "stop_grace_seconds": 3,
                       "migration_bandwidth_mib": 2}})


async def started(data: Path, port: int):
    proc = serve(data, port, "--config", str(data / "nanod.yaml"))
    api = Api(f"http://127.0.0.1:{port}")
    await api.login(ADMIN, ADMIN_PASSWORD)
    return proc, api


async def guest_status(api, gid):
    return await api.ok("GET", f"/guests/{gid}")


@pytest.mark.gen_test(timeout=600)
@pytest.mark.parametrize("mode", ["live", "cold"])
async def test_a_killed_nanod_finishes_the_migration_after_restart(
        tmp_path, qemu_dir, system, second_host: SecondHost, mode):
    data = tmp_path / "data"
    data.mkdir()
    prepare(data, qemu_dir, second_host)
    h2 = second_host.name
    h2_conn = libvirt.open(second_host.uri())
    port = free_port()
    proc, api = await started(data, port)
    try:
        async def alive(name):
            return (await api.ok("GET", f"/cells/{name}"))["alive"] or None

        await until(lambda: alive("local-k"), timeout=30, what="local cell alive")
        await api.ok("POST", f"/cells/{h2}", second_host.body)
        await until(lambda: alive(h2), timeout=60, what="second host alive")
        for cell in ("local-k", h2):
            await api.ok("POST", f"/compute_pool_cells/kp/{cell}", {})

        image = counter_disk(tmp_path / "noisy.qcow2", noise=24 * MiB)
        blob = image.read_bytes()
        image_id = await create_image(api, "disk", "noisy-counter")
        reply = await upload(api, "disk", image_id, blob, checksum=sha1(blob),
                             filename="noisy.qcow2")
        assert reply.code == 0, reply.message
        body = {"name": f"crash-{mode}", "owner": ADMIN, "group": "admin", "pool": "kp",
                "cores": 1, "memory": 64 * MiB, "disks": [64 * MiB], "auto_start": False,
                "from_image": image_id, "template": "", "modules": [], "cell": "local-k",
                "qos": {"cpu_priority": "medium", "write_speed": 0, "write_iops": 0,
                        "read_speed": 0, "read_iops": 0, "receive_speed": 0,
                        "send_speed": 0}}
        gid = (await api.ok("POST", "/guests/", body))["id"]

        async def created():
            return (await guest_status(api, gid))["created"] or None

        await until(created, timeout=120, what="guest created")
        before: list[int] = []
        if mode == "live":
            await api.ok("POST", f"/instances/{gid}", {})

            async def counting():
                path = host_log(gid)
                values = counters(path.read_bytes()) if path.exists() else []
                return values if len(values) > 3 else None

            before = await until(counting, timeout=60, what="the counter on this host")
        vols = {v.name(): v for v in system.storagePoolLookupByName(
            f"{PREFIX}-local-k").listAllVolumes() if gid in v.name()}
        assert sorted(vols) == [names().volume(gid, 0)]

        mid = (await api.ok("POST", "/migrations/", {
            "source_pool": "kp", "source_cell": "local-k", "target_cell": h2,
            "instances": [gid]}))["id"]
        busy = "migrating" if mode == "live" else "copying"

        async def under_way():
            status = await api.call("GET", f"/migrations/{mid}")
            guest = status.data["guests"][0]
            if guest.get("phase") == busy and (mode == "cold" or 0 < status.data["progress"]
                                               < 100):
                return status
            assert not status.data["finished"], status.data  # too fast to be interrupted
            return None

        status = await until(under_way, timeout=60, what=f"the {mode} migration under way")
        assert status.status == 201
        stats = await api.ok("GET", "/compute_cell_status/kp/local-k")
        assert stats["instances"][3] == 1  # counted as migrating while it moves
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

        proc, api = await started(data, port)

        async def finished():
            reply = await api.call("GET", f"/migrations/{mid}")
            return reply if reply.data["finished"] else None

        done = await until(finished, timeout=240, what="the migration finished after restart")
        assert done.status == 200 and "error" not in done.data, done.data
        # defined on exactly one cell: the target
        with pytest.raises(libvirt.libvirtError):
            system.lookupByName(names().domain(gid))
        dom = h2_conn.lookupByName(names().domain(gid))
        assert dom.isPersistent() and bool(dom.isActive()) == (mode == "live")
        local = system.storagePoolLookupByName(f"{PREFIX}-local-k")
        local.refresh(0)
        assert not [v for v in local.listVolumes() if gid in v]
        if mode == "live":  # it never started again
            path = h2_log(second_host, gid)
            after = counters(path.read_bytes()) if path.exists() else []
            assert after and after[0] >= before[-1], (before[-3:], after[:3])

        async def reported():
            item = await guest_status(api, gid)
            return item if item["cell"] == h2 else None

        await until(reported, timeout=60, what="the guest reported on the target")
        await api.ok("DELETE", f"/guests/{gid}", {"force": True})
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        time.sleep(0.2)
        remove_cell_leftovers(system, f"{PREFIX}-local-k")
        remove_cell_leftovers(h2_conn, f"{PREFIX}-{h2}")
        h2_conn.close()
