"""A PostgreSQL connection closed by the server (a restart, a Patroni switchover, a proxy's
idle cut; here pg_terminate_backend) does not break the thread that held it: the next
statement runs on a new connection, a read cut in the middle is run again, a write cut in
the middle fails (it may have landed) and the one after it works (state/db.py)."""

from __future__ import annotations

import peewee
import pytest

from state.db import db
from state.models import Cell
from tests.conftest import _postgres, postgres_only


@pytest.fixture
def pg():
    yield from postgres_only("about PostgreSQL's connections")


def cut_my_connection() -> None:
    pid = db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
    _postgres(f"SELECT pg_terminate_backend({int(pid)})")


def test_a_connection_cut_by_the_server_is_opened_again(pg):
    Cell.create(name="c1", spec={})
    cut_my_connection()
    assert Cell.select().count() == 1  # a read: run again on a new connection

    cut_my_connection()
    with pytest.raises(peewee.OperationalError, match="closed the connection"):
        Cell.create(name="c2", spec={})  # a write: not repeated behind the caller's back
    Cell.create(name="c3", spec={})
    cut_my_connection()
    with pytest.raises(peewee.OperationalError), db.atomic():
        Cell.create(name="c4", spec={})
    assert sorted(c.name for c in Cell.select()) in (["c1", "c3"], ["c1", "c2", "c3"])
