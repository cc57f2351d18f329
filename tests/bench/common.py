"""What the benchmarks share: `--quick` sizes, a refusal for a machine that lacks what a
benchmark needs, the tests' names and settings (prefix `nanotest`, tests/conftest.py: never
the production `nano`), and an in-process nanod with a small JSON client for those that
drive one through its API.

Benchmarks run on demand (`.venv/bin/python tests/bench/NAME.py`) and, with `--quick`,
from tests/test_benchmarks.py in the normal suite, which checks that each one completes and
prints its ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import tornado.httpclient

from nanod import config
from tests.conftest import TEST_NAMES_PREFIX as PREFIX  # (sets this process's names)
from tests.conftest import TEST_SETTINGS, write_nanod_config

MiB = 1 << 20
QOS = {"cpu_priority": "medium", "write_speed": 0, "write_iops": 0, "read_speed": 0,
       "read_iops": 0, "receive_speed": 0, "send_speed": 0}
__all__ = ["PREFIX", "write_nanod_config"]  # re-exported for the benchmarks
CANNOT_RUN = 77  # exit status of a benchmark this machine cannot run (as automake's SKIP)
ADMIN, PASSWORD = "admin", "Adm1nPassword"

T = TypeVar("T")


def add_quick(parser: argparse.ArgumentParser, sizes: dict[str, Any]) -> None:
    """Add `--quick`: run at `sizes` (option dest -> value), small enough for CI."""
    shown = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in sizes.items())
    parser.add_argument("--quick", action="store_const", const=sizes, default=None,
                        help=f"small sizes that only show the benchmark works ({shown})")


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the command line; with --quick its sizes replace the defaults."""
    args = parser.parse_args()
    for dest, value in (args.quick or {}).items():
        setattr(args, dest, value)
    return args


def cannot_run(reason: str) -> NoReturn:
    """End a benchmark this machine cannot run, saying why (exit status CANNOT_RUN)."""
    print(f"cannot run: {reason}", file=sys.stderr)
    sys.exit(CANNOT_RUN)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nanod_settings(data: Path, reconciler: dict[str, Any]) -> dict[str, Any]:
    """Settings of a benchmark's own nanod: its own data directory, the given reconciler
    settings, and test-driver cells allowed (`allow_test_cells`, the setting that gates
    `test:///` cells; the benchmarks' simulated cells are node files in their temp
    directory). A nanod older than that setting has no gate and does not read the key."""
    settings = config.load(None, config.merge(TEST_SETTINGS, {"data_dir": str(data)}))
    settings["reconciler"] = {**settings["reconciler"], **reconciler}
    settings["session_timeout"] = 3600  # a full-size run seeds for minutes
    settings["allow_test_cells"] = True
    settings["password_hash"] = dict(config.DEFAULTS["password_hash"])  # what users get
    return settings


class Client:
    """JSON calls to a nanod; an error reply raises with the route and its message."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}/api/v1"
        self.http = tornado.httpclient.AsyncHTTPClient()
        self.session = ""

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        response = await self.http.fetch(
            self.base + path, method=method, raise_error=False,
            body=None if body is None and method in ("GET", "DELETE") else json.dumps(body or {}),
            headers={"Nano-Session": self.session, "Content-Type": "application/json"},
            allow_nonstandard_methods=True, request_timeout=600)
        doc = json.loads(response.body)
        if doc["error_code"]:
            raise RuntimeError(f"{method} {path}: {doc['message']}")
        return response.code, doc.get("data")

    async def login(self) -> None:
        await self.call("POST", "/system/", {"user": ADMIN, "password": PASSWORD})
        _, data = await self.call("POST", "/sessions/", {"user": ADMIN, "password": PASSWORD})
        self.session = data["session"]


async def start_server(data: Path, reconciler: dict[str, Any]) -> tuple[Any, Client]:
    """A nanod in this process on a free loopback port, with an administrator logged in."""
    from nanod.server import Server

    server = Server(nanod_settings(data, reconciler))
    server.listen("127.0.0.1", 0)
    client = Client(server.port)
    await client.login()
    return server, client


async def wait_for(check: Callable[[], Awaitable[T]], timeout: float = 600,
                   interval: float = 0.02, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(interval)
    raise TimeoutError(f"waited {timeout:g} s{' for ' + what if what else ''}")
