"""Placement: which cell of a compute pool a new guest goes to. Pure (no database, no I/O).

Called by the guest store (`state/guests.py`) inside the create transaction, with the
room it computed for each cell of the pool:

    room = the cell's observed stats (max_cpu, available_memory, available_disk)
           minus what guests already placed on it but not yet created reserve
           (their cores, memory and the sum of their disks).

Guests that exist are already inside `available_memory`/`available_disk` (the reconciler
measures them); CPU cores are not reserved by created guests (cores are overcommitted, as
in the original: a cell offers 4 vCPUs per host core, `CPU_OVERCOMMIT` in state/guests.py),
only by pending ones so that a burst of creates spreads over the cells.

Choice: among the alive and enabled cells where the guest fits, the one with the most free
memory, then the most free disk, then the most free cores, then the first by name. A
pinned cell (the `cell` extension of POST /guests/) must be in the pool, alive, enabled and
have room.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

from state.errors import Conflict, NotFound, Unavailable

GIB = 1 << 30


@dataclass(frozen=True)
class CellRoom:
    """What one cell can still take."""

    name: str
    alive: bool
    enabled: bool
    cores: int
    memory: int
    disk: int


@dataclass(frozen=True)
class Need:
    """What one guest takes."""

    cores: int
    memory: int
    disk: int


RESOURCES = ("cores", "memory", "disk")


def amount(what: str, value: int) -> str:
    """`value` of resource `what` for people: cores as a count, bytes in GiB."""
    if what == "cores":
        return f"{value} core{'s' if value != 1 else ''}"
    return f"{value / GIB:.1f} GiB {'memory' if what == 'memory' else 'disk'}"


def shortfalls(cell: CellRoom, need: Need) -> list[str]:
    """What `cell` lacks for `need`, e.g. ["4 cores free of 8 needed"]; [] when it fits."""
    out = []
    for what in RESOURCES:
        have, want = getattr(cell, what), getattr(need, what)
        if have < want:
            out.append(f"{amount(what, max(have, 0))} free of {amount(what, want)} needed")
    return out


def _roomiest(cell: CellRoom) -> tuple[int, int, int, str]:
    """Sort key: most free memory, disk, cores first; then the first name."""
    return (-cell.memory, -cell.disk, -cell.cores, cell.name)


def choose_cell(pool: str, cells: list[CellRoom], need: Need, *, pinned: str = "") -> str:
    """The cell for a guest needing `need` in compute pool `pool`, or an error saying what
    is missing: NotFound (pinned cell not in the pool), Unavailable (no cell alive),
    Conflict (no cell enabled, or none with room: naming the short resource and the best
    candidate)."""
    if pinned:
        cell = next((c for c in cells if c.name == pinned), None)
        if cell is None:
            raise NotFound(f"cell: {pinned!r} is not a cell of compute pool {pool!r}")
        if not cell.alive:
            raise Unavailable(f"cell {pinned!r} is offline: wait until it answers probes or "
                              "leave 'cell' empty to let nano choose")
        if not cell.enabled:
            raise Conflict(f"cell {pinned!r} is disabled: enable it or leave 'cell' empty")
        lacks = shortfalls(cell, need)
        if lacks:
            raise Conflict(f"cell {pinned!r} has no room for the guest: {'; '.join(lacks)}")
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
        top = max(usable, key=attrgetter(what))  # the first of equals in name order
        if getattr(top, what) < want:
            raise Conflict(f"no cell in compute pool {pool!r} has {amount(what, want)} free "
                           f"(best: {top.name} with {amount(what, max(getattr(top, what), 0))})")
    details = "; ".join(f"{c.name}: {', '.join(shortfalls(c, need))}"
                        for c in sorted(usable, key=lambda c: c.name))
    raise Conflict(f"no cell in compute pool {pool!r} has room for {amount('cores', need.cores)}"
                   f", {amount('memory', need.memory)} and {amount('disk', need.disk)} at once "
                   f"({details})")

