"""Benchmark (issue 17): several `nanod serve` replicas on one PostgreSQL store, measured
against one replica on the same store in the same run:
1. resync split: one full resync of N guests on C test-driver cells, done by one replica,
   then by three: how many reconciles each replica did (the `_count` of
   `nano_reconcile_duration_seconds` in its /metrics) and the wall time until every queue
   is idle (`nano_workqueue_depth` 0). The resync measured is the one a replica does at
   start (no periodic resync runs during the bench): one replica's first start; for
   three, a restart after kill -9 once they are spread, where each reclaims its own
   leases at its first renewal, so nothing moves while they resync;
2. authenticated reads: the same number of GET /api/v1/compute_pools/ (header
   `Nano-Session`), at a fixed concurrency, all to one replica and round-robin over three;
3. takeover after kill -9: with three replicas spread over the cells, one is killed and a
   survivor's GET /api/v1/replicas/ is read every 0.1 s until live replicas hold every cell
   the victim held; a new replica joins before the next run.

Run: NANO_TEST_POSTGRES=postgresql://... .venv/bin/python tests/bench/bench_replicas.py
     [--guests 10000] [--cells 50] [--requests 3000]
     [--concurrency 15] [--takeovers 5] [--quick]
NANO_BENCH_GUESTS, NANO_BENCH_CELLS and NANO_BENCH_TAKEOVERS change the defaults of
--guests, --cells and --takeovers. Without NANO_TEST_POSTGRES it cannot run (exit 77).
Goals (issue 17): each of three replicas does about a third of the reconciles of one
resync; takeover within the lease TTL plus one renewal. Timing is printed, never asserted.

The guests come to be as a user's do, once, before any replica runs: a nanod in this
process on the bench's own PostgreSQL schema gets the cells, a pool and, per cell, a batch
create through the API; its reconciler makes every guest (volume, definition; shut off).
A test-driver cell (`test:///FILE.xml`) is private to the process that opens it, so what
that nanod made on each cell is then written into the cell's node file (domains, the
storage pool and its volumes): every replica that opens a cell later finds it as the
seeding nanod left it, converged, and a resync is the steady-state pass it is in
production. The seeding nanod stops cleanly (its leases given back) before the replicas
start. The replicas (tests/helpers/replicas.py) are child processes stopped by pid; the
schema is dropped and the temp directory removed at the end, however the run ends.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402
import tornado.tcpclient  # noqa: E402

from tests.api.test_replicas import spread, until  # noqa: E402
from tests.bench.bench_api import Budget, Run  # noqa: E402
from tests.bench.common import (  # noqa: E402
    QOS,
    MiB,
    add_quick,
    cannot_run,
    nanod_settings,
    parse,
    wait_for,
)
from tests.conftest import PG_URL, Api, _postgres, postgres_schema_url  # noqa: E402
from tests.helpers.replicas import Replica, Replicas  # noqa: E402
from tests.helpers.testdriver import write_test_cell  # noqa: E402

TTL, RENEW = 6.0, 2.0
READ_PATH = "/api/v1/compute_pools/"
RUNSTATE_SHUTOFF = 5  # virDomainState VIR_DOMAIN_SHUTOFF, for <test:runstate>
TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
POLL = 0.5  # seconds between two scrapes of every replica's /metrics


def settings() -> dict[str, Any]:
    """What every replica runs with: short leases, and no periodic work (resync, probes and
    guest polls hourly) so that what a replica reconciles from its start until it is idle
    is its start-up resync and nothing else."""
    return {
        "replicas": {"lease_ttl_seconds": TTL, "renew_seconds": RENEW},
        "reconciler": {"enabled": True, "workers": 4, "resync_seconds": 3600,
                       "probe_seconds": 3600, "offline_after": 3, "guest_poll_seconds": 3600},
        "session_timeout": 3600,
        "log_level": "warning",
    }


# -- seeding -------------------------------------------------------------------------------


async def seed(url: str, tmpdir: Path, guests: int, cells: int) -> dict[str, int]:
    """Cells, pool and guests through the API of a nanod in this process on the store at
    `url`; then each cell's node file gets what that nanod made on it. Returns the number
    of guests per cell."""
    settings_ = nanod_settings(tmpdir / "seed", {"workers": 4, "resync_seconds": 3600,
                                                 "probe_seconds": 3600,
                                                 "guest_poll_seconds": 3600})
    settings_["database"] = url
    settings_["replicas"] = {**settings_["replicas"], "id": "seed"}
    from nanod.server import Server

    server = Server(settings_)
    server.listen("127.0.0.1", 0)
    try:
        client = Api(f"http://127.0.0.1:{server.port}")
        await client.ok("POST", "/system/", {"user": "admin", "password": "Adm1nPassword"},
                        session="")
        await client.login()
        await client.ok("POST", "/compute_pools/bench", {})
        names = [f"c{i:02d}" for i in range(cells)]
        per_cell = {name: guests // cells + (1 if i < guests % cells else 0)
                    for i, name in enumerate(names)}
        files: dict[str, tuple[Path, str]] = {}
        for name in names:
            count = per_cell[name]
            cell = write_test_cell(tmpdir / f"{name}.xml", cpus=max(4, count),
                                   memory_kib=(count * 64 + 4096) << 10)
            files[name] = (cell.path, cell.path.read_text())
            await client.ok("POST", f"/cells/{name}", {"libvirt_uri": cell.uri,
                                                       "virt_type": "qemu",
                                                       "storage_path": f"/sim/{name}"})
        for name in names:
            async def alive(name: str = name) -> bool:
                return bool((await client.ok("GET", f"/cells/{name}"))["alive"])
            await wait_for(alive, 120, 0.1, f"cell {name} alive")
            await client.ok("POST", f"/compute_pool_cells/bench/{name}", None)
        tasks = []
        for name in names:
            left = per_cell[name]
            while left:  # a batch holds at most 1000 guests
                count = min(left, 1000)
                data = await client.ok("POST", "/batch/create_guest/", {
                    "name_rule": "order", "name_prefix": f"{name}-{per_cell[name] - left}",
                    "pool": "bench", "cell": name, "count": count, "cores": 1,
                    "memory": 64 * MiB, "disks": [16 * MiB], "auto_start": False,
                    "template": "", "modules": [], "qos": QOS})
                tasks.append(data["id"])
                left -= count
        for task in tasks:
            async def done(task: str = task) -> bool:
                reply = await client.call("GET", f"/batch/create_guest/{task}")
                failed = [e for e in reply.data if e["status"] == "fail"]
                if failed:
                    raise RuntimeError(f"guest {failed[0]['name']} failed: "
                                       f"{failed[0].get('error')}")
                return reply.status == 200
            await wait_for(done, 3600, 0.5, f"batch {task} created")
        if not server.controller.wait_idle(600):
            raise RuntimeError("the seeding nanod did not settle")
        loop = asyncio.get_running_loop()
        for name in names:
            hypervisor = server.controller.connections.link(
                server.store.cell_spec(name)).hypervisor
            made = await loop.run_in_executor(None, hypervisor.call,
                                              "read what was made", read_cell)
            if made.count("<domain ") != per_cell[name]:
                raise RuntimeError(f"cell {name} holds {made.count('<domain ')} domains, "
                                   f"{per_cell[name]} guests were made")
            path, original = files[name]
            path.write_text(original.replace("</node>", made + "</node>"))
        return per_cell
    finally:
        await server.shutdown()  # its leases are given back: the replicas need not wait


def read_cell(conn: libvirt.virConnect) -> str:
    """The domains, storage pools (with their volumes) and networks other than `default`
    of a test-driver connection, as `<node>` children: what a fresh open of the cell's node
    file then holds."""
    parts = []
    for dom in conn.listAllDomains():
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
        xml = xml.replace("<domain ", f"<domain xmlns:test='{TEST_NS}' ", 1)
        if not dom.isActive():
            xml = xml.replace("</domain>", f"<test:runstate>{RUNSTATE_SHUTOFF}"
                              "</test:runstate></domain>")
        parts.append(xml)
    for pool in conn.listAllStoragePools():
        volumes = "".join(v.XMLDesc(0) for v in pool.listAllVolumes())
        parts.append(pool.XMLDesc(0).replace("</pool>", volumes + "</pool>"))
    for net in conn.listAllNetworks():
        if net.name() != "default":  # the node file has that one already
            parts.append(net.XMLDesc(0))
    return "".join(parts)


# -- 1. resync split -----------------------------------------------------------------------


@dataclass
class Sample:
    at: float
    counts: dict[str, float]  # kind -> reconciles done (the histogram's _count), all results
    failed: float
    depth: float
    created: float  # nano_guest_domains_created


SERIES = re.compile(r'^(nano_\w+?)(?:_total)?(?:\{([^}]*)\})? (\S+)$')


async def sample(replica: Replica) -> Sample:
    body = await asyncio.get_running_loop().run_in_executor(None, _get, replica.url + "/metrics")
    counts: dict[str, float] = {}
    failed = depth = created = 0.0
    for line in body.splitlines():
        match = SERIES.match(line)
        if not match:
            continue
        name, labels, value = match.group(1), match.group(2) or "", float(match.group(3))
        if name == "nano_reconcile_duration_seconds_count":
            kind = re.search(r'kind="([^"]*)"', labels)
            key = kind.group(1) if kind else "?"
            counts[key] = counts.get(key, 0.0) + value
            if 'result="ok"' not in labels:
                failed += value
        elif name == "nano_workqueue_depth":
            depth += value
        elif name == "nano_guest_domains_created":
            created += value
    return Sample(time.monotonic(), counts, failed, depth, created)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return reply.read().decode()


def total(s: Sample) -> float:
    return sum(s.counts.values())


@dataclass
class Pass:
    replica: str
    seconds: float  # from the replicas answering to this one's last counted reconcile
    reconciles: dict[str, float]
    failed: float
    created: float


async def one_pass(replicas: list[Replica], timeout: float) -> list[Pass]:
    """Count what freshly started `replicas` reconcile until every queue is empty and no
    count moved for three scrapes in a row (the counts of a new process start at 0)."""
    began = time.monotonic()
    deadline = began + timeout
    last: list[Sample] | None = None
    moved = [began] * len(replicas)
    quiet = 0
    while True:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the replicas did not settle within {timeout:g} s")
        now = list(await asyncio.gather(*(sample(r) for r in replicas)))
        if last is not None:
            for i, (n, p) in enumerate(zip(now, last, strict=True)):
                if total(n) != total(p):
                    moved[i] = (n.at + p.at) / 2
            still = all(n.depth == 0 and total(n) == total(p) and total(n) > 0
                        for n, p in zip(now, last, strict=True))
            quiet = quiet + 1 if still else 0
            if quiet >= 3:
                return [Pass(r.id, t - began, dict(s.counts), s.failed, s.created)
                        for r, t, s in zip(replicas, moved, now, strict=True)]
        last = now
        await asyncio.sleep(POLL)


async def restart(group: Replicas) -> None:
    """kill -9 every replica, then start them again under the same ids, ports and data
    directories: each reclaims the leases it held at its first renewal (its own, still
    unexpired) and its start-up resync covers exactly its share."""
    for replica in group.members:
        replica.kill()
    for replica in group.members:
        replica.start()
    for replica in group.members:
        await replica.wait_ready()


async def resync_split(url: str, tmpdir: Path, count: int, cells: list[str],
                       groups: list[Replicas]) -> tuple[list[Pass], Replicas]:
    """`count` replicas on the seeded store; the full resync of their start-up, measured.
    One replica alone holds every lease from its first renewal, so its first start is
    measured; several first spread the cells (handing leases over while they resync), so
    once spread and idle they are killed and restarted and that start is measured."""
    group = Replicas(tmpdir / f"x{count}", url, settings())
    groups.append(group)
    await group.start(count)
    if count > 1:
        api = Api(group[0].url)
        await api.login()
        await spread(api, count, cells)
        await one_pass(group.members, 1800)
        await restart(group)
        measured = await one_pass(group.members, 1800)
        await spread(api, count, cells)  # still as before the restart (each reclaimed its own)
        return measured, group
    return await one_pass(group.members, 1800), group


def print_split(label: str, passes: list[Pass], guests: int, owners: dict[str, list[str]],
                per_cell: dict[str, int]) -> tuple[float, float]:
    everything = sum(sum(p.reconciles.values()) for p in passes)
    wall = max(p.seconds for p in passes)
    print(f"{label}:")
    for p in passes:
        done = sum(p.reconciles.values())
        cells = owners.get(p.replica, [])
        kinds = ", ".join(f"{k} {v:.0f}" for k, v in sorted(p.reconciles.items()))
        print(f"  {p.replica}: {done:6.0f} reconciles ({100 * done / everything:5.1f} %: "
              f"{kinds}); {len(cells)} cells holding {sum(per_cell[c] for c in cells)} "
              f"guests; idle after {p.seconds:6.1f} s; failed {p.failed:.0f}, domains "
              f"defined {p.created:.0f}")
    print(f"  all: {everything:.0f} reconciles for {guests} guests on {len(per_cell)} cells; "
          f"every queue idle after {wall:.1f} s")
    return everything, wall


# -- 2. authenticated reads ----------------------------------------------------------------


async def reader(ports: list[int], first: int, token: str, expected: dict[int, bytes],
                 budget: Budget, run: Run, served: dict[int, int]) -> None:
    """One keep-alive connection to each of `ports`; request i goes to
    ports[(first + i) % len(ports)]. A reply other than 200 with the expected body
    counts as an error."""
    streams = {}
    for port in ports:
        stream = await tornado.tcpclient.TCPClient().connect("127.0.0.1", port)
        stream.set_nodelay(True)
        streams[port] = stream
    i = first
    try:
        while budget.take():
            port = ports[i % len(ports)]
            i += 1
            stream = streams[port]
            began = time.perf_counter()
            await stream.write((f"GET {READ_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                f"Nano-Session: {token}\r\n\r\n").encode())
            head = (await stream.read_until(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            body = await stream.read_bytes(length) if length else b""
            run.latencies.append(time.perf_counter() - began)
            served[port] = served.get(port, 0) + 1
            if not head[0].startswith("HTTP/1.1 200") or body != expected[port]:
                run.errors += 1
    finally:
        for stream in streams.values():
            stream.close()


async def reads(ports: list[int], token: str, requests: int, concurrency: int
                ) -> tuple[Run, dict[int, int]]:
    expected = {}
    for port in ports:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{READ_PATH}",
                                         headers={"Nano-Session": token})
        with urllib.request.urlopen(request, timeout=30) as reply:
            expected[port] = reply.read()
    # warm-up, not measured: the connections and each replica's first session lookups
    await asyncio.gather(*(reader(ports, w, token, expected, Budget(20, 10), Run("w", "w"), {})
                           for w in range(concurrency)))
    run, served = Run(",".join(map(str, ports)), "keepalive"), {}
    budget = Budget(requests, 600)
    began = time.perf_counter()
    await asyncio.gather(*(reader(ports, w, token, expected, budget, run, served)
                           for w in range(concurrency)))
    run.seconds = time.perf_counter() - began
    return run, served


# -- 3. takeover ---------------------------------------------------------------------------


async def takeovers(group: Replicas, cells: list[str], runs: int) -> list[float]:
    """Kill -9 one of three spread replicas and time until live replicas hold all its
    cells, `runs` times; a new replica joins after each."""
    times = []
    for run in range(runs):
        live = group.live()
        api = Api(live[0].url)
        await api.login()
        view = await spread(api, 3, cells)
        victim = live[run % len(live)]
        lost = set(next(r["cells"] for r in view if r["id"] == victim.id))
        survivor = Api(next(r for r in live if r is not victim).url)
        survivor.session = api.session
        victim.kill()
        killed = time.monotonic()

        async def taken_over(survivor: Api = survivor, victim: Replica = victim,
                             lost: set[str] = lost) -> bool:
            held = {c for r in await survivor.ok("GET", "/replicas/")
                    if r["alive"] and r["id"] != victim.id for c in r["cells"]}
            return lost <= held
        await until(taken_over, timeout=3 * TTL + 10, every=0.1,
                    what=f"the cells of {victim.id} taken over")
        times.append(time.monotonic() - killed)
        print(f"  run {run + 1}: killed {victim.id} holding {len(lost)} cells; taken over "
              f"after {times[-1]:.2f} s")
        await group.start(1)  # back to three for the next run
    return times


# -- main ----------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, url: str, tmpdir: Path, groups: list[Replicas]
                ) -> None:
    began = time.monotonic()
    per_cell = await seed(url, tmpdir, args.guests, args.cells)
    cells = sorted(per_cell)
    print(f"seeded {args.guests} guests (created, shut off) on {args.cells} test-driver "
          f"cells through the API of one nanod in this process: {time.monotonic() - began:.1f} "
          "s; each cell's node file then holds what was made on it")
    print(f"every replica: lease TTL {TTL:g} s, renewal every {RENEW:g} s, 4 workers; "
          "resync, probes and guest polls hourly (none during the run)")
    print(f"this machine has {os.cpu_count()} CPUs, shared by the replicas, PostgreSQL and "
          "this client: wall time is shown, not the measure; the split of the work is")

    print("\n1. one full resync: what each replica reconciles from its start until every "
          "queue is idle (nano_reconcile_duration_seconds_count in its /metrics; a replica "
          "resyncs its keys at start; three replicas are measured at a restart after kill -9, "
          "where each reclaims its own cells at once)")
    one, group = await resync_split(url, tmpdir, 1, cells, groups)
    alone, wall_one = print_split("1 replica", one, args.guests, {one[0].replica: cells},
                                  per_cell)
    group.stop()
    three, group = await resync_split(url, tmpdir, 3, cells, groups)
    api = Api(group[0].url)
    await api.login()
    owners = {r["id"]: r["cells"] for r in await api.ok("GET", "/replicas/") if r["alive"]}
    _, wall_three = print_split("3 replicas", three, args.guests, owners, per_cell)
    shares = [sum(p.reconciles.values()) / alone for p in three]
    print(f"split: the 3 replicas did {', '.join(f'{s:.2f}' for s in shares)} of the "
          f"reconciles one replica did alone (ideal 0.33 each); together {sum(shares):.2f}")
    print(f"wall time of one resync, 3 replicas / 1 replica: {wall_three / wall_one:.2f} "
          f"({wall_three:.1f} s / {wall_one:.1f} s; {os.cpu_count()} CPUs: not the measure)")

    print(f"\n2. authenticated reads: {args.requests} x GET {READ_PATH} (Nano-Session), "
          f"{args.concurrency} concurrent keep-alive clients, replicas idle")
    ports = [r.port for r in group.members]
    single, _ = await reads(ports[:1], api.session, args.requests, args.concurrency)
    spread3, served = await reads(ports, api.session, args.requests, args.concurrency)
    for label, run in (("all to 1 replica", single), ("round-robin over 3", spread3)):
        print(f"  {label:<20} {run.rate:7.0f} req/s  p50 {run.pct(0.5):6.1f} ms  "
              f"p99 {run.pct(0.99):6.1f} ms  errors {run.errors}")
    print(f"  round-robin per replica: {', '.join(str(served[p]) for p in ports)} requests")
    print(f"reads: 3 replicas / 1 replica throughput ratio {spread3.rate / single.rate:.2f} "
          f"({os.cpu_count()} CPUs, the client among them)")
    if single.errors or spread3.errors:
        raise RuntimeError(f"{single.errors + spread3.errors} reads failed")

    print(f"\n3. takeover after kill -9 of one of 3 replicas ({args.takeovers} runs; "
          f"GET /replicas/ on a survivor every 0.1 s)")
    times = await takeovers(group, cells, args.takeovers)
    print(f"takeover: median {statistics.median(times):.2f} s, max {max(times):.2f} s "
          f"(TTL + renewal = {TTL + RENEW:g} s; goal max <= {TTL + RENEW:g} s)")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"whole run {time.monotonic() - began:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guests", type=int,
                        default=int(os.environ.get("NANO_BENCH_GUESTS", 10000)))
    parser.add_argument("--cells", type=int,
                        default=int(os.environ.get("NANO_BENCH_CELLS", 50)))
    parser.add_argument("--requests", type=int, default=3000, help="reads per case")
    parser.add_argument("--concurrency", type=int, default=15)
    parser.add_argument("--takeovers", type=int,
                        default=int(os.environ.get("NANO_BENCH_TAKEOVERS", 5)))
    add_quick(parser, {"guests": 60, "cells": 6, "requests": 300,
                       "concurrency": 6, "takeovers": 2})
    args = parse(parser)
    if not PG_URL:
        cannot_run("several replicas need PostgreSQL: set NANO_TEST_POSTGRES=postgresql://...")
    libvirt.registerErrorHandler(lambda *_: None, None)

    schema, url = postgres_schema_url()
    groups: list[Replicas] = []
    try:
        with tempfile.TemporaryDirectory(prefix="nano-bench-replicas-") as tmp:
            try:
                asyncio.run(bench(args, url, Path(tmp), groups))
            finally:
                for group in groups:
                    group.stop()
    finally:
        _postgres(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


if __name__ == "__main__":
    main()
