"""Migrations in the store: the seed's `/migrations/` group (api/migrations.py) and the
moves the guest reconciler makes for it (reconciler/migration.py).

A migration is a placement change tracked by a record (ARCHITECTURE.md §3): the request is
checked and stored in one transaction (`start_migration`), and nothing reconciles the record
itself. Each guest it names is an ordinary guest whose reconcile finds its active move
(`guest_move`) and drives it on both cells; the guest row keeps `cell`/`pool` = where the
guest is until the reconciler observes it on the target only, then `record_move(done=True)`
moves the row in the same transaction that records the outcome. A failed move leaves the
row where the guest still is. So a crash at any moment leaves the store saying where the
guest was last seen, and the next reconcile observes both cells and goes on (or rolls back).

Migration.spec:   {source_pool, source_cell, target_pool, target_cell ("" = placement per
                  guest), instances: [guest ids], targets: {guest id: cell}, owner}
Migration.observed: {guests: {guest id: {phase, percent, mode, error, done}}} copied from
                  the guests' rows when the migration settles (finished)
Guest.observed["move"]: {migration, phase, percent, mode, error, done} while and after it
                  moves (the last move only)

Refusals, all before anything moves (each naming the field and what to do): unknown pool
or cell, a cell not in its pool, a target pool with other storage or another address pool,
the same cell, a target offline or disabled or without room (counting every guest of the
request, as placement counts a batch), a guest not on the source cell, deleting, already
moving, or with media inserted from the source cell.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from state.db import db
from state.errors import Conflict, Invalid, NanoError, NotFound
from state.events import record_event
from state.identity import SessionInfo
from state.models import Cell, ComputePool, Guest, Migration, PortAllocation, now
from state.placement import check_cell, choose_cell, guest_need

KEEP = 200  # finished migrations kept (oldest purged first)
log = logging.getLogger("nano.state.migrations")


@dataclass(frozen=True)
class Move:
    """One guest's part of a migration, as the guest reconciler drives it."""

    migration: str
    source_cell: str
    source_pool: str
    target_cell: str
    target_pool: str


class MigrationStore:
    """Mixin of `state.store.Store`: migrations (uses ComputeStore and GuestStore)."""

    # -- the API side -----------------------------------------------------------------------

    def start_migration(self, session: SessionInfo, body: dict[str, Any]
                        ) -> tuple[str, list[str]]:
        """POST /migrations/: check everything, store the record; returns (id, guest ids)."""
        source_pool = self._pool(body["source_pool"]).name  # type: ignore[attr-defined]
        source = self._cell_in("source_cell", body["source_cell"], source_pool)
        target_pool = body.get("target_pool") or source_pool
        tpool = self._pool(target_pool)  # type: ignore[attr-defined]
        spool = ComputePool.get(ComputePool.name == source_pool)
        if target_pool != source_pool:
            if (tpool.storage or "") != (spool.storage or ""):
                raise Invalid(f"target_pool: compute pool {target_pool!r} uses storage "
                              f"{tpool.storage or 'local'!r}, {source_pool!r} uses "
                              f"{spool.storage or 'local'!r}: a guest moves only between pools "
                              "with the same storage; choose such a pool or leave target_pool out")
            if (tpool.network or "") != (spool.network or ""):
                raise Invalid(f"target_pool: compute pool {target_pool!r} uses address pool "
                              f"{tpool.network or 'none'!r}, {source_pool!r} uses "
                              f"{spool.network or 'none'!r}: the guests' addresses belong to "
                              "their address pool; choose a pool with the same one")
        target = body.get("target_cell") or ""
        if target:
            self._cell_in("target_cell", target, target_pool)
            if target == source.name:
                raise Conflict(f"target_cell: the guests are already on cell {target!r}: "
                               "choose another cell or leave target_cell out")
        with db.atomic():
            guests = self._movable(source, body.get("instances"))
            rooms = [r for r in self._cell_rooms(target_pool)  # type: ignore[attr-defined]
                     if r.name != source.name]
            targets: dict[str, str] = {}
            for row in guests:
                need = guest_need(row.spec or {})
                if target:
                    room = next((r for r in rooms if r.name == target), None)
                    if room is None:
                        raise NotFound(f"target_cell: {target!r} is not a cell of compute pool "
                                       f"{target_pool!r}")
                    check_cell(room, need, purpose=f"for guest {row.name!r}")
                    cell = target
                else:
                    if not rooms:
                        raise Conflict(f"compute pool {target_pool!r} has no cell besides "
                                       f"{source.name!r} to move to: add a cell first")
                    cell = choose_cell(target_pool, rooms, need)
                rooms = [r.promise(need) if r.name == cell else r for r in rooms]
                targets[row.id] = cell
            mid = str(uuid.uuid4())
            Migration.create(id=mid, phase="running", spec={
                "source_pool": source_pool, "source_cell": source.name,
                "target_pool": target_pool, "target_cell": target,
                "instances": [g.id for g in guests], "targets": targets,
                "owner": session.user})
        self._purge_migrations()
        return mid, [g.id for g in guests]

    def _cell_in(self, field: str, name: str, pool: str) -> Cell:
        row = Cell.get_or_none(Cell.name == name)
        if row is None:
            raise NotFound(f"{field}: no cell named {name!r}")
        if row.pool != pool:
            raise Invalid(f"{field}: cell {name!r} is not in compute pool {pool!r} "
                          f"({'in ' + repr(row.pool) if row.pool else 'in no pool'})")
        return row

    def _movable(self, source: Cell, instances: list[str] | None) -> list[Guest]:
        on_cell = {g.id: g for g in Guest.select().where(Guest.cell == source.name)}
        if instances is None:
            guests = [g for g in on_cell.values() if not g.deleting]
            if not guests:
                raise Conflict(f"source_cell: cell {source.name!r} hosts no guest to move")
        else:
            if len(set(instances)) != len(instances):
                raise Invalid("instances: a guest is named twice")
            guests = []
            for gid in instances:
                row = on_cell.get(gid)
                if row is None:
                    where = Guest.get_or_none(Guest.id == gid)
                    raise (NotFound(f"instances: no guest {gid!r}") if where is None else
                           Invalid(f"instances: guest {where.name!r} ({gid}) is on cell "
                                   f"{where.cell!r}, not on source_cell {source.name!r}"))
                guests.append(row)
        busy = self._moving_guests()
        for row in guests:
            if row.deleting:
                raise Conflict(f"instances: guest {row.name!r} is being deleted")
            if row.id in busy:
                raise Conflict(f"instances: guest {row.name!r} is already moving (migration "
                               f"{busy[row.id]}): wait until it finished")
            media = (row.spec or {}).get("media")
            if media:
                raise Conflict(f"instances: guest {row.name!r} has media image {media} "
                               "inserted from its cell: eject it first "
                               f"(DELETE /instances/{row.id}/media)")
        return guests

    def _moving_guests(self) -> dict[str, str]:
        """guest id -> the unfinished migration that moves it."""
        out: dict[str, str] = {}
        for row in Migration.select().where(Migration.finished == False):  # noqa: E712
            for gid in (row.spec or {}).get("instances", []):
                out[gid] = row.id
        return out

    def _purge_migrations(self) -> None:
        done = [r.id for r in Migration.select(Migration.id).where(Migration.finished == True)  # noqa: E712
                .order_by(Migration.modified_at.desc()).offset(KEEP)]
        if done:
            Migration.delete().where(Migration.id.in_(done)).execute()

    def migration_status(self, mid: str) -> dict[str, Any]:
        """GET /migrations/{id}: {finished, progress} (+ error when a guest failed), and
        `guests` (extension: each guest's phase, percent, mode and error)."""
        row = Migration.get_or_none(Migration.id == mid)
        if row is None:
            raise NotFound(f"no migration {mid!r}")
        return self._migration_view(self._settle(row))

    def migrations(self) -> list[dict[str, Any]]:
        rows = Migration.select().order_by(Migration.created_at, Migration.id)
        return [{"id": r.id, **self._migration_view(self._settle(r))} for r in rows]

    @staticmethod
    def _migration_view(row: Migration) -> dict[str, Any]:
        view: dict[str, Any] = {"finished": bool(row.finished)}
        guests = (row.observed or {}).get("guests", {})
        if not row.finished:
            view["progress"] = row.progress
        errors = [f"{g['name']}: {g['error']}" for g in guests.values() if g.get("error")]
        if row.finished and errors:
            view["error"] = "; ".join(errors)
        view["guests"] = [{"id": gid, **g} for gid, g in guests.items()]
        return view

    def _settle(self, row: Migration) -> Migration:
        """Copy the guests' move facts into the record; finished once every guest is done."""
        if row.finished:
            return row
        spec = row.spec or {}
        guests: dict[str, dict[str, Any]] = {}
        rows = {g.id: g for g in Guest.select().where(Guest.id.in_(spec.get("instances", [])))}
        for gid in spec.get("instances", []):
            g = rows.get(gid)
            move = ((g.observed or {}).get("move") or {}) if g else {}
            if move.get("migration") != row.id:
                move = {"phase": "waiting", "percent": 0} if g else {
                    "phase": "gone", "percent": 100, "done": True,
                    "error": "the guest was deleted before it moved"}
            guests[gid] = {"name": g.name if g else gid,
                           "target_cell": spec.get("targets", {}).get(gid, ""),
                           **{k: move.get(k) for k in ("phase", "percent", "mode", "error",
                                                       "done") if k in move}}
        finished = all(g.get("done") for g in guests.values())
        percent = (sum(int(g.get("percent") or 0) for g in guests.values())
                   // max(len(guests), 1))
        errors = [g["error"] for g in guests.values() if g.get("error")]
        Migration.update(observed={"guests": guests}, progress=min(percent, 100),
                         finished=finished,
                         phase=("failed" if errors else "finished") if finished else "running",
                         last_error="; ".join(errors)).where(Migration.id == row.id).execute()
        return Migration.get_by_id(row.id)

    # -- draining a cell ----------------------------------------------------------------------

    def drain_cell(self, session: SessionInfo, name: str, drain: bool) -> tuple[str, list[str]]:
        """`PUT /cells/{name} {"drain": true}` (extension): the cell takes no new guests and
        every guest it hosts moves to other cells of its pool (live when running), in one
        migration; returns (migration id or "", guest ids). All or nothing: when a guest
        cannot move (no room elsewhere, media inserted), nothing changes. `false` lets the
        cell take guests again (moved guests stay where they went)."""
        with db.atomic():
            row = Cell.get_or_none(Cell.name == name)
            if row is None:
                raise NotFound(f"no cell named {name!r}")
            spec = dict(row.spec or {})
            mid, guests = "", []
            if drain and not spec.get("drain"):
                hosted = Guest.select().where((Guest.cell == name) & (Guest.deleting == False)  # noqa: E712
                                              ).exists()
                if hosted:
                    if not row.pool:
                        raise Conflict(f"cell {name!r} hosts guests but is in no compute "
                                       "pool: nowhere to move them")
                    mid, guests = self.start_migration(session, {
                        "source_pool": row.pool, "source_cell": name})
            spec["drain"] = bool(drain)
            spec["drain_migration"] = mid if drain else ""
            if drain and not mid:
                spec["drain_migration"] = (row.spec or {}).get("drain_migration", "")
            Cell.update(spec=spec, generation=row.generation + 1).where(
                Cell.name == name).execute()
        return mid, guests

    def drain_status(self, spec: dict[str, Any]) -> dict[str, Any] | None:
        """The `drain` view of a cell record: {migration, finished, progress} or None."""
        if not spec.get("drain"):
            return None
        mid = spec.get("drain_migration") or ""
        row = Migration.get_or_none(Migration.id == mid) if mid else None
        if row is None:
            return {"migration": mid, "finished": True, "progress": 100}
        view = self._migration_view(self._settle(row))
        return {"migration": mid, "finished": view["finished"],
                "progress": 100 if view["finished"] else view.get("progress", 0),
                **({"error": view["error"]} if view.get("error") else {})}

    # -- the reconciler side ------------------------------------------------------------------

    def guest_move(self, guest_id: str) -> Move | None:
        """The move the guest is part of, or None: an unfinished migration naming it whose
        outcome for it is not recorded yet."""
        for row in Migration.select().where(Migration.finished == False):  # noqa: E712
            spec = row.spec or {}
            if guest_id not in spec.get("instances", []):
                continue
            g = Guest.get_or_none(Guest.id == guest_id)
            move = ((g.observed or {}).get("move") or {}) if g else {}
            if move.get("migration") == row.id and move.get("done"):
                return None
            return Move(migration=row.id, source_cell=spec["source_cell"],
                        source_pool=spec["source_pool"],
                        target_cell=spec["targets"][guest_id], target_pool=spec["target_pool"])
        return None

    def record_move(self, guest_id: str, move: Move, *, phase: str, percent: int = 0,
                    mode: str = "", error: str = "", done: bool = False,
                    copied: bool = False, attempts: int = 0,
                    cpu_checked: bool = False) -> None:
        """The guest's progress in `move`; `done` without `error` moves the guest's row to
        the target cell and pool (it was observed there only), its port forwards with it
        (the same cell ports where they are free there)."""
        if done and not error:
            self._ports_to(guest_id, move.source_cell, move.target_cell)
        with db.atomic():
            g = Guest.get_or_none(Guest.id == guest_id)
            if g is None:
                return
            observed = dict(g.observed or {})
            observed["move"] = {"migration": move.migration, "phase": phase,
                                "percent": max(0, min(int(percent), 100)), "mode": mode,
                                "error": error, "done": done, "copied": copied,
                                "attempts": attempts, "cpu_checked": cpu_checked}
            fields: dict[Any, Any] = {Guest.observed: observed}
            if not done:  # counted as migrating from the same write that says it moves
                fields[Guest.phase] = "migrating"
            if done and not error:
                fields.update({Guest.cell: move.target_cell, Guest.pool: move.target_pool})
                self._ports_off(guest_id, move.source_cell)
            Guest.update(fields).where(Guest.id == guest_id).execute()
            step = {k: observed["move"][k] for k in ("phase", "percent", "mode", "error", "done")}
            before = (g.observed or {}).get("move") or {}
            if {k: before.get(k) for k in step} != step:  # a step, not a re-record
                record_event("Migration", move.migration, move.migration, "progress",
                             {"guest": guest_id, "name": g.name, **step})
        if done:
            row = Migration.get_or_none(Migration.id == move.migration)
            if row is not None:
                self._settle(row)

    def _ports_to(self, guest_id: str, source: str, target: str) -> None:
        """The guest's port forwards on `source` get cell ports on `target` (the same
        numbers where free): made before the guest's row moves, so a crash in between
        leaves spare forwards, never missing ones."""
        held = PortAllocation.select().where((PortAllocation.guest == guest_id) & (
            PortAllocation.cell == source)).order_by(PortAllocation.port)
        forwarded = [p.guest_port for p in held]
        if forwarded:
            self.allocate_guest_ports(guest_id, target, forwarded)  # type: ignore[attr-defined]

    @staticmethod
    def _ports_off(guest_id: str, cell: str) -> None:
        PortAllocation.delete().where((PortAllocation.guest == guest_id) & (
            PortAllocation.cell == cell)).execute()

    # -- failover (reconciler/failover.py) -----------------------------------------------------

    def pool_fails_over(self, pool: str) -> bool:
        row = ComputePool.get_or_none(ComputePool.name == pool) if pool else None
        return bool(row and row.failover and row.storage)

    def guests_to_fail_over(self, cell: str) -> list[str]:
        """Guests still placed on lost cell `cell` (not being deleted, not moving)."""
        busy = self._moving_guests()
        return [g.id for g in Guest.select(Guest.id).where(
            (Guest.cell == cell) & (Guest.deleting == False)).order_by(Guest.id)  # noqa: E712
            if g.id not in busy]

    def fail_over(self, cell: str, guests: list[str], *, note: str) -> list[tuple[str, str]]:
        """Place each guest of fenced cell `cell` on another cell of its pool with room
        (counting the guests placed before it): auto_start guests are to run there, the
        others stay stopped. A guest no cell has room for stays (and is tried again).
        Returns [(guest id, new cell)]."""
        moved: list[tuple[str, str]] = []
        rooms_of: dict[str, list[Any]] = {}
        for gid in guests:
            row = Guest.get_or_none(Guest.id == gid)
            if row is None or row.cell != cell:
                continue
            rooms = rooms_of.setdefault(row.pool, [  # type: ignore[attr-defined]
                r for r in self._cell_rooms(row.pool) if r.name != cell])
            need = guest_need(row.spec or {})
            try:
                target = choose_cell(row.pool, rooms, need)
            except NanoError as exc:
                log.warning("failover: guest %s stays on lost cell %s: %s", row.name, cell,
                            exc.message)
                continue
            rooms_of[row.pool] = [r.promise(need) if r.name == target else r for r in rooms]
            self._ports_to(gid, cell, target)
            with db.atomic():
                spec = dict(row.spec or {})
                spec["power"] = "running" if spec.get("auto_start") else "stopped"
                # the fenced cell's copy is dead: nothing runs until the new cell says so
                observed = {**(row.observed or {}), "running": False, "failed_over": {
                    "from": cell, "to": target, "at": str(now())}}
                Guest.update(cell=target, spec=spec, generation=row.generation + 1,
                             observed=observed, modified_at=now()).where(
                    Guest.id == gid).execute()
                self._ports_off(gid, cell)
            self.add_log(f"failover: guest {row.name} ({gid}) moved from lost cell {cell} "  # type: ignore[attr-defined]
                         f"to {target} ({'started' if spec['power'] == 'running' else 'stopped'}"
                         f"; {note})")
            moved.append((gid, target))
        return moved

    def stale_guests(self, cell: str, owned: list[str]) -> list[str]:
        """Of the guests whose domains cell `cell` holds (`owned`), those that live on
        another cell now (failed over while it was away) and are not moving."""
        busy = self._moving_guests()
        rows = Guest.select(Guest.id, Guest.cell).where(Guest.id.in_(owned)) if owned else []
        return [g.id for g in rows if g.cell != cell and g.id not in busy]

    def guests_moving_to(self, cell: str) -> list[str]:
        """Guests of unfinished migrations bound for `cell` that are not there yet: their
        security policy chains are made there before they arrive."""
        out = []
        for row in Migration.select().where(Migration.finished == False):  # noqa: E712
            spec = row.spec or {}
            out += [gid for gid, to in spec.get("targets", {}).items() if to == cell]
        return out
