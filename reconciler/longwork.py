"""The long-work lane: work that takes minutes (an image streamed to a cell, a full copy of
a volume, `qemu-img convert` of a disk, a clone pulled from a cell) runs in a few threads
of its own, so the reconciler's workers stay free for the status and power changes that
must not wait behind it.

A reconciler hands a job over with `LongWork.run(owner, job_id, what, fn)` and returns at
once: while the job runs, `run` raises `InProgress` (what, how long, how far), which the
reconciler turns into a condition and a requeue; when the job ends its owner key is
enqueued, and the next `run` with the same id returns the job's result or raises its error
(once). The same id never runs twice at a time, so a reconcile that plans the same action
again while it runs only asks how far it got. Results nobody comes back for are dropped
after `keep_seconds`.

The lane is bounded (`reconciler.long_workers` threads): jobs beyond that wait in order,
reported as queued. `fn` receives a `report(done, total)` callable for progress.

Among several replicas a job belongs to the lease its reconcile ran under (the fence of
state.leases): its store writes are fenced like any other, and its work on the cell stops
too once the lease is lost. `report` raises `Fenced` when `holds(fence)` says no (every
stream block asks), and a queued job whose lease went meanwhile does not start: the
replica that took the lease over makes it again, and two replicas never stream into the
same volume at once.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from reconciler.contract import Key
from reconciler.threads import DaemonThreads
from state.db import FENCE
from state.leases import Fence, Fenced

log = logging.getLogger("nano.reconciler.longwork")

T = TypeVar("T")
Report = Callable[[int, int], None]


class InProgress(Exception):
    """The long job a reconcile asked for is queued or running; its owner key is enqueued
    when it ends. Not an error: the reconcile records it and comes back."""

    def __init__(self, job: Job) -> None:
        super().__init__(job.describe())
        self.job = job


@dataclass
class Job:
    owner: Key
    job_id: str
    what: str
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    ended_at: float | None = None
    done: int = 0
    total: int = 0
    future: concurrent.futures.Future[Any] | None = None
    fence: Fence | None = None  # the lease the job's reconcile ran under (None: unfenced)
    holds: Callable[[Fence], bool] | None = None

    def report(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        self.check_lease()

    def check_lease(self) -> None:
        """Raise `Fenced` once this replica no longer holds the job's lease."""
        if self.fence is not None and self.holds is not None and not self.holds(self.fence):
            raise Fenced(f"{self.what}: stopped, lease {self.fence.lease} (token "
                         f"{self.fence.token}) is no longer this replica's; the replica "
                         "that holds it now does this work")

    def describe(self) -> str:
        now = time.monotonic()
        if self.started_at is None:
            return f"{self.what}: waiting {now - self.queued_at:.0f} s for a long-work thread"
        far = f", {100 * self.done // self.total}%" if self.total else ""
        return f"{self.what}: running for {now - self.started_at:.0f} s{far}"


class LongWork:
    """`workers` threads for long jobs; `enqueue` wakes a job's owner when it ends."""

    def __init__(self, enqueue: Callable[[Key], None], *, workers: int = 2,
                 keep_seconds: float = 600.0,
                 holds: Callable[[Fence], bool] | None = None) -> None:
        if workers < 1:
            raise ValueError(f"settings: reconciler.long_workers must be at least 1, "
                             f"not {workers}")
        self._enqueue = enqueue
        # daemon threads: a stop of nanod does not wait for a job; the restart redoes it
        self._pool = DaemonThreads(workers, "long-work", idle_seconds=60.0)
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.keep_seconds = keep_seconds
        self._holds = holds  # Membership.holds among replicas; None: one nanod, no leases

    def run(self, owner: Key, job_id: str, what: str, fn: Callable[[Report], T]) -> T:
        """The result of `fn(report)` once it has run in the lane; until then raises
        InProgress (the first call starts it). A job that failed raises its error once."""
        with self._lock:
            self._forget_old()
            job = self._jobs.get(job_id)
            if job is None:
                job = Job(owner, job_id, what, fence=FENCE.get(), holds=self._holds)
                self._jobs[job_id] = job
                job.future = self._pool.submit(self._execute, job, fn)
                raise InProgress(job)
            if job.ended_at is None:
                raise InProgress(job)
            del self._jobs[job_id]
        assert job.future is not None
        return job.future.result()  # the job's error, raised here once

    def discard(self, job_id: str) -> None:
        """Forget an ended job's result: what it made was seen by other means (or is gone),
        and a later `run` with that id must start it again, not return the old result."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.ended_at is not None:
                del self._jobs[job_id]

    def running_for(self, owner: Key) -> Job | None:
        """A job of `owner` queued or running, if any."""
        with self._lock:
            return next((j for j in self._jobs.values()
                         if j.owner == owner and j.ended_at is None), None)

    def running(self) -> list[Job]:
        """Jobs queued or running (for status and tests)."""
        with self._lock:
            return [j for j in self._jobs.values() if j.ended_at is None]

    def _execute(self, job: Job, fn: Callable[[Report], T]) -> T:
        job.started_at = time.monotonic()
        try:
            job.check_lease()  # queued while the lease went: not started at all
            return fn(job.report)
        finally:
            job.ended_at = time.monotonic()
            log.info("%s: ended after %.1f s", job.what, job.ended_at - job.started_at)
            self._enqueue(job.owner)

    def _forget_old(self) -> None:
        now = time.monotonic()
        for job_id, job in list(self._jobs.items()):
            if job.ended_at is not None and now - job.ended_at > self.keep_seconds:
                del self._jobs[job_id]
