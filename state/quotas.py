"""Quotas per user group: how many cores, bytes of memory, bytes of guest disks, guests and
bytes of image files the guests and images of a group may hold together, and what they hold
now (usage).

Called by the quota routes (`api/quotas.py`: GET/PUT/DELETE /user_groups/{name}/quota) and,
inside their own write transactions, by every store function that makes a group hold more:
guest creates (`state/guests.py`), batch creates (`state/batches.py`), resizes
(`state/guest_changes.py`), image creates, clones, uploads, imports and moves between groups
(`state/images.py`).

Limits: a number per resource, 0 = unlimited; a group that never had a quota set (no
`Quota` row) has every limit 0. PUT changes the limits it names and keeps the others;
DELETE removes the quota (every limit unlimited again).

Usage is computed from the store, never kept as a counter that could drift:
  guests         every guest row of the group, whatever its phase (a deleting guest until
                 the reconciler removed it: it still holds its cell's resources)
  cores, memory  the sums of those guests' specs (`cores`, `memory`)
  disk           the sum of the sizes of all their disks (spec `disks`)
  image_storage  the sizes of the group's disk and media images (their current files), and
                 for a clone from a guest still being made, its source guest's system disk
                 size (what it reserves until its file is there)

Refusal: a request that asks a group for more (`asked`) is refused when, for a limit that
is not 0, usage + asked > limit. A request that asks nothing of a resource (a shrink, an
empty image) is never refused for it, even when a lowered limit is below the usage already
held. The refusal is `QuotaExceeded`, a Conflict (error_code 409), naming the group, each
quota exceeded with its limit, the usage and what the request asks, and the way out.

Concurrency: `check_quota` runs inside the caller's write transaction, before the write:
on PostgreSQL it locks the group's `Quota` row (SELECT ... FOR UPDATE), so checks of one
group are serialised and each counts the rows the previous ones committed (under READ
COMMITTED every statement sees what committed before it); on SQLite the transaction holds
the database's write lock from its start (BEGIN IMMEDIATE, state/db.py). Twenty parallel
creates against a quota of ten guests make exactly ten.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import peewee

from state.db import db
from state.errors import Conflict, Invalid, NotFound
from state.models import Guest, Image, Quota, UserGroup, now
from state.policies import locked, write_transaction

LIMITS = ("cores", "memory", "disk", "guests", "image_storage")
UNITS = {"cores": "cores", "memory": "bytes", "disk": "bytes", "guests": "guests",
         "image_storage": "bytes"}


class QuotaExceeded(Conflict):
    """A request would take a group past one of its quotas (error_code 409)."""


@dataclass(frozen=True)
class Usage:
    """What a group holds, or what a request asks of it, per quota resource."""

    cores: int = 0
    memory: int = 0
    disk: int = 0
    guests: int = 0
    image_storage: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(getattr(self, f) + getattr(other, f) for f in LIMITS))

    def times(self, count: int) -> Usage:
        return Usage(*(getattr(self, f) * count for f in LIMITS))

    def asks(self) -> list[str]:
        return [f for f in LIMITS if getattr(self, f) > 0]


def guest_usage(spec: dict[str, Any]) -> Usage:
    """What one guest with this spec holds of its group's quota."""
    return Usage(cores=int(spec.get("cores", 0)), memory=int(spec.get("memory", 0)),
                 disk=sum(int(d) for d in spec.get("disks", [])), guests=1)


def _amount(name: str, value: int) -> str:
    unit = UNITS[name]
    if unit == "bytes" and value >= 1 << 20:
        return f"{value} bytes ({value / (1 << 30):.2f} GiB)"
    return f"{value} {unit}"


def _problem(name: str, limit: int, have: int, want: int) -> str:
    return (f"{name} quota {_amount(name, limit)}: {_amount(name, have)} used, the request "
            f"asks {_amount(name, want)} more")


def exceeded(group: str, what: str, problems: list[str]) -> QuotaExceeded:
    """The refusal of `what` by the quotas of `group`, one problem per quota exceeded."""
    return QuotaExceeded(
        f"{what} would exceed the quota of user group {group!r}: " + "; ".join(problems)
        + ". Free some (delete guests or images) or raise the quota (PUT "
        f"/api/v1/user_groups/{group}/quota); nothing was changed")


@dataclass(frozen=True)
class ImageRoom:
    """An image's group's image storage quota, as an upload to the image counts against it:
    `used` by everything of the group but the image's current file."""

    group: str
    name: str
    limit: int
    used: int

    @property
    def room(self) -> int:
        return max(0, self.limit - self.used)

    def refusal(self, size: int, label: str) -> QuotaExceeded:
        """The refusal of a file of `size` bytes (or more: still arriving)."""
        return exceeded(self.group, f"uploading {size} bytes or more to {label} {self.name!r}",
                        [_problem("image_storage", self.limit, self.used, size)])


def _limits(row: Quota | None) -> dict[str, int]:
    return {f: int(getattr(row, f)) if row is not None else 0 for f in LIMITS}


class QuotaStore:
    """Mixin of `state.store.Store`: group quotas and the check every growth passes."""

    # -- usage ------------------------------------------------------------------------

    def group_usage(self, group: str) -> Usage:
        """What the guests and images of `group` hold now (see the module docstring)."""
        # the same sums placement makes per cell (state/guests.py), here per group
        guests, cores, memory, disk = self.guest_sums(  # type: ignore[attr-defined]
            Guest.group == group)
        files = (Image.select(peewee.fn.SUM(Image.size)).where(Image.group == group)
                 .scalar()) or 0
        return Usage(cores=cores, memory=memory, disk=disk, guests=guests,
                     image_storage=int(files) + self._cloning(group))

    @staticmethod
    def _cloning(group: str) -> int:
        """Bytes reserved by the group's clones still being made: each its source guest's
        system disk size (the file's size is known only once it is there)."""
        sources = [row.source_guest for row in Image.select(Image.source_guest).where(
            (Image.group == group) & (Image.source_guest != "") & (Image.version == 0)
            & (Image.phase != "failed"))]
        if not sources:
            return 0
        specs = {g.id: g.spec or {} for g in Guest.select(Guest.id, Guest.spec).where(
            Guest.id.in_(sorted(set(sources))))}
        return sum(int((specs.get(s, {}).get("disks") or [0])[0]) for s in sources)

    # -- the check ------------------------------------------------------------------------

    def check_quota(self, group: str, asked: Usage, what: str) -> None:
        """Refuse (`QuotaExceeded`) `asked` more for `group` when it would pass one of the
        group's limits. Call inside the transaction that then writes what was asked (the
        group's quota row stays locked until it ends: see the module docstring). `what`
        names the request for the message ("creating guest 'web-1'")."""
        if not asked.asks():
            return
        row = locked(Quota.select().where(Quota.group == group)).first()
        limits = _limits(row)
        if not any(limits[f] for f in asked.asks()):
            return  # nothing asked is limited: no usage to count
        used = self.group_usage(group)
        problems = []
        for name in asked.asks():
            limit, have, want = limits[name], getattr(used, name), getattr(asked, name)
            if limit and have + want > limit:
                problems.append(_problem(name, limit, have, want))
        if problems:
            raise exceeded(group, what, problems)

    def image_room(self, image_id: str) -> ImageRoom | None:
        """How large a new file of image `image_id` may be within its group's image storage
        quota (the file it replaces is freed); None when unlimited or no such image. What
        an upload counts its bytes against while they arrive; its commit checks again."""
        row = Image.get_or_none(Image.id == image_id)
        if row is None:
            return None
        quota = Quota.get_or_none(Quota.group == row.group)
        if quota is None or not quota.image_storage:
            return None
        used = self.group_usage(row.group).image_storage - row.size
        return ImageRoom(group=row.group, name=row.name, limit=int(quota.image_storage),
                         used=used)

    # -- the routes ---------------------------------------------------------------------

    @staticmethod
    def _quota_group(name: str) -> UserGroup:
        group = UserGroup.get_or_none(UserGroup.name == name)
        if group is None:
            raise NotFound(f"no user group named {name!r}")
        return group

    def quota(self, group: str) -> dict[str, Any]:
        """GET /user_groups/{name}/quota: {group, limits, usage}; a limit of 0 is unlimited."""
        self._quota_group(group)
        row = Quota.get_or_none(Quota.group == group)
        return {"group": group, "limits": _limits(row), "usage": asdict(self.group_usage(group))}

    def set_quota(self, group: str, values: dict[str, Any]) -> dict[str, Any]:
        """PUT /user_groups/{name}/quota: change the limits given (0 = unlimited), keep the
        others. A limit below the current usage is accepted (nothing is taken away) and
        refuses every further growth of that resource. Returns what `quota` returns."""
        unknown = sorted(set(values) - set(LIMITS))
        if unknown:
            raise Invalid(f"{', '.join(unknown)}: not a quota; quotas: {', '.join(LIMITS)}")
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise Invalid(f"{name}: {value!r} is not a whole number of at least 0 "
                              "(0 = unlimited)")
        with write_transaction():
            self._quota_group(group)
            row = locked(Quota.select().where(Quota.group == group)).first()
            if row is None:
                Quota.create(group=group, **values)
            elif values:
                Quota.update(generation=Quota.generation + 1, modified_at=now(),
                             **values).where(Quota.group == group).execute()
        return self.quota(group)

    def delete_quota(self, group: str) -> None:
        """DELETE /user_groups/{name}/quota: every limit unlimited again."""
        with db.atomic():
            self._quota_group(group)
            Quota.delete().where(Quota.group == group).execute()


__all__ = ["LIMITS", "ImageRoom", "QuotaExceeded", "QuotaStore", "Usage", "exceeded",
           "guest_usage"]
