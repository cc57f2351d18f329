"""Disk images cloned from a stopped guest's system disk (`POST /disk_images/` with
`guest`): the request as desired state, and what the image reconciler records. The
request itself is stored by `ImageStore.create_image` (state/images.py), in the
transaction that checks the group's image storage quota.

Called by the image routes (api/images.py) and the image reconciler
(reconciler/images.py). The request is an `Image` row of kind disk with `source_guest`
set and version 0; the reconciler pulls the guest's system volume back through a libvirt
download stream, installs it as version 1 and reports progress until then.
"""

from __future__ import annotations

from typing import Any

from state.db import db
from state.errors import Conflict, NotFound
from state.identity import SessionInfo
from state.models import Guest, Image, now


class CloneStore:
    """Mixin of `state.store.Store`."""

    def check_clone_source(self, guest_id: str, session: SessionInfo) -> None:
        """The guest must be visible to the caller, created, and stopped."""
        row = None if "\x00" in guest_id else Guest.get_or_none(Guest.id == guest_id)
        visible = row is not None and (
            row.owner == session.user
            or (row.group == session.group and session.visibility.get("instance_visible"))
        )
        if not visible:
            raise NotFound(f"no guest {guest_id!r} that you can see to clone a disk image from")
        obs = row.observed or {}
        if not obs.get("created"):
            raise Conflict(f"guest {row.name!r} is not created yet: wait until it is")
        if obs.get("running") or row.deleting:
            raise Conflict(f"guest {row.name!r} is running: stop it before cloning its disk")

    def clone_jobs(self) -> list[str]:
        """Clones still to be made; a failed one stays failed (delete it, clone again)."""
        return [i.id for i in Image.select(Image.id).where(
            (Image.source_guest != "") & (Image.version == 0) & (Image.phase != "failed"))]

    def clone_job(self, image_id: str) -> dict[str, Any] | None:
        """A pending clone (None when done, deleted or not a clone)."""
        row = Image.get_or_none(Image.id == image_id)
        if row is None or not row.source_guest or row.version > 0 or row.phase == "failed":
            return None
        return {"id": row.id, "guest": row.source_guest, "generation": row.generation}

    def image_conditions(self, image_id: str) -> list[dict[str, Any]]:
        row = Image.get_or_none(Image.id == image_id)
        return list(row.conditions or []) if row else []

    def record_clone(self, image_id: str, *, progress: int | None = None,
                     error: str | None = None, phase: str | None = None,
                     conditions: list[dict[str, Any]] | None = None) -> None:
        columns: dict[Any, Any] = {}
        if conditions is not None:
            columns[Image.conditions] = conditions
        if progress is not None:
            columns[Image.progress] = max(0, min(99, progress))
        if error is not None:
            columns[Image.last_error] = error
        if phase is not None:
            columns[Image.phase] = phase
        if columns:
            Image.update(columns).where(Image.id == image_id).execute()

    def finish_clone(self, image_id: str, size: int, sha1: str) -> bool:
        """The cloned file is installed as version 1; False when the image went away."""
        with db.atomic():
            return bool(Image.update(version=1, size=size, checksum=sha1, progress=100,
                                     phase="created", last_error="", modified_at=now(),
                                     conditions=[],
                                     observed_generation=Image.generation)
                        .where((Image.id == image_id) & (Image.version == 0)).execute())
