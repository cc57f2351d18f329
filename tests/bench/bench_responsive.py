"""Benchmark (issue 13, section 5): does the API stay responsive while the reconcilers work?
p50, p99 and the slowest of authenticated GETs (`/roles/`) and of `GET /compute_zone_status/`
(what the portal's dashboard polls every 2 s) from 16 clients, first with the reconcilers
idle, then during a full resync of every guest on every simulated cell plus a batch create
of 500 guests, measured in the same run.

Run: .venv/bin/python tests/bench/bench_responsive.py [--cells 50] [--domains 200]
     [--batch 500] [--seconds 10] [--concurrency 16] [--quick]
Goal: p99 under load at most 3x the idle p99, and no request over 1 s.

The nanod runs in this process (its own temp data directory, test-driver cells, the
tests' names prefix); its guests are made as a user's are (bench_resync.seed: cells, a
pool, batch creates through the API, every guest started). The load comes from a child
process (this file with --drive), so the clients never share the server's IOLoop: each of
N workers keeps one HTTP/1.1 connection and sends GETs back to back for the given
seconds, alternating the two paths; every reply must be HTTP 200 with error_code 0.
Everything stays on loopback and in the temp directory; the child is waited for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import tornado.tcpclient  # noqa: E402

from tests.bench.bench_resync import seed  # noqa: E402
from tests.bench.common import (  # noqa: E402
    QOS,
    MiB,
    add_quick,
    parse,
    start_server,
    wait_for,
)

PATHS = ("/api/v1/roles/", "/api/v1/compute_zone_status/")


# -- the child: the clients ---------------------------------------------------------------


async def worker(port: int, token: str, deadline: float, out: dict[str, list[float]],
                 errors: list[str]) -> None:
    stream = await tornado.tcpclient.TCPClient().connect("127.0.0.1", port)
    stream.set_nodelay(True)
    turn = 0
    try:
        while time.perf_counter() < deadline:
            path = PATHS[turn % len(PATHS)]
            turn += 1
            request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                       f"Nano-Session: {token}\r\n\r\n").encode()
            began = time.perf_counter()
            await stream.write(request)
            head = (await stream.read_until(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            length = next((int(v) for n, _, v in (h.partition(":") for h in head[1:])
                           if n.lower() == "content-length"), 0)
            body = await stream.read_bytes(length) if length else b""
            out[path].append(time.perf_counter() - began)
            if not head[0].startswith("HTTP/1.1 200") or json.loads(body)["error_code"]:
                errors.append(f"{path}: {head[0]} {body[:200]!r}")
    finally:
        stream.close()


async def drive(port: int, token: str, seconds: float, concurrency: int) -> dict[str, Any]:
    out: dict[str, list[float]] = {p: [] for p in PATHS}
    errors: list[str] = []
    deadline = time.perf_counter() + seconds
    await asyncio.gather(*(worker(port, token, deadline, out, errors)
                           for _ in range(concurrency)))
    return {"latencies": out, "errors": errors[:5], "error_count": len(errors)}


# -- the parent: nanod, the seeding, the two phases ----------------------------------------


def summary(latencies: list[float]) -> tuple[float, float, float, int]:
    """(p50, p99, max) in ms, and the count."""
    ordered = sorted(latencies)
    if not ordered:
        return 0.0, 0.0, 0.0, 0
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return (1000 * statistics.median(ordered), 1000 * p99, 1000 * ordered[-1], len(ordered))


async def measure(port: int, token: str, seconds: float, concurrency: int) -> dict[str, Any]:
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--drive", str(port), token, str(seconds), str(concurrency),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await child.communicate()
    if child.returncode:
        raise RuntimeError(f"the clients failed:\n{err.decode()[-2000:]}")
    result = json.loads(out)
    if result["error_count"]:
        raise RuntimeError(f"{result['error_count']} replies were errors, e.g. "
                           f"{result['errors']}")
    return result


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="nano-bench-responsive-"))
    server, client = await start_server(tmp / "data", {
        "workers": 4, "resync_seconds": 3600, "probe_seconds": 3600,
        "guest_poll_seconds": 3600})
    try:
        ids, seeded = await seed(client, tmp, args.cells, args.domains)
        print(f"seeded {len(ids)} running guests on {args.cells} cells in "
              f"{sum(seeded.values()):.0f} s", flush=True)
        idle = await measure(server.port, client.session, args.seconds, args.concurrency)

        loop = asyncio.get_running_loop()
        controller = server.controller
        enqueued = controller.resync()
        _, task = await client.call("POST", "/batch/create_guest/", {
            "name_rule": "order", "name_prefix": "late", "pool": "bench", "count": args.batch,
            "cores": 1, "memory": 64 * MiB, "disks": [16 * MiB], "auto_start": False,
            "template": "", "modules": [], "qos": QOS})
        began = time.perf_counter()
        loaded = await measure(server.port, client.session, args.seconds, args.concurrency)
        busy = not controller.wait_idle(0)
        await loop.run_in_executor(None, controller.wait_idle, 3600)
        work_seconds = time.perf_counter() - began
        await wait_for(lambda: _batch_done(client, task["id"]), 3600, 0.5, "the late batch")
    finally:
        await server.shutdown()

    print(f"load: a resync of {enqueued} keys and a batch create of {args.batch} guests; the "
          f"reconcilers were {'still busy' if busy else 'idle again'} when the "
          f"{args.seconds:g} s of measuring ended (all work done after {work_seconds:.0f} s)")
    print(f"{'path':<30} {'phase':<6} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    worst_ratio, slowest = 0.0, 0.0
    for path in PATHS:
        rows = {}
        for phase, result in (("idle", idle), ("load", loaded)):
            p50, p99, top, count = summary(result["latencies"][path])
            rows[phase] = (p50, p99, top)
            print(f"{path:<30} {phase:<6} {count:>8} {p50:>8.1f} {p99:>8.1f} {top:>8.1f}")
        ratio = rows["load"][1] / rows["idle"][1] if rows["idle"][1] else float("inf")
        worst_ratio = max(worst_ratio, ratio)
        slowest = max(slowest, rows["load"][2])
        print(f"ratio p99 load/idle {path}: {ratio:.2f}")
    print(f"ratio p99 load/idle (worst): {worst_ratio:.2f} (goal <= 3)")
    print(f"slowest request under load: {slowest:.0f} ms (goal < 1000)")


async def _batch_done(client: Any, task: str) -> bool:
    code, entries = await client.call("GET", f"/batch/create_guest/{task}")
    failed = [e for e in entries if e["status"] == "fail"]
    if failed:
        raise RuntimeError(f"guest {failed[0]['name']} failed: {failed[0].get('error')}")
    return code == 200


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--drive":
        port, token, seconds, concurrency = sys.argv[2:6]
        result = asyncio.run(drive(int(port), token, float(seconds), int(concurrency)))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=50)
    parser.add_argument("--domains", type=int, default=200, help="guests per cell")
    parser.add_argument("--batch", type=int, default=500, help="guests of the late batch")
    parser.add_argument("--seconds", type=float, default=10.0, help="of measuring, per phase")
    parser.add_argument("--concurrency", type=int, default=16)
    add_quick(parser, {"cells": 2, "domains": 10, "batch": 20, "seconds": 2.0})
    args = parse(parser)
    import tornado.ioloop

    tornado.ioloop.IOLoop.current().run_sync(lambda: run(args))


if __name__ == "__main__":
    main()
