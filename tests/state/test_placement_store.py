"""Placement through the store, on SQLite and PostgreSQL: every guest on a cell counts by
what it is promised whatever its phase, so single creates, batches and resizes agree, and
the answer does not depend on what the reconciler measured last. The overcommit setting is
the store's, a cell's `overcommit` field wins over it.

What the reconciler would write (cell liveness and stats, guest phases) is written here
with the store functions it uses (`record_guest_observed`) or, for the cell, directly as
the cell reconciler records it."""

from __future__ import annotations

from typing import Any

import pytest

from state.db import open_database
from state.errors import Conflict, Unavailable
from state.identity import SessionInfo
from state.models import BatchTask, Cell, Guest
from state.placement import Amounts, NoRoom, guest_need
from state.store import Store

GIB = 1 << 30
ADMIN_PASSWORD = "Adm1nPassword"
FULL = ("no cell in compute pool 'p' has 1 core free (best: a with 0 cores free, 8 of 8 "
        "cores promised: 2 host cores x overcommit.cpu 4)")


def observe_cell(name: str, *, alive: bool = True, cores: int = 2, memory: int = 16 * GIB,
                 disk: int = 100 * GIB, available_memory: int | None = None,
                 available_disk: int | None = None) -> None:
    """What the cell reconciler records for a cell with these host figures."""
    stats = {"max_cpu": cores, "max_memory": memory, "max_disk": disk, "cpu_usage": 0,
             "available_memory": memory if available_memory is None else available_memory,
             "available_disk": disk if available_disk is None else available_disk}
    Cell.update(observed={"alive": alive, "stats": stats}).where(Cell.name == name).execute()


def make_store(database: str, **settings: Any) -> tuple[Store, SessionInfo]:
    open_database(database)
    store = Store(**settings)
    store.init_system("admin", ADMIN_PASSWORD)
    store.create_pool("p", {})
    for name in ("a",):
        store.register_cell(name, {"libvirt_uri": "qemu:///system"})  # no reconciler here
        observe_cell(name)
        store.add_cell_to_pool("p", name)
    return store, store.open_session("admin", "127.0.0.1")


@pytest.fixture
def store(database: str) -> tuple[Store, SessionInfo]:
    """A store with the default setting (cpu 4) and pool p of one 2-core cell a."""
    return make_store(database)


def body(name: str = "g", **extra: Any) -> dict[str, Any]:
    return {"name": name, "pool": "p", "cores": 1, "memory": GIB // 4, "disks": [GIB],
            **extra}


def batch(count: int, **extra: Any) -> dict[str, Any]:
    out = body(name_rule="order", name_prefix="b", count=count, **extra)
    del out["name"]
    return out


PHASES = {
    "all creating": ["creating"] * 8,
    "all stopped": ["stopped"] * 8,
    "all running": ["running"] * 8,
    "every phase": ["creating", "stopped", "running", "failed", "lost", "migrating",
                    "deleting", "creating"],
}


@pytest.mark.parametrize("phases", PHASES.values(), ids=PHASES.keys())
def test_nine_one_core_guests_never_fit_two_cores_at_ratio_4(store, phases):
    store, session = store
    ids = [store.create_guest(session, body(f"g{i}"))["id"] for i in range(8)]
    for guest_id, phase in zip(ids, phases, strict=True):
        store.record_guest_observed(guest_id, phase=phase,
                                    observed={"created": phase != "creating"})
    with pytest.raises(NoRoom) as single:
        store.create_guest(session, body("ninth"))
    assert str(single.value).startswith(FULL)
    with pytest.raises(NoRoom, match="1 core free"):
        store.batch_create_guests(session, batch(1))
    assert Guest.select().count() == 8


def test_the_database_sums_promises_as_guest_need_counts_them(store):
    """Placement sums the guests' promises in SQL (state/guests.py `_promised`): the same
    figures as `guest_need` on each spec, data disks included, on SQLite and PostgreSQL."""
    store, session = store
    store.modify_cell_spec("a", {"overcommit": {"cpu": 10, "disk": 10}})
    store.create_guest(session, body("one", cores=3, memory=3 * GIB, disks=[40 * GIB]))
    store.create_guest(session, body("two", memory=GIB, disks=[10 * GIB, 5 * GIB, 7]))
    store.batch_create_guests(session, batch(3, disks=[GIB, 2 * GIB]))
    expected = Amounts()
    for row in Guest.select():
        expected += guest_need(row.spec)
    assert expected == Amounts(7, 4 * GIB + 3 * GIB // 4, 64 * GIB + 7)
    [room] = store._cell_rooms("p")
    assert room.promised == expected


def test_a_deleting_guest_counts_until_its_row_is_gone(store):
    store, session = store
    ids = [store.create_guest(session, body(f"g{i}"))["id"] for i in range(8)]
    store.delete_guest(session, ids[0])
    with pytest.raises(NoRoom):
        store.create_guest(session, body("ninth"))
    store.finish_guest_delete(ids[0])
    assert store.create_guest(session, body("ninth"))["cell"] == "a"


def test_a_batch_fits_exactly_when_as_many_singles_do(store, database):
    store, session = store
    with pytest.raises(NoRoom) as refused:
        store.batch_create_guests(session, batch(40))
    assert str(refused.value).startswith("batch of 40 guests: room for 8 only: " + FULL)
    assert Guest.select().count() == 0 and BatchTask.select().count() == 0  # all or none
    store.modify_cell_spec("a", {"overcommit": {"cpu": 20}})
    _, guests = store.batch_create_guests(session, batch(40))
    assert len(guests) == 40 and {g["cell"] for g in guests} == {"a"}
    with pytest.raises(NoRoom, match="40 of 40 cores promised: 2 host cores x overcommit.cpu 20"):
        store.create_guest(session, body("forty-first"))
    store.modify_cell_spec("a", {"overcommit": {}})  # back to the setting: over-promised
    with pytest.raises(NoRoom, match="40 of 8 cores promised"):
        store.create_guest(session, body("forty-first"))


@pytest.mark.parametrize(("setting", "cell_field", "fit"), [
    ({}, None, 8),                                # the default: 4 vCPUs per core
    ({"cpu": 20}, None, 40),                      # the setting
    ({"cpu": 20}, {"cpu": 4}, 8),                 # the cell wins over the setting
    ({"cpu": 1}, {"cpu": 10, "memory": 2}, 20),
])
def test_the_cell_field_wins_over_the_setting(database, setting, cell_field, fit):
    store, session = make_store(database, overcommit=setting)
    if cell_field is not None:
        store.modify_cell_spec("a", {"overcommit": cell_field})
    _, guests = store.batch_create_guests(session, batch(fit))
    assert len(guests) == fit
    with pytest.raises(NoRoom, match=f"{fit} of {fit} cores promised"):
        store.create_guest(session, body("one-more"))


def test_memory_and_disk_count_promises_not_measurements(store):
    """The reconciler's measurement of free memory and disk (which moves as guests start,
    stop, write) does not change the answer; only the guests' promises do."""
    store, session = store
    store.modify_cell_spec("a", {"overcommit": {"cpu": 100}})
    observe_cell("a", memory=16 * GIB, disk=100 * GIB, available_memory=0, available_disk=0)
    first = store.create_guest(session, body("big", memory=12 * GIB, disks=[60 * GIB]))
    assert first["cell"] == "a"
    with pytest.raises(NoRoom) as memory:
        store.create_guest(session, body("more", memory=5 * GIB))
    assert str(memory.value).startswith(
        "no cell in compute pool 'p' has 5.0 GiB memory free (best: a with 4.0 GiB memory "
        "free, 12.0 of 16.0 GiB memory promised: 16.0 GiB host memory x overcommit.memory 1)")
    store.record_guest_observed(first["id"], phase="running", observed={"created": True})
    observe_cell("a", memory=16 * GIB, disk=100 * GIB)  # measured again: all free
    with pytest.raises(NoRoom, match="12.0 of 16.0 GiB memory promised"):
        store.create_guest(session, body("more", memory=5 * GIB))
    with pytest.raises(NoRoom, match="60.0 of 100.0 GiB disk promised"):
        store.create_guest(session, body("more", disks=[30 * GIB, 11 * GIB]))
    store.modify_cell_spec("a", {"overcommit": {"cpu": 100, "memory": 1.5, "disk": 2}})
    assert store.create_guest(session, body("more", memory=5 * GIB,
                                            disks=[30 * GIB, 11 * GIB]))["cell"] == "a"


def test_resizes_grow_only_into_free_room(store):
    store, session = store
    observe_cell("a", disk=50 * GIB)  # under limits.max_disk (64 GiB) of one disk
    ids = [store.create_guest(session, body(f"g{i}", cores=2))["id"] for i in range(3)]
    guest = ids[0]
    with pytest.raises(NoRoom) as cores:
        store.set_cores(session, guest, 5)
    assert str(cores.value) == (
        "cell 'a' has no room to grow guest 'g0' to 5 cores: 2 cores free of 3 cores needed "
        "(6 of 8 cores promised: 2 host cores x overcommit.cpu 4)")
    store.set_cores(session, guest, 4)                       # 8 of 8
    store.set_cores(session, guest, 1)                       # a shrink always passes
    assert Guest.get_by_id(guest).spec["cores"] == 1
    with pytest.raises(NoRoom) as memory:
        store.set_memory(session, guest, 16 * GIB)
    assert str(memory.value).startswith(
        "cell 'a' has no room to grow guest 'g0' to 16.0 GiB memory: 15.2 GiB memory free "
        "of 15.8 GiB memory needed (0.8 of 16.0 GiB memory promised")
    store.set_memory(session, guest, 10 * GIB)
    with pytest.raises(NoRoom) as disk:
        store.resize_disk(session, guest, "0", 49 * GIB)
    assert str(disk.value).startswith(
        "cell 'a' has no room to grow guest 'g0' disk 0 to 49.0 GiB: 47.0 GiB disk free of "
        "48.0 GiB disk needed (3.0 of 50.0 GiB disk promised")
    store.resize_disk(session, guest, "0", 48 * GIB)
    assert Guest.get_by_id(guest).spec["disks"] == [48 * GIB]
    # the grown guest's promise is what placement counts next
    with pytest.raises(NoRoom, match="has 1.0 GiB disk free"):
        store.create_guest(session, body("x"))


def test_a_migration_target_is_checked_for_the_whole_guest(store):
    store, session = store
    store.register_cell("b", {"libvirt_uri": "qemu:///system"})
    observe_cell("b", cores=1)
    store.add_cell_to_pool("p", "b")
    guest = store.create_guest(session, body("g", cores=5, cell="a"))["id"]
    with pytest.raises(NoRoom) as refused:
        store.check_guest_fits(guest, "b")
    assert str(refused.value) == (
        "cell 'b' has no room for guest 'g': 4 cores free of 5 cores needed "
        "(0 of 4 cores promised: 1 host core x overcommit.cpu 4)")
    small = store.create_guest(session, body("small", cores=3, cell="a"))["id"]
    store.check_guest_fits(small, "b")  # 3 of b's 4
    with pytest.raises(Conflict, match="already on cell 'a'"):
        store.check_guest_fits(guest, "a")
    observe_cell("b", alive=False)
    with pytest.raises(Unavailable, match="cell 'b' is offline"):
        store.check_guest_fits(guest, "b")
