"""Controller with real threads: dedup, exclusion per key, backoff, requeue_after, resync,
run_once order and error capture, clean stop. Also the contract values the loop carries."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable

import pytest

from reconciler.contract import (
    READY,
    Action,
    Key,
    Result,
    Verb,
    get_condition,
    set_condition,
)
from reconciler.loop import Controller, Outcome
from state.errors import Transient

WAIT = 5.0  # generous bound for "eventually"; tests finish far sooner


class Recorder:
    """A reconciler that records every call and can be told how to behave per call.

    `behave(key, n)` gets the key and how many times it was reconciled before, and returns
    a Result or raises. `gate`, when given, is waited on inside every reconcile.
    """

    def __init__(
        self,
        kind: str,
        ids: Iterable[str] = (),
        *,
        behave: Callable[[Key, int], Result | None] | None = None,
        gate: threading.Event | None = None,
        hold: float = 0.0,
    ) -> None:
        self.kind = kind
        self.ids = list(ids)
        self.behave = behave
        self.gate = gate
        self.hold = hold
        self.entered = threading.Event()
        self.calls: list[Key] = []
        self.active: Counter[Key] = Counter()
        self.overlaps: list[Key] = []
        self.lock = threading.Lock()

    def keys(self) -> list[Key]:
        return [Key(self.kind, i) for i in self.ids]

    def reconcile(self, key: Key) -> Result:
        with self.lock:
            before = self.calls.count(key)
            self.calls.append(key)
            self.active[key] += 1
            if self.active[key] > 1:
                self.overlaps.append(key)
        try:
            self.entered.set()
            if self.gate is not None:
                assert self.gate.wait(WAIT)
            if self.hold:
                time.sleep(self.hold)
            result = self.behave(key, before) if self.behave else None
            return Result() if result is None else result
        finally:
            with self.lock:
                self.active[key] -= 1


@pytest.fixture
def controllers() -> Iterable[list[Controller]]:
    """Controllers created by a test; stopped afterwards even if the test fails."""
    made: list[Controller] = []
    yield made
    for controller in made:
        assert controller.stop(WAIT)


def make(
    made: list[Controller],
    *reconcilers: Recorder,
    workers: int = 4,
    resync_seconds: float = 3600.0,
    base_backoff: float = 0.5,
) -> Controller:
    """A controller the fixture stops; no periodic resync unless asked for."""
    controller = Controller(
        reconcilers, workers=workers, resync_seconds=resync_seconds, base_backoff=base_backoff
    )
    made.append(controller)
    return controller


# -- run_once ----------------------------------------------------------------------------------


def test_run_once_order_and_error_capture() -> None:
    def fail_b(key: Key, _: int) -> Result | None:
        if key.id == "b":
            raise Transient("cell unreachable")
        if key.id == "c":
            raise RuntimeError("bug")
        return Result(requeue_after=1.0) if key.id == "y" else None

    guests = Recorder("guest", ["c", "b", "a", "b"], behave=fail_b)
    cells = Recorder("cell", ["z", "y"], behave=fail_b)
    controller = Controller([guests, cells])
    seen: list[Key] = []
    controller.subscribe(lambda key, _: seen.append(key))

    outcomes = controller.run_once()

    keys = [key for key, _ in outcomes]
    # Registration order first (guest before cell), then key order, each key once.
    assert [str(k) for k in keys] == ["guest/a", "guest/b", "guest/c", "cell/y", "cell/z"]
    by_key = dict(outcomes)
    assert by_key[Key("guest", "a")] == Result()
    assert isinstance(by_key[Key("guest", "b")], Transient)
    assert isinstance(by_key[Key("guest", "c")], RuntimeError)
    assert by_key[Key("cell", "y")] == Result(requeue_after=1.0)
    assert seen == keys
    # Synchronous and final: nothing queued, retried or delayed.
    assert len(controller.queue) == 0 and controller.queue.delayed() == 0


def test_run_once_refused_while_running(controllers: list[Controller]) -> None:
    controller = make(controllers, Recorder("guest"))
    controller.start()
    with pytest.raises(RuntimeError):
        controller.run_once()
    assert controller.stop(WAIT)
    assert controller.run_once() == []


def test_two_reconcilers_for_one_kind_is_an_error() -> None:
    with pytest.raises(ValueError):
        Controller([Recorder("guest"), Recorder("guest")])


# -- the worker loop ---------------------------------------------------------------------------


def test_dedup_and_requeue_of_a_key_added_while_processing(
    controllers: list[Controller],
) -> None:
    gate = threading.Event()
    guests = Recorder("guest", gate=gate)
    controller = make(controllers, guests, workers=1)
    controller.start()
    x, a = Key("guest", "x"), Key("guest", "a")

    controller.enqueue(x)
    assert guests.entered.wait(WAIT)  # the only worker is now busy with x
    for _ in range(10):
        controller.enqueue(a)
    for _ in range(3):
        controller.enqueue(x)
    gate.set()

    assert controller.wait_idle(WAIT)
    # a ten times -> once; x three times during its run -> once more, after a.
    assert guests.calls == [x, a, x]


def test_one_key_never_on_two_workers(controllers: list[Controller]) -> None:
    guests = Recorder("guest", hold=0.002)
    controller = make(controllers, guests, workers=4)
    controller.start()
    keys = [Key("guest", str(n)) for n in range(3)]

    def hammer() -> None:
        for _ in range(100):
            for key in keys:
                controller.enqueue(key)

    producers = [threading.Thread(target=hammer) for _ in range(3)]
    for thread in producers:
        thread.start()
    for thread in producers:
        thread.join(WAIT)
    assert controller.wait_idle(WAIT)

    assert guests.overlaps == []
    assert set(guests.calls) == set(keys)
    assert len(guests.calls) < 900  # dedup collapsed the storm


def test_different_keys_run_in_parallel(controllers: list[Controller]) -> None:
    # Each reconcile waits for the other to arrive: only possible if both run at once.
    barrier = threading.Barrier(2, timeout=WAIT)

    def meet(key: Key, n: int) -> None:
        barrier.wait()

    guests = Recorder("guest", behave=meet)
    controller = make(controllers, guests, workers=2)
    outcomes: list[Outcome] = []
    controller.subscribe(lambda key, outcome: outcomes.append(outcome))
    controller.start()
    controller.enqueue(Key("guest", "a"))
    controller.enqueue(Key("guest", "b"))
    assert controller.wait_idle(WAIT)
    assert outcomes == [Result(), Result()]  # a broken barrier would have raised
    assert sorted(guests.calls) == [Key("guest", "a"), Key("guest", "b")]


def test_errors_back_off_and_success_resets(controllers: list[Controller]) -> None:
    def flaky(key: Key, n: int) -> Result | None:
        if n < 2:
            raise Transient(f"attempt {n}")
        return None

    guests = Recorder("guest", behave=flaky)
    controller = make(controllers, guests, base_backoff=0.01)
    key = Key("guest", "a")
    trail: list[tuple[str, int]] = []
    finished = threading.Event()

    def observe(_: Key, outcome: Outcome) -> None:
        trail.append((type(outcome).__name__, controller.queue.failures(key)))
        if isinstance(outcome, Result):
            finished.set()

    controller.subscribe(observe)
    controller.start()
    controller.enqueue(key)
    assert finished.wait(WAIT)
    # Retried without any new trigger, the failure count growing, then reset by success.
    assert trail == [("Unavailable", 1), ("Unavailable", 2), ("Result", 0)]


def test_max_backoff_caps_the_delay() -> None:
    controller = Controller([Recorder("guest")], max_backoff=0.75)
    key = Key("guest", "a")
    assert [controller.queue.add_rate_limited(key) for _ in range(3)] == [0.5, 0.75, 0.75]


def test_requeue_after_brings_the_key_back(controllers: list[Controller]) -> None:
    def poll(key: Key, n: int) -> Result:
        return Result(requeue_after=0.02) if n < 2 else Result()

    guests = Recorder("guest", behave=poll)
    controller = make(controllers, guests)
    third = threading.Event()

    def observe(key: Key, _: Outcome) -> None:
        if len(guests.calls) >= 3:
            third.set()

    controller.subscribe(observe)
    controller.start()
    controller.enqueue(Key("guest", "a"))

    assert third.wait(WAIT)
    assert controller.wait_idle(WAIT)
    assert guests.calls == [Key("guest", "a")] * 3
    assert controller.queue.delayed() == 0


def test_resync_reconciles_every_key_repeatedly(controllers: list[Controller]) -> None:
    guests = Recorder("guest", ["a", "b", "c"])
    cells = Recorder("cell", ["x"])
    controller = make(controllers, guests, cells, resync_seconds=0.05)
    wanted = set(guests.keys() + cells.keys())
    counts: Counter[Key] = Counter()
    twice = threading.Event()
    lock = threading.Lock()

    def observe(key: Key, _: Outcome) -> None:
        with lock:
            counts[key] += 1
            if all(counts[k] >= 2 for k in wanted):
                twice.set()

    controller.subscribe(observe)
    controller.start()  # no enqueue at all: only the resync thread triggers
    assert twice.wait(WAIT)
    assert set(counts) == wanted


def test_resync_survives_a_failing_keys_listing() -> None:
    class Broken(Recorder):
        def keys(self) -> list[Key]:
            raise Transient("store down")

    controller = Controller([Broken("cell"), Recorder("guest", ["a", "b"])])
    assert controller.resync() == 2
    assert len(controller.queue) == 2


def test_unknown_kind_is_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    controller = Controller([Recorder("guest")])
    with caplog.at_level(logging.WARNING, logger="reconciler.loop"):
        controller.enqueue(Key("image", "i1"))
        controller.enqueue(Key("image", "i2"))
    assert len(controller.queue) == 0
    assert sum("image" in r.getMessage() for r in caplog.records) == 1


def test_failing_observer_does_not_stop_the_worker(controllers: list[Controller]) -> None:
    guests = Recorder("guest")
    controller = make(controllers, guests, workers=1)

    def broken(key: Key, outcome: Outcome) -> None:
        raise RuntimeError("observer bug")

    controller.subscribe(broken)
    controller.start()
    controller.enqueue(Key("guest", "a"))
    assert controller.wait_idle(WAIT)
    controller.enqueue(Key("guest", "b"))
    assert controller.wait_idle(WAIT)
    assert guests.calls == [Key("guest", "a"), Key("guest", "b")]


def test_unsubscribe_stops_notifications() -> None:
    controller = Controller([Recorder("guest", ["a"])])
    seen: list[Key] = []
    unsubscribe = controller.subscribe(lambda key, _: seen.append(key))
    controller.run_once()
    unsubscribe()
    controller.run_once()
    assert seen == [Key("guest", "a")]


def test_stop_finishes_the_running_reconcile_and_joins_every_thread() -> None:
    gate = threading.Event()
    guests = Recorder("guest", gate=gate)
    controller = Controller([guests], workers=3, resync_seconds=3600.0)
    done: list[Outcome] = []
    controller.subscribe(lambda key, outcome: done.append(outcome))
    controller.start()
    assert len(controller.threads) == 4 and all(t.is_alive() for t in controller.threads)
    controller.enqueue(Key("guest", "a"))
    assert guests.entered.wait(WAIT)
    threading.Timer(0.05, gate.set).start()

    assert controller.stop(WAIT)

    assert not any(t.is_alive() for t in controller.threads)
    assert done == [Result()]
    controller.enqueue(Key("guest", "b"))  # after stop: ignored, no error
    assert guests.calls == [Key("guest", "a")]


# -- contract values ---------------------------------------------------------------------------


def test_set_condition_moves_last_transition_only_on_a_flip() -> None:
    t1 = dt.datetime(2024, 5, 1, 10, 0, 0)
    t2 = "2024-05-01 10:05:00"
    first = set_condition([], READY, False, "Creating", "defining domain", t1)
    assert first == [
        {
            "type": "Ready",
            "status": False,
            "reason": "Creating",
            "message": "defining domain",
            "last_transition": "2024-05-01 10:00:00",
        }
    ]
    other = {"type": "Placed", "status": True, "reason": "", "message": "", "last_transition": ""}
    stored = [other, *first]
    same = set_condition(stored, READY, False, "Creating", "uploading image", t2)
    assert same[1]["last_transition"] == "2024-05-01 10:00:00"
    assert same[1]["message"] == "uploading image"
    assert same[0] == other  # other conditions keep their place and content
    flipped = set_condition(same, READY, True, "Running", "", t2)
    assert flipped[1]["status"] is True
    assert flipped[1]["last_transition"] == t2
    assert stored[1]["message"] == "defining domain"  # pure: the input is untouched
    ready = get_condition(flipped, READY)
    assert ready is not None and ready.status and ready.reason == "Running"
    assert get_condition(flipped, "Missing") is None


def test_action_describes_itself_without_secrets() -> None:
    key = Key("guest", "abc")
    update = Action(
        Verb.UPDATE,
        key,
        before={"cores": 2, "name": "vm", "admin_password": "old"},
        after={"cores": 4, "name": "vm", "admin_password": "new"},
        reason="spec changed",
        live=True,
    )
    text = update.describe()
    assert text == (
        "update guest/abc: admin_password (sensitive) -> (sensitive), cores 2 -> 4 "
        "(live; spec changed)"
    )
    assert "old" not in text and "new" not in text
    assert update.changes() == [("admin_password", "old", "new"), ("cores", 2, 4)]
    assert str(Action(Verb.CREATE, key, None, {"cores": 2})) == "create guest/abc"
    assert str(Verb.DELETE) == "delete" and Verb("restart") is Verb.RESTART
