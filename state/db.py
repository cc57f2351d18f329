"""Opening the store's database and running its forward migrations.

Called once by `nanod` at start (and by tests). SQLite with WAL is the default; a
`postgresql://` URL gives the same models on PostgreSQL. Only `state/` imports peewee.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import peewee
from playhouse.db_url import connect

log = logging.getLogger(__name__)

db = peewee.DatabaseProxy()


def database_url(url: str | None, data_dir: str) -> str:
    """The URL to open: the given one, or an SQLite file under the data directory."""
    if url:
        return url
    return "sqlite:///" + os.path.join(os.path.abspath(data_dir), "nano.db")


class ImmediateSqliteDatabase(peewee.SqliteDatabase):
    """SQLite whose transactions take the write lock when they begin.

    A deferred transaction that reads and then writes fails at once with "database is
    locked" when another connection wrote in between (SQLite cannot wait on it without
    risking a deadlock); BEGIN IMMEDIATE waits for the lock (busy_timeout) instead."""

    def begin(self, lock_type: str | None = None) -> Any:
        # `begin`, not `atomic`: the models reach us through a DatabaseProxy, whose
        # atomic() never calls ours
        return super().begin(lock_type=lock_type or "IMMEDIATE")


def open_database(url: str) -> peewee.Database:
    """Connect, bind the models and bring the schema up to date; returns the database."""
    scheme = urlparse(url).scheme
    if scheme.startswith("sqlite"):
        path = url.split("://", 1)[1]
        if path.startswith("/") and not path.startswith("//"):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        database: peewee.Database = ImmediateSqliteDatabase(
            path,
            pragmas={
                "journal_mode": "wal",
                "foreign_keys": 1,
                "busy_timeout": 30000,
                "synchronous": "normal",
            },
        )
    elif scheme.startswith("postgres"):
        database = connect(url)
    else:
        raise ValueError(f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql://...")
    db.initialize(database)
    database.connect(reuse_if_open=True)
    migrate(database)
    return database


def close_database() -> None:
    if db.obj is not None and not db.is_closed():
        db.close()


# -- migrations ---------------------------------------------------------------------------

Migration = Callable[[peewee.Database], None]


def _initial(database: peewee.Database) -> None:
    from state import models

    database.create_tables(models.ALL_MODELS, safe=True)


def _quotas(database: peewee.Database) -> None:
    """Group quotas (state/quotas.py): a table of their own; a fresh database has it from
    `_initial` already."""
    from state.models import Quota

    database.create_tables([Quota], safe=True)


# Forward migrations, oldest first. Version N is MIGRATIONS[N-1]. Append only: never edit
# or reorder a released step, so an upgrade from any older version keeps every row.
MIGRATIONS: list[Migration] = [_initial, _quotas]


def migrate(database: peewee.Database, steps: list[Migration] | None = None) -> int:
    """Apply the pending steps in one transaction each; returns the schema version."""
    from state.models import SchemaVersion

    steps = MIGRATIONS if steps is None else steps
    database.create_tables([SchemaVersion], safe=True)
    row = SchemaVersion.select().order_by(SchemaVersion.version.desc()).first()
    current = row.version if row else 0
    for version in range(current + 1, len(steps) + 1):
        with database.atomic():
            log.info("schema migration %d", version)
            steps[version - 1](database)
            SchemaVersion.create(version=version)
    return max(current, len(steps))
