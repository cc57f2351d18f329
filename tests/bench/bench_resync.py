"""Benchmark (issue 3, reseeded in issue 12): one full resync pass of nanod's reconcilers
over 50 simulated cells holding 200 running guests each (10,000), against a raw libvirt
loop over the same domains, in the same run; and p50/p99 of the zone/pool/cell status
endpoints at that size.

Run: .venv/bin/python tests/bench/bench_resync.py [--cells 50] [--domains 200]
     [--requests 200] [--quick]
Goals: pass/raw ratio <= 3 (set when the pass covered the cells only; the guest
reconciler now reads and compares every guest too); status endpoints p50 < 50 ms.

The guests come to be as a user's do: a nanod in this process (its own temp data
directory, test-driver cells) gets the cells (`test:///<tmp>/cell-N.xml`), a compute pool
and, per cell, a batch create of its guests through the API; its reconciler creates every
guest (volume, definition) and starts it on request (POST /instances/{id}). Then:
- raw loop: what any tool must do at least to check the guests: on each cell, list the
  domains and read each one's state, our ownership mark and its definition. libvirt's test
  driver keeps what was defined in the connection that defined it, so the loop runs on
  nanod's open connections (it does not pay for opening them);
- resync pass: every key of every reconciler enqueued at once (as the periodic resync
  does), timed until the workers are idle. Every reconcile must succeed: a failure ends
  the benchmark with the error;
- status endpoints: `nanod serve` (reconciler off) on the same data directory.
Everything stays on loopback and in the temp directory; the nanod subprocess is stopped by
pid; nothing is left on this host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402

from tests.bench.common import (  # noqa: E402
    ADMIN,
    PASSWORD,
    QOS,
    Client,
    MiB,
    add_quick,
    free_port,
    parse,
    start_server,
    wait_for,
    write_nanod_config,
)
from tests.helpers.testdriver import write_test_cell  # noqa: E402

STATUS_PATHS = ("/compute_zone_status/", "/compute_pool_status/", "/compute_cell_status/bench/")
NANO_XMLNS = "https://nano.cloud/xmlns/guest/1"


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def raw_loop(server: Any, cells: list[str]) -> tuple[float, int]:
    """List the domains of every cell and read each one's state, ownership mark and
    definition, on the connections nanod holds."""
    store, connections = server.store, server.controller.connections
    hypervisors = [connections.link(store.cell_spec(name)).hypervisor for name in cells]

    def read_all(conn: libvirt.virConnect) -> int:
        seen = 0
        for dom in conn.listAllDomains():
            dom.info()
            try:
                dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NANO_XMLNS)
            except libvirt.libvirtError:
                pass
            dom.XMLDesc(0)
            seen += 1
        return seen

    start = time.perf_counter()
    seen = sum(hv.call("list and read every domain", read_all) for hv in hypervisors)
    return time.perf_counter() - start, seen


async def seed(client: Client, tmpdir: Path, cells: int, domains: int
               ) -> tuple[list[str], dict[str, float]]:
    """Cells, pool, guests through the API; returns the guest ids once all run, and how
    long each step took."""
    times: dict[str, float] = {}
    began = time.perf_counter()
    await client.call("POST", "/compute_pools/bench", {})
    names = [f"c{i}" for i in range(cells)]
    for i, name in enumerate(names):
        # room for the guests with the default overcommit (cores) and memory to spare
        cell = write_test_cell(tmpdir / f"cell-{i}.xml", cpus=max(4, domains),
                               memory_kib=(domains * 64 + 4096) << 10)
        await client.call("POST", f"/cells/{name}", {"libvirt_uri": cell.uri,
                                                     "virt_type": "qemu",
                                                     "storage_path": f"/sim/{name}"})
    for name in names:
        await wait_for(lambda name=name: _alive(client, name), 120, 0.1, f"cell {name} alive")
        await client.call("POST", f"/compute_pool_cells/bench/{name}", {})
    tasks = []
    for name in names:
        left = domains
        while left:  # a batch holds at most 1000 guests
            count = min(left, 1000)
            _, data = await client.call("POST", "/batch/create_guest/", {
                "name_rule": "order", "name_prefix": f"{name}-{domains - left}", "pool": "bench",
                "cell": name, "count": count, "cores": 1, "memory": 64 * MiB,
                "disks": [16 * MiB], "auto_start": False, "template": "", "modules": [],
                "qos": QOS})
            tasks.append(data["id"])
            left -= count
    times["cells and batches"] = time.perf_counter() - began
    ids: list[str] = []
    for task in tasks:
        entries = await wait_for(lambda task=task: _batch_done(client, task), 3600, 0.5,
                                 f"batch {task} created")
        ids += [e["id"] for e in entries]
    times["created"] = time.perf_counter() - began - sum(times.values())
    await asyncio.gather(*(_start(client, ids[n::8]) for n in range(8)))
    for name in names:
        await wait_for(lambda name=name: _all_running(client, name, domains), 3600, 0.5,
                       f"the guests of {name} running")
    times["started"] = time.perf_counter() - began - sum(times.values())
    return ids, times


async def _alive(client: Client, name: str) -> bool:
    return bool((await client.call("GET", f"/cells/{name}"))[1]["alive"])


async def _batch_done(client: Client, task: str) -> list[dict[str, Any]] | None:
    code, entries = await client.call("GET", f"/batch/create_guest/{task}")
    failed = [e for e in entries if e["status"] == "fail"]
    if failed:
        raise RuntimeError(f"guest {failed[0]['name']} failed: {failed[0].get('error')}")
    return entries if code == 200 else None


async def _start(client: Client, ids: list[str]) -> None:
    for guest in ids:
        await client.call("POST", f"/instances/{guest}", {})


async def _all_running(client: Client, cell: str, count: int) -> bool:
    _, rows = await client.call("GET", f"/instance_status/bench/{cell}")
    broken = [r for r in rows if r.get("phase") == "failed"]
    if broken:
        raise RuntimeError(f"guest {broken[0]['name']} failed")
    return len(rows) == count and all(r["running"] for r in rows)


def resync_pass(server: Any, timeout: float) -> tuple[float, int]:
    """Enqueue every key, time until the workers are idle; raise on any failed key."""
    controller = server.controller
    failed: list[tuple[Any, Exception]] = []
    done = [0]

    def observe(key: Any, outcome: Any) -> None:
        done[0] += 1
        if isinstance(outcome, Exception):
            failed.append((key, outcome))

    unsubscribe = controller.subscribe(observe)
    try:
        start = time.perf_counter()
        enqueued = controller.resync()
        time.sleep(0.01)
        if not controller.wait_idle(timeout):
            raise RuntimeError(f"the resync pass did not end within {timeout:g} s")
        took = time.perf_counter() - start
    finally:
        unsubscribe()
    if failed:
        key, exc = failed[0]
        raise RuntimeError(f"{len(failed)} of {done[0]} reconciles failed; {key}: "
                           f"{type(exc).__name__}: {exc}")
    if done[0] < enqueued:
        raise RuntimeError(f"only {done[0]} of {enqueued} keys were reconciled")
    return took, done[0]


async def in_process(args: argparse.Namespace, tmpdir: Path, data: Path) -> dict[str, Any]:
    server, client = await start_server(data, {
        "workers": 4, "resync_seconds": 3600, "probe_seconds": 3600,
        "guest_poll_seconds": 3600})
    try:
        ids, seeded = await seed(client, tmpdir, args.cells, args.domains)
        loop = asyncio.get_running_loop()
        names = [f"c{i}" for i in range(args.cells)]
        raw_seconds, seen = await loop.run_in_executor(None, raw_loop, server, names)
        if seen != len(ids):
            raise RuntimeError(f"the cells hold {seen} domains, nanod made {len(ids)}")
        rss_before = rss_mib()
        pass_seconds, keys = await loop.run_in_executor(None, resync_pass, server, 3600)
        return {"seeded": seeded, "guests": len(ids), "raw": raw_seconds, "pass": pass_seconds,
                "keys": keys, "rss_before": rss_before, "rss": rss_mib(),
                "workers": server.settings["reconciler"]["workers"]}
    finally:
        await server.shutdown()


def status_latencies(data: Path, tmpdir: Path, requests: int) -> list[tuple[str, float, float]]:
    """p50/p99 of each status endpoint, from a `nanod serve` on the same data directory."""
    port = free_port()
    conf = write_nanod_config(tmpdir / "serve.yaml", {
        "listen": f"127.0.0.1:{port}", "data_dir": str(data), "log_level": "warning",
        "reconciler": {"enabled": False}})
    log = tmpdir / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("nanod")), "serve",
                                 "--config", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}/api/v1"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(base + "/system/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nanod serve did not start:\n{log.read_text()}") from None
                time.sleep(0.1)
        req = urllib.request.Request(base + "/sessions/", method="POST", data=json.dumps(
            {"user": ADMIN, "password": PASSWORD}).encode())
        token = json.loads(urllib.request.urlopen(req).read())["data"]["session"]
        rows = []
        for path in STATUS_PATHS:
            times = []
            for _ in range(requests):
                t0 = time.perf_counter()
                body = urllib.request.urlopen(urllib.request.Request(
                    base + path, headers={"Nano-Session": token})).read()
                times.append((time.perf_counter() - t0) * 1000)
            reply = json.loads(body)
            if reply["error_code"]:
                raise RuntimeError(f"GET {path}: {reply['message']}")
            rows.append((path, statistics.median(times), percentile(times, 0.99)))
        return rows
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=50)
    parser.add_argument("--domains", type=int, default=200, help="guests per cell")
    parser.add_argument("--requests", type=int, default=200, help="per status endpoint")
    add_quick(parser, {"cells": 2, "domains": 5, "requests": 20})
    args = parse(parser)
    libvirt.registerErrorHandler(lambda *_: None, None)

    with tempfile.TemporaryDirectory(prefix="nano-bench-resync-") as tmp:
        tmpdir = Path(tmp)
        data = tmpdir / "data"
        got = asyncio.run(in_process(args, tmpdir, data))
        rows = status_latencies(data, tmpdir, args.requests)

    steps = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in got["seeded"].items())
    print(f"cells={args.cells} guests/cell={args.domains} guests={got['guests']} (running); "
          f"seeded through the API: {steps}")
    print(f"raw libvirt loop (list; state, mark and definition of every domain): "
          f"{got['raw']:.3f} s")
    print(f"nanod resync pass, {got['workers']} workers, {got['keys']} keys (cells, guests, "
          f"networks, firewalls, pools): {got['pass']:.3f} s, no failure")
    print(f"ratio pass/raw: {got['pass'] / got['raw']:.2f}  (goal <= 3)")
    print(f"peak RSS of this process: {got['rss']:.0f} MiB (before the pass "
          f"{got['rss_before']:.0f} MiB)")
    for path, p50, p99 in rows:
        print(f"GET {path:<32} p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  (goal p50 < 50 ms)")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
