"""peewee models: one table per resource of the Nano API, with the spec/status split.

Reconciled resources (pools, cells, storage and address pools, guests, snapshots, images,
security policy groups, migrations, batch tasks) carry the `Reconciled` columns: the spec
written only by the API or a manifest (`generation` bumped on each change) and the status
written only by the reconciler (`observed_generation`, `phase`, `progress`, `conditions`,
`last_error`, `observed`). Identity records (users, groups, roles, sessions, logs) have
nothing on a host to observe, so they are spec only.

Only `state/` imports these; other layers receive dicts or dataclasses from the store.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import peewee

from state.db import db


class JSONField(peewee.TextField):
    """JSON in a text column: the same on SQLite and PostgreSQL."""

    def db_value(self, value: Any) -> str | None:
        return None if value is None else json.dumps(value, sort_keys=True)

    def python_value(self, value: str | None) -> Any:
        return None if value is None else json.loads(value)


def now() -> dt.datetime:
    return dt.datetime.now().replace(microsecond=0)


class Base(peewee.Model):
    class Meta:
        database = db
        legacy_table_names = False


class Reconciled(Base):
    """Spec + status columns shared by every kind the reconciler converges."""

    generation = peewee.IntegerField(default=1)
    deleting = peewee.BooleanField(default=False)
    created_at = peewee.DateTimeField(default=now)
    modified_at = peewee.DateTimeField(default=now)
    # status: written only by the reconciler
    observed_generation = peewee.IntegerField(default=0)
    phase = peewee.CharField(default="pending")
    progress = peewee.IntegerField(default=0)
    conditions = JSONField(default=list)
    last_error = peewee.TextField(default="")
    observed = JSONField(default=dict)

    # Every write of these rows passes through here, so the event stream (state/events.py)
    # is fed from one place: spec changes (generation, deleting), status transitions,
    # creation and removal (delete_instance and save's UPDATE go through these queries).
    # The imports are late: state.events imports this module.
    @classmethod
    def update(cls, __data: Any = None, **update: Any) -> peewee.ModelUpdate:
        from state.events import EventedUpdate

        return EventedUpdate(cls, cls._normalize_data(__data, update))

    @classmethod
    def delete(cls) -> peewee.ModelDelete:
        from state.events import EventedDelete

        return EventedDelete(cls)

    def save(self, force_insert: bool = False, only: Any = None) -> Any:
        from state import events

        with events.saving(self):
            rows = super().save(force_insert=force_insert, only=only)
        if force_insert:
            events.created(self)
        return rows


class SchemaVersion(Base):
    version = peewee.IntegerField(primary_key=True)
    applied_at = peewee.DateTimeField(default=now)


# -- identity and access -------------------------------------------------------------------


class Role(Base):
    name = peewee.CharField(primary_key=True)
    menu = JSONField(default=list)
    created_at = peewee.DateTimeField(default=now)


class UserGroup(Base):
    name = peewee.CharField(primary_key=True)
    display = peewee.CharField(default="")
    instance_visible = peewee.BooleanField(default=False)
    media_image_visible = peewee.BooleanField(default=False)
    disk_image_visible = peewee.BooleanField(default=False)
    created_at = peewee.DateTimeField(default=now)


class Quota(Base):
    """Limits of one user group (state/quotas.py); 0 = unlimited. A group without a row
    has no limits. Removed with its group."""

    group = peewee.ForeignKeyField(UserGroup, primary_key=True, backref="quota",
                                   on_delete="CASCADE")
    cores = peewee.IntegerField(default=0)
    memory = peewee.BigIntegerField(default=0)  # bytes
    disk = peewee.BigIntegerField(default=0)  # bytes
    guests = peewee.IntegerField(default=0)
    image_storage = peewee.BigIntegerField(default=0)  # bytes of disk + media image files
    generation = peewee.IntegerField(default=1)
    modified_at = peewee.DateTimeField(default=now)


class GroupRole(Base):
    group = peewee.ForeignKeyField(UserGroup, backref="role_links", on_delete="CASCADE")
    role = peewee.ForeignKeyField(Role, backref="group_links", on_delete="RESTRICT")

    class Meta:
        indexes = ((("group", "role"), True),)


class User(Base):
    name = peewee.CharField(primary_key=True)
    nick = peewee.CharField(default="")
    mail = peewee.CharField(default="")
    password_hash = peewee.CharField()
    group = peewee.ForeignKeyField(UserGroup, null=True, backref="members", on_delete="RESTRICT")
    created_at = peewee.DateTimeField(default=now)
    modified_at = peewee.DateTimeField(default=now)


class Session(Base):
    """A login. `token_hash` is SHA-256 of the bearer token: a copy of the database alone
    does not let anyone act as a user."""

    token_hash = peewee.CharField(primary_key=True)
    handle = peewee.CharField(unique=True)
    user = peewee.ForeignKeyField(User, backref="sessions", on_delete="CASCADE")
    group = peewee.CharField(default="")
    menu = JSONField(default=list)
    address = peewee.CharField(default="")
    timeout = peewee.IntegerField()
    expires = peewee.DoubleField(index=True)  # epoch seconds: REAL (float4) would round to minutes
    created_at = peewee.DateTimeField(default=now)


class LogEntry(Base):
    id = peewee.CharField(primary_key=True, max_length=17)
    time = peewee.DateTimeField(index=True)
    content = peewee.TextField()
    user = peewee.CharField(default="")
    address = peewee.CharField(default="")
    resource = peewee.CharField(default="")
    request_id = peewee.CharField(default="")  # X-Request-Id of the request that wrote it


# -- compute ------------------------------------------------------------------------------


class ComputePool(Reconciled):
    name = peewee.CharField(unique=True)
    enabled = peewee.BooleanField(default=True)
    storage = peewee.CharField(default="")  # StoragePool name, "" = local storage
    network = peewee.CharField(default="")  # AddressPool name, "" = default NAT
    failover = peewee.BooleanField(default=False)


class Cell(Reconciled):
    name = peewee.CharField(unique=True)
    pool = peewee.CharField(default="", index=True)  # ComputePool name, "" = unallocated
    enabled = peewee.BooleanField(default=True)
    spec = JSONField(default=dict)  # address, libvirt_uri, ssh, virt_type, storage, bridge


class StoragePool(Reconciled):
    name = peewee.CharField(unique=True)
    type = peewee.CharField(default="nfs")
    host = peewee.CharField(default="")
    target = peewee.CharField(default="")


class AddressPool(Reconciled):
    name = peewee.CharField(unique=True)
    gateway = peewee.CharField()
    dns = JSONField(default=list)
    provider = peewee.CharField(default="dhcp")
    mode = peewee.CharField(default="internal")


class AddressRange(Base):
    pool = peewee.ForeignKeyField(AddressPool, backref="ranges", on_delete="CASCADE")
    type = peewee.CharField(default="internal")
    start = peewee.CharField()
    end = peewee.CharField()
    netmask = peewee.CharField()

    class Meta:
        indexes = ((("pool", "type", "start"), True),)


class AddressAllocation(Base):
    """One address held by one guest interface; the unique index makes allocation safe
    under concurrency (a second insert of the same address fails)."""

    pool = peewee.ForeignKeyField(AddressPool, backref="allocations", on_delete="RESTRICT")
    type = peewee.CharField(default="internal")
    address = peewee.CharField()
    guest = peewee.CharField(index=True)

    class Meta:
        indexes = ((("pool", "address"), True),)


class PortAllocation(Base):
    """A cell port forwarded (DNAT) to a guest port."""

    cell = peewee.CharField()
    port = peewee.IntegerField()
    guest = peewee.CharField(index=True)
    guest_port = peewee.IntegerField()

    class Meta:
        indexes = ((("cell", "port"), True),)


# -- templates, guests, snapshots ------------------------------------------------------------


class Template(Base):
    id = peewee.CharField(primary_key=True)
    name = peewee.CharField(unique=True)
    spec = JSONField(default=dict)  # admin, operating_system, disk, network, display, ...
    generation = peewee.IntegerField(default=1)  # bumped by each modify: the ETag
    created_at = peewee.DateTimeField(default=now)
    modified_at = peewee.DateTimeField(default=now)


class Guest(Reconciled):
    id = peewee.CharField(primary_key=True)
    name = peewee.CharField()
    pool = peewee.CharField(index=True)
    cell = peewee.CharField(default="", index=True)  # placement, chosen once
    owner = peewee.CharField(default="")
    group = peewee.CharField(default="")
    spec = JSONField(default=dict)  # GuestConfig fields and desired power/media/restart
    batch = peewee.CharField(default="", index=True)

    class Meta:
        indexes = ((("pool", "name"), True),)


class GuestDisk(Base):
    guest = peewee.ForeignKeyField(Guest, backref="disk_rows", on_delete="CASCADE")
    index = peewee.IntegerField()  # 0 = system, 1.. = data
    size = peewee.BigIntegerField()

    class Meta:
        indexes = ((("guest", "index"), True),)


class GuestInterface(Base):
    guest = peewee.ForeignKeyField(Guest, backref="interfaces", on_delete="CASCADE")
    type = peewee.CharField(default="internal")  # internal | external
    mac = peewee.CharField(unique=True)
    address = peewee.CharField(default="")


class GuestPolicy(Base):
    guest = peewee.ForeignKeyField(Guest, backref="policy", on_delete="CASCADE", unique=True)
    default_action = peewee.CharField(default="accept")
    rules = JSONField(default=list)  # ordered SecurityPolicyRule objects
    generation = peewee.IntegerField(default=1)


class Snapshot(Reconciled):
    guest = peewee.ForeignKeyField(Guest, backref="snapshots", on_delete="CASCADE")
    name = peewee.CharField()
    description = peewee.TextField(default="")
    parent = peewee.CharField(default="")

    class Meta:
        indexes = ((("guest", "name"), True),)


# -- images --------------------------------------------------------------------------------


class Image(Reconciled):
    """Media (ISO) and disk (qcow2) images; `kind` tells which."""

    id = peewee.CharField(primary_key=True)
    kind = peewee.CharField(index=True)  # media | disk
    name = peewee.CharField()
    owner = peewee.CharField(default="")
    group = peewee.CharField(default="")
    description = peewee.TextField(default="")
    tags = JSONField(default=list)
    version = peewee.IntegerField(default=0)  # bumped by each completed upload
    size = peewee.BigIntegerField(default=0)
    checksum = peewee.CharField(default="")  # SHA-1 hex of the current file
    source_guest = peewee.CharField(default="")
    # the replica (state/leases.py) whose upload of a new version is running, "" for none:
    # a replica starting up settles only the uploads of replicas that are gone
    uploader = peewee.CharField(default="")

    class Meta:
        indexes = ((("kind", "group", "name"), True),)


class ImageReplica(Base):
    """A copy of an image version cached as a volume on a cell."""

    image = peewee.CharField(index=True)
    version = peewee.IntegerField()
    cell = peewee.CharField(index=True)
    volume = peewee.CharField()
    size = peewee.BigIntegerField(default=0)
    checksum = peewee.CharField(default="")
    created_at = peewee.DateTimeField(default=now)

    class Meta:
        indexes = ((("image", "version", "cell"), True),)


# -- security policies ---------------------------------------------------------------------


class SecurityPolicyGroup(Reconciled):
    id = peewee.CharField(primary_key=True)
    name = peewee.CharField()
    description = peewee.TextField(default="")
    owner = peewee.CharField(default="")
    group = peewee.CharField(default="")
    enabled = peewee.BooleanField(default=True)
    is_global = peewee.BooleanField(default=False)
    default_action = peewee.CharField(default="accept")
    rules = JSONField(default=list)


# -- the event stream -----------------------------------------------------------------------


class Event(Base):
    """One entry of the event stream (state/events.py writes, GET /api/v1/events reads).

    `id` is the stream's cursor: it only grows (the newest row is never trimmed, so
    SQLite never hands out an id again). `owner`/`group` decide who sees it (both empty:
    every session, as for infrastructure)."""

    id = peewee.BigAutoField()
    time = peewee.DoubleField(index=True)  # epoch seconds: trimmed by age on it
    kind = peewee.CharField()  # manifest kind: Guest, Cell, DiskImage, Migration, ...
    name = peewee.CharField(default="")
    ref = peewee.CharField(default="")  # the resource's id (its name where it has none)
    type = peewee.CharField()  # created, changed, deleting, removed, status, online, ...
    actor = peewee.CharField(default="")  # who: a user, or "nanod" for its own writes
    owner = peewee.CharField(default="")
    group = peewee.CharField(default="")
    payload = JSONField(default=dict)


# -- long work -------------------------------------------------------------------------------


class Migration(Reconciled):
    id = peewee.CharField(primary_key=True)
    spec = JSONField(default=dict)  # source_pool, source_cell, target_pool, target_cell, instances
    finished = peewee.BooleanField(default=False)


class BatchTask(Reconciled):
    id = peewee.CharField(primary_key=True)
    kind = peewee.CharField()  # create_guest | delete_guest | stop_guest
    owner = peewee.CharField(default="")
    spec = JSONField(default=dict)
    finished_at = peewee.DateTimeField(null=True)


class BatchEntry(Base):
    task = peewee.ForeignKeyField(BatchTask, backref="entries", on_delete="CASCADE")
    position = peewee.IntegerField()
    guest = peewee.CharField(default="")
    name = peewee.CharField(default="")
    status = peewee.CharField(default="")
    error = peewee.TextField(default="")

    class Meta:
        indexes = ((("task", "position"), True),)


# -- idempotent writes ------------------------------------------------------------------------


class IdempotencyKey(Base):
    """The first reply to a POST that carried an `Idempotency-Key` (state/idempotency.py):
    a retry with the same key, caller and route gets it back instead of a second create.
    `scope` is SHA-256 of (user, route, key), so long keys and paths need no long index;
    `status` is null while the first request is still being handled."""

    scope = peewee.CharField(primary_key=True, max_length=64)
    user = peewee.CharField()
    route = peewee.TextField()
    body_hash = peewee.CharField(max_length=64)
    status = peewee.IntegerField(null=True)
    reply = peewee.TextField(null=True)
    created = peewee.DoubleField(index=True)  # epoch seconds: trimmed after a day


# -- several replicas of nanod on one store (state/leases.py) --------------------------------


class ControlReplica(Base):
    """A running nanod of this store: it writes `heartbeat_at` every renewal; one whose
    heartbeat is older than the lease TTL is gone."""

    id = peewee.CharField(primary_key=True)
    address = peewee.CharField(default="")  # where its API listens, for people
    host = peewee.CharField(default="")
    pid = peewee.IntegerField(default=0)
    started_at = peewee.DoubleField(default=0.0)  # epoch seconds
    heartbeat_at = peewee.DoubleField(default=0.0)
    ttl = peewee.DoubleField(default=10.0)  # the lease TTL it runs with
    reconciles = peewee.BooleanField(default=True)  # False: API only, takes no lease


class Lease(Base):
    """Who reconciles what: `global` (pools, address pools, images, placement) or
    `cell:NAME` (a cell and its guests, network and firewall). `token` is the fencing token,
    raised by one at every acquisition; a reconciler's writes carry the token they were
    given and are refused once it is not the lease's (state/db.py)."""

    name = peewee.CharField(primary_key=True)
    holder = peewee.CharField(default="")  # a ControlReplica id, "" = free
    token = peewee.BigIntegerField(default=0)
    acquired_at = peewee.DoubleField(default=0.0)  # epoch seconds
    expires_at = peewee.DoubleField(default=0.0)


class MonitorChannel(Base):
    """A one-time console channel (api/console.py), in the store so that the replica that
    made it and the one the websocket reaches need not be the same. `token_hash` is SHA-256
    of the channel id, which is the websocket's only credential."""

    token_hash = peewee.CharField(primary_key=True, max_length=64)
    guest = peewee.CharField()
    cell = peewee.CharField()
    port = peewee.IntegerField()
    expires_at = peewee.DoubleField(index=True)  # epoch seconds


ALL_MODELS: list[type[Base]] = [
    Role,
    UserGroup,
    Quota,
    GroupRole,
    User,
    Session,
    LogEntry,
    ComputePool,
    Cell,
    StoragePool,
    AddressPool,
    AddressRange,
    AddressAllocation,
    PortAllocation,
    Template,
    Guest,
    GuestDisk,
    GuestInterface,
    GuestPolicy,
    Snapshot,
    Image,
    ImageReplica,
    SecurityPolicyGroup,
    Migration,
    BatchTask,
    BatchEntry,
    Event,
    IdempotencyKey,
    ControlReplica,
    Lease,
    MonitorChannel,
]
