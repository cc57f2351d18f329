"""Snapshots through the API: the list shape keyed by name, parents taken from the current
snapshot, refusals while the guest runs, restore requests, deletion as a state, and what
the reconciler's `record_snapshot_observed`/`finish_snapshot_delete` change."""

from __future__ import annotations

import pytest

from state.models import Guest, Snapshot
from tests.api.guest_helpers import create_guest, make_pool, mark_created


async def stopped_guest(api, server) -> str:
    await make_pool(api)
    guest_id = await create_guest(api)
    mark_created(server, guest_id)
    return guest_id


@pytest.mark.gen_test
async def test_snapshot_tree_and_current(api, server):
    guest_id = await stopped_guest(api, server)
    base = f"/instances/{guest_id}/snapshots/"
    assert await api.ok("GET", base) == {}
    await api.ok("POST", base, {"name": "s1", "description": "first"})
    await api.ok("POST", base, {"name": "s2"})
    assert await api.ok("GET", base) == {"s1": {"is_root": True},
                                         "s2": {"backing": "s1", "is_current": True}}
    info = await api.ok("GET", base + "s1")
    assert info["running"] is False and info["description"] == "first" and info["create_time"]

    await api.ok("PUT", base, {"target": "s1"})
    spec = Guest.get_by_id(guest_id).spec
    assert spec["restore"] == {"target": "s1", "generation": 1}
    await api.ok("POST", base, {"name": "branch"})
    assert await api.ok("GET", base) == {"s1": {"is_root": True}, "s2": {"backing": "s1"},
                                         "branch": {"backing": "s1", "is_current": True}}
    assert Snapshot.get(Snapshot.name == "branch").phase == "creating"

    # once the reconciler converged the guest, what it observed is the truth
    row = Guest.get_by_id(guest_id)
    server.store.record_guest_observed(guest_id, generation=row.generation,
                                       observed={"current_snapshot": "s2"})
    assert (await api.ok("GET", base))["s2"] == {"backing": "s1", "is_current": True}

    taken = await api.call("POST", base, {"name": "s1"})
    assert taken.code == 409 and "already has a snapshot named 's1'" in taken.message
    unknown = await api.call("PUT", base, {"target": "nope"})
    assert unknown.code == 404
    assert (await api.call("GET", base + "nope")).code == 404


@pytest.mark.gen_test
async def test_snapshots_refused_while_running_or_not_created(api, server):
    guest_id = await stopped_guest(api, server)
    base = f"/instances/{guest_id}/snapshots/"
    await api.ok("POST", base, {"name": "s1"})
    server.store.record_guest_observed(guest_id, phase="running", observed={"running": True})
    running = await api.call("POST", base, {"name": "s2"})
    assert running.code == 409 and "stop the guest first" in running.message
    restore = await api.call("PUT", base, {"target": "s1"})
    assert restore.code == 409 and "stop the guest first" in restore.message
    await api.ok("DELETE", base + "s1")  # deleting is fine while running
    creating = await create_guest(api, "new")
    early = await api.call("POST", f"/instances/{creating}/snapshots/", {"name": "s"})
    assert early.code == 409 and "not created yet" in early.message
    bad = await api.call("POST", base, {"name": "has space"})
    assert bad.code == 400


@pytest.mark.gen_test
async def test_delete_is_a_state_until_the_reconciler_finishes(api, server):
    guest_id = await stopped_guest(api, server)
    base = f"/instances/{guest_id}/snapshots/"
    for name in ("a", "b", "c"):
        await api.ok("POST", base, {"name": name})
    await api.ok("DELETE", base + "b")
    assert Snapshot.get(Snapshot.name == "b").deleting is True
    # the child of a deleted snapshot hangs from its grandparent; b is hidden
    assert await api.ok("GET", base) == {"a": {"is_root": True},
                                         "c": {"backing": "a", "is_current": True}}
    again = await api.call("DELETE", base + "b")
    assert again.code == 404
    busy = await api.call("POST", base, {"name": "b"})
    assert busy.code == 409 and "being deleted" in busy.message
    await api.ok("DELETE", base + "c")  # the current one: current moves to its parent
    assert Guest.get_by_id(guest_id).spec["current_snapshot"] == "a"
    assert await api.ok("GET", base) == {"a": {"is_root": True, "is_current": True}}

    assert server.store.record_snapshot_observed(guest_id, "a", phase="created",
                                                 observed={"size": 1})
    assert Snapshot.get(Snapshot.name == "a").phase == "created"
    with pytest.raises(Exception, match="not being deleted"):
        server.store.finish_snapshot_delete(guest_id, "a")
    assert server.store.finish_snapshot_delete(guest_id, "b") is True
    assert Snapshot.get(Snapshot.name == "c").parent == "a"
    assert server.store.finish_snapshot_delete(guest_id, "b") is False
    assert server.store.finish_snapshot_delete(guest_id, "c") is True
    assert [s.name for s in Snapshot.select()] == ["a"]
