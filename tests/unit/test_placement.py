"""Placement (state/placement.py): the roomiest fitting cell wins, ties go to the first
name, and every refusal says what is short and where."""

from __future__ import annotations

import pytest

from state.errors import Conflict, NotFound, Unavailable
from state.placement import CellRoom, Need, choose_cell

GIB = 1 << 30


def cell(name: str, cores: int = 8, memory: int = 16, disk: int = 100, *, alive: bool = True,
         enabled: bool = True) -> CellRoom:
    return CellRoom(name, alive, enabled, cores, memory * GIB, disk * GIB)


NEED = Need(cores=2, memory=4 * GIB, disk=20 * GIB)


@pytest.mark.parametrize(("cells", "chosen"), [
    ([cell("a"), cell("b", memory=32)], "b"),                    # most memory
    ([cell("a", disk=200), cell("b")], "a"),                     # then most disk
    ([cell("a"), cell("b", cores=16)], "b"),                     # then most cores
    ([cell("b"), cell("a")], "a"),                               # then the first name
    ([cell("a", memory=64, alive=False), cell("b")], "b"),       # offline cells never
    ([cell("a", memory=64, enabled=False), cell("b")], "b"),     # disabled cells never
    ([cell("a", memory=64, cores=1), cell("b")], "b"),           # roomy but short of cores
])
def test_roomiest_fitting_cell(cells, chosen):
    assert choose_cell("p", cells, NEED) == chosen


def test_pinned_cell():
    cells = [cell("a", memory=64), cell("b"), cell("off", alive=False),
             cell("dis", enabled=False), cell("small", memory=1)]
    assert choose_cell("p", cells, NEED, pinned="b") == "b"
    with pytest.raises(NotFound, match="'x' is not a cell of compute pool 'p'"):
        choose_cell("p", cells, NEED, pinned="x")
    with pytest.raises(Unavailable, match="offline"):
        choose_cell("p", cells, NEED, pinned="off")
    with pytest.raises(Conflict, match="disabled"):
        choose_cell("p", cells, NEED, pinned="dis")
    with pytest.raises(Conflict, match="1.0 GiB memory free of 4.0 GiB memory needed"):
        choose_cell("p", cells, NEED, pinned="small")


def test_refusals_say_what_is_short():
    with pytest.raises(Conflict, match="has no cells"):
        choose_cell("p", [], NEED)
    with pytest.raises(Unavailable, match=r"no cell of compute pool 'p' is alive \(a, b"):
        choose_cell("p", [cell("b", alive=False), cell("a", alive=False)], NEED)
    with pytest.raises(Conflict, match="every alive cell .* is disabled"):
        choose_cell("p", [cell("a", enabled=False), cell("b", alive=False)], NEED)
    with pytest.raises(Conflict) as cores:
        choose_cell("p", [cell("a", cores=1), cell("b", cores=1)], Need(8, GIB, GIB))
    assert str(cores.value) == "no cell in compute pool 'p' has 8 cores free (best: a with 1 core)"
    with pytest.raises(Conflict) as memory:
        choose_cell("p", [cell("a", memory=2), cell("b", memory=3)], NEED)
    assert "has 4.0 GiB memory free (best: b with 3.0 GiB memory)" in str(memory.value)
    with pytest.raises(Conflict) as together:
        choose_cell("p", [cell("a", cores=1), cell("b", memory=1)], NEED)
    assert "at once" in str(together.value)
    assert "a: 1 core free of 2 cores needed; b: 1.0 GiB memory free" in str(together.value)
    with pytest.raises(Conflict, match="0 cores free"):  # over-reserved: never negative
        choose_cell("p", [cell("a", cores=-3)], NEED, pinned="a")
