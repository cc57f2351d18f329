"""Several `nanod serve` processes on one PostgreSQL schema: the replicas of one control
plane, each with its own data directory and port, for tests/api/test_replicas.py, the
real-libvirt replica test and tests/bench/bench_replicas.py.

`Replicas.start(n)` starts them; `kill(i)` (SIGKILL), `freeze(i)`/`thaw(i)` (SIGSTOP and
SIGCONT) and `stop()` act on the processes by pid, never by name. `metric(i, name)` sums a
Prometheus counter or gauge of one replica.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import tornado.httpclient

from tests.api.test_restart import NANOD, free_port
from tests.conftest import write_nanod_config


class Replica:
    def __init__(self, index: int, root: Path, database: str, settings: dict[str, Any]) -> None:
        self.index = index
        self.id = f"r{index}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = root / self.id
        self.data_dir.mkdir(parents=True, exist_ok=True)
        mine = {**settings, "replicas": {**settings.get("replicas", {}), "id": self.id}}
        conf = write_nanod_config(root / f"{self.id}.yaml", mine)
        self.args = [NANOD, "serve", "--config", str(conf), "--data-dir", str(self.data_dir),
                     "--listen", f"127.0.0.1:{self.port}", "--database", database,
                     "--allow-test-cells"]
        self.output = root / f"{self.id}.out"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)

    async def wait_ready(self, timeout: float = 60) -> None:
        client = tornado.httpclient.AsyncHTTPClient()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, (
                f"replica {self.id} exited early:\n{self.output.read_text()[-3000:]}")
            try:
                await client.fetch(self.url + "/api/v1/system/", request_timeout=2)
                return
            except (OSError, tornado.httpclient.HTTPClientError):
                await asyncio.sleep(0.1)
        raise AssertionError(f"replica {self.id} did not answer:\n{self.output.read_text()}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)  # a frozen one must be able to die
            self.proc.kill()
            self.proc.wait()

    def terminate(self, timeout: float = 20) -> int | None:
        if not self.alive:
            return self.proc.returncode if self.proc else None
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    async def metric(self, name: str) -> float:
        """The sum of every series of `name` in this replica's /metrics."""
        client = tornado.httpclient.AsyncHTTPClient()
        body = (await client.fetch(self.url + "/metrics", request_timeout=10)).body.decode()
        total = 0.0
        for line in body.splitlines():
            match = re.match(rf"^{re.escape(name)}(?:_total)?(?:{{[^}}]*}})? (\S+)$", line)
            if match:
                total += float(match.group(1))
        return total

    def log(self) -> str:
        return self.output.read_text(errors="replace")


class Replicas:
    def __init__(self, root: Path, database: str, settings: dict[str, Any]) -> None:
        self.root = root
        self.database = database
        self.settings = settings
        self.members: list[Replica] = []

    async def start(self, count: int) -> list[Replica]:
        new = [Replica(len(self.members) + i, self.root, self.database, self.settings)
               for i in range(count)]
        for replica in new:
            replica.start()
        for replica in new:
            await replica.wait_ready()
        self.members += new
        return new

    def __getitem__(self, index: int) -> Replica:
        return self.members[index]

    def live(self) -> list[Replica]:
        return [r for r in self.members if r.alive]

    def stop(self) -> None:
        for replica in self.members:
            replica.terminate()
