"""Several nanods on one store: replicas, the leases that shard reconciliation among them,
and the fencing token that every write of a reconciler carries.

Leases. `global` covers what has one owner in the whole control plane (compute, storage
and address pools, image clones); `cell:NAME` covers a cell and what lives on it (its
guests, network and firewall). A replica holds a lease until `expires_at` unless it renews
it; anyone may take a free or expired lease, and every acquisition raises `token` by one.
reconciler/leases.py runs the renewals and the even spread; this module is its store side
and the fence.

Fencing. A reconcile runs `fenced(Fence(lease, holder, token))` (reconciler/loop.py). While
a fence is set on the running context, every INSERT, UPDATE and DELETE the store sends
(state/db.py's `FencedWrites`, the one choke point of all SQL) first reads the lease row
in the same transaction, on PostgreSQL with FOR SHARE, and is refused with `Fenced` unless
the row still names this holder and token and has not expired. A takeover's UPDATE of the
lease row waits for such a transaction, so an old owner's write lands before the new
owner's first one or not at all: a replica frozen past its TTL (SIGSTOP, a long GC, a
partition) cannot write after it resumes.

Clocks: `expires_at` and `heartbeat_at` are epoch seconds of the writing replica's clock;
replicas on different machines need clocks that agree to well within the TTL (NTP).

Called by reconciler/leases.py (renewals), reconciler/loop.py (claims), state/db.py (the
check) and api/replicas.py (GET /api/v1/replicas).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import peewee

from state.db import FENCE, db
from state.errors import Conflict
from state.models import Cell, ControlReplica, Guest, Lease

GLOBAL = "global"
CELL_KINDS = frozenset({"cell", "network", "firewall"})  # keyed by the cell's name
GONE_AFTER_TTLS = 30  # a replica silent this many TTLs is dropped from the list


def cell_lease(cell: str) -> str:
    return f"cell:{cell}"


@dataclass(frozen=True)
class Fence:
    """What a reconcile may write under: the lease, its holder and the token it got."""

    lease: str
    holder: str
    token: int


class Fenced(Conflict):
    """A write under a lease this replica no longer holds (taken over, or expired)."""


@contextlib.contextmanager
def fenced(fence: Fence | None) -> Iterator[None]:
    """Store writes in this block are refused once `fence` is stale (None: unfenced, as
    `nanod reconcile --once` and the API run)."""
    token = FENCE.set(fence)
    try:
        yield
    finally:
        FENCE.reset(token)


def check_fence(database: peewee.Database, fence: Fence) -> None:
    """Raise `Fenced` unless `fence` still holds; call inside the write's transaction (on
    PostgreSQL the row stays share-locked until it ends)."""
    sql = (f'SELECT "holder", "token", "expires_at" FROM "lease" WHERE "name" = '
           f'{database.param}' + (" FOR SHARE" if database.for_update else ""))
    row = database.execute_sql(sql, (fence.lease,)).fetchone()
    if row is None or row[0] != fence.holder or int(row[1]) != fence.token:
        holder = "nobody" if row is None or not row[0] else f"{row[0]} (token {row[1]})"
        raise Fenced(f"lease {fence.lease} with token {fence.token} is lost: {holder} holds "
                     "it now; this replica no longer reconciles it")
    if float(row[2]) <= time.time():
        raise Fenced(f"lease {fence.lease} with token {fence.token} expired before this "
                     "write; this replica must renew or retake it first")


class LeaseStore:
    """Mixin of `state.store.Store`."""

    # -- replicas ---------------------------------------------------------------------------

    def heartbeat(self, replica: str, *, address: str, host: str, pid: int,
                  started_at: float, ttl: float, reconciles: bool = True) -> None:
        now = time.time()
        ControlReplica.insert(id=replica, address=address, host=host, pid=pid,
                              started_at=started_at, heartbeat_at=now, ttl=ttl,
                              reconciles=reconciles).on_conflict(
            conflict_target=[ControlReplica.id],
            update={ControlReplica.address: address, ControlReplica.host: host,
                    ControlReplica.pid: pid, ControlReplica.started_at: started_at,
                    ControlReplica.heartbeat_at: now, ControlReplica.ttl: ttl,
                    ControlReplica.reconciles: reconciles}).execute()

    def live_replicas(self, *, reconciling: bool = False) -> list[str]:
        """Replicas whose last heartbeat is within their TTL (only those that reconcile,
        when `reconciling`), sorted."""
        now = time.time()
        query = ControlReplica.select(ControlReplica.id).where(
            ControlReplica.heartbeat_at + ControlReplica.ttl > now)
        if reconciling:
            query = query.where(ControlReplica.reconciles)
        return sorted(r.id for r in query)

    def leave(self, replica: str) -> None:
        """A replica stopping cleanly: its leases are free at once, its row goes."""
        with db.atomic():
            Lease.update(holder="", expires_at=0.0).where(Lease.holder == replica).execute()
            ControlReplica.delete().where(ControlReplica.id == replica).execute()

    def replicas_view(self) -> list[dict[str, Any]]:
        """GET /api/v1/replicas: each replica, alive or not, with the leases it holds and
        their ages; replicas silent for long are dropped here."""
        now = time.time()
        rows = list(ControlReplica.select().order_by(ControlReplica.id))
        gone = [r.id for r in rows if r.heartbeat_at + GONE_AFTER_TTLS * r.ttl < now]
        if gone:
            ControlReplica.delete().where(ControlReplica.id.in_(gone)).execute()
        leases: dict[str, list[Lease]] = {}
        for lease in Lease.select().where((Lease.holder != "") & (Lease.expires_at > now)):
            leases.setdefault(lease.holder, []).append(lease)
        out = []
        for r in rows:
            if r.id in gone:
                continue
            held = sorted(leases.get(r.id, []), key=lambda x: x.name)
            out.append({
                "id": r.id, "address": r.address, "host": r.host, "pid": r.pid,
                "alive": r.heartbeat_at + r.ttl > now, "reconciles": r.reconciles,
                "started": _iso(r.started_at), "heartbeat_age": round(now - r.heartbeat_at, 3),
                "cells": [x.name.split(":", 1)[1] for x in held if x.name != GLOBAL],
                "global": any(x.name == GLOBAL for x in held),
                "leases": [{"name": x.name, "token": x.token,
                            "age": round(now - x.acquired_at, 3),
                            "expires_in": round(x.expires_at - now, 3)} for x in held],
            })
        return out

    # -- leases -----------------------------------------------------------------------------

    def lease_rows(self) -> list[dict[str, Any]]:
        """Every lease that should exist (`global` and one per registered cell), made if
        missing (leases of cells no longer registered are dropped once free), with holder,
        token and expiry."""
        wanted = [GLOBAL] + [cell_lease(c.name) for c in Cell.select(Cell.name)]
        rows = {r.name: r for r in Lease.select()}
        missing = [name for name in wanted if name not in rows]
        if missing:
            Lease.insert_many([{"name": n} for n in missing]).on_conflict_ignore().execute()
            rows = {r.name: r for r in Lease.select()}
        stale = [n for n in rows if n not in wanted]
        if stale:
            Lease.delete().where(Lease.name.in_(stale) & (
                (Lease.holder == "") | (Lease.expires_at < time.time()))).execute()
        return [{"name": n, "holder": rows[n].holder, "token": rows[n].token,
                 "expires_at": rows[n].expires_at} for n in wanted if n in rows]

    def acquire_lease(self, name: str, replica: str, ttl: float, *,
                      reclaim: bool = False) -> int | None:
        """Take `name` if it is free or expired (or, with `reclaim`, still held in the
        name of this replica by a process that is gone: a restart with the same id);
        returns the new token, or None if another replica holds it."""
        now = time.time()
        free = (Lease.holder == "") | (Lease.expires_at < now)
        if reclaim:
            free = free | (Lease.holder == replica)
        with db.atomic():
            taken = Lease.update(holder=replica, token=Lease.token + 1, acquired_at=now,
                                 expires_at=now + ttl).where((Lease.name == name) & free
                                                             ).execute()
            if taken != 1:
                return None
            return int(Lease.get_by_id(name).token)

    def renew_leases(self, replica: str, held: dict[str, int], ttl: float) -> dict[str, int]:
        """Extend the leases in `held` (name -> token) that this replica still holds with
        that token and that have not expired; returns those renewed."""
        if not held:
            return {}
        now = time.time()
        renewed: dict[str, int] = {}
        rows = (Lease.update(expires_at=now + ttl)
                .where((Lease.holder == replica) & (Lease.expires_at > now)
                       & Lease.name.in_(list(held)))
                .returning(Lease.name, Lease.token).execute())
        for row in rows:
            if held.get(row.name) == int(row.token):
                renewed[row.name] = int(row.token)
        return renewed

    def release_leases(self, replica: str, names: Iterable[str]) -> None:
        names = list(names)
        if names:
            Lease.update(holder="", expires_at=0.0).where(
                (Lease.holder == replica) & Lease.name.in_(names)).execute()

    # -- which lease a key needs ------------------------------------------------------------

    def leases_of(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """The lease each (kind, id) is reconciled under: a cell's for the cell kinds and
        for a placed guest, `global` for the rest (a guest not found is its own ghost's
        business: `global` too)."""
        keys = list(keys)
        out: dict[tuple[str, str], str] = {}
        guests = [i for k, i in keys if k == "guest"]
        cells: dict[str, str] = {}
        for start in range(0, len(guests), 500):  # stay under SQLite's variable limit
            chunk = guests[start:start + 500]
            cells.update((g.id, g.cell) for g in
                         Guest.select(Guest.id, Guest.cell).where(Guest.id.in_(chunk)))
        for kind, key_id in keys:
            if kind in CELL_KINDS:
                out[(kind, key_id)] = cell_lease(key_id)
            elif kind == "guest" and cells.get(key_id):
                out[(kind, key_id)] = cell_lease(cells[key_id])
            else:
                out[(kind, key_id)] = GLOBAL
        return out


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else ""
