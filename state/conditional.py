"""Conditional writes: a resource's generation as its ETag, and a write that happens only
when the caller's `If-Match` names the generation the resource still has.

Called by `api/base.py`: `generation_of` for the `ETag` of a GET, `write_if_match` around
a PUT or DELETE that carried `If-Match`. The compare and the write are one transaction:
the resource's row is locked first (FOR UPDATE on PostgreSQL; on SQLite the transaction
begins IMMEDIATE, holding the write lock), the route's own store calls run inside it, and
the generation is compared before the route runs: a mismatch changes nothing, neither
rows nor files (an image delete removes its file after its row).

A mismatch tells the generation and the newest audit entry about the resource, before the
route's own checks run: to someone who holds a guest's or image's id but may not see it,
that says it exists. Ids of such resources are random UUIDs; names (pools, cells) are
readable by every holder of the routes' menu tags anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import peewee

from state.errors import Conflict
from state.identity import format_time
from state.models import (
    AddressPool,
    BatchTask,
    Cell,
    ComputePool,
    Guest,
    GuestPolicy,
    Image,
    LogEntry,
    Migration,
    SecurityPolicyGroup,
    Snapshot,
    StoragePool,
    Template,
)
from state.policies import locked, write_transaction

T = TypeVar("T")

# kind -> (model, the columns its key names, in path order)
RESOURCES: dict[str, tuple[type[peewee.Model], tuple[peewee.Field, ...]]] = {
    "guest": (Guest, (Guest.id,)),
    "compute_pool": (ComputePool, (ComputePool.name,)),
    "cell": (Cell, (Cell.name,)),
    "storage_pool": (StoragePool, (StoragePool.name,)),
    "address_pool": (AddressPool, (AddressPool.name,)),
    "image": (Image, (Image.id,)),
    "security_policy_group": (SecurityPolicyGroup, (SecurityPolicyGroup.id,)),
    "guest_security_policy": (GuestPolicy, (GuestPolicy.guest,)),
    "snapshot": (Snapshot, (Snapshot.guest, Snapshot.name)),
    "migration": (Migration, (Migration.id,)),
    "batch": (BatchTask, (BatchTask.id,)),
    "template": (Template, (Template.id,)),
}


# kind -> the path segments of the API routes that change it (where its audit entries are)
ROUTE_SEGMENTS: dict[str, frozenset[str]] = {
    "guest": frozenset({"guests", "instances"}),
    "compute_pool": frozenset({"compute_pools"}),
    "cell": frozenset({"cells", "compute_pool_cells"}),
    "storage_pool": frozenset({"storage_pools"}),
    "address_pool": frozenset({"address_pools"}),
    "image": frozenset({"media_images", "disk_images", "media_image_files",
                        "disk_image_files"}),
    "security_policy_group": frozenset({"security_policy_groups"}),
    "guest_security_policy": frozenset({"security_policy"}),
    "snapshot": frozenset({"snapshots"}),
    "migration": frozenset({"migrations"}),
    "batch": frozenset({"create_guest", "delete_guest", "stop_guest"}),
    "template": frozenset({"templates"}),
}


class PreconditionFailed(Conflict):
    """`If-Match` named another generation than the resource has: nothing was changed.
    error_code 409; HTTP 412 for clients that ask for strict HTTP (api/base.py)."""


def etag(generation: int) -> str:
    """The entity tag of a generation, quoted as RFC 9110 wants."""
    return f'"{generation}"'


def _query(kind: str, key: Sequence[str]) -> peewee.Select:
    model, columns = RESOURCES[kind]
    if len(columns) != len(key):
        raise ValueError(f"{kind} is keyed by {len(columns)} value(s), not {list(key)}")
    query = model.select(model.generation)
    for column, value in zip(columns, key, strict=True):
        query = query.where(column == value)
    return query


def _last_change(kind: str, key: Sequence[str]) -> str:
    """The newest audit entry about the resource (its path names the kind's route and
    each part of its key): who changed it, when and how; "" when none is recorded yet."""
    rows = (LogEntry.select().where(LogEntry.resource.contains(f"/{key[-1]}"))
            .order_by(LogEntry.time.desc(), LogEntry.id.desc()).limit(50))
    for row in rows:
        segments = row.resource.strip("/").split("/")
        if ROUTE_SEGMENTS[kind] & set(segments) and all(part in segments for part in key):
            return f"{format_time(row.time)} by {row.user or 'nanod'}: {row.content}"
    return ""


class ConditionalStore:
    """Mixin of `state.store.Store`."""

    def generation_of(self, kind: str, key: Sequence[str]) -> int | None:
        """The resource's generation (None when there is no such resource)."""
        row = _query(kind, key).first()
        return None if row is None else row.generation

    def write_if_match(self, kind: str, key: Sequence[str], tags: Sequence[str],
                       write: Callable[..., T], *args: Any) -> tuple[T, int | None]:
        """Run `write(*args)` (store calls) in one transaction with the check that the
        resource's generation is one of `tags` (strings; "*" matches any existing one);
        returns its result and the generation after it. Raises PreconditionFailed, with
        everything rolled back, when the generation did not match."""
        with write_transaction():
            row = locked(_query(kind, key)).first()
            before = None if row is None else row.generation
            if before is None or ("*" not in tags and str(before) not in tags):
                raise PreconditionFailed(self._mismatch(kind, key, before, tags))
            return write(*args), self.generation_of(kind, key)

    def _mismatch(self, kind: str, key: Sequence[str], generation: int | None,
                  tags: Sequence[str]) -> str:
        name = "/".join(key)
        sent = ", ".join(etag(int(t)) if t.isdigit() else t for t in tags)
        if generation is None:
            return (f"If-Match: there is no {kind} {name!r} any more (you sent {sent}); "
                    "nothing was changed")
        last = _last_change(kind, key)
        changed = f" (last change {last})" if last else ""
        return (f"If-Match: {kind} {name!r} is at generation {generation}, not {sent}: it "
                f"was changed since you read it{changed}; nothing was changed: read it "
                f"again and retry with If-Match: {etag(generation)}")
