"""Shared fixtures: a real store (SQLite file, or PostgreSQL when NANO_TEST_POSTGRES names a
server), a real nanod `Server` on a free port, and a small API client.

The `database` fixture is parametrized: every store/API test that uses it runs on SQLite,
and again on PostgreSQL when `.ci/run` (or you) started one and exported
NANO_TEST_POSTGRES=postgresql://user:password@127.0.0.1:5432/db. Without it the PostgreSQL
variants are skipped with that reason printed.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import tornado.httpclient

from nanod import config
from reconciler import naming
from state.db import close_database, open_database
from state.identity import use_password_hash

pytest_plugins = ["tests.setup_guard"]  # a setup nanod on this host is left as it was

_FIGURES: list[str] = []


@pytest.fixture
def figure() -> Any:
    """`figure(line)`: a measured figure for the run's summary ("figures measured by the
    tests", printed at the end whatever pytest captured): counts and ratios CI shows."""
    return _FIGURES.append


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _FIGURES:
        terminalreporter.section("figures measured by the tests")
        for line in _FIGURES:
            terminalreporter.write_line(line)

ADMIN = "admin"
ADMIN_PASSWORD = "Adm1nPassword"
PG_URL = os.environ.get("NANO_TEST_POSTGRES", "")

TEST_NAMES_PREFIX = "nanotest"
"""Every nanod and reconciler the tests run names what it makes on this host with this
prefix (reconciler/naming.py): `nanotest-<guest id>`, pools `nanotest-<cell>`, networks
`nanotest-net-*`, nft tables `nanotest` and `nanotest_nat_*`. Never the production `nano`:
the suite runs beside a nanod that scripts/setup started (tests/setup_guard.py checks it
is left as it was)."""
TEST_SETTINGS: dict[str, Any] = {
    "names": {"prefix": TEST_NAMES_PREFIX},
    # cell ports for guests' port forwards, apart from a production nanod's 20000-29999
    "limits": {"guest_ports": [46000, 46999]},
    # the suite's simulated cells are libvirt test-driver files (test:///PATH.xml), which a
    # production nanod refuses (state/cell_transport.py)
    "allow_test_cells": True,
    # argon2id at OWASP's least cost (still a real argon2id hash, ~40 ms) instead of the
    # default's ~300 ms: the suite logs in a few thousand times. The tests about hashing
    # cost itself (tests/api/test_password_lane.py) and the benchmarks use the default.
    "password_hash": {"time_cost": 2, "memory_kib": 19456, "parallelism": 1},
}
naming.use(TEST_NAMES_PREFIX)  # for tests that drive reconcilers and drivers directly
use_password_hash(TEST_SETTINGS["password_hash"])  # ... and the store directly


def reconciling(settings: dict[str, Any], **timing: float) -> dict[str, Any]:
    """`settings` with the reconciler on at a test's pace: probes every second, a resync
    every 5 s, guests polled every second, unless `timing` says otherwise (any key of the
    `reconciler` setting)."""
    settings["reconciler"] = {"enabled": True, "workers": 4, "resync_seconds": 5,
                              "probe_seconds": 1, "offline_after": 3,
                              "guest_poll_seconds": 1, **timing}
    return settings


def write_nanod_config(path: Any, settings: dict[str, Any] | None = None) -> Any:
    """A `nanod --config` file for a nanod process a test starts: the tests' names and
    ports (TEST_SETTINGS) under `settings`."""
    import yaml

    merged = config.merge(TEST_SETTINGS, settings or {})
    with open(path, "w") as fh:
        yaml.safe_dump(merged, fh)
    return path


@pytest.fixture
def production_names() -> Iterator[naming.Names]:
    """The production prefix `nano`, for pure tests that compare with listings, scripts and
    XML captured from (or written for) a production cell; nothing touches the host."""
    with naming.using(naming.DEFAULT_PREFIX) as names:
        yield names


@pytest.fixture(autouse=True)
def _names_stay_the_tests() -> Iterator[None]:
    """Fails a test that left this process naming things like a production nanod."""
    yield
    assert naming.names().prefix == TEST_NAMES_PREFIX, (
        f"the test left names prefix {naming.names().prefix!r}: build nanod settings with "
        "the `settings` fixture or config.merge(TEST_SETTINGS, ...)")


def _postgres(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(PG_URL)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql)
    conn.close()


def postgres_schema_url() -> tuple[str, str]:
    """A fresh schema of its own for one test (tests of several sessions may share the
    server at once), and a URL whose connections use it."""
    schema = "t_" + uuid.uuid4().hex[:16]
    _postgres(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_URL else "?"
    return schema, f"{PG_URL}{sep}options=-csearch_path%3D{schema}"


def postgres_only(about: str) -> Iterator[None]:
    """For a fixture of a test about PostgreSQL itself (its row locks, its connections):
    the store opened on a fresh schema of its own, dropped afterwards. Without a server the
    test is skipped, saying what it is `about` and how to give it one."""
    if not PG_URL:
        pytest.skip(f"{about}: set NANO_TEST_POSTGRES=postgresql://... (.ci/run starts a "
                    "server and sets it)")
    schema, url = postgres_schema_url()
    open_database(url)
    try:
        yield
    finally:
        close_database()
        _postgres(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """A database URL for a fresh, empty store."""
    if request.param == "postgresql":
        if not PG_URL:
            pytest.skip("PostgreSQL variant: set NANO_TEST_POSTGRES=postgresql://... "
                        "(.ci/run starts a server and sets it)")
        schema, url = postgres_schema_url()
        yield url
        close_database()
        _postgres(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    else:
        yield "sqlite:///" + str(tmp_path / "nano.db")
    close_database()


def sqlite_only(tmp_path: Any) -> Iterator[str]:
    """For a module whose tests are about threads, cells or SQLite itself, not the store's
    backends: `database = pytest.fixture(name="database")(sqlite_only)` runs them on SQLite
    only (the PostgreSQL variants of the store run in tests/api and tests/state)."""
    yield "sqlite:///" + str(tmp_path / "nano.db")
    close_database()


@pytest.fixture
def settings(tmp_path: Any, database: str) -> dict[str, Any]:
    return config.load(None, config.merge(TEST_SETTINGS, {
        "data_dir": str(tmp_path / "data"),
        "database": database,
        "reconciler": {"enabled": False},
    }))


@dataclass
class Reply:
    status: int
    code: int
    message: str
    data: Any
    headers: Any = None


class Api:
    """Talks to a running nanod over HTTP like any client would."""

    def __init__(self, base_url: str) -> None:
        self.base = base_url.rstrip("/") + "/api/v1"
        self.http = tornado.httpclient.AsyncHTTPClient()
        self.session = ""

    async def call(self, method: str, path: str, body: Any = None, *,
                   session: str | None = None, raw: bytes | None = None,
                   headers: dict[str, str] | None = None) -> Reply:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        token = self.session if session is None else session
        if token:
            hdrs["Nano-Session"] = token
        payload = raw if raw is not None else (None if body is None else json.dumps(body))
        if payload is None and method in ("POST", "PUT", "PATCH"):
            payload = b""
        response = await self.http.fetch(
            self.base + path, method=method, body=payload, headers=hdrs, raise_error=False,
            allow_nonstandard_methods=True, request_timeout=60,
        )
        try:
            doc = json.loads(response.body or b"{}")
        except ValueError:
            doc = {"error_code": -1, "message": response.body.decode(errors="replace")}
        return Reply(response.code, doc.get("error_code", -1), doc.get("message", ""),
                     doc.get("data"), response.headers)

    async def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        """Call and insist on success; returns `data`."""
        reply = await self.call(method, path, body, **kw)
        assert reply.code == 0, f"{method} {path}: {reply.code} {reply.message}"
        return reply.data

    async def login(self, user: str = ADMIN, password: str = ADMIN_PASSWORD) -> str:
        data = await self.ok("POST", "/sessions/", {"user": user, "password": password,
                                                    "nonce": "n"}, session="")
        self.session = data["session"]
        return self.session


@pytest.fixture
def server(settings: dict[str, Any], io_loop: Any) -> Iterator[Any]:
    from nanod.server import Server

    srv = Server(settings)
    srv.listen("127.0.0.1", 0)
    yield srv
    io_loop.run_sync(srv.shutdown)


@pytest.fixture
def api(server: Any, io_loop: Any) -> Api:
    """A client of a fresh nanod with the first administrator created and logged in."""
    client = Api(f"http://127.0.0.1:{server.port}")

    async def setup() -> None:
        await client.ok("POST", "/system/", {"user": ADMIN, "password": ADMIN_PASSWORD},
                        session="")
        await client.login()

    io_loop.run_sync(setup)
    return client


@pytest.fixture
def bare_api(server: Any) -> Api:
    """A client of a fresh nanod before `POST /system/`."""
    return Api(f"http://127.0.0.1:{server.port}")


@pytest.fixture
def qemu_dir() -> Iterator[Any]:
    """A temporary directory QEMU (running as libvirt-qemu) can reach: pytest's tmp dirs
    sit under a 0700 root directory, so guest volumes live here instead."""
    import shutil
    import tempfile
    from pathlib import Path

    base = Path("/var/tmp/nano-tests")
    base.mkdir(mode=0o755, exist_ok=True)
    base.chmod(0o755)
    path = Path(tempfile.mkdtemp(dir=base))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)

