"""The reconcile loop: worker threads draining a `WorkQueue` into the reconcilers.

`nanod serve` builds one `Controller` from every reconciler, passes `controller.enqueue` to
the API and event sources, and calls `start()` / `stop()`. `nanod reconcile --once` and the
tests call `run_once()` instead, which reconciles every key synchronously and returns what
happened. A resync thread enqueues every key of every kind at start and then periodically,
so drift and missed triggers are corrected without any event.

Errors raised by a reconcile are logged and retried with per-key exponential backoff; a
success resets the backoff and honours `Result.requeue_after`.

Each reconcile's duration and result go to the `Meter` (the process's metrics). A key
enqueued with a `cause` (the X-Request-Id of the API request whose write asked for it,
passed by nanod/server.py) remembers it until a worker takes the key: that reconcile's log
records carry it (`CAUSES`, which nanod's log format shows), and its outcome is logged at
INFO naming the request(s) and what the reconcile did.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from reconciler.contract import Key, Meter, NoMeter, Reconciler, Result
from reconciler.queue import WorkQueue
from state.errors import NanoError
from state.leases import Fence, fenced

log = logging.getLogger(__name__)

Outcome = Result | Exception
"""What one reconcile produced: its result, or the exception it raised."""

Observer = Callable[[Key, Outcome], None]
"""Called after each reconcile, on the thread that ran it; must be quick and not raise."""

CAUSES: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "nano_reconcile_causes", default=())
"""The request ids that caused the reconcile this thread runs now (none for a resync or a
reconciler's own requeue)."""

MAX_CAUSES = 8
"""Request ids remembered per waiting key; older ones go first (a key written by many
requests before a worker takes it is reconciled once, for the latest of them)."""


class Shard(Protocol):
    """Which keys this nanod reconciles when it is one replica of several
    (reconciler/leases.py's `Membership`)."""

    def claim(self, key: Key) -> Fence | None:
        """The fence to reconcile `key` under now, or None: another replica's."""
        ...

    def mine(self, keys: Iterable[Key]) -> list[Key]:
        """Those of `keys` this replica holds the lease of."""
        ...


class Controller:
    """Runs reconcilers: one queue, `workers` threads, one resync thread. With a `shard`,
    a worker reconciles only the keys whose lease this replica holds, under its fence
    (state/leases.py): every store write of that reconcile is refused once the lease is
    lost; a resync enqueues only this replica's keys."""

    def __init__(
        self,
        reconcilers: Iterable[Reconciler],
        *,
        workers: int = 4,
        resync_seconds: float = 30.0,
        max_backoff: float = 60.0,
        base_backoff: float = 0.5,
        meter: Meter | None = None,
        shard: Shard | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._reconcilers: dict[str, Reconciler] = {}
        for reconciler in reconcilers:
            if reconciler.kind in self._reconcilers:
                raise ValueError(f"two reconcilers for kind {reconciler.kind!r}")
            self._reconcilers[reconciler.kind] = reconciler
        self._queue = WorkQueue(base_delay=base_backoff, max_delay=max_backoff)
        self._workers = workers
        self._meter: Meter = meter or NoMeter()
        self._shard = shard
        self._broadcast: Callable[[str, str], None] | None = None
        # key -> ids of the requests that enqueued it since a worker last took it
        self._causes: dict[Key, tuple[str, ...]] = {}
        self._resync_seconds = resync_seconds
        self._lock = threading.Lock()
        # Replaced, never mutated, so workers iterate a snapshot without taking the lock.
        self._observers: tuple[Observer, ...] = ()
        self._unknown_kinds: set[str] = set()
        self._threads: tuple[threading.Thread, ...] = ()
        self._started = False
        self._stopping = threading.Event()

    @property
    def kinds(self) -> list[str]:
        """Registered kinds, in registration order."""
        return list(self._reconcilers)

    @property
    def queue(self) -> WorkQueue:
        return self._queue

    @property
    def threads(self) -> tuple[threading.Thread, ...]:
        """The worker and resync threads once started (for tests and diagnostics)."""
        return self._threads

    # -- triggers ----------------------------------------------------------------------------

    def tell_others(self, broadcast: Callable[[str, str], None]) -> None:
        """Also send every key enqueued here (but resyncs' and those that came from
        another replica) to the other replicas, with `broadcast(kind, id)`
        (state/notify.py): the replica that holds its lease reconciles it at once."""
        self._broadcast = broadcast

    def enqueue(self, key: Key, cause: str = "", *, local: bool = False) -> None:
        """Ask for `key` to be reconciled; `cause` is the id of the API request that
        asks, if any. Safe from any thread, the Tornado IOLoop's included: it takes one
        lock briefly and never waits for work.

        A key of a kind with no reconciler is dropped with a warning (once per kind) rather
        than raised: a trigger for a kind not wired yet must not fail an API request.
        """
        if key.kind not in self._reconcilers:
            with self._lock:
                first = key.kind not in self._unknown_kinds
                self._unknown_kinds.add(key.kind)
            if first:
                log.warning("no reconciler for kind %r: dropping keys of that kind", key.kind)
            return
        if cause:
            with self._lock:
                known = self._causes.get(key, ())
                if cause not in known:
                    self._causes[key] = (*known, cause)[-MAX_CAUSES:]
        self._queue.add(key)
        if not local and self._broadcast is not None:
            self._broadcast(key.kind, key.id)

    def resync(self) -> int:
        """Enqueue every key of every reconciler; returns how many were enqueued. A
        reconciler whose `keys()` fails is logged and skipped, the others still resync."""
        count = 0
        for reconciler in self._reconcilers.values():
            try:
                keys = list(reconciler.keys())
                if self._shard is not None:
                    keys = self._shard.mine(keys)
            except Exception:
                log.exception("listing keys of kind %r for resync failed", reconciler.kind)
                continue
            for key in keys:
                self.enqueue(key, local=True)
                count += 1
        return count

    def subscribe(self, observer: Observer) -> Callable[[], None]:
        """Call `observer(key, result_or_exception)` after every reconcile (workers and
        `run_once`); returns a function that unsubscribes it."""
        with self._lock:
            self._observers = (*self._observers, observer)

        def unsubscribe() -> None:
            with self._lock:
                self._observers = tuple(o for o in self._observers if o is not observer)

        return unsubscribe

    # -- running -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker threads and the resync thread (which resyncs at once). Daemon
        threads, so a crashed main thread does not hang the process; call `stop` to end them
        cleanly. A controller starts once."""
        with self._lock:
            if self._started:
                raise RuntimeError("controller already started")
            self._started = True
        threads = [
            threading.Thread(target=self._work, name=f"nano-reconcile-{n}", daemon=True)
            for n in range(self._workers)
        ]
        threads.append(
            threading.Thread(target=self._resync_forever, name="nano-resync", daemon=True)
        )
        self._threads = tuple(threads)
        for thread in threads:
            thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop taking work and join every thread; a reconcile in progress finishes first.
        Returns True if all threads ended within `timeout` seconds."""
        self._stopping.set()
        self._queue.shutdown()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            log.warning("reconcile threads still running after %.1fs: %s", timeout, stuck)
        return not stuck

    def wait_idle(self, timeout: float) -> bool:
        """True once no key is ready or being reconciled (keys waiting on a backoff or a
        `requeue_after` delay do not count), False if `timeout` passes first."""
        return self._queue.wait_idle(timeout)

    def run_once(self) -> list[tuple[Key, Outcome]]:
        """Reconcile every key of every reconciler once, synchronously on this thread, in
        registration order of the reconcilers and then key order; return each key with its
        result or the exception it raised. Nothing is retried or requeued.

        Not while the workers run (a key could then be reconciled on two threads at once).
        An exception from a reconciler's `keys()` propagates: without the list there is no
        honest answer for that kind.
        """
        with self._lock:
            if self._started and not self._stopping.is_set():
                raise RuntimeError("run_once while the controller is running")
        outcomes: list[tuple[Key, Outcome]] = []
        for reconciler in self._reconcilers.values():
            for key in sorted(set(reconciler.keys())):
                outcome = self._reconcile(key)
                if isinstance(outcome, Exception):
                    self._log_failure(key, outcome, retry_in=None)
                self._emit(key, outcome)
                outcomes.append((key, outcome))
        return outcomes

    # -- internals -----------------------------------------------------------------------------

    def _resync_forever(self) -> None:
        while not self._stopping.is_set():
            self.resync()
            self._stopping.wait(self._resync_seconds)

    def _work(self) -> None:
        while True:
            key = self._queue.get()
            if key is None:
                return
            try:
                with self._lock:  # taken before the reconcile: a later write is a new cause
                    causes = self._causes.pop(key, ())
                token = CAUSES.set(causes)
                try:
                    started = time.monotonic()
                    try:
                        fence = self._shard.claim(key) if self._shard is not None else None
                    except Exception as exc:  # the store: retried like a failed reconcile
                        outcome: Outcome = exc
                    else:
                        if self._shard is not None and fence is None:
                            self._queue.forget(key)  # another replica's: nothing to do
                            continue
                        with fenced(fence):
                            outcome = self._reconcile(key)
                    self._meter.reconciled(key.kind, key.id, not isinstance(outcome, Exception),
                                           time.monotonic() - started)
                    if causes and not isinstance(outcome, Exception):
                        log.info("reconcile %s for request %s: %s", key, ",".join(causes),
                                 outcome.summary())
                    elif causes:  # the retry is still for these requests
                        with self._lock:
                            later = self._causes.get(key, ())
                            self._causes[key] = (*causes, *later)[-MAX_CAUSES:]
                    self._settle(key, outcome)
                finally:
                    CAUSES.reset(token)
                # Before done(): wait_idle then also means every observer has been told.
                self._emit(key, outcome)
            except Exception:
                # Only our own bookkeeping can get here; the worker must survive it.
                log.exception("reconcile worker failed handling %s", key)
            finally:
                self._queue.done(key)

    def _reconcile(self, key: Key) -> Outcome:
        reconciler = self._reconcilers.get(key.kind)
        if reconciler is None:
            return LookupError(f"no reconciler for kind {key.kind!r}")
        try:
            result = reconciler.reconcile(key)
        except Exception as exc:
            return exc
        # Tolerate a bare `return`: it means "done, nothing to ask".
        return Result() if result is None else result

    def _settle(self, key: Key, outcome: Outcome) -> None:
        if isinstance(outcome, Exception):
            delay = self._queue.add_rate_limited(key)
            self._log_failure(key, outcome, retry_in=delay)
            return
        self._queue.forget(key)
        if outcome.requeue_after is not None:
            self._queue.add_after(key, outcome.requeue_after)

    def _log_failure(self, key: Key, exc: Exception, *, retry_in: float | None) -> None:
        retry = "" if retry_in is None else f"; retry in {retry_in:.1f}s"
        if isinstance(exc, NanoError):
            # Expected failures (a cell down, a conflict): the message is the story. Our
            # errors carry no secrets in their messages by convention.
            log.warning("reconcile %s failed: %s: %s%s", key, type(exc).__name__, exc, retry)
        else:
            # Anything else is a bug: keep the traceback (frames only, no local values).
            log.error("reconcile %s failed%s", key, retry, exc_info=exc)

    def _emit(self, key: Key, outcome: Outcome) -> None:
        for observer in self._observers:
            try:
                observer(key, outcome)
            except Exception:
                log.exception("reconcile observer %r failed", observer)
