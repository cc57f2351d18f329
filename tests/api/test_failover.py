"""Failover decisions on the store (reconciler/failover.py `Failover.lost`), with fence
commands that are real programs (`true`, `false`, a missing one) and cells no reconciler
touches: nothing moves before a successful fence; after it each guest of the lost cell is
placed on another cell of the pool (auto_start guests to run, the others stopped), its
port forwards with it, and the log says so; a cell back after a fence names the stale
copies to remove. The moves on real cells: tests/integration/test_failover_real.py."""

from __future__ import annotations

import pytest

from reconciler.failover import Failover, Fencing, check_fencing
from state.models import Guest
from tests.api.guest_helpers import GIB, create_guest, make_pool, mark_created, set_cell


async def failover_pool(api, server) -> tuple[str, str]:
    await api.ok("POST", "/storage_pools/nfs1", {"type": "nfs", "host": "nfs.example",
                                                 "target": "/export/nano"})
    await make_pool(api, cells={"cell-a": {}, "cell-b": {}})
    await api.ok("PUT", "/compute_pools/pool1", {"storage": "nfs1", "failover": True})
    g1 = await create_guest(api, "g1", cell="cell-a", auto_start=True, ports=[22])
    g2 = await create_guest(api, "g2", cell="cell-a")
    for gid in (g1, g2):
        mark_created(server, gid, running=True)
    set_cell("cell-a", alive=False)
    return g1, g2


def lost(server, fencing: Fencing, fence=None):
    enqueued = []
    failover = Failover(server.store, enqueued.append, fencing)
    fence, condition = failover.lost(server.store.cell_spec("cell-a"), fence)
    return fence, condition, enqueued


@pytest.mark.gen_test
async def test_nothing_moves_without_a_fence(api, server):
    g1, g2 = await failover_pool(api, server)
    for fencing, reason in ((Fencing(), "NoFenceCommand"),
                            (Fencing(default=["false"]), "FenceFailed"),
                            (Fencing(default=["/nonexistent/fence"]), "FenceFailed")):
        fence, (status, why, message), enqueued = lost(server, fencing)
        assert (fence["ok"], status, why) == (False, False, reason), message
        assert "stay lost" in message and not enqueued
        assert {Guest.get_by_id(g).cell for g in (g1, g2)} == {"cell-a"}


@pytest.mark.gen_test
async def test_after_the_fence_the_guests_start_elsewhere(api, server):
    g1, g2 = await failover_pool(api, server)
    ports = server.store.guest_ports(g1)
    fence, (status, why, message), enqueued = lost(
        server, Fencing(commands={"cell-a": ["test", "{cell}", "=", "cell-a"]}))
    assert fence["ok"] and (status, why) == (True, "Fenced") and "fenced by test" in message
    one, two = Guest.get_by_id(g1), Guest.get_by_id(g2)
    assert (one.cell, one.spec["power"]) == ("cell-b", "running")  # auto_start: runs there
    assert (two.cell, two.spec["power"]) == ("cell-b", "stopped")  # defined, stopped
    assert {k.id for k in enqueued if k.kind == "guest"} == {g1, g2}
    moved = server.store.guest_ports(g1)
    assert [p["cell"] for p in moved] == ["cell-b"] and \
        [p["guest_port"] for p in moved] == [p["guest_port"] for p in ports]
    logs = [e["content"] for e in (await api.ok("GET", "/logs/?limit=10"))["logs"]]
    assert any("failover: guest g1" in line and "to cell-b (started" in line for line in logs)
    # the next probe finds nothing left to move; the fence is not run again
    fence2, (status, why, _), enqueued = lost(server, Fencing(default=["false"]), fence)
    assert fence2 == fence and status is True and not enqueued

    # back: its copies of g1 and g2 are stale, a guest still placed there is not
    stale = server.store.stale_guests("cell-a", [g1, g2, "not-a-guest"])
    assert sorted(stale) == sorted([g1, g2])


@pytest.mark.gen_test
async def test_a_guest_without_room_stays_lost(api, server):
    g1, g2 = await failover_pool(api, server)
    set_cell("cell-b", max_memory=3 * GIB, available_memory=3 * GIB)  # room for one
    _, (status, _, message), _ = lost(server, Fencing(default=["true"]))
    assert status is True and "1 guest(s) wait for room" in message
    assert sorted(Guest.get_by_id(g).cell for g in (g1, g2)) == ["cell-a", "cell-b"]


def test_fencing_settings_are_checked():
    assert check_fencing({"commands": {}, "default": [], "timeout_seconds": 60}) == ""
    assert "argv lists" in check_fencing({"default": "ipmitool power off"})
    assert "timeout_seconds" in check_fencing({"timeout_seconds": 0})
    assert "takes" in check_fencing({"command": ["x"]})
