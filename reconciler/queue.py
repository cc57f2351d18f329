"""The work queue between triggers and reconcile workers (client-go's workqueue, in small).

`reconciler.loop.Controller` owns one: API writes, resync ticks and lifecycle events `add`
keys; worker threads `get` a key, reconcile it and call `done`. The queue guarantees:

- deduplication: a key added many times before a worker takes it is processed once;
- exclusion: a key is never handed to two workers at once; a key added while it is being
  processed is marked dirty and queued again when the worker calls `done`;
- delays: `add_after` (a reconcile's `requeue_after`) and `add_rate_limited` (per-key
  exponential backoff after errors, reset by `forget`).

One `threading.Condition` guards everything. There is no timer thread: delayed keys sit in
a heap and `get` moves the due ones to the ready queue, waking up when the next one is due.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque

from reconciler.contract import Key


class WorkQueue:
    """Thread-safe, deduplicating queue of `Key`s with delayed and rate-limited adds."""

    def __init__(
        self,
        *,
        base_delay: float = 0.5,
        factor: float = 2.0,
        max_delay: float = 60.0,
    ) -> None:
        self._cond = threading.Condition()
        self._ready: deque[Key] = deque()
        # when each ready key joined `_ready` (for the oldest item's age in metrics)
        self._ready_since: dict[Key, float] = {}
        # Keys that need processing: in `_ready`, or in `_processing` and to be re-queued
        # by done(). A key is in `_ready` at most once because of this set.
        self._dirty: set[Key] = set()
        self._processing: set[Key] = set()
        # Delayed adds: a heap of (due, seq, key) with stale entries skipped lazily; `_due`
        # holds the one live due time per key (the earliest asked for).
        self._timers: list[tuple[float, int, Key]] = []
        self._due: dict[Key, float] = {}
        self._seq = itertools.count()
        self._failures: dict[Key, int] = {}
        self._base_delay = base_delay
        self._factor = factor
        self._max_delay = max_delay
        self._shutdown = False

    # -- adding ------------------------------------------------------------------------------

    def add(self, key: Key) -> None:
        """Queue `key` now; a no-op if it is already queued or after shutdown. Never blocks
        beyond the lock, so the Tornado IOLoop may call it."""
        with self._cond:
            self._add_locked(key)

    def add_after(self, key: Key, seconds: float) -> None:
        """Queue `key` once `seconds` have passed. If it is already waiting, the earlier of
        the two times wins (client-go semantics: a later request never postpones one)."""
        if seconds <= 0:
            self.add(key)
            return
        with self._cond:
            if self._shutdown:
                return
            due = time.monotonic() + seconds
            current = self._due.get(key)
            if current is not None and current <= due:
                return
            self._due[key] = due
            heapq.heappush(self._timers, (due, next(self._seq), key))
            # Waiters computed their sleep from the old earliest timer.
            self._cond.notify_all()

    def add_rate_limited(self, key: Key) -> float:
        """Queue `key` after its backoff delay and lengthen the next one; returns the delay.

        Delays go base, base*factor, base*factor^2, ... up to the cap, per key, until
        `forget(key)` after a success.
        """
        with self._cond:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
            delay = self._delay(failures)
        self.add_after(key, delay)
        return delay

    def forget(self, key: Key) -> None:
        """Reset `key`'s backoff (after a successful reconcile). Pending delayed adds stay."""
        with self._cond:
            self._failures.pop(key, None)

    def failures(self, key: Key) -> int:
        """How many rate-limited adds `key` has had since it was last forgotten."""
        with self._cond:
            return self._failures.get(key, 0)

    def _delay(self, failures: int) -> float:
        # Step by step, stopping at the cap: factor**failures overflows a float once a key
        # has failed for long enough.
        delay = self._base_delay
        for _ in range(failures):
            delay *= self._factor
            if delay >= self._max_delay:
                return self._max_delay
        return min(delay, self._max_delay)

    def _add_locked(self, key: Key) -> None:
        if self._shutdown or key in self._dirty:
            return
        self._dirty.add(key)
        if key in self._processing:
            return  # done() re-queues it: one worker per key
        self._ready.append(key)
        self._ready_since[key] = time.monotonic()
        # notify_all, not notify: wait_idle callers share the condition, and waking one of
        # them instead of a worker would leave the key sitting in the queue.
        self._cond.notify_all()

    def _promote_due_locked(self, now: float) -> float | None:
        """Move due delayed keys to the ready queue; return when the next one is due."""
        while self._timers:
            due, _, key = self._timers[0]
            if self._due.get(key) != due:
                heapq.heappop(self._timers)  # superseded by an earlier add_after
                continue
            if due > now:
                return due
            heapq.heappop(self._timers)
            del self._due[key]
            self._add_locked(key)
        return None

    # -- taking --------------------------------------------------------------------------------

    def get(self, timeout: float | None = None) -> Key | None:
        """The next key to process, waiting up to `timeout` seconds (None: until one comes).

        Returns None on timeout and, at once, after `shutdown`. The caller owns the key until
        it calls `done(key)`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._shutdown:
                    return None
                now = time.monotonic()
                next_due = self._promote_due_locked(now)
                if self._ready:
                    key = self._ready.popleft()
                    self._ready_since.pop(key, None)
                    self._dirty.discard(key)
                    self._processing.add(key)
                    return key
                wake = next_due
                if deadline is not None:
                    if now >= deadline:
                        return None
                    wake = deadline if wake is None else min(wake, deadline)
                self._cond.wait(None if wake is None else max(wake - now, 0.0))

    def done(self, key: Key) -> None:
        """Release `key` after processing; if it was added meanwhile, queue it again."""
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty and not self._shutdown:
                self._ready.append(key)
                self._ready_since[key] = time.monotonic()
            # Wakes a worker for the re-queued key and anyone in wait_idle.
            self._cond.notify_all()

    # -- lifecycle and inspection ----------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop handing out keys: `get` returns None from now on, adds are ignored."""
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()

    @property
    def shutting_down(self) -> bool:
        with self._cond:
            return self._shutdown

    def __len__(self) -> int:
        """Keys ready to be taken now (not those being processed or waiting on a delay)."""
        with self._cond:
            return len(self._ready)

    def stats(self) -> tuple[int, float]:
        """(keys ready to be taken, seconds the oldest of them has waited; 0 when none
        waits): what GET /metrics shows of the queue."""
        with self._cond:
            if not self._ready_since:
                return 0, 0.0
            # `_ready` is in arrival order: its first key waited longest
            return len(self._ready), time.monotonic() - self._ready_since[self._ready[0]]

    def processing(self) -> int:
        """Keys taken by workers and not yet done."""
        with self._cond:
            return len(self._processing)

    def delayed(self) -> int:
        """Keys waiting on `add_after` / `add_rate_limited`."""
        with self._cond:
            return len(self._due)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is ready or due and nothing is being processed; True if that
        happened within `timeout`. Keys whose delay has not run out do not count, so a key
        in error backoff does not keep the queue busy. Needs workers calling `get` to drain
        the queue."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                next_due = self._promote_due_locked(now)
                if not self._ready and not self._processing:
                    return True
                if now >= deadline:
                    return False
                wake = deadline if next_due is None else min(next_due, deadline)
                self._cond.wait(wake - now)
