"""A cell whose libvirtd hangs (it accepts the connection and never answers) holds no
reconciler worker (reconciler/drivers/libvirt_hv.py, "call limits").

The hanging libvirtd is real: a real sshd on loopback (tests/helpers/sshd.py) whose
ForceCommand runs every command as asked, except libvirt's own remote end
(virt-ssh-helper, or nc on libvirt's socket), which it replaces with `cat`: the client's
bytes are read and nothing ever comes back. Host facts over SSH still work, so the cell
gets as far as libvirt and waits there.

1. The driver: a call to such a cell gives up after reconciler.libvirt_timeout_seconds,
   and the calls after it fail at once (naming the call that hangs) instead of queueing.
2. Through nanod with two reconciler workers and three such cells: starting a guest on
   another (test-driver) cell takes at most a second longer than it took before the
   hanging cells were registered (without the limit, the hanging cells hold both workers
   and the guest never starts).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.drivers import libvirt_hv
from reconciler.drivers.libvirt_hv import LibvirtHypervisor
from state.errors import Unavailable
from tests.api.test_compute import register, until
from tests.conftest import reconciling, sqlite_only
from tests.helpers.sshd import SSHD, SshServer, start_sshd
from tests.integration.conftest import remove_cell_pools

pytestmark = pytest.mark.integration

LIMIT = 0.5
HUNG = ("hang-1", "hang-2", "hang-3")
HANG = """#!/bin/sh
# libvirt's remote end gets a peer that reads and never answers; anything else runs
case "$SSH_ORIGINAL_COMMAND" in
  *virt-ssh-helper*|*libvirt-sock*) exec cat >/dev/null ;;
  *) exec /bin/sh -c "$SSH_ORIGINAL_COMMAND" ;;
esac
"""


@pytest.fixture
def hanging_sshd(tmp_path: Path) -> Iterator[SshServer]:
    if not os.access(SSHD, os.X_OK):
        pytest.skip(f"{SSHD} missing: apt-get install openssh-server")
    script = tmp_path / "hang-libvirt"
    script.write_text(HANG)
    script.chmod(0o755)
    sshd = start_sshd(tmp_path / "sshd", force_command=str(script))
    yield sshd
    sshd.stop()  # the sessions end, and with them every call still waiting on them


@pytest.fixture
def call_limit() -> Iterator[float]:
    libvirt_hv.configure(call_timeout=LIMIT)
    yield LIMIT
    libvirt_hv.configure(call_timeout=30)


def test_a_hanging_cell_answers_unavailable_in_time_and_then_at_once(hanging_sshd, call_limit):
    hv = LibvirtHypervisor(hanging_sshd.libvirt_uri())
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable, match=f"^node info of .*: no answer within {LIMIT:g} s"):
            hv.node_info()
        first = time.monotonic() - started
        started = time.monotonic()
        with pytest.raises(Unavailable, match="^list domains .*: not tried, the cell has not answered an "
                           "earlier call for 0 s \\(node info of"):
            hv.list_domains()
        second = time.monotonic() - started
        print(f"first call gave up after {first:.2f} s, the next failed after {second:.3f} s")
        assert first < LIMIT + 2.0  # the limit, not libvirt's own (it has none here)
        assert second < LIMIT  # did not wait for the limit again
    finally:
        hv.close()


# -- through nanod ------------------------------------------------------------------------


database = pytest.fixture(name="database")(sqlite_only)  # threads, not backends


@pytest.fixture
def settings(settings, tmp_path):
    settings["ssh"].update({"key_dir": str(tmp_path)})
    return reconciling(settings, workers=2, probe_seconds=2, resync_seconds=2,
                       offline_after=2, guest_poll_seconds=0.5,
                       libvirt_timeout_seconds=LIMIT)


@pytest.fixture
def no_pools_left(server) -> Iterator[None]:
    """Facts over SSH work on the hanging cells, libvirt never does: nothing should be
    made on the real libvirtd; whatever was is removed once the reconciler stopped."""
    yield
    if server.controller:
        server.controller.stop(10.0)
    remove_cell_pools(HUNG)


async def start_and_time(api, gid: str) -> float:
    started = time.monotonic()
    await api.ok("POST", f"/instances/{gid}", {})

    async def running():
        return (await api.ok("GET", f"/instances/{gid}"))["running"]
    await until(running, timeout=60, what="guest running")
    return time.monotonic() - started


async def stop(api, gid: str) -> None:
    await api.ok("DELETE", f"/instances/{gid}", {"reboot": False, "force": True})

    async def stopped():
        return not (await api.ok("GET", f"/instances/{gid}"))["running"]
    await until(stopped, timeout=60, what="guest stopped")


@pytest.mark.gen_test(timeout=180)
async def test_a_hanging_cell_does_not_delay_a_power_change_elsewhere(
        api, tmp_path, hanging_sshd, no_pools_left, figure):
    from tests.api.guest_helpers import guest_body

    await register(api, tmp_path, "fast", cpus=8, memory_gib=16)
    await api.ok("POST", "/compute_pools/fastp", {"storage": "", "network": "",
                                                   "failover": False})
    await api.ok("POST", "/compute_pool_cells/fastp/fast", None)
    gid = (await api.ok("POST", "/guests/", guest_body(
        "fast-g", pool="fastp", cores=1, memory=256 << 20, disks=[64 << 20])))["id"]

    async def created():
        reply = await api.call("GET", f"/guests/{gid}")
        return reply.status == 200 and reply.data["created"]
    await until(created, timeout=30, what="guest created")
    before = await start_and_time(api, gid)
    await stop(api, gid)

    for name in HUNG:
        await api.ok("POST", f"/cells/{name}", {
            "address": "127.0.0.1", "virt_type": "qemu",
            "storage_path": str(tmp_path / f"images-{name}"),
            "ssh": {"user": "root", "port": hanging_sshd.port,
                    "key_file": hanging_sshd.key_file, "host_key": hanging_sshd.host_key}})

    async def all_hanging():
        for name in HUNG:
            rec = await api.ok("GET", f"/cells/{name}")
            reach = next((c for c in rec["status"]["conditions"]
                          if c["type"] == "CellReachable"), None)
            if not reach or reach["status"] or ("not answered" not in reach["message"]
                                                and "no answer" not in reach["message"]):
                return None
        return True
    await until(all_hanging, timeout=60, what="every hanging cell found hanging")

    during = await start_and_time(api, gid)
    figure(f"start of a guest beside hanging cells: {before:.2f} s before, {during:.2f} s "
           f"with {len(HUNG)} hanging cells and 2 workers (libvirt limit {LIMIT} s)")
    assert during - before <= 1.0
    for name in HUNG:
        rec = await api.ok("GET", f"/cells/{name}")
        assert rec["alive"] is False
