"""Forward schema migrations (state/db.py `migrate`), on SQLite and PostgreSQL: a step
appended to the list runs once, keeps the rows already stored and records its version; a
step that fails leaves neither half of its change nor its version behind."""

from __future__ import annotations

import peewee
import pytest

from state.db import MIGRATIONS, close_database, migrate, open_database
from state.models import SchemaVersion
from state.store import Store


def _versions() -> list[int]:
    return [row.version for row in SchemaVersion.select().order_by(SchemaVersion.version)]


def _notes(database: peewee.Database) -> list[tuple[str, str]]:
    # unquoted columns: SQLite reads an unknown "quoted" name as a string literal
    cursor = database.execute_sql('SELECT name, note FROM "role" ORDER BY name')
    return [tuple(row) for row in cursor.fetchall()]


def test_an_appended_step_runs_once_keeps_rows_and_records_its_version(database):
    current = len(MIGRATIONS)
    handle = open_database(database)
    assert _versions() == list(range(1, current + 1))
    store = Store()
    store.init_system("admin", "Adm1nPassword", menu=["user"])
    store.create_role("auditor", ["log"], grantor=["log"])
    entry = store.add_log("written before the migration", user="admin")

    runs = []

    def add_role_note(db: peewee.Database) -> None:
        runs.append(db)
        db.execute_sql('ALTER TABLE "role" ADD COLUMN "note" VARCHAR(255) NOT NULL DEFAULT \'\'')
        db.execute_sql('UPDATE "role" SET "note" = \'migrated\' WHERE "name" = \'super\'')

    steps = [*MIGRATIONS, add_role_note]
    assert migrate(handle, steps) == current + 1
    assert len(runs) == 1
    assert _versions() == list(range(1, current + 2))
    # existing rows are kept (and the step saw them)
    assert _notes(handle) == [("auditor", ""), ("super", "migrated")]
    assert store.role("auditor") == {"menu": ["log"]}
    assert store.list_users() == ["admin"]
    assert store.authenticate("admin", "Adm1nPassword") == "admin"
    assert entry in [e["id"] for e in store.query_logs()["logs"]]

    # again, and after a reopen (a restart): nothing runs twice
    assert migrate(handle, steps) == current + 1
    close_database()
    handle = open_database(database)
    assert migrate(handle, steps) == current + 1
    assert len(runs) == 1
    assert _versions() == list(range(1, current + 2))
    assert _notes(handle) == [("auditor", ""), ("super", "migrated")]


def test_a_failing_step_is_rolled_back_and_not_recorded(database):
    current = len(MIGRATIONS)
    handle = open_database(database)
    Store().create_role("auditor", ["log"], grantor=["log"])

    def half_done(db: peewee.Database) -> None:
        db.execute_sql('ALTER TABLE "role" ADD COLUMN "note" VARCHAR(255) NOT NULL DEFAULT \'\'')
        db.execute_sql('DELETE FROM "role"')
        raise RuntimeError("step failed half way")

    with pytest.raises(RuntimeError, match="half way"):
        migrate(handle, [*MIGRATIONS, half_done])
    assert _versions() == list(range(1, current + 1))
    assert Store().list_roles() == ["auditor"]
    with pytest.raises(peewee.DatabaseError):
        _notes(handle)  # the column was not added either

    # fixed, the step runs on the next start
    def fixed(db: peewee.Database) -> None:
        db.execute_sql('ALTER TABLE "role" ADD COLUMN "note" VARCHAR(255) NOT NULL DEFAULT \'\'')

    assert migrate(handle, [*MIGRATIONS, fixed]) == current + 1
    assert _notes(handle) == [("auditor", "")]
