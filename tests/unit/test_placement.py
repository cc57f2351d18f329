"""Placement (state/placement.py): room is capacity (host figures x overcommit ratios) minus
what guests are promised; the roomiest fitting cell wins, ties go to the first name, and
every refusal says what is short, where, and how that cell's room is counted."""

from __future__ import annotations

import pytest

from nanod import config
from state.errors import Conflict, NotFound, Unavailable
from state.placement import (
    Amounts,
    CellRoom,
    NoRoom,
    Overcommit,
    check_cell,
    check_room,
    choose_cell,
    growth,
    guest_need,
    overcommit_from,
)

GIB = 1 << 30
ONE_CORE = Amounts(cores=1, memory=GIB // 4, disk=GIB)
NEED = Amounts(cores=2, memory=4 * GIB, disk=20 * GIB)
NOTHING = Amounts()


def cell(name: str, cores: int = 2, memory: int = 16, disk: int = 100, *, cpu: float = 4,
         mem_ratio: float = 1, disk_ratio: float = 1, promised: Amounts = NOTHING,
         alive: bool = True, enabled: bool = True) -> CellRoom:
    """A cell with `cores` host cores, `memory` GiB, `disk` GiB and these ratios."""
    return CellRoom(name, alive, enabled, Amounts(cores, memory * GIB, disk * GIB),
                    Overcommit(cpu, mem_ratio, disk_ratio), promised)


def place_one_by_one(cells: list[CellRoom], need: Amounts, count: int) -> list[str]:
    """Place `count` guests as a batch does (each promise counted before the next); returns
    the cells chosen, stopping at the first refusal (re-raised)."""
    chosen = []
    for _ in range(count):
        name = choose_cell("p", cells, need)
        cells = [c.promise(need) if c.name == name else c for c in cells]
        chosen.append(name)
    return chosen


@pytest.mark.parametrize(("ratio", "fit"), [(4, 8), (20, 40), (2.5, 5), (0.5, 1)])
def test_one_core_guests_on_a_two_core_cell(ratio, fit):
    """2 host cores x ratio vCPUs, whether the guests come one by one or in a batch."""
    cells = [cell("a", cores=2, cpu=ratio)]
    assert place_one_by_one(cells, ONE_CORE, fit) == ["a"] * fit
    full = [cell("a", cores=2, cpu=ratio, promised=Amounts(fit, fit * GIB // 4, fit * GIB))]
    with pytest.raises(NoRoom) as refused:
        choose_cell("p", full, ONE_CORE)
    assert str(refused.value).startswith(
        f"no cell in compute pool 'p' has 1 core free (best: a with 0 cores free, {fit} of "
        f"{fit} core{'s' if fit != 1 else ''} promised: 2 host cores x overcommit.cpu "
        f"{ratio:g}): raise the cell's ratio (PUT /cells/a")


def test_forty_guests_at_once_fit_exactly_when_forty_one_by_one_do():
    at_once = place_one_by_one([cell("a", cpu=20)], ONE_CORE, 40)
    assert at_once == ["a"] * 40
    with pytest.raises(NoRoom, match="1 core free"):
        place_one_by_one([cell("a", cpu=20)], ONE_CORE, 41)


@pytest.mark.parametrize(("host", "ratios", "capacity"), [
    (Amounts(2, 16 * GIB, 100 * GIB), Overcommit(), Amounts(8, 16 * GIB, 100 * GIB)),
    (Amounts(2, 16 * GIB, 100 * GIB), Overcommit(1, 1.5, 3), Amounts(2, 24 * GIB, 300 * GIB)),
    (Amounts(3, 10, 10), Overcommit(1.5, 0.5, 0.25), Amounts(4, 5, 2)),  # rounded down
    (Amounts(), Overcommit(), Amounts()),                                 # never observed
])
def test_capacity_is_host_times_ratio(host, ratios, capacity):
    room = CellRoom("a", True, True, host, ratios, Amounts(1, GIB, GIB))
    assert room.capacity == capacity
    assert room.free == capacity - Amounts(1, GIB, GIB)


def test_memory_and_disk_count_what_guests_are_promised():
    """Not what the host happens to have free: the promises of every guest on the cell."""
    room = cell("a", cores=8, memory=16, disk=100, promised=Amounts(2, 14 * GIB, 10 * GIB))
    with pytest.raises(NoRoom) as memory:
        choose_cell("p", [room], NEED)
    assert ("has 4.0 GiB memory free (best: a with 2.0 GiB memory free, 14.0 of 16.0 GiB "
            "memory promised: 16.0 GiB host memory x overcommit.memory 1)") in str(memory.value)
    over = cell("a", cores=8, memory=16, disk=100, mem_ratio=1.5,
                promised=Amounts(2, 14 * GIB, 10 * GIB))
    assert choose_cell("p", [over], NEED) == "a"  # 24 GiB promisable
    disk = cell("a", cores=8, memory=64, disk=100, promised=Amounts(0, 0, 90 * GIB))
    with pytest.raises(NoRoom, match=r"has 20.0 GiB disk free \(best: a with 10.0 GiB disk "
                                     r"free, 90.0 of 100.0 GiB disk promised: 100.0 GiB host "
                                     r"disk x overcommit.disk 1\)"):
        choose_cell("p", [disk], NEED)


def test_guest_need_counts_every_disk():
    spec = {"cores": 3, "memory": 2 * GIB, "disks": [10 * GIB, 5 * GIB, GIB]}
    assert guest_need(spec) == Amounts(3, 2 * GIB, 16 * GIB)
    assert guest_need({}) == Amounts()


@pytest.mark.parametrize(("setting", "cell_field", "ratios"), [
    ({}, None, Overcommit(4, 1, 1)),                                  # the defaults
    ({"cpu": 8}, None, Overcommit(8, 1, 1)),                          # the setting
    ({"cpu": 8}, {}, Overcommit(8, 1, 1)),                            # {} = the setting's
    ({"cpu": 8, "memory": 1.5}, {"cpu": 20}, Overcommit(20, 1.5, 1)),  # the cell wins, per key
    ({}, {"disk": 2, "memory": 0.5}, Overcommit(4, 0.5, 2)),
])
def test_cell_override_wins_over_the_setting(setting, cell_field, ratios):
    assert overcommit_from(setting, "overcommit").over(cell_field) == ratios


@pytest.mark.parametrize(("value", "problem"), [
    ({"cpus": 4}, "overcommit: unknown key(s) cpus; known: cpu, memory, disk"),
    ({"cpu": 0}, "overcommit.cpu: 0 is not a number greater than 0"),
    ({"memory": -1.0}, "overcommit.memory: -1.0 is not a number greater than 0"),
    ({"disk": "2"}, "overcommit.disk: '2' is not a number greater than 0"),
    ({"cpu": True}, "overcommit.cpu: True is not a number greater than 0"),
    ({"cpu": float("inf")}, "overcommit.cpu: inf is not a number greater than 0"),
    ([4], "overcommit: must be a mapping of cpu, memory, disk to ratios"),
])
def test_bad_settings_are_refused_by_name(value, problem):
    with pytest.raises(ValueError) as error:
        overcommit_from(value, "overcommit")
    assert str(error.value) == problem


def test_the_setting_in_a_config_file(tmp_path):
    assert config.load(None, {})["overcommit"] == {"cpu": 4, "memory": 1.0, "disk": 1.0}
    path = tmp_path / "nanod.yaml"
    path.write_text("overcommit: {cpu: 20}\n")
    assert config.load(str(path), {})["overcommit"] == {"cpu": 20, "memory": 1.0, "disk": 1.0}
    path.write_text("overcommit: {cpu: 20, ram: 2}\n")
    with pytest.raises(SystemExit) as bad:
        config.load(str(path), {})
    assert str(bad.value) == (f"nanod: config {path}: overcommit: unknown key(s) ram; known: "
                              "cpu, memory, disk")


@pytest.mark.parametrize(("before", "after", "more", "fits"), [
    (Amounts(2, GIB, GIB), Amounts(4, GIB, GIB), Amounts(2, 0, 0), False),   # 7 of 8 promised
    (Amounts(2, GIB, GIB), Amounts(3, GIB, GIB), Amounts(1, 0, 0), True),
    (Amounts(2, GIB, GIB), Amounts(1, GIB, GIB), Amounts(0, 0, 0), True),    # a shrink
    (Amounts(1, GIB, GIB), Amounts(1, 10 * GIB, GIB), Amounts(0, 9 * GIB, 0), False),
    (Amounts(1, GIB, GIB), Amounts(1, 8 * GIB, 5 * GIB), Amounts(0, 7 * GIB, 4 * GIB), True),
])
def test_resize_asks_the_cell_for_the_growth_only(before, after, more, fits):
    room = cell("a", cores=2, memory=16, disk=100, promised=Amounts(7, 8 * GIB, 50 * GIB))
    assert growth(before, after) == more
    if fits:
        check_room(room, more, purpose="to grow guest 'g'")
        return
    with pytest.raises(NoRoom) as refused:
        check_room(room, more, purpose="to grow guest 'g'")
    message = str(refused.value)
    assert message.startswith("cell 'a' has no room to grow guest 'g': ")
    if more.cores:
        assert message.endswith("1 core free of 2 cores needed (7 of 8 cores promised: "
                                "2 host cores x overcommit.cpu 4)")
    else:
        assert message.endswith("8.0 GiB memory free of 9.0 GiB memory needed (8.0 of 16.0 "
                                "GiB memory promised: 16.0 GiB host memory x "
                                "overcommit.memory 1)")


def test_a_migration_target_must_be_alive_enabled_and_roomy():
    check_cell(cell("t", cores=4), NEED, purpose="for guest 'g'")
    with pytest.raises(Unavailable, match="cell 't' is offline"):
        check_cell(cell("t", cores=4, alive=False), NEED)
    with pytest.raises(Conflict, match="cell 't' is disabled"):
        check_cell(cell("t", cores=4, enabled=False), NEED)
    with pytest.raises(NoRoom, match="cell 't' has no room for guest 'g': 0 cores free of 2"):
        check_cell(cell("t", cores=1, promised=Amounts(cores=5)), NEED, purpose="for guest 'g'")


def room(name: str, cores: int = 8, memory: int = 16, disk: int = 100, **kw) -> CellRoom:
    """A cell whose free room is exactly these figures (ratio 1, nothing promised)."""
    return cell(name, cores, memory, disk, cpu=1, **kw)


@pytest.mark.parametrize(("cells", "chosen"), [
    ([room("a"), room("b", memory=32)], "b"),                    # most memory
    ([room("a", disk=200), room("b")], "a"),                     # then most disk
    ([room("a"), room("b", cores=16)], "b"),                     # then most cores
    ([room("b"), room("a")], "a"),                               # then the first name
    ([room("a", memory=64, alive=False), room("b")], "b"),       # offline cells never
    ([room("a", memory=64, enabled=False), room("b")], "b"),     # disabled cells never
    ([room("a", memory=64, cores=1), room("b")], "b"),           # roomy but short of cores
    # free, not capacity: a's 32 GiB are 24 GiB promised
    ([room("a", memory=32, promised=Amounts(0, 24 * GIB, 0)), room("b")], "b"),
])
def test_roomiest_fitting_cell(cells, chosen):
    assert choose_cell("p", cells, NEED) == chosen


def test_pinned_cell():
    cells = [room("a", memory=64), room("b"), room("off", alive=False),
             room("dis", enabled=False), room("small", memory=1)]
    assert choose_cell("p", cells, NEED, pinned="b") == "b"
    with pytest.raises(NotFound, match="'x' is not a cell of compute pool 'p'"):
        choose_cell("p", cells, NEED, pinned="x")
    with pytest.raises(Unavailable, match="offline"):
        choose_cell("p", cells, NEED, pinned="off")
    with pytest.raises(Conflict, match="disabled"):
        choose_cell("p", cells, NEED, pinned="dis")
    with pytest.raises(NoRoom, match=r"cell 'small' has no room for the guest: 1.0 GiB memory "
                                     r"free of 4.0 GiB memory needed \(0.0 of 1.0 GiB memory "
                                     r"promised"):
        choose_cell("p", cells, NEED, pinned="small")


def test_refusals_say_what_is_short():
    with pytest.raises(Conflict, match="has no cells"):
        choose_cell("p", [], NEED)
    with pytest.raises(Unavailable, match=r"no cell of compute pool 'p' is alive \(a, b"):
        choose_cell("p", [room("b", alive=False), room("a", alive=False)], NEED)
    with pytest.raises(Conflict, match="every alive cell .* is disabled"):
        choose_cell("p", [room("a", enabled=False), room("b", alive=False)], NEED)
    with pytest.raises(NoRoom) as cores:
        choose_cell("p", [room("a", cores=1), room("b", cores=1)], Amounts(8, GIB, GIB))
    assert str(cores.value).startswith(
        "no cell in compute pool 'p' has 8 cores free (best: a with 1 core free, 0 of 1 core "
        "promised: 1 host core x overcommit.cpu 1)")
    with pytest.raises(NoRoom) as memory:
        choose_cell("p", [room("a", memory=2), room("b", memory=3)], NEED)
    assert "has 4.0 GiB memory free (best: b with 3.0 GiB memory free" in str(memory.value)
    with pytest.raises(NoRoom) as together:
        choose_cell("p", [room("a", cores=1), room("b", memory=1)], NEED)
    assert "has room for 2 cores, 4.0 GiB memory and 20.0 GiB disk at once" in str(
        together.value)
    assert ("a: 1 core free of 2 cores needed (0 of 1 core promised: 1 host core x "
            "overcommit.cpu 1); b: 1.0 GiB memory free") in str(together.value)
    # over-promised (a ratio lowered, a host that shrank): never a negative free figure,
    # and the promise that explains it
    with pytest.raises(NoRoom, match=r"0 cores free of 2 cores needed \(11 of 8 cores promised"):
        choose_cell("p", [cell("a", promised=Amounts(cores=11))], NEED, pinned="a")
