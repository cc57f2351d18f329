"""`Membership`: this nanod as one replica of a control plane on one store, and the leases
it reconciles under (the store side and the fence: state/leases.py).

Every `renew_seconds` a thread of its own:
1. writes this replica's heartbeat;
2. renews the leases it holds (a lease it could not renew, taken over or expired while
   this process was frozen, is lost at once: nothing runs under it any more);
3. spreads the cells evenly: with n live replicas sorted by id and N cells, replica i
   aims at N // n cells, one more for the first N % n. A replica over its aim releases the
   extra leases, one under it takes free or expired ones, so the spread converges within a
   few renewals after a replica joins or leaves. `global` goes to whoever finds it free;
4. tells the controller which leases it gained (their keys are resynced) and lost.

`claim(key)` is what a worker asks before a reconcile: the `Fence` to write under, or
None when another replica owns the key. A lease counts as held only until its local
deadline (the monotonic time of the renewal that extended it plus the TTL), so a
replica that was frozen neither reconciles nor writes on a lease it may have lost; the
store refuses its writes anyway (state/db.py).

Built by nanod/server.py for `nanod serve`; stopped (leases released, replica row removed)
when nanod stops cleanly. A nanod whose reconciler is disabled still heartbeats (so the
other replicas know it is alive and leave its uploads alone, state/images.py) but takes
no lease (`reconciles=False`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from reconciler.contract import Key
from state.leases import GLOBAL, Fence

log = logging.getLogger("nano.reconciler.leases")

Changed = Callable[[set[str], set[str]], None]
"""Told (gained, lost) lease names after a renewal that changed them."""


class Membership:
    def __init__(self, store: Any, replica: str, *, ttl: float, renew_seconds: float,
                 address: str = "", reconciles: bool = True) -> None:
        self.store = store
        self.replica = replica
        self.ttl = ttl
        self.renew_seconds = renew_seconds
        self.address = address
        self.reconciles = reconciles
        self.started_at = time.time()
        self._held: dict[str, tuple[int, float]] = {}  # name -> (token, local deadline)
        self._lock = threading.Lock()
        self._listeners: tuple[Changed, ...] = ()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._first = True
        self.takeovers = 0  # leases this replica took from another holder (metrics)

    # -- what the workers ask --------------------------------------------------------------

    def claim(self, key: Key) -> Fence | None:
        """The fence for reconciling `key` now, or None if this replica does not hold its
        lease (or holds it past the local deadline)."""
        lease = self.store.leases_of([(key.kind, key.id)])[(key.kind, key.id)]
        return self.fence(lease)

    def fence(self, lease: str) -> Fence | None:
        with self._lock:
            held = self._held.get(lease)
        if held is None or held[1] <= time.monotonic():
            return None
        return Fence(lease, self.replica, held[0])

    def holds(self, fence: Fence) -> bool:
        """Whether `fence` still holds by this replica's own account (no store read): its
        lease held, with the same token, before the local deadline. Long work asks it
        between blocks, so that it stops before another replica can take the lease over."""
        return self.fence(fence.lease) == fence

    def mine(self, keys: Iterable[Key]) -> list[Key]:
        """The keys among `keys` whose lease this replica holds (one store read for all)."""
        keys = list(keys)
        leases = self.store.leases_of([(k.kind, k.id) for k in keys])
        now = time.monotonic()
        with self._lock:
            held = {name for name, (_, deadline) in self._held.items() if deadline > now}
        return [k for k in keys if leases[(k.kind, k.id)] in held]

    def held(self) -> dict[str, int]:
        """Lease name -> token of the leases held now."""
        now = time.monotonic()
        with self._lock:
            return {n: t for n, (t, deadline) in self._held.items() if deadline > now}

    def subscribe(self, listener: Changed) -> None:
        self._listeners = (*self._listeners, listener)

    # -- running ---------------------------------------------------------------------------

    def start(self) -> None:
        """One renewal now (so that a lone replica reconciles from its first second), then
        a thread renews every `renew_seconds`."""
        self.tick()
        self._thread = threading.Thread(target=self._run, name="nano-leases", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing and give every lease back at once (a clean stop: the others
        need not wait for the TTL)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(self.renew_seconds + 5)
        with self._lock:
            self._held.clear()
        try:
            self.store.leave(self.replica)
        except Exception:  # the store is gone: the leases expire by themselves
            log.exception("replica %s could not release its leases", self.replica)

    def _run(self) -> None:
        while not self._stopping.wait(self.renew_seconds):
            try:
                self.tick()
            except Exception:
                # the store is unreachable: held leases lapse at their local deadline
                log.exception("replica %s: lease renewal failed", self.replica)

    def tick(self) -> tuple[set[str], set[str]]:
        """One renewal round; returns (gained, lost)."""
        started = time.monotonic()
        self.store.heartbeat(self.replica, address=self.address, host=socket.gethostname(),
                             pid=os.getpid(), started_at=self.started_at, ttl=self.ttl,
                             reconciles=self.reconciles)
        if not self.reconciles:
            return set(), set()
        with self._lock:
            before = {n: t for n, (t, _) in self._held.items()}
        renewed = self.store.renew_leases(self.replica, before, self.ttl)
        lost = set(before) - set(renewed)
        held = dict(renewed)
        rows = self.store.lease_rows()
        live = self.store.live_replicas(reconciling=True)
        if self.replica not in live:
            live = sorted([*live, self.replica])
        now = time.time()
        cells = [r for r in rows if r["name"] != GLOBAL]
        mine = [r["name"] for r in cells if r["name"] in held]
        aim = len(cells) // len(live) + (1 if live.index(self.replica) < len(cells) % len(live)
                                        else 0)
        released: list[str] = []
        if len(mine) > aim:
            released = sorted(mine)[aim:]
            self.store.release_leases(self.replica, released)
            for name in released:
                held.pop(name)
        gained: set[str] = set()
        free = [r for r in rows if r["name"] not in held and
                (not r["holder"] or r["expires_at"] < now
                 or (self._first and r["holder"] == self.replica))]
        want = max(aim - len(mine), 0)
        for row in sorted(free, key=lambda r: (r["name"] != GLOBAL, r["name"])):
            if row["name"] != GLOBAL:
                if want == 0:
                    continue
            token = self.store.acquire_lease(row["name"], self.replica, self.ttl,
                                             reclaim=self._first)
            if token is None:
                continue
            if row["holder"] and row["holder"] != self.replica:
                self.takeovers += 1
                log.info("replica %s took over lease %s from %s (token %d)", self.replica,
                         row["name"], row["holder"], token)
            held[row["name"]] = token
            gained.add(row["name"])
            if row["name"] != GLOBAL:
                want -= 1
        self._first = False
        deadline = started + self.ttl
        with self._lock:
            self._held = {n: (t, deadline) for n, t in held.items()}
        lost |= set(released)
        if lost - set(released):
            log.warning("replica %s lost lease(s) %s: taken over or expired; it no longer "
                        "reconciles them", self.replica, ", ".join(sorted(lost - set(released))))
        if released:
            log.info("replica %s handed over lease(s) %s to even the spread", self.replica,
                     ", ".join(released))
        if gained or lost:
            for listener in self._listeners:
                try:
                    listener(gained, lost)
                except Exception:
                    log.exception("lease listener %r failed", listener)
        return gained, lost
