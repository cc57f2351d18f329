"""Reconcile status of every reconciled resource in one read: what `nanod drift` and
`nanod apply --wait` poll, through `GET /api/v1/resource_status/` (api/status.py).

A mixin of `state.store.Store`. It reads only the `Reconciled` columns (generation and the
status the reconciler records) of each kind's table and never writes.
"""

from __future__ import annotations

from typing import Any

from state.identity import SessionInfo
from state.models import (
    AddressPool,
    BatchTask,
    Cell,
    ComputePool,
    Guest,
    Image,
    Migration,
    SecurityPolicyGroup,
    Snapshot,
    StoragePool,
)

ADMIN_TAG = "user"
"""Sessions holding this menu tag see every resource; others see only what they own or
what their group shares (the guest and image visibility flags)."""

_IMAGE_KINDS = {"media": "MediaImage", "disk": "DiskImage"}
_IMAGE_FLAGS = {"media": "media_image_visible", "disk": "disk_image_visible"}


def _status(kind: str, name: str, ident: str, row: Any, **extra: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "name": name,
        "id": ident,
        "generation": row.generation,
        "observed_generation": row.observed_generation,
        "phase": row.phase,
        "deleting": bool(row.deleting),
        "conditions": list(row.conditions or []),
        "last_error": row.last_error or "",
        **extra,
    }


def _sees(viewer: SessionInfo | None, owner: str, group: str, flag: str | None) -> bool:
    if viewer is None or viewer.allows(ADMIN_TAG) or owner == viewer.user:
        return True
    if not group or group != viewer.group:
        return False
    return flag is None or bool(getattr(viewer, "visibility", {}).get(flag))


class StatusStore:
    """Mixin of `state.store.Store`: reconcile status across kinds."""

    def resource_statuses(self, viewer: SessionInfo | None = None) -> list[dict[str, Any]]:
        """[{kind, name, id, generation, observed_generation, phase, deleting, conditions,
        last_error, ...}] of every reconciled resource the viewer may see, ordered by kind
        and name. Guests add `pool`, snapshots `guest` (its id), images nothing more.
        Infrastructure (pools, cells, storage and address pools) is visible to every
        session, as its routes are."""
        out: list[dict[str, Any]] = []
        for model, kind in ((ComputePool, "ComputePool"), (Cell, "Cell"),
                            (StoragePool, "StoragePool"), (AddressPool, "AddressPool")):
            for row in model.select().order_by(model.name):
                out.append(_status(kind, row.name, row.name, row))
        for row in Guest.select().order_by(Guest.pool, Guest.name):
            if _sees(viewer, row.owner, row.group, "instance_visible"):
                out.append(_status("Guest", row.name, row.id, row, pool=row.pool))
        guests = {g.id: g for g in Guest.select(Guest.id, Guest.owner, Guest.group)}
        for row in Snapshot.select().order_by(Snapshot.guest, Snapshot.name):
            owner = guests.get(row.guest_id)
            if owner is None or _sees(viewer, owner.owner, owner.group, "instance_visible"):
                out.append(_status("Snapshot", row.name, str(row.id), row, guest=row.guest_id))
        for row in Image.select().order_by(Image.kind, Image.name):
            if _sees(viewer, row.owner, row.group, _IMAGE_FLAGS.get(row.kind)):
                # Only a clone still to be made (state/clones.py clone_jobs) is reconciled;
                # any other image is converged as stored (uploads finish in the request).
                settled = {} if row.source_guest and row.version == 0 else {
                    "observed_generation": row.generation,
                    "phase": "created" if row.phase == "pending" else row.phase}
                out.append(_status(_IMAGE_KINDS.get(row.kind, "Image"), row.name, row.id, row,
                                   **settled))
        for row in SecurityPolicyGroup.select().order_by(SecurityPolicyGroup.name):
            if row.is_global or _sees(viewer, row.owner, row.group, None):
                out.append(_status("SecurityPolicyGroup", row.name, row.id, row))
        for row in Migration.select().order_by(Migration.created_at):
            out.append(_status("Migration", row.id, row.id, row))
        for row in BatchTask.select().order_by(BatchTask.created_at):
            if _sees(viewer, row.owner, "", None):
                out.append(_status("BatchTask", row.id, row.id, row, task=row.kind))
        return out
