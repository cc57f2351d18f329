"""WorkQueue semantics with real threads: dedup, one worker per key, delays, backoff."""

from __future__ import annotations

import threading
import time

import pytest

from reconciler.contract import Key
from reconciler.queue import WorkQueue

A = Key("guest", "a")
B = Key("guest", "b")
C = Key("cell", "c")


def test_key_is_hashable_ordered_and_prints_as_kind_slash_id() -> None:
    assert str(A) == "guest/a"
    assert Key.parse("guest/a") == A
    assert len({A, Key("guest", "a"), B}) == 2
    assert sorted([B, C, A]) == [C, A, B]
    with pytest.raises(ValueError):
        Key.parse("guest")


def test_fifo_and_dedup_before_processing() -> None:
    q = WorkQueue()
    for key in (A, B, A, A, C, B):
        q.add(key)
    assert len(q) == 3
    assert [q.get(timeout=1), q.get(timeout=1), q.get(timeout=1)] == [A, B, C]
    assert q.get(timeout=0.01) is None


def test_key_added_while_processing_is_requeued_once_on_done() -> None:
    q = WorkQueue()
    q.add(A)
    assert q.get(timeout=1) == A
    q.add(A)
    q.add(A)
    # Not handed out while being processed, not even to another caller.
    assert len(q) == 0
    assert q.get(timeout=0.01) is None
    q.done(A)
    assert len(q) == 1
    assert q.get(timeout=1) == A
    q.done(A)
    assert len(q) == 0
    assert q.get(timeout=0.01) is None


def test_done_without_new_add_does_not_requeue() -> None:
    q = WorkQueue()
    q.add(A)
    assert q.get(timeout=1) == A
    q.done(A)
    assert len(q) == 0 and q.processing() == 0


def test_get_blocks_until_add_from_another_thread() -> None:
    q = WorkQueue()
    got: list[Key | None] = []
    taker = threading.Thread(target=lambda: got.append(q.get(timeout=5)))
    taker.start()
    q.add(B)
    taker.join(5)
    assert got == [B]


def test_no_key_on_two_workers_under_contention() -> None:
    q = WorkQueue()
    keys = [Key("guest", str(n)) for n in range(5)]
    active: dict[Key, int] = dict.fromkeys(keys, 0)
    overlaps: list[Key] = []
    handled: list[Key] = []
    lock = threading.Lock()

    def worker() -> None:
        while (key := q.get(timeout=5)) is not None:
            with lock:
                active[key] += 1
                if active[key] > 1:
                    overlaps.append(key)
                handled.append(key)
            time.sleep(0.001)  # widen the window in which a second worker could take it
            with lock:
                active[key] -= 1
            q.done(key)

    workers = [threading.Thread(target=worker) for _ in range(6)]
    for thread in workers:
        thread.start()
    for _ in range(200):
        for key in keys:
            q.add(key)
    assert q.wait_idle(5)
    q.shutdown()
    for thread in workers:
        thread.join(5)
    assert overlaps == []
    assert set(handled) == set(keys)
    # Dedup: 1000 adds collapse to far fewer runs.
    assert len(handled) < 1000


def test_add_after_fires_later_and_keeps_the_earliest() -> None:
    q = WorkQueue()
    q.add_after(A, 0.2)
    q.add_after(A, 30)  # later request never postpones the earlier one
    assert len(q) == 0 and q.delayed() == 1
    assert q.get(timeout=0.001) is None
    assert q.get(timeout=5) == A
    q.done(A)
    assert q.delayed() == 0
    q.add_after(B, 30)
    q.add_after(B, 0.05)  # an earlier request wins
    assert q.get(timeout=5) == B


def test_add_after_zero_is_add() -> None:
    q = WorkQueue()
    q.add_after(A, 0)
    assert len(q) == 1


def test_timer_fires_while_a_getter_is_already_waiting() -> None:
    q = WorkQueue()
    got: list[Key | None] = []
    taker = threading.Thread(target=lambda: got.append(q.get(timeout=5)))
    taker.start()
    time.sleep(0.02)  # the taker now sleeps with no timer known to it
    q.add_after(C, 0.05)
    taker.join(5)
    assert got == [C]


def test_backoff_grows_caps_and_resets_on_forget() -> None:
    q = WorkQueue(max_delay=5.0)
    delays = [q.add_rate_limited(A) for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert q.failures(A) == 6
    # Per key: B starts from the base.
    assert q.add_rate_limited(B) == 0.5
    q.forget(A)
    assert q.failures(A) == 0
    assert q.add_rate_limited(A) == 0.5


def test_backoff_survives_very_many_failures() -> None:
    q = WorkQueue(max_delay=60.0)
    for _ in range(5000):
        delay = q.add_rate_limited(A)
    assert delay == 60.0


def test_rate_limited_key_comes_back() -> None:
    q = WorkQueue(base_delay=0.02)
    q.add_rate_limited(A)
    assert q.get(timeout=5) == A


def test_shutdown_releases_getters_and_ignores_adds() -> None:
    q = WorkQueue()
    got: list[Key | None] = [A]
    taker = threading.Thread(target=lambda: got.__setitem__(0, q.get()))
    taker.start()
    time.sleep(0.02)
    q.shutdown()
    taker.join(5)
    assert not taker.is_alive()
    assert got == [None]
    q.add(B)
    q.add_after(B, 0.01)
    assert q.get(timeout=0.05) is None
    assert q.shutting_down


def test_wait_idle_ignores_future_delays_but_not_processing() -> None:
    q = WorkQueue()
    q.add_after(A, 30)
    assert q.wait_idle(0.01)
    q.add(B)
    assert not q.wait_idle(0.01)  # ready, nobody took it
    assert q.get(timeout=1) == B
    assert not q.wait_idle(0.01)  # being processed
    threading.Timer(0.05, q.done, args=(B,)).start()
    assert q.wait_idle(5)
