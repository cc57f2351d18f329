"""The loop's side of metrics and request ids, with real threads: each reconcile reaches
the Meter with its kind, key and result; a key enqueued with a request id as its cause
carries it into that reconcile (CAUSES, the log line naming it) and into the retry of a
failed one, and a later reconcile without a cause names none; the queue's depth and the
wait of its oldest key."""

from __future__ import annotations

import logging
import threading

from reconciler.contract import Key, Result
from reconciler.loop import CAUSES, MAX_CAUSES, Controller
from reconciler.queue import WorkQueue
from state.errors import Transient

WAIT = 5.0


class Seen:
    """A reconciler that records the causes each reconcile ran for; `fail` ids fail once."""

    kind = "thing"

    def __init__(self, fail: set[str] = frozenset()) -> None:
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.fail = set(fail)
        self.lock = threading.Lock()
        self.retried = threading.Event()  # a failed key succeeded on its retry

    def keys(self) -> list[Key]:
        return []

    def reconcile(self, key: Key) -> Result:
        with self.lock:
            self.calls.append((key.id, CAUSES.get()))
            if key.id in self.fail:
                self.fail.discard(key.id)
                raise Transient(f"{key.id} not yet")
            if sum(1 for i, _ in self.calls if i == key.id) > 1:
                self.retried.set()
        return Result(note="done")


class Meter:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bool]] = []

    def reconciled(self, kind: str, key_id: str, ok: bool, seconds: float) -> None:
        assert seconds >= 0
        self.seen.append((kind, key_id, ok))

    def domain_created(self, cell: str) -> None:
        return None

    def transferred(self, direction: str, nbytes: int) -> None:
        raise AssertionError("the loop moves no image bytes")


def run(controller: Controller, *keys: tuple[str, str],
        until: threading.Event | None = None) -> None:
    controller.start()
    try:
        for ident, cause in keys:
            controller.enqueue(Key("thing", ident), cause=cause)
        if until is not None:  # wait_idle does not wait for a key in backoff
            assert until.wait(WAIT)
        assert controller.wait_idle(WAIT)
    finally:
        controller.stop()


def test_a_reconcile_runs_for_the_requests_that_enqueued_it_and_is_metered(caplog):
    caplog.set_level(logging.INFO, logger="reconciler.loop")
    seen, meter = Seen(fail={"b"}), Meter()
    controller = Controller([seen], workers=1, resync_seconds=3600, base_backoff=0.01,
                            meter=meter)
    run(controller, ("a", "req-1"), ("b", "req-2"), ("c", ""), until=seen.retried)
    calls = dict.fromkeys(i for i, _ in seen.calls)
    assert list(calls) == ["a", "b", "c"]
    assert [c for i, c in seen.calls if i == "a"] == [("req-1",)]
    assert [c for i, c in seen.calls if i == "b"] == [("req-2",), ("req-2",)]  # the retry too
    assert [c for i, c in seen.calls if i == "c"] == [()]
    assert sorted(meter.seen) == [("thing", "a", True), ("thing", "b", False),
                                  ("thing", "b", True), ("thing", "c", True)]
    lines = [r.getMessage() for r in caplog.records if r.name == "reconciler.loop"]
    assert "reconcile thing/a for request req-1: no change (done)" in lines
    assert "reconcile thing/b for request req-2: no change (done)" in lines
    assert not [line for line in lines if "thing/c for" in line]

    controller = Controller([seen], workers=1, resync_seconds=3600)
    seen.calls.clear()
    run(controller, ("a", ""))  # a trigger without a request names none
    assert seen.calls == [("a", ())]


def test_causes_of_a_waiting_key_are_kept_once_each_and_bounded():
    seen = Seen()
    controller = Controller([seen], workers=1, resync_seconds=3600)
    key = Key("thing", "x")
    for n in range(MAX_CAUSES + 3):  # enqueued before any worker runs: one reconcile
        controller.enqueue(key, cause=f"r{n}")
        controller.enqueue(key, cause=f"r{n}")
    run(controller)
    assert seen.calls == [("x", tuple(f"r{n}" for n in range(3, MAX_CAUSES + 3)))]


def test_the_queue_reports_its_depth_and_its_oldest_wait():
    queue = WorkQueue()
    assert queue.stats() == (0, 0.0)
    queue.add(Key("thing", "a"))
    queue.add(Key("thing", "b"))
    queue.add(Key("thing", "a"))
    depth, oldest = queue.stats()
    assert depth == 2 and oldest >= 0
    taken = queue.get(timeout=1)
    assert taken == Key("thing", "a") and queue.stats()[0] == 1
    assert queue.get(timeout=1) == Key("thing", "b")
    assert queue.stats() == (0, 0.0)
    queue.add(taken)  # added while being processed: queued again by done()
    assert queue.stats() == (0, 0.0)
    queue.done(taken)
    assert queue.stats()[0] == 1
