"""Every benchmark under tests/bench/ still runs: each is run at its `--quick` size in a
subprocess with a time limit, and must end with status 0 and print its ratios (their
values are not checked: timing is measured, never asserted).

A benchmark that finds this machine lacking what it needs (no network namespaces, no
qemu:///system, no curl) exits with tests.bench.common.CANNOT_RUN and says why; that is
the one case skipped, with its reason. A benchmark still running at the limit gets SIGINT
(so its cleanup runs and it stops the nanod it started), then SIGKILL, both sent to the
process group it was started in.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.common import CANNOT_RUN

BENCH = Path(__file__).resolve().parent / "bench"
RATIO = r"(\d+\.\d\d)"

# What each prints, one pattern per ratio (or figure) it exists to measure.
EXPECTED: dict[str, list[str]] = {
    "bench_api.py": [rf"keepalive: nanod/bare throughput ratio {RATIO}",
                     rf"asynchttpclient: nanod/bare throughput ratio {RATIO}",
                     r"login POST /sessions/ \(argon2id verify\): p50 \d+ ms"],
    "bench_firewall.py": [rf"apply / raw nft -f ratio\s+{RATIO}",
                          r"one rule change \(replace 1 chain\)\s+\d+\.\d ms"],
    "bench_guests.py": [rf"ratio nanod/direct: {RATIO}",
                        r"batch create of \d+ guests on \d+ test-driver cells: \d+\.\d s",
                        rf"through nanod's websocket proxy .* ratio {RATIO}"],
    "bench_images.py": [rf"upload \(lean client\) .* {RATIO} cp ",
                        rf"upload \(curl -F\) .* {RATIO} cp ",
                        rf"download, cold \(lean client\) .* {RATIO} cp, cold source",
                        rf"download, cached \(lean\) .* {RATIO} cp ",
                        r"\d+ MiB upload\s+\d+\.\d MiB"],
    "bench_migration.py": [rf"live migration: nanod/direct time ratio {RATIO}",
                           rf"live migration: nanod/direct downtime ratio {RATIO}",
                           rf"cold migration: nanod/direct time ratio {RATIO}"],
    "bench_responsive.py": [rf"ratio p99 load/idle \(worst\): {RATIO}",
                            r"slowest request under load: \d+ ms"],
    "bench_replicas.py": [rf"split: the 3 replicas did {RATIO}, {RATIO}, {RATIO}",
                          rf"reads: 3 replicas / 1 replica throughput ratio {RATIO}",
                          r"takeover: median \d+\.\d\d s, max \d+\.\d\d s"],
    "bench_resync.py": [rf"ratio pass/raw: {RATIO}",
                        r"nanod resync pass, .*, no failure",
                        r"GET /compute_zone_status/\s+p50\s+\d+\.\d ms",
                        r"GET /compute_pool_status/\s+p50\s+\d+\.\d ms",
                        r"GET /compute_cell_status/bench/\s+p50\s+\d+\.\d ms"],
}
LIMIT = 240.0  # seconds for one quick run; together they take about a minute
BY_HAND: dict[str, str] = {
    # minutes at any size: not in the quick run, run on demand
    "bench_realos.py": "two Debian boots to SSH under TCG",
}


def test_every_benchmark_is_checked() -> None:
    assert sorted([*EXPECTED, *BY_HAND]) == sorted(p.name for p in BENCH.glob("bench_*.py"))


def run_quick(name: str) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, str(BENCH / name), "--quick"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"{name} --quick did not finish in {LIMIT:g} s:\n{out[-3000:]}")
    return proc.returncode, out


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_benchmark_runs_at_its_quick_size(name: str, figure) -> None:
    code, out = run_quick(name)
    if code == CANNOT_RUN:
        reason = out.strip().splitlines()[-1]
        print(f"{name}: {reason}")
        pytest.skip(f"{name}: {reason}")
    assert code == 0, f"{name} --quick exited with {code}:\n{out[-3000:]}"
    missing = [pattern for pattern in EXPECTED[name] if not re.search(pattern, out)]
    assert not missing, f"{name} --quick did not print {missing}:\n{out[-3000:]}"
    for pattern in EXPECTED[name]:
        figure(f"{name} --quick: {re.search(pattern, out).group(0)}")
