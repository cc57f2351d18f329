"""The reconcile contract: keys, results, planned actions, status conditions, the Protocol.

Everything here is a plain value. The API builds `Key`s and calls an `Enqueue`; planners
return lists of `Action`; reconcilers implement `Reconciler` and write conditions computed
with `set_condition`; the loop (`reconciler.loop`) drives them. ARCHITECTURE.md §3 says why
the shapes are these (controller-runtime's request/result, Terraform's plan as data).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
"""How `Condition.last_transition` is written: the Nano API's own time format."""

READY = "Ready"
"""The condition type that, with `observed_generation == generation`, means converged."""


@dataclass(frozen=True, order=True)
class Key:
    """What to reconcile: a kind and an id, never why (no event, no verb).

    Ordered by (kind, id) so that `run_once` and reports are deterministic.
    """

    kind: str
    id: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.id}"

    @classmethod
    def parse(cls, text: str) -> Key:
        """Inverse of `str()`: "guest/abc" -> Key("guest", "abc")."""
        kind, sep, ident = text.partition("/")
        if not sep or not kind or not ident:
            raise ValueError(f"not a key (want kind/id): {text!r}")
        return cls(kind, ident)


Enqueue = Callable[[Key], None]
"""What the API and event sources receive: hand a key to the loop; never blocks."""


@dataclass(frozen=True)
class Result:
    """What one reconcile asks of the loop.

    `requeue_after`: reconcile this key again after that many seconds even if nothing
    triggers it (long work in progress, polling a guest agent). None: only on triggers and
    resync. Errors are not results: raise, and the loop retries with backoff.
    """

    requeue_after: float | None = None
    actions: tuple[Action, ...] = ()
    note: str = ""

    def summary(self) -> str:
        """One line for people (`nanod reconcile --once`)."""
        done = "; ".join(a.describe() for a in self.actions) or "no change"
        return f"{done}{' (' + self.note + ')' if self.note else ''}"


class Verb(StrEnum):
    """What an action does; a `str`, so plans serialise as plain text."""

    CREATE = "create"
    UPDATE = "update"
    REPLACE = "replace"
    DELETE = "delete"
    START = "start"
    STOP = "stop"
    RESTART = "restart"
    ATTACH = "attach"
    DETACH = "detach"


class Effect(StrEnum):
    """How a change takes effect on what runs: the classes `nanod apply --diff` shows and
    the guest planner gives each action (reconciler/guest_plan.py)."""

    LIVE = "live"
    RESTART = "needs restart"
    REPLACE = "replaces"
    DESTRUCTIVE = "destructive"


# Field names whose values never appear in a description: these strings end up in logs,
# `nanod diff` output and status messages.
_SECRET_MARKERS = ("password", "secret", "token", "private")
_MAX_VALUE_CHARS = 60


def _shown(field: str, value: object) -> str:
    if any(marker in field.lower() for marker in _SECRET_MARKERS):
        return "(sensitive)"
    text = repr(value)
    if len(text) > _MAX_VALUE_CHARS:
        text = text[: _MAX_VALUE_CHARS - 3] + "..."
    return text


_MISSING = object()


@dataclass(frozen=True)
class Action:
    """One step of a plan: a value, produced by a pure planner, executed by drivers.

    `before`/`after` are the compared fields as observed and as desired (None when the
    thing does not exist on that side). `reason` is for people; apply never branches on it.
    `live`: True to change a running guest now, False for the persistent definition only,
    None when the distinction does not apply. `effect`: how the change takes effect
    (manifest plans), None when not classified.
    """

    verb: Verb
    target: Key
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None
    reason: str = ""
    live: bool | None = None
    effect: Effect | None = None

    def changes(self) -> list[tuple[str, object, object]]:
        """(field, before, after) for every top-level field that differs, sorted by field;
        a missing side reads as None."""
        before = self.before or {}
        after = self.after or {}
        out: list[tuple[str, object, object]] = []
        for field in sorted(set(before) | set(after)):
            old, new = before.get(field, _MISSING), after.get(field, _MISSING)
            if old != new:
                out.append(
                    (field, None if old is _MISSING else old, None if new is _MISSING else new)
                )
        return out

    def describe(self) -> str:
        """One line for people, e.g. "update guest/abc: cores 2 -> 4 (live; cpu changed)".

        Values of fields that look secret are never shown.
        """
        text = f"{self.verb.value} {self.target}"
        if self.verb in (Verb.UPDATE, Verb.REPLACE):
            changed = [
                f"{field} {_shown(field, old)} -> {_shown(field, new)}"
                for field, old, new in self.changes()
            ]
            if changed:
                text += ": " + ", ".join(changed)
        notes = []
        if self.live is True:
            notes.append("live")
        elif self.live is False:
            notes.append("persistent only")
        if self.reason:
            notes.append(self.reason)
        if notes:
            text += f" ({'; '.join(notes)})"
        return text

    def __str__(self) -> str:
        return self.describe()


@dataclass(frozen=True)
class Condition:
    """One Kubernetes-style status condition, as stored in a record's `conditions` list.

    `last_transition` changes only when `status` flips, so it says how long a resource has
    been (not) Ready, not when it was last looked at.
    """

    type: str
    status: bool
    reason: str = ""
    message: str = ""
    last_transition: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "last_transition": self.last_transition,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Condition:
        return cls(
            type=str(data["type"]),
            status=bool(data.get("status", False)),
            reason=str(data.get("reason", "")),
            message=str(data.get("message", "")),
            last_transition=str(data.get("last_transition", "")),
        )


def format_time(moment: dt.datetime | str) -> str:
    """`moment` as 'YYYY-MM-DD HH:MM:SS'; strings are taken as already formatted."""
    return moment if isinstance(moment, str) else moment.strftime(TIME_FORMAT)


def set_condition(
    conditions: Iterable[Mapping[str, Any]],
    type: str,
    status: bool,
    reason: str,
    message: str,
    now: dt.datetime | str,
) -> list[dict[str, Any]]:
    """Return a new conditions list with condition `type` set; the input is not changed.

    The condition keeps its place in the list (or is appended). Its `last_transition` becomes
    `now` only when it is new or its status flips; otherwise the stored time is kept, so
    recording the same state on every reconcile is a no-op apart from reason and message.
    A stray duplicate of the same type is dropped.
    """
    stamp = format_time(now)
    out: list[dict[str, Any]] = []
    found = False
    for entry in conditions:
        if entry.get("type") != type:
            out.append(dict(entry))
            continue
        if found:
            continue
        found = True
        previous = Condition.from_dict(entry)
        unchanged = previous.status == status and previous.last_transition
        since = previous.last_transition if unchanged else stamp
        out.append(Condition(type, status, reason, message, since).to_dict())
    if not found:
        out.append(Condition(type, status, reason, message, stamp).to_dict())
    return out


def get_condition(conditions: Iterable[Mapping[str, Any]], type: str) -> Condition | None:
    """The condition of that type in a stored list, or None."""
    for entry in conditions:
        if entry.get("type") == type:
            return Condition.from_dict(entry)
    return None


class Reconciler(Protocol):
    """One per kind. The loop calls `reconcile` from worker threads, never for the same key
    on two threads at once, and `keys` from the resync thread.
    """

    kind: str

    def reconcile(self, key: Key) -> Result:
        """Converge `key` a step: observe desired and observed state, plan (pure), apply,
        re-observe and record status. Idempotent: run twice, it changes nothing the second
        time; a missing record means deleted and gone, which is success.

        Raise to report failure (the loop logs it and retries with backoff; record
        `last_error` and conditions first where the status should show it). Return a
        `Result` with `requeue_after` to be called again while work is in progress.
        """
        ...

    def keys(self) -> Iterable[Key]:
        """Every key of this kind that may need reconciling (including records marked
        deleting), for the periodic resync and `nanod reconcile --once`."""
        ...


class Meter(Protocol):
    """What the reconciler tells the process's metrics (api/metrics.py's `Metrics`, handed
    in by nanod/server.py; the reconciler never imports the API). Called from worker and
    long-work threads; quick, never raises."""

    def reconciled(self, kind: str, key_id: str, ok: bool, seconds: float) -> None:
        """One reconcile ended (`ok`: it returned a result, did not raise)."""
        ...

    def transferred(self, direction: str, nbytes: int) -> None:
        """`nbytes` of an image moved: "to_cell" (sent to a cell), "from_cell" (read back)."""
        ...

    def domain_created(self, cell: str) -> None:
        """A guest's domain was defined on `cell` for the first time (not a redefinition)."""
        ...


class NoMeter:
    """A `Meter` that keeps nothing: `nanod reconcile --once` and reconcilers built in
    tests without a nanod."""

    def reconciled(self, kind: str, key_id: str, ok: bool, seconds: float) -> None:
        return None

    def transferred(self, direction: str, nbytes: int) -> None:
        return None

    def domain_created(self, cell: str) -> None:
        return None
