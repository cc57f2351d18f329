"""Changes to existing guests: each imperative verb of the API (start, stop, reboot, insert
media, reset a password, resize, shrink, reset the system, rename, QoS, delete) becomes a
change of the desired state described in `state/guests.py`, stored with the guest's
generation bumped in one compare-and-set transaction (`GuestStore._change`).

Called by the guest routes (`api/guests.py`) and the batch store (`state/batches.py`).
Refusals that depend on what the reconciler observed (running or not, created or not) are
checked here, against the observed facts stored at the time of the request. A resize that
grows a guest is refused when its cell has not that much room left (state/placement.py
counts it, the same way as for creates) or when it would pass a quota of the guest's group
(state/quotas.py), in the transaction that stores it.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

import peewee

from state.db import db
from state.errors import Conflict, Invalid, NotFound
from state.guests import GIB, QOS_DEFAULTS, GuestStore, generate_password, generate_secret
from state.identity import SessionInfo
from state.models import Guest
from state.placement import Amounts, check_room, growth, guest_need
from state.quotas import Usage


def ask_power(spec: dict[str, Any], power: str) -> None:
    """A new power request (see `power_request` in state/guests.py)."""
    spec["power"] = power
    spec["power_request"] = int(spec.get("power_request", 0)) + 1


def ask_stop(spec: dict[str, Any], mode: str, *, escalate: bool = False) -> None:
    """A stop request. `escalate`: a shutdown the guest ignores (no ACPI support, no OS)
    becomes a power-off after the reconciler's grace period (batch stops)."""
    ask_power(spec, "stopped")
    spec["stop_mode"] = mode
    spec["stop_escalate"] = escalate


class GuestChangeStore(GuestStore):
    """Mixin of `state.store.Store`: the verbs on existing guests."""

    def _check_growth(self, row: Guest, before: Amounts, spec: dict[str, Any], what: str
                      ) -> None:
        """Refuse (NoRoom, naming the cell and the short resource) a resize from `before`
        to `spec` that asks the guest's cell for more than it has not promised yet. A
        shrink, or a change within what the guest already holds, always passes."""
        more = growth(before, guest_need(spec))
        if more != Amounts():
            # the group's quota first: on PostgreSQL it stays locked until the commit
            self.check_quota(  # type: ignore[attr-defined]
                row.group, Usage(cores=more.cores, memory=more.memory, disk=more.disk),
                f"growing guest {row.name!r} {what}")
            check_room(self._cell_room(row.cell), more,
                       purpose=f"to grow guest {row.name!r} {what}")

    def set_auto_start(self, session: SessionInfo, guest_id: str, enable: bool) -> str:
        def change(row: Guest, spec: dict) -> str:
            spec["auto_start"] = enable
            return row.name
        return self._change(session, guest_id, change)

    def set_cores(self, session: SessionInfo, guest_id: str, cores: int,
                  immediate: bool = False) -> str:
        if cores > self.limits["max_cores"]:
            raise Invalid(f"cores: {cores} is more than the limit of {self.limits['max_cores']}")

        def change(row: Guest, spec: dict) -> str:
            before = guest_need(spec)
            spec["cores"] = cores
            self._check_growth(row, before, spec, f"to {cores} cores")
            spec["immediate"]["cores"] = immediate
            return row.name
        return self._change(session, guest_id, change)

    def set_memory(self, session: SessionInfo, guest_id: str, memory: int,
                   immediate: bool = False) -> str:
        if memory > self.limits["max_memory"] * GIB:
            raise Invalid(f"memory: {memory} bytes is more than the limit of "
                          f"{self.limits['max_memory']} GiB")

        def change(row: Guest, spec: dict) -> str:
            before = guest_need(spec)
            spec["memory"] = memory
            self._check_growth(row, before, spec, f"to {memory / GIB:.1f} GiB memory")
            spec["immediate"]["memory"] = immediate
            return row.name
        return self._change(session, guest_id, change)

    @staticmethod
    def _disk_index(spec: dict[str, Any], disk: str) -> int:
        if not disk.isdigit():
            raise Invalid(f"disk: {disk!r} is not a disk index (0 = system, 1.. = data)")
        index = int(disk)
        count = len(spec.get("disks", []))
        if index >= count:
            raise NotFound(f"disk: the guest has {count} disk(s), indexes 0-{count - 1}")
        return index

    def resize_disk(self, session: SessionInfo, guest_id: str, disk: str, size: int,
                    immediate: bool = False) -> str:
        if size > self.limits["max_disk"] * GIB:
            raise Invalid(f"size: {size} bytes is more than the limit of "
                          f"{self.limits['max_disk']} GiB")

        def change(row: Guest, spec: dict) -> str:
            index = self._disk_index(spec, disk)
            current = spec["disks"][index]
            if size < current:
                raise Invalid(f"size: {size} bytes is smaller than disk {index} "
                              f"({current} bytes): disks only grow; to compact a disk use "
                              f"PUT /guests/{row.id}/disks/shrink/{index}")
            before = guest_need(spec)
            spec["disks"][index] = size
            self._check_growth(row, before, spec, f"disk {index} to {size / GIB:.1f} GiB")
            spec["immediate"]["disks"][str(index)] = immediate
            return row.name
        return self._change(session, guest_id, change)

    def shrink_disk(self, session: SessionInfo, guest_id: str, disk: str) -> str:
        def change(row: Guest, spec: dict) -> str:
            index = self._disk_index(spec, disk)
            self._require_created(row, "shrink a disk")
            if self._running(row):
                raise Conflict(f"guest {row.name!r} is running: stop it before shrinking a disk")
            key = str(index)
            spec["disk_shrink"][key] = int(spec["disk_shrink"].get(key, 0)) + 1
            return row.name
        return self._change(session, guest_id, change)

    def reset_system(self, session: SessionInfo, guest_id: str, from_image: str) -> str:
        self._check_image(session, "disk", from_image, "from_image")

        def change(row: Guest, spec: dict) -> str:
            self._require_created(row, "reset its system")
            if self._running(row):
                raise Conflict(f"guest {row.name!r} is running: stop it before resetting its "
                               "system")
            previous = (spec.get("system_reset") or {}).get("generation", 0)
            spec["system_reset"] = {"from_image": from_image, "generation": previous + 1}
            spec["from_image"] = from_image
            spec["instance_id"] = str(uuid.uuid4())
            return row.name
        return self._change(session, guest_id, change)

    def reset_password(self, session: SessionInfo, guest_id: str, user: str = "",
                       password: str = "") -> dict[str, str]:
        """PUT /guests/{id}/auth: the new admin user/password (generated when not given),
        applied by the reconciler with the guest agent. The password is stored sealed
        (state/secrets.py); the answer carries it in clear, once."""
        def change(row: Guest, spec: dict) -> dict[str, str]:
            admin = spec["admin"]
            admin["user"] = user or admin.get("user") or spec["template_spec"]["admin"]
            plain = password or generate_password()
            admin["password"] = self.vault.seal(plain)
            admin["generation"] = int(admin.get("generation", 0)) + 1
            if spec.get("cloud_init"):
                spec["cloud_init"]["admin_secret"] = admin["password"]
            return {"name": row.name, "user": admin["user"], "password": plain}
        return self._change(session, guest_id, change)

    def rename_guest(self, session: SessionInfo, guest_id: str, name: str) -> tuple[str, str]:
        """Returns (old name, new name)."""
        def change(row: Guest, spec: dict) -> str:
            self._check_guest_name(row.pool, name, but=row.id)
            return row.name
        try:
            old = self._change(session, guest_id, change, name=name)
        except peewee.IntegrityError:  # a concurrent rename or create took the name
            raise Conflict(f"a guest named {name!r} already exists in its compute pool: "
                           "choose another name") from None
        return old, name

    def set_qos(self, session: SessionInfo, guest_id: str, values: dict[str, Any]) -> str:
        """Change the given QoS values (cpu_priority, disk or network limits) only."""
        def change(row: Guest, spec: dict) -> str:
            spec["qos"] = {**QOS_DEFAULTS, **spec.get("qos", {}), **values}
            return row.name
        return self._change(session, guest_id, change)

    def reset_monitor_secret(self, session: SessionInfo, guest_id: str) -> str:
        def change(row: Guest, spec: dict) -> str:
            spec["monitor_secret"] = generate_secret(8)
            return row.name
        return self._change(session, guest_id, change)

    def start_guest(self, session: SessionInfo, guest_id: str, *, from_media: bool = False,
                    from_network: bool = False, source: str = "") -> str:
        """POST /instances/{id}: desired power on, optionally booting once from a media
        image or the network."""
        if from_media and from_network:
            raise Invalid("from_media and from_network: choose one boot source")
        if from_media:
            if not source:
                raise Invalid("source: give the id of the media image to boot from")
            self._check_image(session, "media", source, "source")

        def change(row: Guest, spec: dict) -> str:
            self._require_created(row, "start it")
            if self._running(row):
                raise Conflict(f"guest {row.name!r} is already running")
            ask_power(spec, "running")
            request = str(uuid.uuid4())
            if from_media:
                spec["boot_once"] = {"request": request, "source": source}
            elif from_network:
                spec["boot_once"] = {"request": request, "network": True}
            else:
                spec["boot_once"] = None
            return row.name
        return self._change(session, guest_id, change)

    def stop_guest(self, session: SessionInfo, guest_id: str, *, reboot: bool = False,
                   force: bool = False) -> str:
        """DELETE /instances/{id}: false/false shutdown, false/true destroy, true/false
        reboot, true/true reset. Refused unless observed running."""
        def change(row: Guest, spec: dict) -> str:
            if not self._running(row):
                raise Conflict(f"guest {row.name!r} is not running")
            if reboot:
                restart = spec.setdefault("restart", {"counter": 0, "mode": "reboot"})
                restart["counter"] = int(restart.get("counter", 0)) + 1
                restart["mode"] = "reset" if force else "reboot"
            else:
                ask_stop(spec, "destroy" if force else "shutdown")
            return row.name
        return self._change(session, guest_id, change)

    def insert_media(self, session: SessionInfo, guest_id: str, source: str) -> str:
        self._check_image(session, "media", source, "source")

        def change(row: Guest, spec: dict) -> str:
            if not self._running(row):
                raise Conflict(f"guest {row.name!r} is not running: media goes into a running "
                               "instance (or start it from media)")
            spec["media"] = source
            return row.name
        return self._change(session, guest_id, change)

    def eject_media(self, session: SessionInfo, guest_id: str) -> str:
        def change(row: Guest, spec: dict) -> str:
            if not spec.get("media") and not (row.observed or {}).get("media_attached"):
                raise Conflict(f"guest {row.name!r} has no media attached")
            spec["media"] = ""
            return row.name
        return self._change(session, guest_id, change)

    def mark_guest_deleting(self, row: Guest, *, force: bool) -> None:
        """Accept a delete of `row` (visible to the caller): refused while observed running
        unless `force`, which also asks for a hard stop. Idempotent."""
        if row.deleting:
            return
        if self._running(row) and not force:
            raise Conflict(f"guest {row.name!r} is running: stop it first, or delete with "
                           "force true")
        spec = copy.deepcopy(row.spec or {})
        if force:
            ask_stop(spec, "destroy")
        if not self._write_spec(row, spec, deleting=True):
            raise Conflict(f"guest {row.name!r} changed concurrently: try again")

    def delete_guest(self, session: SessionInfo, guest_id: str, *, force: bool = False) -> str:
        with db.atomic():
            row = self._guest(session, guest_id)
            self.mark_guest_deleting(row, force=force)
        return row.name

    def request_stop(self, row: Guest) -> None:
        """Batch stop of one visible guest: a shutdown request; refused unless running."""
        if row.deleting:
            raise Conflict("the guest is being deleted")
        if not self._running(row):
            raise Conflict("the guest is not running")
        spec = copy.deepcopy(row.spec or {})
        ask_stop(spec, "shutdown", escalate=True)
        if not self._write_spec(row, spec):
            raise Conflict("the guest changed concurrently: try again")
