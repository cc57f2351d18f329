"""Benchmark (issue 2): authenticated GET /api/v1/roles/ on a real nanod against a bare
Tornado handler that answers the same JSON bytes, measured in the same run; and the login
(POST /sessions/, an argon2id verify) time.

Run: .venv/bin/python tests/bench/bench_api.py [--concurrency 16] [--requests 4000]
     [--seconds 8] [--rounds 2] [--client keepalive|asynchttpclient|both]
     [--database postgresql://...EMPTY database...] [--quick]
Goal: nanod/bare throughput ratio >= 0.5.

Both servers are child processes on loopback (nanod with its data in a temporary
directory); they are stopped by pid. The load comes from this process: N concurrent
workers, each on its own keep-alive connection (a small HTTP/1.1 client on Tornado's
IOStream: the stock AsyncHTTPClient opens a new connection per request unless pycurl is
installed, which it is not here), or, with --client asynchttpclient, Tornado's
AsyncHTTPClient with one connection per request. Every reply is checked byte for byte.
Rounds alternate the order (bare first, then nanod first) to even out drift on a busy
machine. Pytest does not collect this file (setup.cfg ignores tests/bench).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import tornado.httpclient  # noqa: E402
import tornado.tcpclient  # noqa: E402
import tornado.web  # noqa: E402

from state.identity import hash_password, verify_password  # noqa: E402
from tests.bench.common import add_quick, free_port, parse, write_nanod_config  # noqa: E402

NANOD = str(Path(sys.executable).with_name("nanod"))
USER, PASSWORD = "admin", "Adm1nPassword"
PATH = "/api/v1/roles/"


# -- the bare server (this file run with --serve-bare PORT BODYFILE) --------------------------


def serve_bare(port: int, body_file: str) -> None:
    body = Path(body_file).read_bytes()

    class Roles(tornado.web.RequestHandler):
        def get(self) -> None:
            self.set_header("Content-Type", "application/json; charset=UTF-8")
            self.finish(body)

    async def main() -> None:
        app = tornado.web.Application([(r"/api/v1/roles/?", Roles)])
        app.listen(port, address="127.0.0.1")
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()

    asyncio.run(main())


# -- child processes --------------------------------------------------------------------------


class Child:
    def __init__(self, name: str, args: list[str], port: int, log: Path) -> None:
        self.name, self.port, self.log = name, port, log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=str(ROOT))

    async def ready(self, path: str) -> None:
        client = tornado.httpclient.AsyncHTTPClient()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited:\n{self.log.read_text()}")
            try:
                await client.fetch(f"http://127.0.0.1:{self.port}{path}", request_timeout=2,
                                   raise_error=False)
                return
            except OSError:
                await asyncio.sleep(0.1)
        raise SystemExit(f"{self.name} did not start:\n{self.log.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# -- load -------------------------------------------------------------------------------------


@dataclass
class Run:
    target: str
    client: str
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: int = 0

    def add(self, other: Run) -> None:
        self.latencies += other.latencies
        self.seconds += other.seconds
        self.errors += other.errors

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class Budget:
    """How many requests may still start, and until when."""

    def __init__(self, requests: int, seconds: float) -> None:
        self.left = requests
        self.deadline = time.perf_counter() + seconds

    def take(self) -> bool:
        if self.left <= 0 or time.perf_counter() >= self.deadline:
            return False
        self.left -= 1
        return True


async def keepalive_worker(port: int, request: bytes, expected: bytes, budget: Budget,
                           run: Run) -> None:
    stream = await tornado.tcpclient.TCPClient().connect("127.0.0.1", port)
    stream.set_nodelay(True)
    try:
        while budget.take():
            began = time.perf_counter()
            await stream.write(request)
            head = await stream.read_until(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            body = await stream.read_bytes(length) if length else b""
            run.latencies.append(time.perf_counter() - began)
            if not lines[0].startswith("HTTP/1.1 200") or body != expected:
                run.errors += 1
    finally:
        stream.close()


async def asynchttp_worker(url: str, headers: dict[str, str], expected: bytes,
                           budget: Budget, run: Run) -> None:
    client = tornado.httpclient.AsyncHTTPClient()
    while budget.take():
        began = time.perf_counter()
        reply = await client.fetch(url, headers=headers, raise_error=False)
        run.latencies.append(time.perf_counter() - began)
        if reply.code != 200 or reply.body != expected:
            run.errors += 1


async def drive(target: str, port: int, token: str, expected: bytes, client: str,
                concurrency: int, requests: int, seconds: float) -> Run:
    run = Run(target, client)
    headers = {"Nano-Session": token}
    if client == "keepalive":
        request = (f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                   f"Nano-Session: {token}\r\n\r\n").encode()
        # warm-up on fresh connections, not measured
        await asyncio.gather(*(keepalive_worker(port, request, expected, Budget(20, 5), Run(
            target, client)) for _ in range(concurrency)))
        budget = Budget(requests, seconds)
        began = time.perf_counter()
        await asyncio.gather(*(keepalive_worker(port, request, expected, budget, run)
                               for _ in range(concurrency)))
    else:
        url = f"http://127.0.0.1:{port}{PATH}"
        budget = Budget(requests, seconds)
        began = time.perf_counter()
        await asyncio.gather(*(asynchttp_worker(url, headers, expected, budget, run)
                               for _ in range(concurrency)))
    run.seconds = time.perf_counter() - began
    return run


# -- main -------------------------------------------------------------------------------------


async def login_times(port: int, count: int) -> list[float]:
    client = tornado.httpclient.AsyncHTTPClient()
    body = json.dumps({"user": USER, "password": PASSWORD, "nonce": "bench"})
    times = []
    for _ in range(count):
        began = time.perf_counter()
        reply = await client.fetch(f"http://127.0.0.1:{port}/api/v1/sessions/", method="POST",
                                   body=body)
        times.append(time.perf_counter() - began)
        assert json.loads(reply.body)["error_code"] == 0, reply.body
    return times


def verify_times(count: int) -> list[float]:
    stored = hash_password(PASSWORD)
    times = []
    for _ in range(count):
        began = time.perf_counter()
        assert verify_password(stored, PASSWORD)
        times.append(time.perf_counter() - began)
    return times


async def bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="nano-bench-") as tmp:
        tmpdir = Path(tmp)
        nanod_port, bare_port = free_port(), free_port()
        serve = [NANOD, "serve", "--config", str(write_nanod_config(tmpdir / "nanod.yaml")),
                 "--data-dir", str(tmpdir / "data"), "--listen", f"127.0.0.1:{nanod_port}"]
        if args.database:
            serve += ["--database", args.database]
        nanod = Child("nanod", serve, nanod_port, tmpdir / "nanod.out")
        bare = None
        try:
            await nanod.ready("/api/v1/system/")
            client = tornado.httpclient.AsyncHTTPClient()
            await client.fetch(f"http://127.0.0.1:{nanod_port}/api/v1/system/", method="POST",
                               body=json.dumps({"user": USER, "password": PASSWORD}))
            logins = await login_times(nanod_port, args.logins)
            token = json.loads((await client.fetch(
                f"http://127.0.0.1:{nanod_port}/api/v1/sessions/", method="POST",
                body=json.dumps({"user": USER, "password": PASSWORD})
            )).body)["data"]["session"]
            for n in range(5):  # a few more roles, so the reply is not trivially small
                await client.fetch(f"http://127.0.0.1:{nanod_port}/api/v1/roles/role{n}",
                                   method="POST", headers={"Nano-Session": token},
                                   body=json.dumps({"menu": ["dashboard"]}))
            expected = (await client.fetch(f"http://127.0.0.1:{nanod_port}{PATH}",
                                           headers={"Nano-Session": token})).body
            assert json.loads(expected)["error_code"] == 0, expected
            (tmpdir / "body.json").write_bytes(expected)
            bare = Child("bare tornado", [sys.executable, __file__, "--serve-bare",
                                          str(bare_port), str(tmpdir / "body.json")],
                         bare_port, tmpdir / "bare.out")
            await bare.ready(PATH)

            clients = ["keepalive", "asynchttpclient"] if args.client == "both" else [
                args.client]
            totals: dict[tuple[str, str], Run] = {}
            targets = [("bare tornado", bare_port), ("nanod", nanod_port)]
            for client_kind in clients:
                for round_no in range(args.rounds):
                    order = targets if round_no % 2 == 0 else targets[::-1]
                    for name, port in order:
                        run = await drive(name, port, token, expected, client_kind,
                                          args.concurrency, args.requests, args.seconds)
                        totals.setdefault((name, client_kind), Run(name, client_kind)).add(run)
            print_report(args, totals, clients, logins, verify_times(args.logins),
                         len(expected))
        finally:
            codes = {"nanod": nanod.stop()}
            if bare is not None:
                codes["bare"] = bare.stop()
            if codes["nanod"] != 0:
                print(f"nanod exited with {codes['nanod']}:\n{(tmpdir / 'nanod.out').read_text()}")


def print_report(args: argparse.Namespace, totals: dict[tuple[str, str], Run],
                 clients: list[str], logins: list[float], verifies: list[float],
                 size: int) -> None:
    print(f"\nGET {PATH} ({size} bytes of JSON) on {args.database.split(':')[0] or 'sqlite'}, "
          f"concurrency {args.concurrency}, "
          f"{args.rounds} round(s) of <= {args.requests} requests / {args.seconds:g} s "
          f"per target, loopback, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    header = f"{'target':<14}{'client':<17}{'requests':>9}{'errors':>7}{'req/s':>9}" \
             f"{'p50 ms':>9}{'p99 ms':>9}"
    print(header)
    print("-" * len(header))
    for client_kind in clients:
        for name in ("bare tornado", "nanod"):
            run = totals[(name, client_kind)]
            print(f"{name:<14}{client_kind:<17}{len(run.latencies):>9}{run.errors:>7}"
                  f"{run.rate:>9.0f}{run.pct(0.50):>9.2f}{run.pct(0.99):>9.2f}")
    print()
    for client_kind in clients:
        bare, nano = totals[("bare tornado", client_kind)], totals[("nanod", client_kind)]
        ratio = nano.rate / bare.rate if bare.rate else 0.0
        verdict = "meets" if ratio >= 0.5 else "MISSES"
        print(f"{client_kind}: nanod/bare throughput ratio {ratio:.2f} ({verdict} the goal "
              f">= 0.5); p50 {nano.pct(0.5):.2f} vs {bare.pct(0.5):.2f} ms, "
              f"p99 {nano.pct(0.99):.2f} vs {bare.pct(0.99):.2f} ms")
    print(f"login POST /sessions/ (argon2id verify): p50 {1000 * statistics.median(logins):.0f} "
          f"ms, max {1000 * max(logins):.0f} ms over {len(logins)}; in-process verify p50 "
          f"{1000 * statistics.median(verifies):.0f} ms")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-bare":
        serve_bare(int(sys.argv[2]), sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4000,
                        help="at most this many measured requests per target and round")
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="at most this long per target and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--logins", type=int, default=10)
    parser.add_argument("--database", default="",
                        help="a postgresql:// URL of an EMPTY database (default: SQLite in "
                        "the temporary data directory)")
    parser.add_argument("--client", choices=["keepalive", "asynchttpclient", "both"],
                        default="both")
    add_quick(parser, {"concurrency": 4, "requests": 200, "seconds": 1.0, "rounds": 1,
                       "logins": 2})
    asyncio.run(bench(parse(parser)))


if __name__ == "__main__":
    main()
