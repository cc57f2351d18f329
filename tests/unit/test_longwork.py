"""The long-work lane (reconciler/longwork.py) and the daemon thread pool under it
(reconciler/threads.py): a job runs once per id however often it is asked for, reports
where it is, wakes its owner when it ends, hands its result (or error) back once; the lane
is bounded; idle threads end; a thread stuck for ever does not keep the process from
exiting."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from reconciler.contract import Key
from reconciler.longwork import InProgress, LongWork
from reconciler.threads import DaemonThreads
from state.errors import Permanent

OWNER = Key("guest", "g1")


def wait_for(check, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_job_runs_once_reports_progress_and_hands_its_result_back_once():
    woken: list[Key] = []
    lane = LongWork(woken.append, workers=1)
    gate = threading.Event()
    runs = []

    def job(report):
        runs.append(1)
        report(3, 4)
        gate.wait(5)
        return "volume-1"

    with pytest.raises(InProgress, match="waiting|running"):
        lane.run(OWNER, "send/x", "send disk image x", job)
    wait_for(lambda: lane.running() and lane.running()[0].done == 3)
    with pytest.raises(InProgress, match=r"send disk image x: running for \d+ s, 75%"):
        lane.run(OWNER, "send/x", "send disk image x", job)
    assert woken == []
    gate.set()
    wait_for(lambda: woken == [OWNER])
    assert lane.run(OWNER, "send/x", "send disk image x", job) == "volume-1"
    assert runs == [1]
    # handed back once: asked again, it is new work
    with pytest.raises(InProgress):
        lane.run(OWNER, "send/x", "send disk image x", job)
    wait_for(lambda: len(runs) == 2)


def test_a_failed_job_raises_its_error_once():
    woken: list[Key] = []
    lane = LongWork(woken.append, workers=1)

    def job(report):
        raise Permanent("the image arrived damaged")

    with pytest.raises(InProgress):
        lane.run(OWNER, "j", "copy", job)
    wait_for(lambda: woken == [OWNER])
    with pytest.raises(Permanent, match="damaged"):
        lane.run(OWNER, "j", "copy", job)
    assert lane.running() == []


def test_the_lane_is_bounded_and_says_what_waits():
    lane = LongWork(lambda key: None, workers=2)
    gate = threading.Event()
    for n in range(3):
        with pytest.raises(InProgress):
            lane.run(OWNER, f"j{n}", f"job {n}", lambda report: gate.wait(5))
    wait_for(lambda: sum(j.started_at is not None for j in lane.running()) == 2)
    time.sleep(0.1)
    started = sorted(j.job_id for j in lane.running() if j.started_at is not None)
    assert started == ["j0", "j1"]
    with pytest.raises(InProgress, match="job 2: waiting 0 s for a long-work thread"):
        lane.run(OWNER, "j2", "job 2", lambda report: None)
    gate.set()
    wait_for(lambda: not lane.running())


def test_idle_threads_end():
    pool = DaemonThreads(3, "t", idle_seconds=0.2)
    futures = [pool.submit(time.sleep, 0.05) for _ in range(5)]
    assert [f.result(5) for f in futures] == [None] * 5
    assert 1 <= pool.thread_count() <= 3
    wait_for(lambda: pool.thread_count() == 0)
    assert pool.submit(lambda: 42).result(5) == 42  # and start again when work comes


def test_a_stuck_thread_does_not_keep_the_process_from_exiting():
    script = ("import threading, time\n"
              "from reconciler.threads import DaemonThreads\n"
              "pool = DaemonThreads(1, 'stuck')\n"
              "pool.submit(threading.Event().wait)\n"
              "time.sleep(0.2)\n"
              "print('leaving')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=20, cwd=str(__import__("pathlib").Path(__file__).parents[2]))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "leaving"


def test_the_job_of_an_owner_is_known_while_it_runs():
    lane = LongWork(lambda key: None, workers=1)
    gate = threading.Event()
    other = Key("guest", "g2")
    with pytest.raises(InProgress):
        lane.run(OWNER, "copy", "copy a volume", lambda report: gate.wait(5))
    assert lane.running_for(OWNER).job_id == "copy"
    assert lane.running_for(other) is None
    gate.set()
    wait_for(lambda: lane.running_for(OWNER) is None)


def test_a_discarded_result_is_not_handed_to_the_next_caller():
    """A send whose volume was seen by other means, then dropped from the cell: the next
    guest needing it must send it again, not get the old job's answer (issue 15's bench
    found a second guest of one image failing for good)."""
    lane = LongWork(lambda key: None, workers=1)
    runs: list[int] = []

    def send(report):
        runs.append(1)
        return "volume"

    with pytest.raises(InProgress):
        lane.run(OWNER, "send/x", "send", send)
    wait_for(lambda: not lane.running())
    lane.discard("send/x")
    with pytest.raises(InProgress):  # started again, not the old result
        lane.run(Key("guest", "g2"), "send/x", "send", send)
    wait_for(lambda: not lane.running())
    assert lane.run(Key("guest", "g2"), "send/x", "send", send) == "volume"
    assert len(runs) == 2
    lane.discard("send/unknown")  # nothing to forget: nothing happens
