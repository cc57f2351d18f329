"""The event stream in the store: what is written where things happen, and how it is read.

Writers. Every write of a reconciled row passes through `Reconciled.update`/`delete`/`save`
(state/models.py), which hand the query to `EventedUpdate`/`EventedDelete` here: one place
for all of them, no call site of its own. An UPDATE that touches a spec column
(`generation`, `deleting`) or a status column (`observed_generation`, `phase`, `progress`,
`conditions`, `last_error`) gets a RETURNING clause (no extra read) and leaves:
  - `changed` / `deleting` for a spec change, with the generation and who made it (the
    API's store lane runs each request `acting_as` its session's user; other writes are
    nanod's own);
  - `status` for a status transition (Cell: `online`/`offline` when its phase turns so).
    An unchanged re-record writes nothing: the last status seen of each row is kept in
    memory (the reconciler re-records often); after a restart the first record of each
    row is written once.
An INSERT through `create` leaves `created`, a DELETE `removed`. Writes of other columns
only (observed facts, the most frequent) take the plain path. Events are written in the
transaction of the change they describe, so a rolled-back change leaves none.
A status transition of a guest made by a batch task also leaves the task's `progress`.
Others call `record_event` directly: libvirt lifecycle events of guests (reconciler/kinds.py)
and the per-guest progress of a migration (state/migrations.py `record_move`).

Readers. `EventStore` (a mixin of `state.store.Store`): `events_after(cursor)` is the one
query of the API's tail (api/events.py), `sees` applies the lists' visibility rules to an
event, `trim_events` keeps the table within the retention settings (`events` in
nanod/config.py). The cursor is `Event.id`, which only grows.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

import peewee

from state.identity import SessionInfo
from state.models import BatchTask, Event, Guest, Reconciled
from state.policies import ADMIN_TAG

T = TypeVar("T")

NANOD = "nanod"
ACTOR: ContextVar[str] = ContextVar("nano_event_actor", default=NANOD)
_SAVING: ContextVar[frozenset[str] | None] = ContextVar("nano_event_saving", default=None)

SPEC_COLUMNS = frozenset({"generation", "deleting"})
STATUS_COLUMNS = frozenset({"observed_generation", "phase", "progress", "conditions",
                            "last_error"})
# kinds whose `progress` is news on its own (others change it by the percent of a copy)
PROGRESS_KINDS = frozenset({"Migration", "BatchTask"})
# the group flag under which a group member sees another member's resource of the kind
GROUP_FLAGS = {"Guest": "instance_visible", "Snapshot": "instance_visible",
               "DiskImage": "disk_image_visible", "MediaImage": "media_image_visible"}
NAMED_BY_NAME = frozenset({"ComputePool", "Cell", "StoragePool", "AddressPool"})
MESSAGE_CHARS = 200  # a condition's message in an event: enough to say why


@contextlib.contextmanager
def acting_as(user: str) -> Iterator[None]:
    """Events written in this block name `user` as who made the change."""
    token = ACTOR.set(user or NANOD)
    try:
        yield
    finally:
        ACTOR.reset(token)


def as_actor(user: str, fn: Callable[..., T]) -> Callable[..., T]:
    """`fn`, run `acting_as(user)` (for work handed to a thread pool)."""
    def run(*args: Any) -> T:
        with acting_as(user):
            return fn(*args)
    return run


@contextlib.contextmanager
def saving(row: Reconciled) -> Iterator[None]:
    """A `save()` of `row` in progress: its UPDATE writes every column, so only those the
    caller assigned (peewee's dirty set) count as changed."""
    token = _SAVING.set(frozenset(f.name for f in row.dirty_fields))
    try:
        yield
    finally:
        _SAVING.reset(token)


# -- what a row's event says ------------------------------------------------------------------


def kind_of(model: type[Reconciled], row: dict[str, Any]) -> str:
    if model.__name__ == "Image":
        return "DiskImage" if row.get("kind") == "disk" else "MediaImage"
    return model.__name__


def _returned(model: type[Reconciled]) -> list[peewee.Field]:
    """The columns an event of `model` needs back from its write."""
    fields = model._meta.fields
    names = ["name", "generation", "deleting", *sorted(STATUS_COLUMNS), "owner", "group",
             "kind", "is_global", "batch", "guest"]
    return [model._meta.primary_key] + [fields[n] for n in names if n in fields]


def _identity(model: type[Reconciled], row: dict[str, Any]) -> dict[str, str]:
    """kind, name, ref, owner and group of an event about `row` (owner "" = every session
    sees it: infrastructure, migrations, global policy groups)."""
    kind = kind_of(model, row)
    # pools and cells are named by their name (as in resource_status), the rest by id
    key = "name" if kind in NAMED_BY_NAME else model._meta.primary_key.name
    ref = str(row[key])
    owner, group = str(row.get("owner") or ""), str(row.get("group") or "")
    if kind == "SecurityPolicyGroup" and row.get("is_global"):
        owner, group = "", ""
    if kind == "Snapshot":  # a snapshot is seen as its guest is
        guest = Guest.get_or_none(Guest.id == row.get("guest"))
        owner, group = (guest.owner, guest.group) if guest else ("", "")
    return {"kind": kind, "name": str(row.get("name") or ref), "ref": ref,
            "owner": owner, "group": group}


def _conditions(row: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"type": c.get("type", ""), "status": c.get("status", ""),
             "reason": c.get("reason", ""),
             "message": str(c.get("message", ""))[:MESSAGE_CHARS]}
            for c in (row.get("conditions") or []) if isinstance(c, dict)]


def _status(kind: str, row: dict[str, Any]) -> dict[str, Any]:
    return {"generation": row.get("generation"),
            "observed_generation": row.get("observed_generation"),
            "phase": row.get("phase"), "progress": row.get("progress"),
            "deleting": bool(row.get("deleting")),
            "last_error": str(row.get("last_error") or "")[:MESSAGE_CHARS],
            "conditions": _conditions(row),
            **({"batch": row["batch"]} if row.get("batch") else {})}


def _digest(kind: str, row: dict[str, Any]) -> tuple:
    """What makes a status record news: a message or a copy's percent alone is not."""
    return (row.get("observed_generation"), row.get("phase"), row.get("last_error"),
            row.get("progress") if kind in PROGRESS_KINDS else None,
            tuple((c["type"], c["status"], c["reason"]) for c in _conditions(row)))


class _LastStatus:
    """The status last written of each row, in memory: a re-record of the same status is
    no event. Bounded: past `limit` rows it starts again (one repeat event each)."""

    limit = 200_000

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], tuple] = {}
        self._lock = threading.Lock()

    def swap(self, key: tuple[str, str], digest: tuple) -> tuple | None:
        """Store `digest`; returns the previous one, or None when unknown."""
        with self._lock:
            if len(self._seen) >= self.limit:
                self._seen.clear()
            previous = self._seen.get(key)
            self._seen[key] = digest
            return previous

    def clear(self) -> None:
        """Another database was opened (state/db.py): what was seen is of no row of it."""
        with self._lock:
            self._seen.clear()

    def forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._seen.pop(key, None)


LAST_STATUS = _LastStatus()


def record_event(kind: str, name: str, ref: str, type: str, payload: dict[str, Any], *,
                 owner: str = "", group: str = "") -> None:
    """Append one event (in the caller's transaction, if any)."""
    Event.insert(time=time.time(), kind=kind, name=name, ref=ref, type=type,
                 actor=ACTOR.get(), owner=owner, group=group, payload=payload).execute()


def _row_events(model: type[Reconciled], rows: Iterable[dict[str, Any]],
                changed: frozenset[str]) -> None:
    spec = changed & SPEC_COLUMNS
    status = changed & STATUS_COLUMNS
    for row in rows:
        ident = _identity(model, row)
        who = {"owner": ident["owner"], "group": ident["group"]}
        args = (ident["kind"], ident["name"], ident["ref"])
        if "deleting" in spec and row.get("deleting"):
            record_event(*args, "deleting", {"generation": row.get("generation")}, **who)
        elif "generation" in spec:
            record_event(*args, "changed", {"generation": row.get("generation"),
                                            "deleting": bool(row.get("deleting"))}, **who)
        if status:
            digest = _digest(ident["kind"], row)
            previous = LAST_STATUS.swap((model.__name__, ident["ref"]), digest)
            if previous == digest:
                continue
            kind_type = "status"
            phase = row.get("phase")
            if (ident["kind"] == "Cell" and phase in ("online", "offline")
                    and (previous is None or previous[1] != phase)):
                kind_type = phase
            record_event(*args, kind_type, _status(ident["kind"], row), **who)
            if ident["kind"] == "Guest" and row.get("batch"):
                _batch_step(row)


def _batch_step(row: dict[str, Any]) -> None:
    """A guest of a batch task moved: the task's progress, seen by the task's owner (one
    read, of the task, on a transition of one of its guests only)."""
    task = BatchTask.get_or_none(BatchTask.id == row["batch"])
    if task is None:
        return
    record_event("BatchTask", task.id, task.id, "progress",
                 {"task": task.kind, "guest": row["id"], "name": row.get("name", ""),
                  "phase": row.get("phase"), "progress": row.get("progress"),
                  "last_error": str(row.get("last_error") or "")[:MESSAGE_CHARS]},
                 owner=task.owner)


class EventedUpdate(peewee.ModelUpdate):
    """`Reconciled.update`: an UPDATE that leaves the events of what it changed."""

    def _execute(self, database: peewee.Database) -> Any:
        saved = _SAVING.get()
        columns = frozenset(getattr(k, "name", str(k)) for k in self._update)
        changed = columns if saved is None else columns & saved
        if self._returning or not changed & (SPEC_COLUMNS | STATUS_COLUMNS):
            return super()._execute(database)
        model = self.model
        query = self.returning(*_returned(model)).dicts()
        with database.atomic():  # the change and its events land together
            rows = list(peewee.ModelUpdate._execute(query, database))
            _row_events(model, rows, changed)
        return len(rows)


class EventedDelete(peewee.ModelDelete):
    """`Reconciled.delete`: a DELETE that leaves a `removed` event per row."""

    def _execute(self, database: peewee.Database) -> Any:
        if self._returning:
            return super()._execute(database)
        model = self.model
        query = self.returning(*_returned(model)).dicts()
        with database.atomic():
            rows = list(peewee.ModelDelete._execute(query, database))
            for row in rows:
                ident = _identity(model, row)
                LAST_STATUS.forget((model.__name__, ident["ref"]))
                record_event(ident["kind"], ident["name"], ident["ref"], "removed", {},
                             owner=ident["owner"], group=ident["group"])
        return len(rows)


def created(row: Reconciled) -> None:
    """`Reconciled.save(force_insert=True)` (a `create`) inserted `row`."""
    ident = _identity(type(row), dict(row.__data__))
    record_event(ident["kind"], ident["name"], ident["ref"], "created",
                 {"generation": row.generation}, owner=ident["owner"], group=ident["group"])


# -- reading ------------------------------------------------------------------------------------


def event_dict(row: Event) -> dict[str, Any]:
    """An event as the stream sends it (owner and group stay inside: they only decide who
    receives it)."""
    stamp = dt.datetime.fromtimestamp(row.time, dt.UTC)
    return {"id": row.id, "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "kind": row.kind, "name": row.name, "resource": row.ref, "type": row.type,
            "actor": row.actor, "payload": row.payload or {},
            "_owner": row.owner, "_group": row.group}


def public(event: dict[str, Any]) -> dict[str, Any]:
    """`event` without the fields that only decide visibility."""
    return {k: v for k, v in event.items() if not k.startswith("_")}


def sees(event: dict[str, Any], viewer: SessionInfo) -> bool:
    """Whether `viewer` may see `event`: the rules of the lists (state/guests.py `visible`,
    state/images.py `visible_images`, state/policies.py, a batch task's owner)."""
    owner, group, kind = event["_owner"], event["_group"], event["kind"]
    if not owner or owner == viewer.user:
        return True
    if kind == "SecurityPolicyGroup":
        return viewer.allows(ADMIN_TAG) or bool(group) and group == viewer.group
    flag = GROUP_FLAGS.get(kind)
    return bool(flag and viewer.group and group == viewer.group
                and viewer.visibility.get(flag))


class EventStore:
    """Mixin of `state.store.Store`: the event stream's reads, trimming and direct writes."""

    def events_after(self, cursor: int, limit: int = 500) -> list[dict[str, Any]]:
        """The events with an id above `cursor`, oldest first (at most `limit`)."""
        rows = Event.select().where(Event.id > cursor).order_by(Event.id).limit(limit)
        return [event_dict(row) for row in rows]

    def event_bounds(self) -> tuple[int, int]:
        """(oldest id, newest id) retained; (0, 0) when there is none."""
        low, high = Event.select(peewee.fn.MIN(Event.id), peewee.fn.MAX(Event.id)).scalar(
            as_tuple=True)
        return int(low or 0), int(high or 0)

    def trim_events(self, *, max_age: float, max_count: int) -> int:
        """Remove events older than `max_age` seconds or beyond the newest `max_count`;
        the newest is always kept (so ids never restart). Returns how many went."""
        newest = Event.select(peewee.fn.MAX(Event.id)).scalar()
        if newest is None:
            return 0
        cutoff = time.time() - max_age
        return Event.delete().where(
            (Event.id < newest) & ((Event.time < cutoff) | (Event.id <= newest - max_count))
        ).execute()

    def record_guest_event(self, guest_id: str, type: str, payload: dict[str, Any]) -> bool:
        """An event about guest `guest_id` from outside the store's writes (a libvirt
        lifecycle event); False when the guest is not ours (or gone)."""
        row = Guest.get_or_none(Guest.id == guest_id)
        if row is None:
            return False
        record_event("Guest", row.name, row.id, type, payload, owner=row.owner,
                     group=row.group)
        return True
