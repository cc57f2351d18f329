"""Wake-ups between replicas: a key enqueued on one nanod reaches the replica that
reconciles it at once, through PostgreSQL's LISTEN/NOTIFY, instead of at its next resync.

An API write lands on whichever replica the client reached; the key it enqueues may belong
to a cell another replica holds (state/leases.py). `Broadcast.send(kind, id)` hands the key
to a thread of its own (the caller, often the IOLoop's side of a request, never waits on the
database), which sends what gathered in one `pg_notify` per 7,000 bytes on the store's channel
(`nano_keys_<schema>`), with the sender's replica id. `Listener` holds one connection of its own that
LISTENs, and calls `on_key(kind, id)` for every key another replica sent; it reconnects
after a lost connection (and then asks for a full resync: wake-ups sent meanwhile are
gone). Notifications are only a shortcut: the periodic resync still finds every key.

SQLite has one nanod per file: nothing to tell, and `for_database` gives None.
Built by nanod/server.py; this module is the only one that speaks psycopg2 directly.
"""

from __future__ import annotations

import logging
import queue
import select
import threading
from collections.abc import Callable
from typing import Any

import peewee

from state.db import db

log = logging.getLogger("nano.state.notify")

MAX_PAYLOAD = 7000  # PostgreSQL takes up to 8000 bytes per notification
SEP, KEY_SEP = "\x1e", "\x1f"  # between keys, between a key's kind and id


def is_postgresql() -> bool:
    return isinstance(db.obj, peewee.PostgresqlDatabase)


def channel() -> str:
    """`nano_keys_<schema>`: notifications reach every session of the database, so the
    replicas of one store (one schema) keep to a channel of their own."""
    schema = str(db.execute_sql("SELECT current_schema()").fetchone()[0] or "public")
    return "nano_keys_" + "".join(c if c.isalnum() or c == "_" else "_" for c in schema)[:50]


class Broadcast:
    """Sends keys to the other replicas (see the module docstring)."""

    def __init__(self, replica: str) -> None:
        self.replica = replica
        self.channel = channel()
        self._keys: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="nano-notify", daemon=True)
        self._thread.start()

    def send(self, kind: str, key_id: str) -> None:
        self._keys.put((kind, key_id))

    def close(self) -> None:
        self._keys.put(None)
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            first = self._keys.get()
            if first is None:
                return
            batch = {first}
            while True:  # what else is waiting goes in the same notifications
                try:
                    more = self._keys.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._send(batch)
                    return
                batch.add(more)
            self._send(batch)

    def _send(self, keys: set[tuple[str, str]]) -> None:
        payloads, current = [], self.replica
        for kind, key_id in sorted(keys):
            item = f"{kind}{KEY_SEP}{key_id}"
            if len(current) + len(item) + 1 > MAX_PAYLOAD:
                payloads.append(current)
                current = self.replica
            current += SEP + item
        payloads.append(current)
        try:
            for payload in payloads:
                db.execute_sql("SELECT pg_notify(%s, %s)", (self.channel, payload))
        except Exception:  # the owner's resync finds the keys all the same
            log.warning("could not tell the other replicas of %d key(s)", len(keys),
                        exc_info=True)


class Listener:
    """Calls `on_key(kind, id)` for keys other replicas send; `on_gap()` after a lost
    connection is back (wake-ups may have been missed)."""

    def __init__(self, replica: str, on_key: Callable[[str, str], None],
                 on_gap: Callable[[], None]) -> None:
        self.replica = replica
        self.on_key = on_key
        self.on_gap = on_gap
        self.channel = channel()
        self._params: dict[str, Any] = dict(db.obj.connect_params)
        self._params["database"] = db.obj.database
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nano-listen", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(5)

    def _run(self) -> None:
        import psycopg2

        first = True
        while not self._stopping.is_set():
            try:
                conn = psycopg2.connect(**self._params)
            except Exception as exc:
                log.warning("cannot listen for other replicas' keys: %s", exc)
                self._stopping.wait(2.0)
                continue
            try:
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute(f"LISTEN {self.channel}")
                if not first:
                    self.on_gap()
                first = False
                while not self._stopping.is_set():
                    if select.select([conn], [], [], 1.0)[0]:
                        conn.poll()
                        while conn.notifies:
                            self._dispatch(conn.notifies.pop(0).payload)
            except Exception as exc:
                if not self._stopping.is_set():
                    log.warning("lost the connection that listens for other replicas' keys "
                                "(%s): listening again", exc)
                    self._stopping.wait(1.0)
            finally:
                conn.close()

    def _dispatch(self, payload: str) -> None:
        sender, _, rest = payload.partition(SEP)
        if sender == self.replica or not rest:
            return
        for item in rest.split(SEP):
            kind, _, key_id = item.partition(KEY_SEP)
            if kind and key_id:
                try:
                    self.on_key(kind, key_id)
                except Exception:
                    log.exception("waking key %s/%s failed", kind, key_id)
