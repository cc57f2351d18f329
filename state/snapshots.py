"""Guest snapshots in the store: one `Snapshot` row per snapshot, a tree through `parent`.

Called by the snapshot routes (`api/guests.py`, /instances/{id}/snapshots/) and by the
guest reconciler, which converges a guest's snapshots in the same reconcile as the guest
(Key("guest", id)): every snapshot request bumps the guest's generation.

Contract with the reconciler (see also state/guests.py):
  - a new row (phase "creating") asks for a disk snapshot of the stopped guest; its
    `parent` is the snapshot that was current when it was requested;
  - `deleting` on a row asks to delete that snapshot (libvirt merges it into its children);
    the reconciler calls `finish_snapshot_delete` once it is gone from libvirt;
  - guest spec.restore = {target, generation} asks to revert the stopped guest to `target`;
    record observed.restore_generation when done;
  - guest spec.current_snapshot is the snapshot that should be current (always a live,
    not-deleting snapshot or ""); record what libvirt says in observed.current_snapshot;
  - `record_snapshot_observed` writes a snapshot's phase ("created" once it exists in
    libvirt, "failed"), last_error and observed facts.

Creating and restoring are refused while the guest is observed running (the original
takes snapshots of stopped guests only); deleting is allowed in any state.
"""

from __future__ import annotations

from typing import Any

from state.db import db
from state.errors import Conflict, NotFound
from state.identity import SessionInfo, format_time
from state.models import Guest, Snapshot


def live_ancestor(rows: dict[str, Snapshot], name: str) -> str:
    """`name` itself when it is a live (not deleting) snapshot, else its nearest live
    ancestor, else ""."""
    seen: set[str] = set()
    while name and name in rows and name not in seen:
        if not rows[name].deleting:
            return name
        seen.add(name)
        name = rows[name].parent
    return ""


def current_snapshot(guest: Guest, rows: dict[str, Snapshot]) -> str:
    """The current snapshot as the API reports it: what the reconciler observed once it
    has converged the guest's latest generation, else the desired one, else the newest."""
    obs = guest.observed or {}
    if guest.observed_generation >= guest.generation and obs.get("current_snapshot"):
        observed = live_ancestor(rows, obs["current_snapshot"])
        if observed:
            return observed
    desired = live_ancestor(rows, (guest.spec or {}).get("current_snapshot", ""))
    if desired:
        return desired
    live = [r for r in rows.values() if not r.deleting]
    return max(live, key=lambda r: (r.created_at, r.id)).name if live else ""


class SnapshotStore:
    """Mixin of `state.store.Store`: guest snapshots. Uses the guest helpers of
    `state.guests.GuestStore` (visibility, `_change`) through the Store."""

    @staticmethod
    def _snapshots(guest_id: str) -> dict[str, Snapshot]:
        rows = Snapshot.select().where(Snapshot.guest == guest_id).order_by(
            Snapshot.created_at, Snapshot.id)
        return {r.name: r for r in rows}

    def list_snapshots(self, session: SessionInfo, guest_id: str) -> dict[str, Any]:
        """{"s1": {"is_root": true}, "s2": {"backing": "s1", "is_current": true}}: the
        snapshots not being deleted; a deleted snapshot's children hang from its parent."""
        guest = self._guest(session, guest_id)  # type: ignore[attr-defined]
        rows = self._snapshots(guest.id)
        current = current_snapshot(guest, rows)
        out: dict[str, Any] = {}
        for name, row in rows.items():
            if row.deleting:
                continue
            backing = live_ancestor(rows, row.parent)
            item: dict[str, Any] = {"backing": backing} if backing else {"is_root": True}
            if name == current:
                item["is_current"] = True
            out[name] = item
        return out

    def snapshot(self, session: SessionInfo, guest_id: str, name: str) -> dict[str, Any]:
        guest = self._guest(session, guest_id)  # type: ignore[attr-defined]
        row = Snapshot.get_or_none((Snapshot.guest == guest.id) & (Snapshot.name == name))
        if row is None or row.deleting:
            raise NotFound(f"guest {guest.name!r} has no snapshot named {name!r}")
        return {"running": False, "description": row.description,
                "create_time": format_time(row.created_at)}

    def create_snapshot(self, session: SessionInfo, guest_id: str, name: str,
                        description: str = "") -> str:
        """Returns the guest's name."""
        def change(row: Guest, spec: dict[str, Any]) -> str:
            self._require_created(row, "take a snapshot")  # type: ignore[attr-defined]
            if self._running(row):  # type: ignore[attr-defined]
                raise Conflict(f"guest {row.name!r} is running: stop the guest first, "
                               "snapshots are taken of stopped guests")
            rows = self._snapshots(row.id)
            if name in rows:
                state = " and is being deleted: try again later" if rows[name].deleting else ""
                raise Conflict(f"guest {row.name!r} already has a snapshot named {name!r}"
                               f"{state}")
            Snapshot.create(guest=row.id, name=name, description=description,
                            parent=current_snapshot(row, rows), phase="creating")
            spec["current_snapshot"] = name
            return row.name
        return self._change(session, guest_id, change)  # type: ignore[attr-defined]

    def restore_snapshot(self, session: SessionInfo, guest_id: str, target: str) -> str:
        def change(row: Guest, spec: dict[str, Any]) -> str:
            self._require_created(row, "restore a snapshot")  # type: ignore[attr-defined]
            rows = self._snapshots(row.id)
            if target not in rows or rows[target].deleting:
                raise NotFound(f"guest {row.name!r} has no snapshot named {target!r}")
            if self._running(row):  # type: ignore[attr-defined]
                raise Conflict(f"guest {row.name!r} is running: stop the guest first, "
                               "snapshots are restored on stopped guests")
            previous = (spec.get("restore") or {}).get("generation", 0)
            spec["restore"] = {"target": target, "generation": previous + 1}
            spec["current_snapshot"] = target
            return row.name
        return self._change(session, guest_id, change)  # type: ignore[attr-defined]

    def delete_snapshot(self, session: SessionInfo, guest_id: str, name: str) -> str:
        def change(row: Guest, spec: dict[str, Any]) -> str:
            rows = self._snapshots(row.id)
            if name not in rows or rows[name].deleting:
                raise NotFound(f"guest {row.name!r} has no snapshot named {name!r}")
            Snapshot.update(deleting=True, generation=Snapshot.generation + 1).where(
                Snapshot.id == rows[name].id).execute()
            rows[name].deleting = True
            spec["current_snapshot"] = live_ancestor(rows, spec.get("current_snapshot", ""))
            return row.name
        return self._change(session, guest_id, change)  # type: ignore[attr-defined]

    # -- for the reconciler ---------------------------------------------------------------

    def record_snapshot_observed(self, guest_id: str, name: str, *, phase: str | None = None,
                                 last_error: str | None = None,
                                 observed: dict[str, Any] | None = None,
                                 generation: int | None = None) -> bool:
        """Status of one snapshot (observed merged key by key); False when it is gone."""
        with db.atomic():
            row = Snapshot.get_or_none((Snapshot.guest == guest_id) & (Snapshot.name == name))
            if row is None:
                return False
            columns: dict[Any, Any] = {}
            if phase is not None:
                columns[Snapshot.phase] = phase
            if last_error is not None:
                columns[Snapshot.last_error] = last_error
            if observed is not None:
                columns[Snapshot.observed] = {**(row.observed or {}), **observed}
            if generation is not None:
                columns[Snapshot.observed_generation] = generation
            if columns:
                Snapshot.update(columns).where(Snapshot.id == row.id).execute()
        return True

    def finish_snapshot_delete(self, guest_id: str, name: str) -> bool:
        """The reconciler removed a deleting snapshot from libvirt: drop its row and hang
        its children from its parent. False when already gone."""
        with db.atomic():
            row = Snapshot.get_or_none((Snapshot.guest == guest_id) & (Snapshot.name == name))
            if row is None:
                return False
            if not row.deleting:
                raise Conflict(f"snapshot {name!r} is not being deleted: refusing to remove it")
            Snapshot.update(parent=row.parent).where(
                (Snapshot.guest == guest_id) & (Snapshot.parent == name)).execute()
            row.delete_instance()
        return True
