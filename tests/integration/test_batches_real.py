"""Batches on real QEMU through a real nanod process: a batch create of 5 guests is
interrupted by SIGKILL of nanod; after a restart every guest ends created exactly once
(one domain, one system volume each, nothing else of theirs on the cell); then batch stop
and batch delete leave nothing behind. Names follow the `order` rule."""

from __future__ import annotations

import os
import signal
import time

import pytest

from nanod import config
from state.db import close_database
from tests.conftest import ADMIN, ADMIN_PASSWORD, write_nanod_config
from tests.conftest import TEST_NAMES_PREFIX as PREFIX
from tests.integration.conftest import remove_cell_leftovers
from tests.integration.test_faults import call, free_port, login, serve, wait

pytestmark = pytest.mark.integration
MiB = 1 << 20


def prepare(data, qemu_dir) -> None:
    from nanod.server import open_store

    store = open_store(config.load(None, {"data_dir": str(data)}))
    store.init_system(ADMIN, ADMIN_PASSWORD)
    store.register_cell("local-b", {"libvirt_uri": "qemu:///system", "virt_type": "qemu",
                                    "storage_path": str(qemu_dir / "pool")})
    store.create_pool("bp", {})
    close_database()
    write_nanod_config(data / "nanod.yaml", {"reconciler": {
        "workers": 4, "resync_seconds": 2, "probe_seconds": 1, "offline_after": 3,
        "guest_poll_seconds": 2, "stop_grace_seconds": 3}})


def test_batch_create_survives_a_killed_nanod(tmp_path, qemu_dir, system):
    data = tmp_path / "data"
    data.mkdir()
    prepare(data, qemu_dir)
    port = free_port()
    conf = ["--config", str(data / "nanod.yaml")]
    proc = serve(data, port, *conf)
    try:
        session = login(port)
        wait(lambda: call(port, "GET", "/cells/local-b", session=session)["data"]["alive"],
             30, "cell alive")
        assert call(port, "POST", "/compute_pool_cells/bp/local-b", {}, session)[
            "error_code"] == 0
        body = {"name_rule": "order", "name_prefix": "b", "owner": ADMIN, "group": "admin",
                "pool": "bp", "count": 5, "cores": 1, "memory": 64 * MiB,
                "disks": [32 * MiB], "auto_start": False, "template": "", "modules": [],
                "qos": {"cpu_priority": "medium", "write_speed": 0, "write_iops": 0,
                        "read_speed": 0, "read_iops": 0, "receive_speed": 0,
                        "send_speed": 0}}
        reply = call(port, "POST", "/batch/create_guest/", body, session)
        assert reply["error_code"] == 0, reply["message"]
        task = reply["data"]["id"]
        time.sleep(0.6)  # some guests are under way
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

        proc = serve(data, port, *conf)
        session = login(port)

        def all_created():
            entries = call(port, "GET", f"/batch/create_guest/{task}", session=session)["data"]
            return entries if all(e["status"] == "created" for e in entries) else None

        entries = wait(all_created, 120, "every guest of the batch created")
        assert [e["name"] for e in entries] == [f"b_{i}" for i in range(5)]
        ids = [e["id"] for e in entries]
        names = [d.name() for d in system.listAllDomains()]
        for gid in ids:
            assert names.count(f"{PREFIX}-{gid}") == 1
        pool = system.storagePoolLookupByName(f"{PREFIX}-local-b")
        pool.refresh(0)
        volumes = sorted(v.name() for v in pool.listAllVolumes() if v.name().startswith(f"{PREFIX}-"))
        assert volumes == sorted(f"{PREFIX}-{gid}-disk0" for gid in ids)

        for gid in ids[:2]:
            assert call(port, "POST", f"/instances/{gid}", {}, session)["error_code"] == 0
        wait(lambda: all(call(port, "GET", f"/instances/{g}", session=session)["data"]["running"]
                         for g in ids[:2]), 60, "two guests running")
        stop = call(port, "POST", "/batch/stop_guest/", {"guest": ids[:2]}, session)
        stop_id = stop["data"]["id"]
        wait(lambda: all(e["status"] == "stopped" for e in call(
            port, "GET", f"/batch/stop_guest/{stop_id}", session=session)["data"]), 120,
             "batch stop done")

        delete = call(port, "POST", "/batch/delete_guest/", {"guest": ids, "force": True},
                      session)
        delete_id = delete["data"]["id"]
        wait(lambda: all(e["status"] == "deleted" for e in call(
            port, "GET", f"/batch/delete_guest/{delete_id}", session=session)["data"]), 120,
             "batch delete done")
        names = [d.name() for d in system.listAllDomains()]
        assert not [gid for gid in ids if f"{PREFIX}-{gid}" in names]
        pool.refresh(0)
        assert not [v.name() for v in pool.listAllVolumes() if v.name().startswith(f"{PREFIX}-")]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        remove_cell_leftovers(system, f"{PREFIX}-local-b")
