"""Batch tasks: create, delete or stop many guests with one request, and follow them.

Called by the batch routes (`api/batches.py`). A task is a parent record (`BatchTask`) over
one `BatchEntry` per guest. Nothing reconciles a task: its guests are ordinary guests,
enqueued one by one, and an entry's status is derived when it is read from its guest's
row (creating/created/fail, deleting/deleted/fail, stopping/stopped/fail). Only refusals
at request time (no such guest, running without force, not running) are stored in the
entry, as "fail" with the reason.

Batch creates insert every guest in one transaction: all or none, so a crash or a refusal
(no room for the 5th guest, a name taken) never leaves half a batch, and a retry cannot
create a guest twice. Placement counts each guest of the batch as it places it, as it
counts guests that exist (state/placement.py): a batch of N fits exactly when N single
creates would. The group's quotas (state/quotas.py) are checked for the whole batch
before its first guest is made, in the same transaction.

Names: rule `order` gives <prefix>_0, <prefix>_1, ...; `MAC` names a guest after its MAC
with ':' replaced by '-' (00-16-3e-1a-2b-3c, after "<prefix>_" when a prefix is given);
`address` after its allocated internal address with '.' replaced by '-' (same prefix rule).

A task is answered to the user who started it. Finished tasks are kept an hour after they
finished (the first read that sees every entry finished stamps `finished_at`), then purged
by the next batch request.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from state.db import db
from state.errors import Conflict, Invalid, NanoError, NotFound
from state.guests import visible
from state.identity import SessionInfo
from state.models import BatchEntry, BatchTask, Guest, now
from state.placement import NoRoom
from state.quotas import guest_usage

KEEP_FINISHED = dt.timedelta(hours=1)
FINISHED = {"created", "deleted", "stopped", "fail"}
KINDS = ("create_guest", "delete_guest", "stop_guest")


def batch_name(prefix: str, suffix: str) -> str:
    return f"{prefix}_{suffix}" if prefix else suffix


class BatchStore:
    """Mixin of `state.store.Store`: batch tasks (uses `state.guests.GuestStore`)."""

    def purge_batches(self) -> int:
        """Remove tasks that finished more than an hour ago; returns how many."""
        old = [t.id for t in BatchTask.select(BatchTask.id).where(
            BatchTask.finished_at.is_null(False) & (BatchTask.finished_at < now() - KEEP_FINISHED))]
        if not old:
            return 0
        with db.atomic():
            BatchEntry.delete().where(BatchEntry.task.in_(old)).execute()
            BatchTask.delete().where(BatchTask.id.in_(old)).execute()
        return len(old)

    def _new_task(self, session: SessionInfo, kind: str, spec: dict[str, Any]) -> BatchTask:
        return BatchTask.create(id=str(uuid.uuid4()), kind=kind, owner=session.user,
                                spec=spec, phase="running")

    def batch_create_guests(self, session: SessionInfo, body: dict[str, Any]
                            ) -> tuple[str, list[dict[str, str]]]:
        """POST /batch/create_guest/: returns the task id and the guests' {id, name, cell}."""
        self.purge_batches()
        rule, prefix, count = body["name_rule"], body.get("name_prefix") or "", body["count"]
        if rule == "order" and not prefix:
            raise Invalid("name_prefix: is required with name_rule 'order' (names are "
                          "<prefix>_0, <prefix>_1, ...)")
        pinned = [k for k in ("ethernet_address", "network_address") if body.get(k)]
        if pinned:
            raise Invalid(f"{', '.join(pinned)}: cannot be given for a batch (every guest needs "
                          "its own); create those guests one by one")
        pool = self._pool(body["pool"])  # type: ignore[attr-defined]
        if rule == "address" and not pool.network:
            raise Invalid("name_rule address needs a compute pool with an address pool: "
                          f"compute pool {pool.name!r} has none; use 'order' or 'MAC'")
        plan = self.plan_guest(session, body)  # type: ignore[attr-defined]

        def by_mac(mac: str, addresses: dict[str, str]) -> str:
            return batch_name(prefix, mac.replace(":", "-"))

        def by_address(mac: str, addresses: dict[str, str]) -> str:
            if not addresses.get("internal"):
                raise Conflict("name_rule address: the address pool gave no internal address")
            return batch_name(prefix, addresses["internal"].replace(".", "-"))

        spec = {k: v for k, v in body.items() if k != "cloud_init"}
        guests = []
        with db.atomic():
            # the whole batch, before any of it is made (and, on PostgreSQL, with the
            # group's quota locked until the commit)
            self.check_quota(  # type: ignore[attr-defined]
                plan["group"], guest_usage(plan["spec"]).times(count),
                f"a batch of {count} guests")
            task = self._new_task(session, "create_guest", spec)
            rooms = self._cell_rooms(plan["pool"])  # type: ignore[attr-defined]
            for position in range(count):
                name: Any = {"order": f"{prefix}_{position}", "MAC": by_mac,
                             "address": by_address}[rule]
                try:
                    row = self.insert_guest(plan, name,  # type: ignore[attr-defined]
                                            batch=task.id, rooms=rooms)
                except NoRoom as exc:
                    raise NoRoom(f"batch of {count} guests: room for {position} only: "
                                 f"{exc.message}") from None
                BatchEntry.create(task=task.id, position=position, guest=row.id, name=row.name,
                                  status="creating")
                guests.append({"id": row.id, "name": row.name, "cell": row.cell})
        return task.id, guests

    def _batch_each(self, session: SessionInfo, kind: str, ids: list[str],
                    spec: dict[str, Any], act: Any) -> tuple[str, list[str]]:
        """A delete or stop task: `act(row)` on each visible guest, each in its own
        savepoint; refusals become "fail" entries. Returns the task id and the ids of the
        guests changed. A batch that names no guest the caller can see is refused (404)
        and stores nothing, as a single guest's route would."""
        if not Guest.select(Guest.id).where(Guest.id.in_(ids) & visible(session)).exists():
            raise NotFound(f"no guest {', '.join(map(repr, ids))} that you can see: a batch "
                           "needs at least one")
        self.purge_batches()
        changed = []
        with db.atomic():
            task = self._new_task(session, kind, spec)
            for position, guest_id in enumerate(ids):
                name, status, error = "", "", ""
                try:
                    with db.atomic():
                        row = self._guest(session, guest_id)  # type: ignore[attr-defined]
                        name = row.name
                        act(row)
                    changed.append(guest_id)
                except NanoError as exc:
                    status, error = "fail", exc.message
                BatchEntry.create(task=task.id, position=position, guest=guest_id, name=name,
                                  status=status, error=error)
        return task.id, changed

    def batch_delete_guests(self, session: SessionInfo, body: dict[str, Any]
                            ) -> tuple[str, list[str]]:
        force = bool(body.get("force", False))
        ids = list(dict.fromkeys(body["guest"]))
        return self._batch_each(
            session, "delete_guest", ids, {"guest": ids, "force": force},
            lambda row: self.mark_guest_deleting(row, force=force))  # type: ignore[attr-defined]

    def batch_stop_guests(self, session: SessionInfo, body: dict[str, Any]
                          ) -> tuple[str, list[str]]:
        ids = list(dict.fromkeys(body.get("guest") or body.get("guests") or []))
        if not ids:
            raise Invalid("guest: is required: the list of guest ids to stop")
        return self._batch_each(session, "stop_guest", ids, {"guest": ids},
                                self.request_stop)  # type: ignore[attr-defined]

    def batch_status(self, session: SessionInfo, kind: str, task_id: str
                     ) -> tuple[bool, list[dict[str, Any]]]:
        """(finished, entries) of a task of `kind` started by the caller."""
        self.purge_batches()
        task = BatchTask.get_or_none((BatchTask.id == task_id) & (BatchTask.kind == kind)
                                     & (BatchTask.owner == session.user))
        if task is None:
            raise NotFound(f"no batch {kind.replace('_', ' ')} task {task_id!r} of yours")
        entries = list(BatchEntry.select().where(BatchEntry.task == task.id)
                       .order_by(BatchEntry.position))
        ids = [e.guest for e in entries]
        guests = {g.id: g for g in Guest.select().where(Guest.id.in_(ids))} if ids else {}
        out = [_entry(kind, e, guests.get(e.guest)) for e in entries]
        finished = all(item["status"] in FINISHED for item in out)
        if finished and task.finished_at is None:
            BatchTask.update(finished_at=now(), phase="finished").where(
                BatchTask.id == task.id).execute()
        return finished, out


def _entry(kind: str, entry: BatchEntry, guest: Guest | None) -> dict[str, Any]:
    """One entry's reply, its status derived from the guest row."""
    item: dict[str, Any] = {"id": entry.guest, "name": guest.name if guest else entry.name}
    if entry.status == "fail":
        return {**item, "status": "fail", "error": entry.error}
    obs = (guest.observed or {}) if guest else {}
    if kind == "create_guest":
        if guest is None:
            return {**item, "status": "fail", "error": "the guest was deleted"}
        if obs.get("created"):
            return {**item, "status": "created"}
        if guest.phase == "failed":
            return {**item, "status": "fail", "error": guest.last_error or "creation failed"}
        return {**item, "status": "creating", "progress": guest.progress}
    if kind == "delete_guest":
        return {**item, "status": "deleting" if guest else "deleted"}
    if guest is None:
        return {**item, "status": "fail", "error": "the guest was deleted"}
    return {**item, "status": "stopping" if obs.get("running") else "stopped"}
