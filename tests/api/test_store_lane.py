"""The IOLoop never waits on the database (api/base.py, "store lane"): every route's
database work runs in the store lane's threads, so a route waiting for SQLite's write lock
holds one lane thread while every other request is answered.

1. The whole route table walked (tests/api/route_walk.py, as the envelope test does) with
   every SQL statement watched: none runs on the IOLoop's thread while a request of the
   walk is in flight (the walk's own fixture writes between requests do not count).
2. Another connection holds SQLite's write lock: a write through the API waits for it,
   and meanwhile authenticated reads and the zone status are answered; once the lock is
   released the write lands.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from state.db import db
from tests.api.route_walk import Walker, fill, scripted_pass
from tests.conftest import sqlite_only


@contextmanager
def sql_on_this_thread(during: Callable[[], str]) -> Iterator[list[tuple[str, str]]]:
    """Every SQL statement run on the calling thread (the IOLoop's) while `during()` names
    a request, as (request, statement)."""
    loop_thread = threading.get_ident()
    seen: list[tuple[str, str]] = []
    database = db.obj
    original = database.execute_sql

    def execute_sql(sql: str, *args: Any, **kwargs: Any) -> Any:
        request = during()
        if request and threading.get_ident() == loop_thread:
            seen.append((request, " ".join(sql.split())[:120]))
        return original(sql, *args, **kwargs)

    database.execute_sql = execute_sql
    try:
        yield seen
    finally:
        del database.execute_sql


@pytest.mark.gen_test(timeout=90)
async def test_no_route_runs_sql_on_the_ioloop(server, tmp_path):
    w = Walker(server)
    with sql_on_this_thread(lambda: w.current) as on_loop:
        await scripted_pass(w, tmp_path)
        w.phase = "sweep"
        for pattern, method in w.all_pairs():
            if (pattern, method) not in w.seen:
                await w.send(method, fill(pattern), {})
    assert len(w.seen) > 100, "the walk reached too few routes to prove anything"
    assert on_loop == [], "SQL on the IOLoop:\n" + "\n".join(f"{r}: {q}" for r, q in on_loop)


# -- a held write lock ----------------------------------------------------------------------


database = pytest.fixture(name="database")(sqlite_only)  # threads, not backends


@contextmanager
def write_lock_held(path: Path) -> Iterator[None]:
    """SQLite's write lock, held by another connection (as a busy reconciler would)."""
    other = sqlite3.connect(path, isolation_level=None, timeout=10)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


@pytest.mark.gen_test(timeout=60)
async def test_reads_answered_while_a_write_waits_for_the_lock(api, settings):
    path = Path(settings["database"].split("://", 1)[1])
    with write_lock_held(path):
        write = asyncio.ensure_future(api.call("POST", "/compute_pools/locked", {}))
        await asyncio.sleep(0.3)  # the write reached the lane and waits for the lock
        assert not write.done(), "the write did not wait for the lock: nothing was tested"
        answered = []
        for _ in range(5):
            answered.append((await api.call("GET", "/compute_pools/")).code)
            answered.append((await api.call("GET", "/compute_zone_status/")).code)
            answered.append((await api.call("GET", "/users/")).code)
        assert answered == [0] * 15
        assert not write.done(), "the reads were answered only after the write: nothing shown"
    reply = await write
    assert reply.code == 0, reply.message
    assert [p["name"] for p in await api.ok("GET", "/compute_pools/")] == ["locked"]
