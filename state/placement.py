"""Placement: which cell of a compute pool a guest goes to, and whether a cell has room for
a guest (or for a guest's growth). Pure (no database, no I/O).

Called by the guest store (`state/guests.py`) for creates (single and batch, inside the
create transaction) and for migration targets, and by `state/guest_changes.py` for resizes,
each with the `CellRoom` of the cells involved, built by `GuestStore._cell_rooms`.

How room is counted: by promises, never by what happens to be in use right now.

    capacity = the cell's host figures (observed stats: max_cpu cores, max_memory bytes,
               max_disk bytes of its local storage pool) x its overcommit ratios
    promised = the sum over every guest placed on the cell (whatever its phase: creating,
               stopped, running, failed, lost, and deleting until its row is gone) of its
               spec: cores, memory, the sizes of all its disks
    free     = capacity - promised

So a guest counts the same while it is being created and once it exists, a batch of N
guests is accepted exactly when N single creates would be, and the answer never depends
on whether the reconciler has measured the cell since the last create.

Overcommit ratios (`Overcommit`): the `overcommit` setting of nanod (default cpu 4, memory
1, disk 1: vCPUs are shared 4 to 1 as in the original, memory and disk are not shared),
overridden key by key by the cell's own `overcommit` field (POST/PUT /cells/{name}). The
ratio is a property of a host (how much it may share), so it lives on the cell.

Choice: among the alive and enabled cells where the guest fits, the one with the most free
memory, then the most free disk, then the most free cores, then the first by name. A
pinned cell (the `cell` extension of POST /guests/, or a migration's target) must be in
the pool, alive, enabled and have room.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from state.errors import Conflict, NotFound, Unavailable

GIB = 1 << 30
RESOURCES = ("cores", "memory", "disk")
RATIO_OF = {"cores": "cpu", "memory": "memory", "disk": "disk"}  # Overcommit field per resource
RATIOS = tuple(RATIO_OF.values())  # cpu, memory, disk: the keys of the setting and the field


class NoRoom(Conflict):
    """No cell has room for a guest (or for its growth): a Conflict naming what is short."""


@dataclass(frozen=True)
class Amounts:
    """Cores, memory bytes and disk bytes: what a guest needs, what a cell has or promised."""

    cores: int = 0
    memory: int = 0
    disk: int = 0

    def __add__(self, other: Amounts) -> Amounts:
        return Amounts(self.cores + other.cores, self.memory + other.memory,
                       self.disk + other.disk)

    def __sub__(self, other: Amounts) -> Amounts:
        return Amounts(self.cores - other.cores, self.memory - other.memory,
                       self.disk - other.disk)


def guest_need(spec: Mapping[str, Any]) -> Amounts:
    """What a guest with this spec is promised: its cores, memory and all its disks."""
    return Amounts(int(spec.get("cores", 0)), int(spec.get("memory", 0)),
                   sum(int(d) for d in spec.get("disks", [])))


def growth(before: Amounts, after: Amounts) -> Amounts:
    """What a resize from `before` to `after` asks more of its cell (a shrink asks 0)."""
    return Amounts(*(max(0, getattr(after, r) - getattr(before, r)) for r in RESOURCES))


@dataclass(frozen=True)
class Overcommit:
    """How many times a cell's host figures may be promised: vCPUs per host core, and
    bytes of guest memory and disk per host byte."""

    cpu: float = 4.0
    memory: float = 1.0
    disk: float = 1.0

    def over(self, override: Mapping[str, Any] | None) -> Overcommit:
        """These ratios with a cell's `overcommit` field on top (its keys win)."""
        return replace(self, **{k: float(v) for k, v in (override or {}).items()
                                if k in RATIOS})


def overcommit_from(values: Any, where: str) -> Overcommit:
    """The ratios of a settings value {cpu, memory, disk} (each optional, a number > 0);
    ValueError naming `where` and the bad key otherwise."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{where}: must be a mapping of cpu, memory, disk to ratios")
    unknown = sorted(set(values) - set(RATIOS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: "
                         f"{', '.join(RATIOS)}")
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and value > 0):
            raise ValueError(f"{where}.{key}: {value!r} is not a number greater than 0")
    return Overcommit().over(values)


@dataclass(frozen=True)
class CellRoom:
    """One cell as placement sees it: its host figures, its ratios and what its guests are
    promised."""

    name: str
    alive: bool
    enabled: bool
    host: Amounts  # observed: max_cpu, max_memory, max_disk
    ratios: Overcommit = field(default_factory=Overcommit)
    promised: Amounts = field(default_factory=Amounts)

    @property
    def capacity(self) -> Amounts:
        return Amounts(*(math.floor(getattr(self.host, r) * getattr(self.ratios, RATIO_OF[r]))
                         for r in RESOURCES))

    @property
    def free(self) -> Amounts:
        return self.capacity - self.promised

    def promise(self, need: Amounts) -> CellRoom:
        """This cell with `need` promised too (a batch places guest after guest)."""
        return replace(self, promised=self.promised + need)


def amount(what: str, value: int) -> str:
    """`value` of resource `what` for people: cores as a count, bytes in GiB."""
    if what == "cores":
        return f"{value} core{'s' if value != 1 else ''}"
    return f"{value / GIB:.1f} GiB {what}"


def _number(what: str, value: int) -> str:
    return str(value) if what == "cores" else f"{value / GIB:.1f}"


def accounting(cell: CellRoom, what: str) -> str:
    """How the cell's room in `what` is counted, e.g. "8 of 8 cores promised: 2 host
    cores x overcommit.cpu 4"."""
    ratio = RATIO_OF[what]
    host = getattr(cell.host, what)
    host_text = (f"{host} host core{'s' if host != 1 else ''}" if what == "cores"
                 else f"{host / GIB:.1f} GiB host {what}")
    return (f"{_number(what, getattr(cell.promised, what))} of "
            f"{amount(what, getattr(cell.capacity, what))} promised: {host_text} x "
            f"overcommit.{ratio} {getattr(cell.ratios, ratio):g}")


def shortfalls(cell: CellRoom, need: Amounts) -> list[str]:
    """What `cell` lacks for `need`, e.g. ["1 core free of 2 cores needed (7 of 8 cores
    promised: 2 host cores x overcommit.cpu 4)"]; [] when it fits."""
    out = []
    for what in RESOURCES:
        have, want = getattr(cell.free, what), getattr(need, what)
        if have < want:
            out.append(f"{amount(what, max(have, 0))} free of {amount(what, want)} needed "
                       f"({accounting(cell, what)})")
    return out


def _hint(cell: str = "NAME", ratio: str = "") -> str:
    """What a user can do about a full pool."""
    ratios = f'{{"{ratio}": N}}' if ratio else "{...}"
    return (f'raise the cell\'s ratio (PUT /cells/{cell} {{"overcommit": {ratios}}}) or the '
            "'overcommit' setting, delete guests, or add a cell")


def check_room(cell: CellRoom, need: Amounts, *, purpose: str) -> None:
    """Refuse (NoRoom, naming the cell and each short resource) unless `need` fits in what
    `cell` has not promised yet. `purpose` completes "cell 'x' has no room ...", e.g.
    "for the guest" or "to grow guest 'g' to 4 cores"."""
    lacks = shortfalls(cell, need)
    if lacks:
        raise NoRoom(f"cell {cell.name!r} has no room {purpose}: {'; '.join(lacks)}")


def check_cell(cell: CellRoom, need: Amounts, *, purpose: str = "for the guest") -> None:
    """A cell chosen by hand (a pinned create, a migration's target): alive, enabled and
    with room, or an error saying which is not so."""
    if not cell.alive:
        raise Unavailable(f"cell {cell.name!r} is offline: wait until it answers probes or "
                          "choose another cell")
    if not cell.enabled:
        raise Conflict(f"cell {cell.name!r} is disabled: enable it or choose another cell")
    check_room(cell, need, purpose=purpose)


def _roomiest(cell: CellRoom) -> tuple[int, int, int, str]:
    """Sort key: most free memory, disk, cores first; then the first name."""
    free = cell.free
    return (-free.memory, -free.disk, -free.cores, cell.name)


def _best(cells: list[CellRoom], what: str) -> CellRoom:
    """The cell with the most free `what` (the first of equals in the given order)."""
    return max(cells, key=lambda c: getattr(c.free, what))


def choose_cell(pool: str, cells: list[CellRoom], need: Amounts, *, pinned: str = "") -> str:
    """The cell for a guest needing `need` in compute pool `pool`, or an error saying what
    is missing: NotFound (pinned cell not in the pool), Unavailable (no cell alive),
    Conflict (no cell enabled), NoRoom (none with room: naming the short resource, the best
    candidate and how its room is counted)."""
    if pinned:
        cell = next((c for c in cells if c.name == pinned), None)
        if cell is None:
            raise NotFound(f"cell: {pinned!r} is not a cell of compute pool {pool!r}")
        check_cell(cell, need)
        return cell.name
    if not cells:
        raise Conflict(f"compute pool {pool!r} has no cells: add a cell to it first")
    cells = sorted(cells, key=lambda c: c.name)
    alive = [c for c in cells if c.alive]
    if not alive:
        raise Unavailable(f"no cell of compute pool {pool!r} is alive "
                          f"({', '.join(sorted(c.name for c in cells))} offline): check the "
                          "cells' libvirtd and SSH, then try again")
    usable = [c for c in alive if c.enabled]
    if not usable:
        raise Conflict(f"every alive cell of compute pool {pool!r} is disabled: enable one")
    fitting = [c for c in usable if not shortfalls(c, need)]
    if fitting:
        return min(fitting, key=_roomiest).name
    for what in RESOURCES:
        want = getattr(need, what)
        top = _best(usable, what)
        have = getattr(top.free, what)
        if have < want:
            raise NoRoom(f"no cell in compute pool {pool!r} has {amount(what, want)} free "
                         f"(best: {top.name} with {amount(what, max(have, 0))} free, "
                         f"{accounting(top, what)}): {_hint(top.name, RATIO_OF[what])}")
    details = "; ".join(f"{c.name}: {', '.join(shortfalls(c, need))}"
                        for c in sorted(usable, key=lambda c: c.name))
    raise NoRoom(f"no cell in compute pool {pool!r} has room for {amount('cores', need.cores)}"
                 f", {amount('memory', need.memory)} and {amount('disk', need.disk)} at once "
                 f"({details}): {_hint()}")
