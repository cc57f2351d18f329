"""End-to-end fixtures: a real `nanod serve` process on a free port with a fresh data dir and
administrator, and a runner of `.venv/bin/nanod` client commands against it.

The server is started and stopped by pid (SIGTERM, then SIGKILL after a grace period), like
tests/integration/test_faults.py does.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ADMIN, ADMIN_PASSWORD, write_nanod_config
from tests.helpers.second_host import second_host  # noqa: F401 (fixture: the migration tests)

NANOD = str(Path(sys.executable).with_name("nanod"))
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Nanod:
    """A running nanod and how to reach it."""

    url: str
    data: Path
    proc: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)
    session: str = ""

    def run(self, *args: str, extra_env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        """`nanod ARGS` as an operator would run it; output as text."""
        return subprocess.run([NANOD, *args], capture_output=True, text=True, timeout=timeout,
                              env={**self.env, **(extra_env or {})}, cwd=ROOT)

    def spawn(self, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen([NANOD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**self.env, **(extra_env or {})}, cwd=ROOT)

    def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        if not self.session:
            self.session = self._raw("POST", "/sessions/", {"user": ADMIN, "password":
                                                            ADMIN_PASSWORD})["data"]["session"]
        return self._raw(method, path, body)

    def _raw(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}/api/v1{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              "Nano-Session": self.session})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())

    def data_of(self, path: str) -> Any:
        reply = self.call("GET", path)
        assert reply["error_code"] == 0, reply
        return reply["data"]


@pytest.fixture
def nanod_config() -> str:
    """The server's settings (YAML) over the tests' names and ports (TEST_SETTINGS); a test
    module overrides this fixture to change them."""
    return ("reconciler: {workers: 2, resync_seconds: 2, probe_seconds: 1, "
            "offline_after: 2}\n")


@pytest.fixture
def nanod(tmp_path: Path, nanod_config: str) -> Iterator[Nanod]:
    data = tmp_path / "data"
    done = subprocess.run([NANOD, "init", "--data-dir", str(data), "--user", ADMIN,
                           "--password", ADMIN_PASSWORD, "--no-local-cell"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    conf = write_nanod_config(tmp_path / "nanod.yaml", yaml.safe_load(nanod_config))
    port = free_port()
    proc = subprocess.Popen([NANOD, "serve", "--config", str(conf), "--data-dir", str(data),
                             "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/v1/system/", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise AssertionError("nanod serve did not start") from None
            time.sleep(0.1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANO_")}
    env.update(NANO_URL=url, NANO_USER=ADMIN, NANO_PASSWORD=ADMIN_PASSWORD,
               HOME=str(tmp_path))  # no client file of the machine's user is read
    server = Nanod(url, data, proc, env)
    yield server
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def lines(out: str) -> list[str]:
    """Output lines with runs of spaces collapsed (column widths vary with names)."""
    return [" ".join(line.split()) for line in out.splitlines()]
