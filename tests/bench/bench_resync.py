"""Benchmark (issue 3): one full resync pass over 50 simulated cells holding 200 domains
each (10,000), against a raw libvirt loop that lists and reads the same domains, in the
same run; and p50/p99 of the zone/pool/cell status endpoints at that size.

Run: .venv/bin/python tests/bench/bench_resync.py [--cells 50] [--domains 200]
Goals: pass/raw ratio <= 3; status endpoints p50 < 50 ms. Everything stays on loopback
and in a temporary directory; the nanod it starts is stopped by pid.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402

from nanod import config  # noqa: E402
from nanod.server import open_store  # noqa: E402
from reconciler.kinds import build  # noqa: E402
from state.db import close_database  # noqa: E402
from state.models import Guest  # noqa: E402
from tests.conftest import TEST_SETTINGS, write_nanod_config  # noqa: E402  (sets the names)
from tests.helpers.testdriver import write_test_cell  # noqa: E402


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def raw_loop(uris: list[str]) -> tuple[float, int]:
    """What any tool must do at least: open each cell, list its domains, read each one's
    state and our ownership mark."""
    start = time.perf_counter()
    seen = 0
    for uri in uris:
        conn = libvirt.open(uri)
        for dom in conn.listAllDomains():
            dom.info()
            try:
                dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                             "https://nano.cloud/xmlns/guest/1")
            except libvirt.libvirtError:
                pass
            seen += 1
        conn.close()
    return time.perf_counter() - start, seen


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=50)
    parser.add_argument("--domains", type=int, default=200)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    libvirt.registerErrorHandler(lambda *_: None, None)

    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        data = tmpdir / "data"
        settings = config.load(None, config.merge(TEST_SETTINGS, {"data_dir": str(data)}))
        store = open_store(settings)
        store.init_system("admin", "Adm1nPassword")
        store.create_pool("bench", {})
        uris = []
        guest_rows = []
        for i in range(args.cells):
            cell = write_test_cell(tmpdir / f"cell-{i}.xml", cpus=64, memory_kib=256 << 20,
                                   domains=args.domains)
            uris.append(cell.uri)
            store.register_cell(f"c{i}", {"libvirt_uri": cell.uri, "virt_type": "qemu",
                                          "storage_path": str(tmpdir / f"img-{i}")})
            for d in cell.domains:
                guest_rows.append({"id": d.owned_id, "name": f"g{i}-{d.name}", "pool": "bench",
                                   "cell": f"c{i}", "phase": "running", "spec": {}})
        Guest.insert_many(guest_rows).execute()  # the store's view of those domains

        raw_seconds, seen = raw_loop(uris)
        # one pass as nanod runs it: the resync enqueues every key, the workers drain it
        controller = build(store, {**settings, "reconciler": {
            **settings["reconciler"], "resync_seconds": 3600, "probe_seconds": 3600}})
        failed: list = []
        controller.subscribe(lambda key, outcome: isinstance(outcome, Exception)
                             and failed.append(key))
        rss_before = rss_mib()
        start = time.perf_counter()
        controller.start()
        time.sleep(0.05)
        controller.wait_idle(600)
        pass_seconds = time.perf_counter() - start
        controller.stop(30)
        controller.connections.close_all()
        workers = settings["reconciler"]["workers"]
        for i in range(args.cells):  # into the pool, as an operator would (cells are alive)
            store.add_cell_to_pool("bench", f"c{i}")
        close_database()

        port = 15999
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("nanod")), "serve", "--config",
             str(write_nanod_config(tmpdir / "nanod.yaml")), "--data-dir", str(data),
             "--listen", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            base = f"http://127.0.0.1:{port}/api/v1"
            for _ in range(100):
                try:
                    urllib.request.urlopen(base + "/system/", timeout=1)
                    break
                except OSError:
                    time.sleep(0.1)
            req = urllib.request.Request(base + "/sessions/", method="POST", data=json.dumps(
                {"user": "admin", "password": "Adm1nPassword"}).encode())
            token = json.loads(urllib.request.urlopen(req).read())["data"]["session"]
            rows = []
            for path in ("/compute_zone_status/", "/compute_pool_status/",
                         "/compute_cell_status/bench/"):
                times = []
                for _ in range(args.requests):
                    t0 = time.perf_counter()
                    body = urllib.request.urlopen(urllib.request.Request(
                        base + path, headers={"Nano-Session": token})).read()
                    times.append((time.perf_counter() - t0) * 1000)
                assert json.loads(body)["error_code"] == 0
                rows.append((path, statistics.median(times), percentile(times, 0.99)))
        finally:
            proc.terminate()
            proc.wait(timeout=20)

    print(f"cells={args.cells} domains/cell={args.domains} domains={seen}")
    print(f"raw libvirt loop (list + read every domain): {raw_seconds:.3f} s")
    print(f"nanod resync pass, {workers} workers (probe, pools, domains, facts, record): "
          f"{pass_seconds:.3f} s"
          f"  failed keys: {len(failed)}")
    print(f"ratio pass/raw: {pass_seconds / raw_seconds:.2f}  (goal <= 3)")
    print(f"peak RSS of this process: {rss_mib():.0f} MiB (before pass {rss_before:.0f} MiB)")
    for path, p50, p99 in rows:
        print(f"GET {path:<32} p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  (goal p50 < 50 ms)")


if __name__ == "__main__":
    main()
