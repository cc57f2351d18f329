"""Reconcile status of every reconciled resource in one read: what `nanod drift` and
`nanod apply --wait` poll, through `GET /api/v1/resource_status/` (api/status.py).

A mixin of `state.store.Store`. It reads only the `Reconciled` columns (generation and the
status the reconciler records) of each kind's table and never writes.
"""

from __future__ import annotations

from typing import Any

import peewee

from state.guests import visible
from state.identity import SessionInfo
from state.images import DISK, MEDIA, visible_images
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
from state.policies import _sees_group

_IMAGE_KINDS = {"media": "MediaImage", "disk": "DiskImage"}


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
        # Guests, snapshots, images and tasks: exactly what the caller's own routes for
        # them show (state/guests.py `visible`, the image routes' rule, a task's owner),
        # administrators included; policy groups as their routes (state/policies.py).
        guests = Guest.select()
        if viewer is not None:
            guests = guests.where(visible(viewer))
        seen: set[str] = set()
        for row in guests.order_by(Guest.pool, Guest.name):
            seen.add(row.id)
            out.append(_status("Guest", row.name, row.id, row, pool=row.pool))
        for row in Snapshot.select().order_by(Snapshot.guest, Snapshot.name):
            if row.guest_id in seen:
                out.append(_status("Snapshot", row.name, str(row.id), row, guest=row.guest_id))
        for kind in (DISK, MEDIA):
            images = Image.select().where(Image.kind == kind.name)
            if viewer is not None:
                images = Image.select().where(visible_images(kind, viewer))
            for row in images.order_by(Image.name):
                # Only a clone still to be made (state/clones.py clone_jobs) is reconciled;
                # any other image is converged as stored (uploads finish in the request).
                settled = {} if row.source_guest and row.version == 0 else {
                    "observed_generation": row.generation,
                    "phase": "created" if row.phase == "pending" else row.phase}
                out.append(_status(_IMAGE_KINDS[row.kind], row.name, row.id, row, **settled))
        for row in SecurityPolicyGroup.select().order_by(SecurityPolicyGroup.name):
            if _sees_group(row, viewer):
                out.append(_status("SecurityPolicyGroup", row.name, row.id, row))
        for row in Migration.select().order_by(Migration.created_at):
            out.append(_status("Migration", row.id, row.id, row))
        for row in BatchTask.select().order_by(BatchTask.created_at):
            if viewer is None or row.owner == viewer.user:
                out.append(_status("BatchTask", row.id, row.id, row, task=row.kind))
        return out

    def metrics_counts(self) -> dict[str, Any]:
        """What GET /metrics shows of the store (api/metrics.py), read at each scrape:
        guests per (pool, phase) in one GROUP BY, and each cell's phase (online/offline).
        Reads only; called in the store lane, never on the IOLoop."""
        guests = list(Guest.select(Guest.pool, Guest.phase, peewee.fn.COUNT(Guest.id))
                      .group_by(Guest.pool, Guest.phase).tuples())
        cells = list(Cell.select(Cell.name, Cell.phase).tuples())
        return {"guests": guests, "cells": cells}
