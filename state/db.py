"""Opening the store's database and running its forward migrations.

Called once by `nanod` at start (and by tests). SQLite with WAL is the default; a
`postgresql://` URL gives the same models on PostgreSQL. Only `state/` imports peewee.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlparse

import peewee
from playhouse.db_url import parse

log = logging.getLogger(__name__)

db = peewee.DatabaseProxy()

FENCE: ContextVar[Any] = ContextVar("nano_fence", default=None)
"""The `state.leases.Fence` the running reconcile writes under, or None (see there)."""

_WRITES = ("INSERT", "UPDATE", "DELETE")


class FencedWrites:
    """The one choke point of every statement the store sends: while a fence is set
    (state/leases.py), each INSERT/UPDATE/DELETE first checks the fence in its own
    transaction (one is opened around a lone statement), and is refused if it is stale."""

    def execute_sql(self, sql: str, params: Any = None, *args: Any, **kw: Any) -> Any:
        fence = FENCE.get()
        if fence is None or sql.lstrip()[:6].upper() not in _WRITES:
            return super().execute_sql(sql, params, *args, **kw)  # type: ignore[misc]
        from state.leases import check_fence

        if self.in_transaction():  # type: ignore[attr-defined]
            check_fence(self, fence)  # type: ignore[arg-type]
            return super().execute_sql(sql, params, *args, **kw)  # type: ignore[misc]
        with self.atomic():  # type: ignore[attr-defined]
            check_fence(self, fence)  # type: ignore[arg-type]
            return super().execute_sql(sql, params, *args, **kw)  # type: ignore[misc]


class NanoPostgresqlDatabase(FencedWrites, peewee.PostgresqlDatabase):
    """PostgreSQL with fenced writes, whose threads survive a lost connection (a server
    restart, a Patroni switchover, an idle connection cut by a proxy): peewee keeps one
    connection per thread and, once the server closed it, would fail every later statement
    of that thread with "connection already closed" until nanod restarts. Outside a
    transaction, a closed connection is opened again before the next statement; a read
    that failed because the server went away is run once more on the new connection. A
    write that failed so is not (it may have landed): its caller's error says so, and the
    reconciler retries, an API client gets a 500 it may retry. Inside a transaction nothing
    is retried: the transaction fails as a whole."""

    def execute_sql(self, sql: str, params: Any = None, *args: Any, **kw: Any) -> Any:
        self._reopen_if_closed()
        try:
            return super().execute_sql(sql, params, *args, **kw)
        except (peewee.OperationalError, peewee.InterfaceError):
            if self.in_transaction() or not self._closed_by_server():
                raise
            log.warning("the PostgreSQL connection of this thread was closed by the server: "
                        "opening a new one")
            self._reopen_if_closed()
            if sql.lstrip()[:6].upper() != "SELECT":
                raise
            return super().execute_sql(sql, params, *args, **kw)

    def begin(self, *args: Any, **kw: Any) -> Any:
        self._reopen_if_closed()
        return super().begin(*args, **kw)

    def _closed_by_server(self) -> bool:
        conn = self._state.conn
        return conn is not None and bool(getattr(conn, "closed", 0))

    def _reopen_if_closed(self) -> None:
        if not self.in_transaction() and self._closed_by_server():
            self._state.reset()  # forget the dead connection without touching it
            self.connect()


def database_url(url: str | None, data_dir: str) -> str:
    """The URL to open: the given one, or an SQLite file under the data directory."""
    if url:
        return url
    return "sqlite:///" + os.path.join(os.path.abspath(data_dir), "nano.db")


class ImmediateSqliteDatabase(FencedWrites, peewee.SqliteDatabase):
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
        database = NanoPostgresqlDatabase(**parse(url))
        _need_driver()
    else:
        raise ValueError(f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql://...")
    db.initialize(database)
    database.connect(reuse_if_open=True)
    with startup_lock():
        migrate(database)
    from state.events import LAST_STATUS  # late: state.events imports the models

    LAST_STATUS.clear()  # the statuses seen were another database's
    return database


def _need_driver() -> None:
    """PostgreSQL needs psycopg2, which only the `postgresql` extra installs: say so in
    one line instead of peewee's traceback at the first connect."""
    if peewee.psycopg2 is None:  # type: ignore[attr-defined]
        raise SystemExit(
            "nanod: the database is PostgreSQL but its driver (psycopg2) is not installed: "
            "pip install 'nano-reconciler[postgresql]' (or scripts/install-deps --postgresql)")


@contextlib.contextmanager
def startup_lock() -> Iterator[None]:
    """Held while a nanod migrates the schema and makes its start-up rows: replicas
    starting together on one PostgreSQL store take turns (an advisory lock, released at
    the block's end; SQLite has one nanod per file)."""
    database = db.obj
    if not isinstance(database, peewee.PostgresqlDatabase):
        yield
        return
    key = zlib.crc32(b"nanod start-up")
    database.execute_sql("SELECT pg_advisory_lock(%s)", (key,))
    try:
        yield
    finally:
        database.execute_sql("SELECT pg_advisory_unlock(%s)", (key,))


def close_database() -> None:
    if db.obj is not None and not db.is_closed():
        db.close()


# -- migrations ---------------------------------------------------------------------------

Migration = Callable[[peewee.Database], None]


def _initial(database: peewee.Database) -> None:
    from state import models

    database.create_tables(models.ALL_MODELS, safe=True)


def _events(database: peewee.Database) -> None:
    """The event stream's table (state/events.py); a new store has it from `_initial`."""
    from state import models

    database.create_tables([models.Event], safe=True)


def _idempotent_and_conditional_writes(database: peewee.Database) -> None:
    """Idempotency keys (state/idempotency.py), and a generation for templates, the one
    resource with a GET and a PUT that had none (its ETag, state/conditional.py). A store
    made by this version has both from `_initial` already."""
    from state import models

    database.create_tables([models.IdempotencyKey], safe=True)
    if "generation" not in {c.name for c in database.get_columns("template")}:
        database.execute_sql(
            'ALTER TABLE "template" ADD COLUMN "generation" INTEGER NOT NULL DEFAULT 1')


def _log_request_ids(database: peewee.Database) -> None:
    # audit entries name the API request that wrote them (X-Request-Id); a store made by
    # _initial from today's models has the column already
    from playhouse.migrate import SchemaMigrator
    from playhouse.migrate import migrate as alter

    from state.models import LogEntry

    # the columns as this connection sees them (get_columns would read PostgreSQL's
    # `public` schema, not the one on the search path)
    columns = {c[0] for c in database.execute_sql("SELECT * FROM log_entry LIMIT 0").description}
    if "request_id" not in columns:
        alter(SchemaMigrator.from_database(database).add_column(
            "log_entry", "request_id", LogEntry.request_id))


def _quotas(database: peewee.Database) -> None:
    """Group quotas (state/quotas.py): a table of their own; a fresh database has it from
    `_initial` already."""
    from state.models import Quota

    database.create_tables([Quota], safe=True)


def _replicas(database: peewee.Database) -> None:
    """Several nanods on one store (state/leases.py): replicas, leases, console channels
    in the store, and who runs an image's upload. A fresh database has them from
    `_initial` already."""
    from playhouse.migrate import SchemaMigrator
    from playhouse.migrate import migrate as alter

    from state.models import ControlReplica, Image, Lease, MonitorChannel

    database.create_tables([ControlReplica, Lease, MonitorChannel], safe=True)
    columns = {c[0] for c in database.execute_sql("SELECT * FROM image LIMIT 0").description}
    if "uploader" not in columns:
        alter(SchemaMigrator.from_database(database).add_column("image", "uploader",
                                                                Image.uploader))


# Forward migrations, oldest first. Version N is MIGRATIONS[N-1]. Append only: never edit
# or reorder a released step, so an upgrade from any older version keeps every row.
MIGRATIONS: list[Migration] = [_initial, _idempotent_and_conditional_writes, _log_request_ids,
                               _events, _quotas, _replicas]


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
