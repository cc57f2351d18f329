"""The guest reconciler: makes a guest's domain, volumes, seed ISO, power state, media,
snapshots, passwords and QoS on its cell match the stored spec, and records what it
observed (state, statistics, addresses, display) in the guest's status.

Registered by `reconciler/kinds.py`; runs on the controller's worker threads with one key
`guest/<id>` at a time. The stored contract it converges is described in `state/guests.py`.
Pure parts (the desired domain, the plan) are functions of values; effects go through
`LibvirtGuests` (domains and volumes), `upload_volume` (images) and the cell's host shell.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from reconciler.cells import CellConnections, local_pool_name, shared_pool_name
from reconciler.cloudinit import build_seed_iso
from reconciler.contract import READY, Action, Key, Result, Verb, format_time, set_condition
from reconciler.guest_xml import (
    CPU_SHARES,
    Boot,
    Change,
    DiskSpec,
    DomainSpec,
    InterfaceSpec,
    IoTune,
    diff_domain,
    disk_target,
    domain_name,
    kib_per_sec,
    parse_domain_xml,
    render_cdrom_xml,
    render_domain_xml,
    render_graphics_xml,
)
from state.compute import CellSpec
from state.errors import NanoError, NotFound, Permanent, Unavailable

log = logging.getLogger("nano.reconciler.guests")

DEFAULT_NETWORK = "default"  # libvirt's NAT network, for pools without an address pool


def address_pool_network(name: str) -> str:
    """The libvirt network of an address pool on every cell of its compute pools."""
    return f"nano-net-{name}"


def volume_name(guest_id: str, index: int) -> str:
    return f"nano-{guest_id}-disk{index}"


def seed_volume(guest_id: str) -> str:
    return f"nano-{guest_id}-seed.iso"


def image_volume(kind: str, image_id: str, version: int) -> str:
    return f"nano-{kind}-{image_id}-v{version}"


def now_text() -> str:
    return format_time(dt.datetime.now().replace(microsecond=0))


@dataclass(frozen=True)
class Placement:
    """Where a guest's things live on its cell."""

    pool: str  # libvirt storage pool for its volumes
    network: str | None  # libvirt network of its internal NIC
    bridge: str  # host bridge of its external NIC
    virt_type: str


def placement_of(desired: Any, cell: CellSpec) -> Placement:
    pool = shared_pool_name(desired.storage_pool) if desired.storage_pool else \
        local_pool_name(cell.name)
    network = address_pool_network(desired.address_pool) if desired.address_pool else \
        DEFAULT_NETWORK
    return Placement(pool=pool, network=network, bridge=cell.bridge, virt_type=cell.virt_type)


def desired_domain(desired: Any, place: Placement, *, media_path: str | None,
                   seed_path: str | None, max_vcpus: int, max_memory: int,
                   boot: Boot = Boot.HD) -> DomainSpec:
    """Pure: the domain a guest should be, from its stored spec and where it lives."""
    spec = desired.spec
    tpl = spec.get("template_spec") or {}
    qos = spec.get("qos") or {}
    disks = tuple(DiskSpec(index=i, pool=place.pool, volume=volume_name(desired.id, i),
                           size=int(size)) for i, size in enumerate(spec["disks"]))
    nics = []
    for nic in desired.interfaces:
        external = nic["type"] == "external"
        nics.append(InterfaceSpec(
            mac=nic["mac"],
            network=None if external else place.network,
            bridge=place.bridge if external else None,
            inbound_kib=kib_per_sec(int(qos.get("receive_speed", 0) or 0)),
            outbound_kib=kib_per_sec(int(qos.get("send_speed", 0) or 0)),
        ))
    return DomainSpec(
        guest_id=desired.id,
        title=desired.name,
        vcpus=int(spec["cores"]),
        max_vcpus=max(int(spec["cores"]), max_vcpus),
        memory_bytes=int(spec["memory"]),
        max_memory_bytes=max(int(spec["memory"]), max_memory),
        virt_type=place.virt_type,
        os_type=tpl.get("operating_system") or spec.get("system") or "linux",
        disk_bus=tpl.get("disk") or "scsi",
        nic_model=tpl.get("network") or "virtio",
        display=tpl.get("display") or "vga",
        control=tpl.get("control") or "vnc",
        usb=tpl.get("usb") or "",
        tablet=tpl.get("tablet") if tpl.get("tablet") is not None else "usb",
        disks=disks,
        cdrom=media_path,
        seed_iso=seed_path,
        interfaces=tuple(nics),
        monitor_secret=spec.get("monitor_secret", ""),
        cpu_shares=CPU_SHARES.get(qos.get("cpu_priority") or "medium", CPU_SHARES["medium"]),
        iotune=IoTune(read_bytes_sec=int(qos.get("read_speed", 0) or 0),
                      write_bytes_sec=int(qos.get("write_speed", 0) or 0),
                      read_iops_sec=int(qos.get("read_iops", 0) or 0),
                      write_iops_sec=int(qos.get("write_iops", 0) or 0)),
        boot=boot,
        generation=desired.generation,
    )


def pending(spec_value: int, observed_value: Any) -> bool:
    return int(spec_value or 0) > int(observed_value or 0)


class GuestReconciler:
    """Converges one guest per key `guest/<id>`."""

    kind = "guest"

    def __init__(self, store: Any, connections: CellConnections,
                 enqueue: Callable[[Key], None], *, poll_seconds: float = 15.0,
                 agent_retry_seconds: float = 10.0, stop_grace_seconds: float = 60.0) -> None:
        self.store = store
        self.connections = connections
        self.enqueue = enqueue
        self.poll_seconds = poll_seconds
        self.agent_retry_seconds = agent_retry_seconds
        self.stop_grace_seconds = stop_grace_seconds
        self._cpu: dict[str, tuple[float, int]] = {}  # guest -> (when, cpu time ns)

    def keys(self) -> Iterable[Key]:
        return [Key("guest", gid) for gid in self.store.guest_ids()]

    # -- the script ---------------------------------------------------------------------

    def reconcile(self, key: Key) -> Result:
        desired = self.store.guest_desired(key.id)
        if desired is None:
            self._cpu.pop(key.id, None)
            return Result()
        cell = self.store.cell_spec(desired.cell)
        if cell is None:
            self._fail(desired, f"cell {desired.cell!r} is not registered any more")
            return Result()
        if not cell.observed.get("alive"):
            return self._lost(desired, cell)
        from reconciler.drivers.domains import LibvirtGuests

        link = self.connections.link(cell)
        drv = LibvirtGuests(link.hypervisor)
        place = placement_of(desired, cell)
        conditions = list(self.store.guest_conditions(desired.id))
        conditions = set_condition(conditions, "CellReachable", True, "CellAlive",
                                   f"cell {cell.name} answers", now_text())
        try:
            if desired.deleting:
                return self._delete(desired, drv, place)
            if drv.domain_xml(domain_name(desired.id), inactive=True) is None:
                if desired.observed.get("created"):
                    # it existed and is gone: someone removed it behind our back
                    conditions = set_condition(conditions, "Drifted", True, "DomainMissing",
                                               "the domain vanished from the cell; recreating",
                                               now_text())
                actions = self._create(desired, cell, drv, place, link)
                desired = self.store.guest_desired(key.id) or desired
            else:
                actions = []
            converged, waiting = self._converge(desired, cell, drv, place, link)
            actions += converged
            conditions = self._observe(desired, drv, link, conditions, waiting)
        except NanoError as exc:
            if isinstance(exc, Unavailable):
                raise
            self._record_error(desired, exc, conditions)
            if not desired.observed.get("created"):
                return Result(note=f"failed: {exc.message}")
            raise  # an existing guest: retried with backoff
        wait = self.poll_seconds
        if any(c["type"] == "AgentReady" and not c["status"] for c in conditions):
            wait = self.agent_retry_seconds
        fresh = self.store.guest_desired(key.id)
        if fresh and fresh.spec.get("stop_escalate") and fresh.spec.get("power") == "stopped" \
                and fresh.observed.get("running"):
            wait = min(wait, self.stop_grace_seconds / 4 or 1.0)
        return Result(requeue_after=wait, actions=tuple(actions))

    # -- create ----------------------------------------------------------------------------

    def _progress(self, desired: Any, value: int) -> None:
        self.store.record_guest_observed(desired.id, progress=value)

    def _create(self, desired: Any, cell: CellSpec, drv: Any, place: Placement,
                link: Any) -> list[Action]:
        """Volumes, seed ISO, definition. Every step is idempotent: a crash in between is
        one more reconcile (volumes are recreated unless recorded as complete)."""
        spec = desired.spec
        actions: list[Action] = []
        key = Key("guest", desired.id)
        done = dict(desired.observed.get("volumes_done") or {})
        self.store.record_guest_observed(desired.id, phase="creating", progress=5,
                                         last_error="")
        for index, size in enumerate(spec["disks"]):
            name = volume_name(desired.id, index)
            if done.get(name):
                continue
            drv.delete_volume(place.pool, name)  # a leftover of an interrupted attempt
            image = spec.get("from_image") if index == 0 else ""
            if image:
                source = self._image_volume(cell, link, place, "disk", image)
                drv.create_volume(place.pool, name, int(size), backing=source)
            else:
                drv.create_volume(place.pool, name, int(size))
            done[name] = True
            self.store.record_guest_observed(desired.id, observed={"volumes_done": done},
                                             progress=10 + 60 * (index + 1) // len(spec["disks"]))
            actions.append(Action(Verb.CREATE, Key("volume", f"{place.pool}/{name}"), None,
                                  {"size": int(size), "from_image": image or None}))
        if "cloud-init" in spec.get("modules", []):
            self._write_seed(desired, drv, place)
            actions.append(Action(Verb.CREATE, Key("volume", seed_volume(desired.id)), None,
                                  {"cloud-init": "seed"}))
        self._progress(desired, 80)
        dom = self._domain_spec(desired, drv, place, max_vcpus=self._initial_max_vcpus(spec),
                                max_memory=int(spec["memory"]))
        drv.define(render_domain_xml(dom))
        drv.set_autostart(dom.name, bool(spec.get("auto_start")))
        self.store.record_guest_observed(
            desired.id, progress=100, phase="stopped", last_error="",
            observed={"created": True, "create_time": now_text(), "max_vcpus": dom.max_vcpus,
                      "max_memory": dom.max_memory_bytes,
                      "instance_id": spec.get("instance_id", "")})
        actions.append(Action(Verb.CREATE, key, None, {"domain": dom.name}))
        self.enqueue(Key("network", desired.cell))  # its DHCP host entry and port forwards
        self.enqueue(Key("firewall", desired.cell))
        return actions

    def _initial_max_vcpus(self, spec: dict[str, Any]) -> int:
        # room to add cores live: twice the request, within the configured maximum
        limit = int(getattr(self.store, "limits", {}).get("max_cores", 24))
        return max(int(spec["cores"]), min(2 * int(spec["cores"]), limit))

    def _image_volume(self, cell: CellSpec, link: Any, place: Placement, kind: str,
                      image_id: str) -> str:
        """The image's current version as a volume of the guest's pool on the cell, sent
        there through a libvirt upload stream when missing (cached by id + version)."""
        from reconciler.drivers.volumes import upload_volume

        source = self.store.image_source(image_id)
        if source is None:
            raise Permanent(f"{kind} image {image_id} does not exist or has no file yet")
        name = image_volume(kind, image_id, source["version"])
        replica = self.store.image_replica(image_id, source["version"], cell.name)
        from reconciler.drivers.domains import LibvirtGuests

        drv = LibvirtGuests(link.hypervisor)
        # a recorded replica was checked by size and SHA-1 when it was made; the volume's
        # capacity cannot say (for qcow2 it is the virtual size, not the file's)
        if replica and drv.volume(place.pool, name) is not None:
            return name
        size, sha1 = upload_volume(link.hypervisor, place.pool, name, source["path"],
                                   fmt="qcow2" if kind == "disk" else "raw")
        if size != source["size"] or (source["checksum"] and sha1 != source["checksum"]):
            drv.delete_volume(place.pool, name)
            raise Permanent(f"{kind} image {image_id} arrived on {cell.name} as {size} bytes "
                            f"with SHA-1 {sha1}, expected {source['size']} / "
                            f"{source['checksum']}")
        self.store.record_image_replica(image_id, source["version"], cell.name,
                                        f"{place.pool}/{name}", size, sha1)
        return name

    def _write_seed(self, desired: Any, drv: Any, place: Placement) -> None:
        spec = desired.spec
        ci = spec.get("cloud_init") or {}
        admin = spec.get("admin") or {}
        bus = (spec.get("template_spec") or {}).get("disk") or "scsi"
        data = [disk_target("sata" if bus == "scsi" else bus, i)
                for i in range(1, len(spec["disks"]))]
        network = None
        if hasattr(self.store, "guest_network_config"):
            network = self.store.guest_network_config(desired.id)
        iso = build_seed_iso(
            instance_id=spec.get("instance_id") or desired.id,
            hostname=desired.name,
            admin_name=admin.get("user") or ci.get("admin_name") or None,
            admin_password=admin.get("password") or ci.get("admin_secret") or "",
            root_enabled=bool(ci.get("root_enabled", True)),
            data_disks=data,
            data_path=ci.get("data_path") or "/opt/data",
            network_config=network,
        )
        drv.write_volume(place.pool, seed_volume(desired.id), iso)

    def _domain_spec(self, desired: Any, drv: Any, place: Placement, *, max_vcpus: int,
                     max_memory: int, boot: Boot = Boot.HD,
                     media_id: str | None = None) -> DomainSpec:
        spec = desired.spec
        media = spec.get("media") if media_id is None else media_id
        media_path = None
        if media:
            media_path = self._media_path(desired, drv, place, media)
        seed_path = None
        if "cloud-init" in spec.get("modules", []):
            info = drv.volume(place.pool, seed_volume(desired.id))
            seed_path = info.path if info else None
        return desired_domain(desired, place, media_path=media_path, seed_path=seed_path,
                              max_vcpus=max_vcpus, max_memory=max_memory, boot=boot)

    def _media_path(self, desired: Any, drv: Any, place: Placement, media_id: str) -> str:
        cell = self.store.cell_spec(desired.cell)
        link = self.connections.link(cell)
        name = self._image_volume(cell, link, place, "media", media_id)
        info = drv.volume(place.pool, name)
        if info is None:
            raise NotFound(f"media volume {name} vanished")
        return info.path

    # -- converge an existing domain -----------------------------------------------------------

    def _converge(self, desired: Any, cell: CellSpec, drv: Any, place: Placement,
                  link: Any) -> tuple[list[Action], list[Change]]:
        """Bring an existing domain to the spec; returns what was done and the changes that
        wait for the next restart."""
        spec, obs = desired.spec, desired.observed
        name = domain_name(desired.id)
        actions: list[Action] = []
        key = Key("guest", desired.id)
        state = drv.state(name)
        running = state == "running"

        # stopped-only work first: system reset, snapshot restore, shrink, snapshots
        if not running:
            actions += self._stopped_work(desired, drv, place)
            desired = self.store.guest_desired(desired.id) or desired
            spec, obs = desired.spec, desired.observed

        # volumes grow to the requested sizes
        for index, size in enumerate(spec["disks"]):
            info = drv.volume(place.pool, volume_name(desired.id, index))
            if info is None:
                raise NotFound(f"disk {index} of guest {desired.name} is missing on "
                               f"{cell.name}")
            if info.capacity < int(size):
                immediate = (spec.get("immediate") or {}).get("disks", {}).get(str(index))
                if running and immediate:
                    target = disk_target((spec.get("template_spec") or {}).get("disk") or
                                         "scsi", index)
                    drv.block_resize(name, target, int(size))
                elif not running:
                    drv.resize_volume(place.pool, volume_name(desired.id, index), int(size))
                else:
                    continue  # grows at the next stop
                actions.append(Action(Verb.UPDATE, Key("volume", volume_name(desired.id, index)),
                                      {"size": info.capacity}, {"size": int(size)},
                                      live=running))

        # persistent definition: redefine whenever it differs from the spec
        max_vcpus = max(int(obs.get("max_vcpus") or 0), int(spec["cores"]))
        max_memory = max(int(obs.get("max_memory") or 0), int(spec["memory"]))
        if not running:
            max_vcpus = max(int(spec["cores"]), int(obs.get("max_vcpus") or 0))
        want = self._domain_spec(desired, drv, place, max_vcpus=max_vcpus, max_memory=max_memory)
        inactive = parse_domain_xml(drv.domain_xml(name, inactive=True) or "")
        config_changes = diff_domain(want, inactive)
        if config_changes:
            drv.define(render_domain_xml(want))
            actions.append(Action(Verb.UPDATE, key, _before(config_changes),
                                  _after(config_changes), reason="spec changed", live=False))
            self.store.record_guest_observed(desired.id, observed={
                "max_vcpus": want.max_vcpus, "max_memory": want.max_memory_bytes})
        if bool(drv.autostart(name)) != bool(spec.get("auto_start")):
            drv.set_autostart(name, bool(spec.get("auto_start")))
            actions.append(Action(Verb.UPDATE, key, None, {"auto_start": spec.get("auto_start")}))

        # live changes to a running domain
        pending_restart: list[Change] = []
        if running:
            live_xml = drv.domain_xml(name) or ""
            live = parse_domain_xml(live_xml)
            want_live = want
            once = spec.get("boot_once") or {}
            if obs.get("boot_once_running") and once.get("source") and not spec.get("media"):
                # booted once from media: that media stays in the drive until it stops
                want_live = self._domain_spec(desired, drv, place, max_vcpus=max_vcpus,
                                              max_memory=max_memory, media_id=once["source"])
            for change in diff_domain(want_live, live):
                if change.field in ("generation", "title"):
                    continue
                if not change.live or not self._apply_live(desired, drv, want_live, change):
                    pending_restart.append(change)
                else:
                    actions.append(Action(Verb.UPDATE, key, {change.field: change.before},
                                          {change.field: change.after}, live=True))

        # power and restarts
        actions += self._power(desired, drv, place, state)
        return actions, pending_restart

    def _apply_live(self, desired: Any, drv: Any, want: DomainSpec, change: Change) -> bool:
        """Apply one live-capable change to the running domain; False when the request
        did not ask for it live (it then waits for the next restart)."""
        name = want.name
        immediate = desired.spec.get("immediate") or {}
        field = change.field
        if field == "vcpus":
            if not immediate.get("cores"):
                return False
            drv.set_vcpus(name, want.vcpus, live=True)
        elif field == "memory_bytes":
            if not immediate.get("memory"):
                return False
            drv.set_memory(name, want.memory_bytes, live=True)
        elif field == "cpu_shares":
            drv.set_cpu_shares(name, want.cpu_shares, live=True)
        elif field.endswith(".iotune"):
            drv.set_iotune(name, change.device or "", {
                "read_bytes_sec": want.iotune.read_bytes_sec,
                "write_bytes_sec": want.iotune.write_bytes_sec,
                "read_iops_sec": want.iotune.read_iops_sec,
                "write_iops_sec": want.iotune.write_iops_sec}, live=True)
        elif field.endswith(".bandwidth"):
            inbound, outbound = change.after  # type: ignore[misc]
            drv.set_bandwidth(name, change.device or "", int(inbound), int(outbound), live=True)
        elif field == "media":
            drv.update_device(name, render_cdrom_xml(want, "media"), live=True)
        elif field == "seed":
            drv.update_device(name, render_cdrom_xml(want, "seed"), live=True)
        elif field == "monitor_secret":
            drv.update_device(name, render_graphics_xml(want), live=True)
        else:
            return False
        return True

    def _power(self, desired: Any, drv: Any, place: Placement, state: str | None
               ) -> list[Action]:
        spec, obs = desired.spec, desired.observed
        name = domain_name(desired.id)
        key = Key("guest", desired.id)
        actions: list[Action] = []
        running = state == "running"
        if pending(spec.get("power_request", 0), obs.get("power_request")):
            if spec.get("power") == "running" and not running:
                self._start(desired, drv, place)
                actions.append(Action(Verb.START, key, {"running": False}, {"running": True}))
            elif spec.get("power") == "stopped" and running:
                if spec.get("stop_mode") == "destroy":
                    drv.destroy(name)
                else:
                    drv.shutdown(name)
                actions.append(Action(Verb.STOP, key, {"running": True}, {"running": False},
                                      reason=spec.get("stop_mode", "shutdown")))
            self.store.record_guest_observed(desired.id, observed={
                "power_request": spec.get("power_request", 0), "stop_sent_at": time.time()})
        elif (spec.get("power") == "stopped" and running and spec.get("stop_escalate")
              and spec.get("stop_mode") == "shutdown"
              and time.time() - float(obs.get("stop_sent_at") or 0) > self.stop_grace_seconds):
            # the guest ignored the shutdown for the whole grace period: power it off
            drv.destroy(name)
            actions.append(Action(Verb.STOP, key, {"running": True}, {"running": False},
                                  reason="shutdown ignored: powered off"))
        restart = spec.get("restart") or {}
        if pending(restart.get("counter", 0), obs.get("restart_counter")):
            if running:
                if restart.get("mode") == "reset":
                    drv.reset(name)
                else:
                    drv.reboot(name)
                actions.append(Action(Verb.RESTART, key, None, {"mode": restart.get("mode")}))
            self.store.record_guest_observed(desired.id, observed={
                "restart_counter": restart.get("counter", 0)})
        if actions:  # taps come and go with the domain: the firewall reads them again
            self.enqueue(Key("firewall", desired.cell))
        return actions

    def _start(self, desired: Any, drv: Any, place: Placement) -> None:
        """Start; a pending one-time boot (media or PXE) is used by this start only: the
        domain is defined with that boot order, started, and defined back."""
        from reconciler.drivers.networks import ensure_started, network_state

        spec, obs = desired.spec, desired.observed
        name = domain_name(desired.id)
        if place.network and desired.interfaces:
            state = network_state(drv.hv, place.network)
            if state is None:
                raise Unavailable(f"network {place.network} is not defined on cell "
                                  f"{desired.cell} yet")
            if not state.active:
                state = ensure_started(drv.hv, place.network)
                if not state.active:
                    raise Permanent(f"network {place.network} cannot start: {state.error}")
        once = spec.get("boot_once") or None
        if once and str(once.get("request")) != str(obs.get("boot_once_request")):
            max_vcpus = max(int(obs.get("max_vcpus") or 0), int(spec["cores"]))
            max_memory = max(int(obs.get("max_memory") or 0), int(spec["memory"]))
            boot = Boot.NETWORK if once.get("network") else Boot.CDROM
            media = once.get("source") if not once.get("network") else None
            special = self._domain_spec(desired, drv, place, max_vcpus=max_vcpus,
                                        max_memory=max_memory, boot=boot, media_id=media)
            drv.define(render_domain_xml(special))
            try:
                drv.start(name)
            finally:
                normal = self._domain_spec(desired, drv, place, max_vcpus=max_vcpus,
                                           max_memory=max_memory)
                drv.define(render_domain_xml(normal))
            self.store.record_guest_observed(desired.id, observed={
                "boot_once_request": once.get("request"), "boot_once_running": True})
        else:
            drv.start(name)

    def _stopped_work(self, desired: Any, drv: Any, place: Placement) -> list[Action]:
        spec, obs = desired.spec, desired.observed
        name = domain_name(desired.id)
        key = Key("guest", desired.id)
        actions: list[Action] = []

        reset = spec.get("system_reset") or None
        if reset and pending(reset.get("generation", 0), obs.get("system_reset_generation")):
            cell = self.store.cell_spec(desired.cell)
            link = self.connections.link(cell)
            system = volume_name(desired.id, 0)
            source = self._image_volume(cell, link, place, "disk", reset["from_image"])
            for snap in drv.snapshots(name):  # snapshots of the old system are meaningless
                drv.delete_snapshot(name, snap.name)
            drv.delete_volume(place.pool, system)
            drv.create_volume(place.pool, system, int(spec["disks"][0]), backing=source)
            if "cloud-init" in spec.get("modules", []):
                self._write_seed(desired, drv, place)  # new instance id: cloud-init runs again
            self.store.record_guest_observed(desired.id, observed={
                "system_reset_generation": reset["generation"],
                "instance_id": spec.get("instance_id", "")})
            actions.append(Action(Verb.REPLACE, Key("volume", system), None,
                                  {"from_image": reset["from_image"]}, reason="system reset"))

        restore = spec.get("restore") or None
        if restore and pending(restore.get("generation", 0), obs.get("restore_generation")):
            drv.revert_snapshot(name, restore["target"])
            self.store.record_guest_observed(desired.id, observed={
                "restore_generation": restore["generation"], "current_snapshot":
                restore["target"]})
            actions.append(Action(Verb.UPDATE, key, None, {"snapshot": restore["target"]},
                                  reason="restore snapshot"))

        have = {s.name: s for s in drv.snapshots(name)}
        for snap in desired.snapshots:
            if snap.deleting:
                if snap.name in have:
                    drv.delete_snapshot(name, snap.name)
                    actions.append(Action(Verb.DELETE, Key("snapshot", snap.name), {}, None))
                self.store.finish_snapshot_delete(desired.id, snap.name)
            elif snap.name not in have:
                drv.create_snapshot(name, snap.name, snap.description)
                self.store.record_snapshot_observed(desired.id, snap.name, phase="created",
                                                    generation=snap.generation)
                self.store.record_guest_observed(desired.id, observed={
                    "current_snapshot": snap.name})
                actions.append(Action(Verb.CREATE, Key("snapshot", snap.name), None,
                                      {"description": snap.description}))
            elif snap.phase != "created":
                self.store.record_snapshot_observed(desired.id, snap.name, phase="created",
                                                    generation=snap.generation)

        shrink = spec.get("disk_shrink") or {}
        done = dict(obs.get("disk_shrink") or {})
        for index, generation in shrink.items():
            if pending(generation, done.get(index)):
                self._shrink(desired, drv, place, int(index))
                done[index] = generation
                self.store.record_guest_observed(desired.id, observed={"disk_shrink": done})
                actions.append(Action(Verb.UPDATE, Key("volume", volume_name(desired.id,
                                                                             int(index))),
                                      None, {"compacted": True}, reason="shrink"))
        return actions

    def _shrink(self, desired: Any, drv: Any, place: Placement, index: int) -> None:
        """Compact a qcow2 disk on the cell with `qemu-img convert` (argv, no shell)."""
        cell = self.store.cell_spec(desired.cell)
        link = self.connections.link(cell)
        info = drv.volume(place.pool, volume_name(desired.id, index))
        if info is None:
            raise NotFound(f"disk {index} of {desired.name} is missing")
        from reconciler.drivers.shell import check

        tmp = info.path + ".compact"
        check(link.shell.run(["qemu-img", "convert", "-O", "qcow2", info.path, tmp],
                             timeout=3600), f"compact disk {index} of {desired.name}")
        check(link.shell.run(["mv", "-f", tmp, info.path], timeout=60),
              f"replace disk {index} of {desired.name}")
        drv.refresh_pool(place.pool)

    # -- delete ------------------------------------------------------------------------------

    def _delete(self, desired: Any, drv: Any, place: Placement) -> Result:
        name = domain_name(desired.id)
        self.store.record_guest_observed(desired.id, phase="deleting")
        drv.undefine(name)
        for vol in drv.volumes(place.pool):
            if vol.startswith(f"nano-{desired.id}-"):
                drv.delete_volume(place.pool, vol)
        if drv.state(name) is not None:
            raise Unavailable(f"domain {name} still exists after undefine; retrying")
        self.store.finish_guest_delete(desired.id)
        self.enqueue(Key("network", desired.cell))  # its DHCP host and port forwards go
        self.enqueue(Key("firewall", desired.cell))
        self._cpu.pop(desired.id, None)
        return Result(actions=(Action(Verb.DELETE, Key("guest", desired.id),
                                      {"domain": name}, None),))

    # -- observe and record --------------------------------------------------------------------

    def _observe(self, desired: Any, drv: Any, link: Any, conditions: list[dict],
                 pending_restart: list[Change]) -> list[dict]:
        name = domain_name(desired.id)
        fresh = self.store.guest_desired(desired.id) or desired
        spec = fresh.spec
        state = drv.state(name)
        running = state == "running"
        observed: dict[str, Any] = {"running": running, "state": state or "missing",
                                    "boot_once_running": bool(running and fresh.observed.get(
                                        "boot_once_running")),
                                    "display_protocol": (spec.get("template_spec") or {})
                                    .get("control") or "vnc"}
        live_xml = drv.domain_xml(name) or ""
        live = parse_domain_xml(live_xml) if live_xml else None
        media = live.media.source if live and live.media else None
        observed["media_attached"] = bool(media)
        source = spec.get("media", "")
        if media and not source and observed["boot_once_running"]:
            source = (spec.get("boot_once") or {}).get("source", "")
        observed["media_source"] = source if media else ""
        port = live.graphics_port if live and running else None
        observed["display_port"] = port or 0
        address = fresh.interfaces[0]["address"] if fresh.interfaces else ""
        cell = self.store.cell_spec(fresh.cell)
        host = cell.address if cell else ""
        display = f"{host}:{port}" if port else ""
        for nic in fresh.interfaces:
            observed[nic["type"]] = {"network_address": nic.get("address", ""),
                                     "allocated_address": nic.get("address", ""),
                                     "display_address": display}
        if not fresh.interfaces:
            observed["internal"] = {"network_address": address, "display_address": display}
        observed["host"] = host
        stats = drv.stats([name]).get(name) if running else None
        total_disk = sum(int(s) for s in spec["disks"])
        if stats is not None:
            now = time.monotonic()
            prev = self._cpu.get(desired.id)
            usage = 0.0
            if prev and now > prev[0] and stats.vcpus:
                usage = 100.0 * (stats.cpu_time_ns - prev[1]) / ((now - prev[0]) * 1e9
                                                                 * stats.vcpus)
            self._cpu[desired.id] = (now, stats.cpu_time_ns)
            allocated = sum(stats.disk_allocation.values())
            observed.update({
                "cpu_usage": round(max(0.0, min(100.0, usage)), 2),
                "memory_available": stats.memory_available_bytes,
                "disk_available": max(0, total_disk - allocated),
                "bytes_read": stats.block_read_bytes, "bytes_written": stats.block_write_bytes,
                "bytes_received": stats.net_rx_bytes, "bytes_sent": stats.net_tx_bytes,
            })
        else:
            self._cpu.pop(desired.id, None)
            observed.update({"cpu_usage": 0, "memory_available": 0,
                             "disk_available": total_disk, "bytes_read": 0,
                             "bytes_written": 0, "bytes_received": 0, "bytes_sent": 0})

        conditions = set_condition(
            conditions, "RestartRequired", bool(pending_restart),
            "ChangesWaitForRestart" if pending_restart else "InSync",
            ("takes effect at the next restart: " + ", ".join(sorted({c.field for c in
                                                                       pending_restart})))
            if pending_restart else "", now_text())
        conditions = set_condition(conditions, "Drifted", False, "InSync", "", now_text())
        admin = spec.get("admin") or {}
        conditions = self._agent(fresh, drv, admin, running, conditions)
        phase = "running" if running else "stopped"
        conditions = set_condition(conditions, READY, True, "Converged",
                                   f"domain {state}", now_text())
        self.store.record_guest_observed(desired.id, generation=desired.generation,
                                         phase=phase, observed=observed, conditions=conditions,
                                         last_error="")
        return conditions

    def _agent(self, desired: Any, drv: Any, admin: dict[str, Any], running: bool,
               conditions: list[dict]) -> list[dict]:
        """Password resets through the guest agent (generation > 0 are API requests)."""
        if not pending(admin.get("generation", 0), desired.observed.get("admin_generation")):
            return conditions
        if not running:
            return set_condition(conditions, "AgentReady", False, "GuestStopped",
                                 "the new password is set by the guest agent once the guest "
                                 "runs", now_text())
        try:
            drv.set_user_password(domain_name(desired.id), admin.get("user") or "root",
                                  admin.get("password", ""))
        except NanoError as exc:
            return set_condition(conditions, "AgentReady", False, "AgentUnavailable",
                                 f"password not set yet: no guest agent answers ({exc.message})",
                                 now_text())
        self.store.record_guest_observed(desired.id, observed={
            "admin_generation": admin.get("generation", 0)})
        return set_condition(conditions, "AgentReady", True, "PasswordSet",
                             "the guest agent set the password", now_text())

    def _lost(self, desired: Any, cell: CellSpec) -> Result:
        conditions = set_condition(list(self.store.guest_conditions(desired.id)),
                                   "CellReachable", False, "CellOffline",
                                   f"cell {cell.name} is offline: {cell.observed.get('error', '')}"
                                   .rstrip(": "), now_text())
        phase = "lost" if desired.observed.get("created") else desired.phase
        self.store.record_guest_observed(desired.id, phase=phase, conditions=conditions)
        return Result(requeue_after=self.poll_seconds, note="cell offline")

    def _fail(self, desired: Any, message: str) -> None:
        self.store.record_guest_observed(desired.id, phase="failed" if not
                                         desired.observed.get("created") else desired.phase,
                                         last_error=message)

    def _record_error(self, desired: Any, exc: NanoError, conditions: list[dict]) -> None:
        conditions = set_condition(conditions, READY, False, "Error", exc.message, now_text())
        created = bool((self.store.guest_desired(desired.id) or desired).observed.get("created"))
        log.warning("guest %s (%s): %s", desired.name, desired.id, exc.message)
        self.store.record_guest_observed(
            desired.id, phase=None if created else "failed", last_error=exc.message,
            conditions=conditions)


def _before(changes: list[Change]) -> dict[str, Any]:
    return {c.field: c.before for c in changes}


def _after(changes: list[Change]) -> dict[str, Any]:
    return {c.field: c.after for c in changes}
