"""Leases and the fencing token (state/leases.py, state/db.py) on a real store: a write made
under a lease that was taken over, or that expired, is refused and changes nothing; a
takeover raises the token; on PostgreSQL a takeover waits for a fenced transaction that
is still writing, so the old owner's write lands before it or not at all. And the even
spread of reconciler/leases.py's `Membership` between replicas on one store.
"""

from __future__ import annotations

import threading
import time

import pytest

from reconciler.contract import Key
from reconciler.leases import Membership
from reconciler.longwork import InProgress, LongWork
from state.db import db, open_database
from state.leases import GLOBAL, Fence, Fenced, cell_lease, fenced
from state.models import Cell, ControlReplica, Lease
from state.store import Store
from tests.conftest import postgres_only


@pytest.fixture
def store(database):
    open_database(database)
    return Store()


def add_cells(*names: str) -> None:
    for name in names:
        Cell.create(name=name, spec={})


def cell_phase(name: str) -> str:
    return Cell.get(Cell.name == name).phase


def test_a_write_under_a_lost_lease_is_refused_and_changes_nothing(store):
    add_cells("c1")
    store.lease_rows()
    old = store.acquire_lease(cell_lease("c1"), "r1", ttl=30)
    assert old == 1
    with fenced(Fence(cell_lease("c1"), "r1", old)):
        Cell.update(phase="online").where(Cell.name == "c1").execute()
    assert cell_phase("c1") == "online"

    # r1 stops renewing; its lease expires and r2 takes it: the token goes up
    Lease.update(expires_at=time.time() - 1).where(Lease.name == cell_lease("c1")).execute()
    new = store.acquire_lease(cell_lease("c1"), "r2", ttl=30)
    assert new == old + 1
    with fenced(Fence(cell_lease("c1"), "r1", old)), pytest.raises(Fenced, match="r2"):
        Cell.update(phase="offline").where(Cell.name == "c1").execute()
    with fenced(Fence(cell_lease("c1"), "r1", old)), pytest.raises(Fenced):
        with db.atomic():  # inside a transaction too, and the whole of it rolls back
            Cell.create(name="c2", spec={})
    assert cell_phase("c1") == "online" and Cell.get_or_none(Cell.name == "c2") is None
    with fenced(Fence(cell_lease("c1"), "r2", new)):
        Cell.update(phase="offline").where(Cell.name == "c1").execute()
    assert cell_phase("c1") == "offline"


def test_an_expired_lease_fences_even_before_anyone_takes_it(store):
    add_cells("c1")
    store.lease_rows()
    token = store.acquire_lease(cell_lease("c1"), "r1", ttl=30)
    Lease.update(expires_at=time.time() - 1).where(Lease.name == cell_lease("c1")).execute()
    with fenced(Fence(cell_lease("c1"), "r1", token)), pytest.raises(Fenced, match="expired"):
        Cell.update(phase="online").where(Cell.name == "c1").execute()
    assert store.renew_leases("r1", {cell_lease("c1"): token}, ttl=30) == {}
    assert cell_phase("c1") == "pending"


@pytest.fixture
def pg_store():
    """PostgreSQL only: SQLite has one writer at a time by itself, no row lock to test."""
    for _ in postgres_only("the row lock is PostgreSQL's"):
        yield Store()


def test_a_takeover_waits_for_the_fenced_write_in_flight(pg_store):
    store = pg_store
    add_cells("c1")
    store.lease_rows()
    token = store.acquire_lease(cell_lease("c1"), "r1", ttl=0.5)
    inside, release = threading.Event(), threading.Event()

    def old_owner() -> None:
        with fenced(Fence(cell_lease("c1"), "r1", token)), db.atomic():
            Cell.update(phase="online").where(Cell.name == "c1").execute()  # checks + locks
            inside.set()
            release.wait(10)
    writer = threading.Thread(target=old_owner)
    writer.start()
    assert inside.wait(10)
    time.sleep(0.6)  # the lease has expired meanwhile
    taken: list[int | None] = []
    taker = threading.Thread(target=lambda: taken.append(
        store.acquire_lease(cell_lease("c1"), "r2", ttl=30)))
    taker.start()
    taker.join(1.0)
    assert taker.is_alive()  # the takeover waits for the old owner's transaction ...
    release.set()
    writer.join(10)
    taker.join(10)
    assert taken == [token + 1]  # ... and then wins
    assert cell_phase("c1") == "online"  # the write landed before the takeover


def test_replicas_spread_the_cells_evenly_and_rebalance_when_one_joins_or_leaves(store):
    add_cells(*(f"c{i}" for i in range(7)))
    one = Membership(store, "a", ttl=30, renew_seconds=10)
    one.tick()
    assert len([n for n in one.held() if n != GLOBAL]) == 7 and GLOBAL in one.held()
    two = Membership(store, "b", ttl=30, renew_seconds=10)
    for _ in range(3):
        one.tick()
        two.tick()
    held_a = {n for n in one.held() if n != GLOBAL}
    held_b = {n for n in two.held() if n != GLOBAL}
    assert not held_a & held_b and len(held_a | held_b) == 7
    assert sorted([len(held_a), len(held_b)]) == [3, 4]
    assert (GLOBAL in one.held()) != (GLOBAL in two.held())
    # keys follow their cell's lease; a guest with no cell and the global kinds: `global`
    key = Key("cell", sorted(held_b)[0].split(":", 1)[1])
    assert one.claim(key) is None and two.claim(key) == Fence(
        cell_lease(key.id), "b", two.held()[cell_lease(key.id)])
    assert (one.claim(Key("compute_pool", "p")) is None) != (
        two.claim(Key("compute_pool", "p")) is None)

    two.stop()  # a clean stop frees its leases at once
    one.tick()
    assert len([n for n in one.held() if n != GLOBAL]) == 7 and GLOBAL in one.held()
    assert store.live_replicas() == ["a"]


def test_a_replica_without_a_reconciler_is_alive_and_holds_no_lease(store):
    add_cells("c1", "c2")
    api_only = Membership(store, "api", ttl=30, renew_seconds=10, reconciles=False)
    worker = Membership(store, "worker", ttl=30, renew_seconds=10)
    for _ in range(2):
        api_only.tick()
        worker.tick()
    assert store.live_replicas() == ["api", "worker"]  # its uploads are left alone
    assert api_only.held() == {}
    assert set(worker.held()) == {GLOBAL, cell_lease("c1"), cell_lease("c2")}


def test_long_work_stops_when_its_lease_is_lost_and_a_queued_job_never_starts(store):
    """An image stream started under a cell's lease stops at its next block once another
    replica took the lease over (the old owner paused past its TTL), before that replica
    can stream into the same volume; a job still queued then does not start at all."""
    add_cells("c1")
    old = Membership(store, "a", ttl=30, renew_seconds=10)
    old.tick()
    woken: list[Key] = []
    lane = LongWork(woken.append, workers=1, holds=old.holds)
    owner = Key("guest", "g1")
    fence = old.claim(Key("cell", "c1"))
    assert fence is not None and old.holds(fence)
    blocks: list[int] = []
    streaming = threading.Event()

    def stream(report):
        for block in range(1000):
            blocks.append(block)
            streaming.set()
            report(block + 1, 1000)
            time.sleep(0.01)
        return "sent"

    with fenced(fence), pytest.raises(InProgress):
        lane.run(owner, "send", "send disk image i1 to cell c1", stream)
    with fenced(fence), pytest.raises(InProgress):  # waits behind the stream (one thread)
        lane.run(owner, "reset", "reset the system disk of g1", lambda report: "reset")
    assert streaming.wait(5)

    # "a" paused past its TTL: "b" takes the lease over; "a" learns it at its next renewal
    Lease.update(expires_at=time.time() - 1).where(Lease.name == cell_lease("c1")).execute()
    ControlReplica.update(heartbeat_at=time.time() - 60).where(
        ControlReplica.id == "a").execute()
    new = Membership(store, "b", ttl=30, renew_seconds=10)
    new.tick()
    assert cell_lease("c1") in new.held()
    old.tick()
    assert not old.holds(fence)

    deadline = time.monotonic() + 5
    while lane.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not lane.running(), "the stream went on after its lease was lost"
    with pytest.raises(Fenced, match="lease cell:c1 .* no longer this replica's"):
        lane.run(owner, "send", "send disk image i1 to cell c1", stream)
    assert len(blocks) < 1000
    with pytest.raises(Fenced, match="reset the system disk of g1: stopped"):
        lane.run(owner, "reset", "reset the system disk of g1", lambda report: "reset")
    assert woken == [owner, owner]  # each job's owner is told it ended

    # without a fence (one nanod, no leases) the same lane just runs the job
    with pytest.raises(InProgress):
        lane.run(owner, "alone", "alone", lambda report: (report(1, 1), "done")[1])
    deadline = time.monotonic() + 5
    while lane.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lane.run(owner, "alone", "alone", lambda report: None) == "done"
