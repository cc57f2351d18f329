"""The image reconciler: disk images cloned from a stopped guest's system disk.

Key `image/<id>`. A pending clone (state/clones.py) is pulled from the guest's cell with a
libvirt download stream (the same path for local and remote cells), in the long-work lane
(reconciler/longwork.py), written to a temporary file beside the image store and installed
as version 1, with progress from the bytes received. Registered by reconciler/kinds.py.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from reconciler.cells import CellConnections
from reconciler.contract import (
    READY,
    Action,
    Key,
    Meter,
    NoMeter,
    Result,
    Verb,
    get_condition,
    set_condition,
)
from reconciler.guests import now_text, placement_of, volume_name
from reconciler.longwork import InProgress, LongWork, Report
from state.errors import NanoError, Unavailable

log = logging.getLogger("nano.reconciler.images")


class ImageReconciler:
    kind = "image"

    def __init__(self, store: Any, connections: CellConnections,
                 enqueue: Callable[[Key], None], *, long_work: LongWork | None = None,
                 meter: Meter | None = None) -> None:
        self.store = store
        self.meter = meter or NoMeter()  # bytes read back from cells
        self.connections = connections
        self.enqueue = enqueue
        # the download runs in the long-work lane (reconciler/longwork.py)
        self.long = long_work or LongWork(enqueue)

    def keys(self) -> Iterable[Key]:
        return [Key("image", i) for i in self.store.clone_jobs()]

    def reconcile(self, key: Key) -> Result:
        job = self.store.clone_job(key.id)
        if job is None:
            return Result()
        guest = self.store.guest_desired(job["guest"])
        if guest is None:
            self.store.record_clone(key.id, phase="failed",
                                    error=f"the source guest {job['guest']} no longer exists")
            return Result()
        if guest.observed_generation < guest.generation or guest.phase == "creating":
            # a change of the guest (a system reset, a restore) is still being made
            self._wait(key.id, "WaitingForGuest", f"waiting for guest {guest.name} to "
                       f"converge: {self._why(guest.id)}")
            return Result(requeue_after=2.0, note="source guest converging")
        if guest.observed.get("running"):
            self._wait(key.id, "GuestRunning",
                       f"guest {guest.name} is running: stop it to clone its system disk")
            return Result(requeue_after=10.0, note="source guest running")
        cell = self.store.cell_spec(guest.cell)
        if cell is None or not cell.observed.get("alive"):
            self._wait(key.id, "CellUnreachable",
                       f"cell {guest.cell} of guest {guest.name} is not reachable")
            raise Unavailable(f"cell {guest.cell} of guest {guest.name} is not reachable")
        from reconciler.drivers.domains import LibvirtGuests
        from reconciler.drivers.volumes import download_volume
        from state.images import DISK

        link = self.connections.link(cell)
        pool = placement_of(guest, cell).pool
        volume = volume_name(guest.id, 0)
        info = LibvirtGuests(link.hypervisor).volume(pool, volume)
        if info is None:
            self.store.record_clone(key.id, phase="failed",
                                    error=f"the system disk of guest {guest.name} is missing")
            return Result()
        files = self.store.image_files()
        files.ensure()
        final = files.path(DISK, key.id, 1)

        def pull(report: Report) -> tuple[int, str]:
            self.store.record_clone(key.id, phase="cloning", progress=1, error="")
            recorded = [time.monotonic(), 1]  # when, and which percentage, was last written

            def progress(done: int, total: int) -> None:
                report(done, total)  # stops the stream once the lease is lost
                percent = min(99, 100 * done // max(total, 1))
                if percent != recorded[1] and time.monotonic() - recorded[0] >= 0.5:
                    self.store.record_clone(key.id, progress=percent)
                    recorded[:] = [time.monotonic(), percent]

            size, sha1 = download_volume(link.hypervisor, pool, volume, final,
                                         progress=progress, expected=info.allocation)
            self.meter.transferred("from_cell", size)
            return size, sha1

        try:
            size, sha1 = self.long.run(key, f"clone/{key.id}",
                                       f"clone the system disk of guest {guest.name}", pull)
        except InProgress as running:  # progress is recorded by the stream's own reports
            return Result(requeue_after=5.0, note=str(running))
        except NanoError as exc:
            conditions = set_condition(self.store.image_conditions(key.id), READY, False,
                                       "CloneFailed", exc.message, now_text())
            self.store.record_clone(key.id, phase="failed", error=exc.message,
                                    conditions=conditions)
            if isinstance(exc, Unavailable):
                raise  # the cell may answer again: retried
            return Result(note=f"failed: {exc.message}")  # stays failed: delete, clone again
        if not self.store.finish_clone(key.id, size, sha1):
            os.unlink(final)  # the image was deleted while we copied
            return Result()
        log.info("disk image %s cloned from guest %s (%d bytes)", key.id, guest.name, size)
        return Result(actions=(Action(Verb.CREATE, key, None, {
            "from_guest": guest.id, "size": size, "sha1": sha1}),))

    def _wait(self, image_id: str, reason: str, message: str) -> None:
        """The clone waits on another resource: its own Ready condition names it and why.
        Waiting is not failing: the image's `error` stays empty (it is set only when the
        clone failed for good)."""
        conditions = set_condition(self.store.image_conditions(image_id), READY, False,
                                   reason, message, now_text())
        self.store.record_clone(image_id, phase="waiting", error="",
                                conditions=conditions)

    def _why(self, guest_id: str) -> str:
        """The source guest's own account of what it waits for (its Ready condition)."""
        ready = get_condition(self.store.guest_conditions(guest_id), READY)
        if ready is None or ready.status:
            return "its last change is still being made"
        return f"{ready.reason}: {ready.message}" if ready.message else ready.reason
