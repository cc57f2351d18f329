"""Image copies cached on cells (volumes made from an image version), for the reconcilers.

The guest reconciler records a replica after it streamed an image to a cell and checked
it; the cell reconciler asks which replicas nobody needs any more and removes them.
"""

from __future__ import annotations

from typing import Any

from state.db import db
from state.models import Guest, Image, ImageReplica


class ReplicaStore:
    """Mixin of `state.store.Store`."""

    def image_source(self, image_id: str) -> dict[str, Any] | None:
        """The current file of an image on the management node, or None while it has none."""
        row = Image.get_or_none(Image.id == image_id)
        if row is None or row.version <= 0:
            return None
        path = self.image_file_path(row.kind, row.id, row.version)
        return {"id": row.id, "kind": row.kind, "version": row.version, "path": path,
                "size": row.size, "checksum": row.checksum}

    def image_file_path(self, kind: str, image_id: str, version: int) -> str:
        from state.images import KINDS

        return self.image_files().path(  # type: ignore[attr-defined]  (ImageStore's)
            KINDS[kind], image_id, version)

    def image_replica(self, image_id: str, version: int, cell: str) -> dict[str, Any] | None:
        row = ImageReplica.get_or_none((ImageReplica.image == image_id)
                                       & (ImageReplica.version == version)
                                       & (ImageReplica.cell == cell))
        if row is None:
            return None
        return {"volume": row.volume, "size": row.size, "checksum": row.checksum}

    def record_image_replica(self, image_id: str, version: int, cell: str, volume: str,
                             size: int, checksum: str) -> None:
        with db.atomic():
            ImageReplica.delete().where((ImageReplica.image == image_id)
                                        & (ImageReplica.version == version)
                                        & (ImageReplica.cell == cell)).execute()
            ImageReplica.create(image=image_id, version=version, cell=cell, volume=volume,
                                size=size, checksum=checksum)

    def unused_replicas(self, cell: str) -> list[dict[str, Any]]:
        """Replicas on `cell` that no guest needs: a disk image copy is needed while a
        guest of the cell is being created from it or waits for a system reset to it; a
        media copy while a guest of the cell has it inserted or boots from it once. Old
        versions and deleted images are never needed."""
        current = {i.id: i.version for i in Image.select(Image.id, Image.version)}
        needed: set[str] = set()
        for g in Guest.select(Guest.spec, Guest.phase, Guest.observed).where(Guest.cell == cell):
            spec = g.spec or {}
            if g.phase in ("creating", "failed") and spec.get("from_image"):
                needed.add(spec["from_image"])
            reset = spec.get("system_reset") or {}
            if reset and int(reset.get("generation", 0)) > int(
                    (g.observed or {}).get("system_reset_generation", 0) or 0):
                needed.add(reset.get("from_image", ""))
            if spec.get("media"):
                needed.add(spec["media"])
            once = spec.get("boot_once") or {}
            if once.get("source"):
                needed.add(once["source"])
        out = []
        for row in ImageReplica.select().where(ImageReplica.cell == cell):
            if current.get(row.image) != row.version or row.image not in needed:
                out.append({"image": row.image, "version": row.version, "volume": row.volume})
        return out

    def forget_replica(self, image_id: str, version: int, cell: str) -> None:
        ImageReplica.delete().where((ImageReplica.image == image_id)
                                    & (ImageReplica.version == version)
                                    & (ImageReplica.cell == cell)).execute()
