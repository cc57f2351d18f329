"""The guest reconciler: makes a guest's domain, volumes, seed ISO, power state, media,
snapshots, passwords and QoS on its cell match the stored spec, and records what it
observed (state, statistics, addresses, display) in the guest's status.

Registered by `reconciler/kinds.py`; runs on the controller's worker threads with one key
`guest/<id>` at a time. The stored contract it converges is described in `state/guests.py`.
One reconcile reads as a script: observe (`ObservedGuest`, from libvirt and the cell's
recorded facts), plan (`reconciler.guest_plan.plan_guest`, pure), apply the actions with
the drivers, observe and plan again, and record conditions from that last plan: status
never claims more than the last observation showed. `guest_want` turns a stored guest into
the planner's input and is pure too, so a dry run (`dry_run_fields`) needs no cell.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from reconciler.cells import CellConnections, local_pool_name, shared_pool_name
from reconciler.cloudinit import build_seed_iso
from reconciler.contract import (
    READY,
    Action,
    Key,
    Meter,
    NoMeter,
    Result,
    Verb,
    format_time,
    get_condition,
    set_condition,
)
from reconciler.guest_plan import (
    CellCaps,
    Do,
    GuestAction,
    GuestPlan,
    GuestWant,
    HoldReason,
    ObservedGuest,
    VolumeWant,
    dry_run_fields,
    plan_guest,
    propose,
    ready_reason,
)
from reconciler.guest_xml import (
    CPU_SHARES,
    Boot,
    Change,
    DiskSpec,
    DomainSpec,
    InterfaceSpec,
    IoTune,
    disk_target,
    domain_name,
    guest_disk_path,
    kib_per_sec,
    parse_domain_xml,
    render_cdrom_xml,
    render_domain_xml,
    render_graphics_xml,
    serial_log_path,
)
from reconciler.longwork import InProgress, LongWork, Report
from reconciler.migration import GuestMover
from reconciler.naming import names
from state.compute import CellSpec
from state.errors import Invalid, NanoError, NotFound, Permanent, Unavailable
from state.guests import SnapshotDesired

log = logging.getLogger("nano.reconciler.guests")

DEFAULT_NETWORK = "default"  # libvirt's NAT network, for pools without an address pool


def address_pool_network(name: str) -> str:
    """The libvirt network of an address pool on every cell of its compute pools."""
    return names().network(name)


def volume_name(guest_id: str, index: int) -> str:
    return names().volume(guest_id, index)


def seed_volume(guest_id: str) -> str:
    return names().seed_volume(guest_id)


def image_volume(kind: str, image_id: str, version: int) -> str:
    return names().image_volume(kind, image_id, version)


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


def initial_max_vcpus(spec: dict[str, Any], max_cores: int) -> int:
    """Room to add cores live: twice the request, within the configured maximum."""
    return max(int(spec["cores"]), min(2 * int(spec["cores"]), max_cores))


def domain_limits(desired: Any, max_cores: int) -> tuple[int, int]:
    """(max vCPUs, max memory) of the guest's domain: what it was defined with (recorded),
    never below the spec; a new domain gets room to grow its cores live."""
    spec, rec = desired.spec, desired.observed
    if rec.get("created"):
        max_vcpus = max(int(rec.get("max_vcpus") or 0), int(spec["cores"]))
    else:
        max_vcpus = initial_max_vcpus(spec, max_cores)
    return max_vcpus, max(int(rec.get("max_memory") or 0), int(spec["memory"]))


@dataclass(frozen=True)
class ImageNeed:
    """An image version the guest needs as a volume of its pool on the cell."""

    kind: str  # disk | media
    image: str
    version: int
    volume: str


def guest_want(desired: Any, place: Placement, *, max_cores: int, images: dict[str, Any],
               paths: Callable[[str], str], now: float, stop_grace_seconds: float,
               seed_digest: str = "") -> tuple[GuestWant, list[ImageNeed]]:
    """Pure: the planner's input for a stored guest. `images` maps image id -> its current
    source ({version, ...}) or None; `paths` gives a volume's path on the cell;
    `seed_digest` is the digest of the seed ISO the guest should carry ("" not compared)."""
    spec, rec = desired.spec, desired.observed
    needs: list[ImageNeed] = []

    def need(kind: str, image_id: str) -> ImageNeed:
        source = images.get(image_id)
        if source is None:
            raise Permanent(f"{kind} image {image_id} does not exist or has no file yet: "
                            f"upload one, or change the guest's {kind} image")
        item = ImageNeed(kind, image_id, int(source["version"]),
                         image_volume(kind, image_id, int(source["version"])))
        needs.append(item)
        return item

    reset = spec.get("system_reset") or {}
    building = not rec.get("created") or (
        reset and pending(reset.get("generation", 0), rec.get("system_reset_generation")))
    from_image = (reset.get("from_image") if reset else "") or spec.get("from_image") or ""
    volumes = []
    for index, size in enumerate(spec["disks"]):
        image = from_image if index == 0 and building else ""
        volumes.append(VolumeWant(index=index, name=volume_name(desired.id, index),
                                  size=int(size), image=image,
                                  image_volume=need("disk", image).volume if image else ""))
    once = spec.get("boot_once") or {}
    once_media = once.get("source") if once and not once.get("network") else ""
    once_pending = bool(once) and str(once.get("request")) != str(rec.get("boot_once_request"))
    media = spec.get("media") or ""
    media_volume = need("media", media).volume if media else ""
    running_media = media_volume
    if once_media and not media and (once_pending or rec.get("boot_once_running")):
        running_media = need("media", once_media).volume
    max_vcpus, max_memory = domain_limits(desired, max_cores)
    seed = seed_volume(desired.id) if "cloud-init" in spec.get("modules", []) else ""

    def build(media_vol: str) -> DomainSpec:
        return desired_domain(desired, place, media_path=paths(media_vol) if media_vol else None,
                              seed_path=paths(seed) if seed else None, max_vcpus=max_vcpus,
                              max_memory=max_memory)

    config = build(media_volume)
    network = place.network if desired.interfaces and any(
        nic["type"] != "external" for nic in desired.interfaces) else None
    want = GuestWant(
        guest_id=desired.id, name=desired.name, spec=spec, recorded=rec,
        generation=desired.generation, observed_generation=desired.observed_generation,
        config=config, running_spec=build(running_media) if running_media != media_volume
        else config, volumes=tuple(volumes), seed_volume=seed_volume(desired.id),
        seed_digest=seed_digest if seed else "",
        media_volume=running_media or media_volume, network=network,
        snapshots=tuple((s.name, s.description, s.deleting) for s in desired.snapshots),
        deleting=desired.deleting, now=now, stop_grace_seconds=stop_grace_seconds)
    return want, needs


def cell_caps(cell: CellSpec) -> CellCaps:
    """What the cell can do for guests, from the facts its reconciler recorded."""
    caps = (cell.observed.get("facts") or {}).get("capabilities") or {}
    return CellCaps(volume_streams=bool(caps.get("volume_streams", True)),
                    bandwidth=caps.get("bandwidth"),
                    bandwidth_missing=str(caps.get("bandwidth_missing") or ""), cell=cell.name)


class GuestReconciler:
    """Converges one guest per key `guest/<id>`: observe, plan (`plan_guest`), apply,
    observe and plan again, record conditions from that last plan."""

    kind = "guest"

    def __init__(self, store: Any, connections: CellConnections,
                 enqueue: Callable[[Key], None], *, poll_seconds: float = 15.0,
                 agent_retry_seconds: float = 10.0, stop_grace_seconds: float = 60.0,
                 sign_of_life_seconds: float = 120.0, long_work: LongWork | None = None,
                 migration_bandwidth_mib: int = 0, meter: Meter | None = None) -> None:
        self.store = store
        # image streams, volume copies and disk compaction (reconciler/longwork.py)
        self.long = long_work or LongWork(enqueue)
        self.meter = meter or NoMeter()  # image bytes sent to cells
        self.connections = connections
        self.enqueue = enqueue
        self.poll_seconds = poll_seconds
        self.agent_retry_seconds = agent_retry_seconds
        self.stop_grace_seconds = stop_grace_seconds
        self.sign_of_life_seconds = sign_of_life_seconds
        self._cpu: dict[str, tuple[float, int]] = {}  # guest -> (when, cpu time ns)
        # a guest with an active migration moves instead (reconciler/migration.py)
        self.mover = GuestMover(store, connections, self.long, enqueue,
                                bandwidth_mib=migration_bandwidth_mib)

    def keys(self) -> Iterable[Key]:
        return [Key("guest", gid) for gid in self.store.guest_ids()]

    @property
    def max_cores(self) -> int:
        return int(self.store.limits["max_cores"])

    # -- the script ---------------------------------------------------------------------

    def reconcile(self, key: Key) -> Result:
        desired = self.store.guest_desired(key.id)
        if desired is None:
            self._cpu.pop(key.id, None)
            return Result()
        move = self.store.guest_move(key.id)
        if move is not None:
            if not desired.deleting:
                return self.mover.step(desired, move)
            self.store.record_move(desired.id, move, phase="failed", percent=100, done=True,
                                   error="the guest was deleted before it moved")
        cell = self.store.cell_spec(desired.cell)
        if cell is None:
            return self._cell_gone(desired)
        if not cell.observed.get("alive"):
            return self._lost(desired, cell)
        from reconciler.drivers.domains import LibvirtGuests

        link = self.connections.link(cell)
        drv = LibvirtGuests(link.hypervisor)
        place = placement_of(desired, cell)
        job = self.long.running_for(key)
        if job is not None:
            # its volumes are being made: observed now, they would look half there (a copy
            # still allocating is not a disk to grow); the job's end wakes this guest
            return self._long_work_running(desired, job.describe())
        if desired.deleting:
            return self._delete(desired, drv, place)
        if desired.observed.get("failed_generation") == desired.generation:
            return Result(note="failed: waits for a change of its spec (or delete it)")
        conditions = set_condition(self.store.guest_conditions(desired.id), "CellReachable",
                                   True, "CellAlive", f"cell {cell.name} answers", now_text())
        try:
            want, needs = self._want(desired, drv, place)
            observed = self._observe(desired, want, needs, drv, place, cell)
            plan = plan_guest(want, observed)
            if plan.blocked:
                return self._blocked(desired, plan, conditions)
            outcome = self._apply(plan, desired, cell, link, drv, place, needs)
            if plan.actions:
                desired = self.store.guest_desired(key.id) or desired
                want, needs = self._want(desired, drv, place)
                observed = self._observe(desired, want, needs, drv, place, cell)
                final = plan_guest(want, observed)
            else:
                final = plan
        except NanoError as exc:
            if isinstance(exc, Unavailable):
                self._record_error(desired, exc, conditions)
                raise
            self._record_error(desired, exc, conditions)
            if not desired.observed.get("created"):
                self.store.record_guest_observed(desired.id, observed={
                    "failed_generation": desired.generation})
                return Result(note=f"failed: {exc.message}")
            raise  # an existing guest: retried with backoff, the reason in its status
        conditions = self._conditions(desired, conditions, plan, final, outcome, observed)
        conditions = self._sign_of_life(desired, observed, link, drv, conditions)
        self._record(desired, observed, final, conditions, drv, cell)
        return Result(requeue_after=self._requeue(final, outcome),
                      actions=tuple(a.action(desired.id) for a in plan.actions))

    def _requeue(self, final: GuestPlan, outcome: dict[str, Any]) -> float:
        wait = self.poll_seconds
        if final.actions:
            wait = min(wait, 2.0)
        if outcome.get("long_work"):
            wait = min(wait, 5.0)  # to report progress; the job's end enqueues the guest
        if outcome.get("agent_error") or any(h.reason is HoldReason.PASSWORD_PENDING
                                             for h in final.holds):
            wait = min(wait, self.agent_retry_seconds)
        if any(h.reason is HoldReason.STOPPING for h in final.holds):
            wait = min(wait, max(self.stop_grace_seconds / 4, 1.0))
        return wait

    # -- desired and observed ---------------------------------------------------------------

    def _want(self, desired: Any, drv: Any, place: Placement) -> tuple[GuestWant,
                                                                        list[ImageNeed]]:
        spec = desired.spec
        ids = {spec.get("media"), (spec.get("boot_once") or {}).get("source"),
               spec.get("from_image"), (spec.get("system_reset") or {}).get("from_image")}
        images = {i: self.store.image_source(i) for i in ids if i}
        pool_path: list[str] = []

        def path(volume: str) -> str:
            info = drv.volume(place.pool, volume)
            if info is not None:
                return info.path
            if not pool_path:
                pool_path.append((drv.hv.pool_state(place.pool, refresh=False).path or "")
                                 .rstrip("/"))
            return f"{pool_path[0]}/{volume}"

        return guest_want(desired, place, max_cores=self.max_cores, images=images, paths=path,
                          now=time.time(), stop_grace_seconds=self.stop_grace_seconds,
                          seed_digest=self._seed(desired)[1])

    def _observe(self, desired: Any, want: GuestWant, needs: list[ImageNeed], drv: Any,
                 place: Placement, cell: CellSpec) -> ObservedGuest:
        """One observation of everything the planner compares."""
        from reconciler.drivers.networks import network_state

        name = domain_name(desired.id)
        power = drv.power(name)
        state, reason = power if power else (None, "")
        config = live = None
        snapshots: frozenset[str] = frozenset()
        autostart = False
        if power is not None:
            xml = drv.domain_xml(name, inactive=True)
            config = parse_domain_xml(xml) if xml else None
            if state == "running":
                live_xml = drv.domain_xml(name)
                live = parse_domain_xml(live_xml) if live_xml else None
            snapshots = frozenset(s.name for s in drv.snapshots(name))
            autostart = bool(drv.autostart(name))
        listed = drv.pool_volumes(place.pool)
        if listed is None:  # the cell's reconciler makes its pools: wait for it
            raise Unavailable(f"storage pool {place.pool} is not on cell {cell.name} (yet): "
                              "the guest waits until the cell has it")
        present = set(listed)
        volumes: dict[str, int] = {}
        for vol in want.volumes:
            if vol.name in present:
                info = drv.volume(place.pool, vol.name)
                if info is not None:
                    volumes[vol.name] = info.capacity
        if want.seed_volume in present:
            volumes[want.seed_volume] = 0
        images = frozenset(
            n.volume for n in needs if n.volume in present
            and self.store.image_replica(n.image, n.version, cell.name))
        network = None
        if want.network:
            net = network_state(drv.hv, want.network)
            network = (net is not None, bool(net and net.active),
                       self._network_error(cell, want.network))
        return ObservedGuest(defined=config is not None, state=state, state_reason=reason,
                             config=config, live=live, volumes=volumes, images=images,
                             snapshots=snapshots, autostart=autostart, network=network,
                             caps=cell_caps(cell))

    def _network_error(self, cell: CellSpec, network: str) -> str:
        """Why the cell says the guest's network is not ready ("" when it does not)."""
        if network == DEFAULT_NETWORK:
            for net in cell.observed.get("networks") or []:
                if net.get("name") == network and net.get("error"):
                    return str(net["error"])
            return ""
        cond = get_condition(self.store.cell_conditions(cell.name), "NetworkReady")
        return cond.message if cond is not None and not cond.status else ""

    # -- apply ----------------------------------------------------------------------------

    def _apply(self, plan: GuestPlan, desired: Any, cell: CellSpec, link: Any, drv: Any,
               place: Placement, needs: list[ImageNeed]) -> dict[str, Any]:
        """Execute the plan's actions in order; returns what the status needs to know of
        how they went (an agent that did not answer)."""
        outcome: dict[str, Any] = {}
        creating = not desired.observed.get("created")
        if creating and plan.actions:
            self.store.record_guest_observed(desired.id, phase="creating", progress=5,
                                             last_error="")
        total = len(plan.actions)
        for done, action in enumerate(plan.actions, 1):
            try:
                self._execute(action, desired, cell, link, drv, place, outcome)
            except InProgress as running:
                # long work in its own lane: the rest of the plan waits for it
                outcome["long_work"] = running.job.describe()
                break
            if creating:
                self.store.record_guest_observed(desired.id, progress=5 + 90 * done // total)
        if any(a.do in (Do.DEFINE, Do.START, Do.SHUTDOWN, Do.DESTROY, Do.REBOOT, Do.RESET)
               for a in plan.actions):
            # DHCP host entries, port forwards and the firewall follow the domain and its taps
            self.enqueue(Key("network", desired.cell))
            self.enqueue(Key("firewall", desired.cell))
        return outcome

    def _execute(self, action: GuestAction, desired: Any, cell: CellSpec, link: Any, drv: Any,
                 place: Placement, outcome: dict[str, Any]) -> None:
        args, gid = action.args, desired.id
        name = domain_name(gid)
        record = self.store.record_guest_observed
        do = action.do
        owner = Key("guest", gid)
        if do is Do.SEND_IMAGE:
            self._image_volume(owner, cell, link, place, args["kind"], args["image"])
        elif do is Do.CREATE_VOLUME:
            def create(_report: Any = None) -> None:
                drv.delete_volume(place.pool, args["volume"])  # left by an interrupted try
                drv.create_volume(place.pool, args["volume"], int(args["size"]),
                                  backing=args["backing"] or None)

            if args["backing"]:  # a full copy of an image: long work
                self.long.run(owner, f"guest/{gid}/volume/{args['volume']}",
                              f"copy image volume {args['backing']} to {args['volume']}",
                              create)
            else:
                create()
        elif do is Do.WRITE_SEED:
            record(gid, observed={"seed_digest": self._write_seed(desired, drv, place)})
        elif do is Do.DEFINE:
            spec: DomainSpec = args["spec"]
            drv.define(render_domain_xml(spec))
            facts: dict[str, Any] = {"max_vcpus": spec.max_vcpus,
                                     "max_memory": spec.max_memory_bytes}
            if not desired.observed.get("created"):
                facts.update(created=True, create_time=now_text(),
                             instance_id=desired.spec.get("instance_id", ""))
                self.meter.domain_created(cell.name)
            record(gid, observed=facts)
        elif do is Do.SET_AUTOSTART:
            drv.set_autostart(name, bool(args["enable"]))
        elif do is Do.RESET_SYSTEM:
            def reset(_report: Any) -> None:
                for snap in drv.snapshots(name):  # snapshots of the old system are void
                    drv.delete_snapshot(name, snap.name)
                drv.delete_volume(place.pool, args["volume"])
                drv.create_volume(place.pool, args["volume"], int(args["size"]),
                                  backing=args["backing"] or None)
                facts = {"system_reset_generation": args["generation"],
                         "instance_id": desired.spec.get("instance_id", "")}
                if args.get("seed"):  # new instance id: cloud-init again
                    facts["seed_digest"] = self._write_seed(desired, drv, place)
                record(gid, observed=facts)

            self.long.run(owner, f"guest/{gid}/reset/{args['generation']}",
                          f"reset the system disk of {desired.name}", reset)
        elif do is Do.RESTORE_SNAPSHOT:
            drv.revert_snapshot(name, args["snapshot"])
            record(gid, observed={"restore_generation": args["generation"],
                                  "current_snapshot": args["snapshot"]})
        elif do is Do.DELETE_SNAPSHOT:
            if args["present"]:
                drv.delete_snapshot(name, args["snapshot"])
            self.store.finish_snapshot_delete(gid, args["snapshot"])
        elif do is Do.CREATE_SNAPSHOT:
            drv.create_snapshot(name, args["snapshot"], args["description"])
            snap = next(s for s in desired.snapshots if s.name == args["snapshot"])
            self.store.record_snapshot_observed(gid, snap.name, phase="created",
                                                generation=snap.generation)
            record(gid, observed={"current_snapshot": snap.name})
        elif do is Do.SHRINK_DISK:
            def shrink(_report: Any) -> None:
                self._shrink(desired, drv, place, int(args["index"]))
                done = dict(desired.observed.get("disk_shrink") or {})
                done[str(args["index"])] = args["generation"]
                record(gid, observed={"disk_shrink": done})

            self.long.run(owner, f"guest/{gid}/shrink/{args['index']}/{args['generation']}",
                          f"compact disk {args['index']} of {desired.name}", shrink)
        elif do is Do.GROW_VOLUME:
            drv.resize_volume(place.pool, args["volume"], int(args["size"]))
        elif do is Do.GROW_DISK_LIVE:
            bus = (desired.spec.get("template_spec") or {}).get("disk") or "scsi"
            drv.block_resize(name, disk_target(bus, int(args["index"])), int(args["size"]))
        elif do is Do.CHANGE_LIVE:
            self._apply_live(drv, args["spec"], args["change"])
        elif do is Do.START:
            self._start(desired, drv, place, args.get("boot_once"))
            record(gid, observed={"power_request": args["request"],
                                  "stop_sent_at": 0})
        elif do in (Do.SHUTDOWN, Do.DESTROY):
            if do is Do.DESTROY:
                drv.destroy(name)
            else:
                drv.shutdown(name)
            facts = {"power_request": args["request"]}
            if not args.get("escalated"):
                facts["stop_sent_at"] = time.time()
            record(gid, observed=facts)
        elif do in (Do.REBOOT, Do.RESET):
            drv.reset(name) if do is Do.RESET else drv.reboot(name)
            record(gid, observed={"restart_counter": args["counter"]})
        elif do is Do.SET_PASSWORD:
            try:
                drv.set_user_password(name, args["user"], desired.admin_password)
            except NanoError as exc:
                outcome["agent_error"] = exc.message
            else:
                record(gid, observed={"admin_generation": args["generation"]})
                outcome["password_set"] = True
        elif do is Do.RECORD:
            facts = {k: args[k] for k in ("restart_counter",) if k in args}
            if "request" in args:
                facts["power_request"] = args["request"]
            record(gid, observed=facts)
        else:  # Do.UNDEFINE runs through _delete
            raise Permanent(f"guest {desired.name}: cannot execute {do} here")

    def _apply_live(self, drv: Any, want: DomainSpec, change: Change) -> None:
        """Apply one live-capable change to the running domain (the planner decided it
        may be applied live)."""
        name = want.name
        field = change.field
        if field == "vcpus":
            drv.set_vcpus(name, want.vcpus, live=True)
        elif field == "memory_bytes":
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
            raise Permanent(f"{field} cannot change on a running domain")

    def _start(self, desired: Any, drv: Any, place: Placement,
               once: dict[str, Any] | None) -> None:
        """Start; a pending one-time boot (media or PXE) is used by this start only: the
        domain is defined with that boot order, started, and defined back."""
        from reconciler.drivers.networks import ensure_started, network_state

        name = domain_name(desired.id)
        if place.network and desired.interfaces:
            state = network_state(drv.hv, place.network)
            if state is not None and not state.active:
                state = ensure_started(drv.hv, place.network)
                if not state.active:
                    raise Permanent(f"network {place.network} cannot start: {state.error}")
        if not once:
            drv.start(name)
            return
        max_vcpus, max_memory = domain_limits(desired, self.max_cores)
        boot = Boot.NETWORK if once.get("network") else Boot.CDROM
        media = None
        if not once.get("network"):
            media = self._media_path(desired, drv, place, once["source"])
        special = desired_domain(desired, place, media_path=media,
                                 seed_path=self._seed_path(desired, drv, place),
                                 max_vcpus=max_vcpus, max_memory=max_memory, boot=boot)
        drv.define(render_domain_xml(special))
        try:
            drv.start(name)
        finally:
            want, _ = self._want(desired, drv, place)
            drv.define(render_domain_xml(want.config))
        self.store.record_guest_observed(desired.id, observed={
            "boot_once_request": once.get("request"), "boot_once_running": True})

    def _seed_path(self, desired: Any, drv: Any, place: Placement) -> str | None:
        if "cloud-init" not in desired.spec.get("modules", []):
            return None
        info = drv.volume(place.pool, seed_volume(desired.id))
        return info.path if info else None

    def _media_path(self, desired: Any, drv: Any, place: Placement, media_id: str) -> str:
        cell = self.store.cell_spec(desired.cell)
        link = self.connections.link(cell)
        name = self._image_volume(Key("guest", desired.id), cell, link, place, "media",
                                  media_id)
        info = drv.volume(place.pool, name)
        if info is None:
            raise NotFound(f"media volume {name} vanished")
        return info.path

    def _image_volume(self, owner: Key, cell: CellSpec, link: Any, place: Placement,
                      kind: str, image_id: str) -> str:
        """The image's current version as a volume of the guest's pool on the cell, sent
        there through a libvirt upload stream when missing (cached by id + version): long
        work, in its lane (InProgress until it is there)."""
        from reconciler.drivers.domains import LibvirtGuests
        from reconciler.drivers.volumes import upload_volume

        source = self.store.image_source(image_id)
        if source is None:
            raise Permanent(f"{kind} image {image_id} does not exist or has no file yet")
        name = image_volume(kind, image_id, source["version"])
        replica = self.store.image_replica(image_id, source["version"], cell.name)
        drv = LibvirtGuests(link.hypervisor)
        # a recorded replica was checked by size and SHA-1 when it was made; the volume's
        # capacity cannot say (for qcow2 it is the virtual size, not the file's)
        job_id = f"send/{cell.name}/{place.pool}/{name}"
        if replica and drv.volume(place.pool, name) is not None:
            self.long.discard(job_id)  # a send's result nobody needs any more
            return name

        def send(report: Report) -> str:
            size, sha1 = upload_volume(link.hypervisor, place.pool, name, source["path"],
                                       fmt="qcow2" if kind == "disk" else "raw",
                                       progress=report)
            self.meter.transferred("to_cell", size)
            if size != source["size"] or (source["checksum"] and sha1 != source["checksum"]):
                drv.delete_volume(place.pool, name)
                raise Permanent(f"{kind} image {image_id} arrived on {cell.name} as {size} "
                                f"bytes with SHA-1 {sha1}, expected {source['size']} / "
                                f"{source['checksum']}")
            self.store.record_image_replica(image_id, source["version"], cell.name,
                                            f"{place.pool}/{name}", size, sha1)
            return name

        # one job per volume on a cell: guests that need the same image share it
        sent = self.long.run(owner, job_id, f"send {kind} image {image_id} to cell "
                             f"{cell.name}", send)
        if drv.volume(place.pool, sent) is None:  # dropped since (an unused cached copy)
            self.long.discard(job_id)
            raise Unavailable(f"{kind} image {image_id} was sent to cell {cell.name} and is "
                              "gone again (its cached copy was dropped): sending it again")
        return sent

    def _seed(self, desired: Any) -> tuple[dict[str, Any], str]:
        """What the guest's cloud-init seed ISO is built from (build_seed_iso's arguments)
        and its digest. The digest names the admin password by its generation, never by
        its value, so the recorded digest says nothing about the password."""
        spec = desired.spec
        ci = spec.get("cloud_init") or {}
        admin = spec.get("admin") or {}
        bus = (spec.get("template_spec") or {}).get("disk") or "scsi"
        inputs = dict(
            instance_id=spec.get("instance_id") or desired.id,
            hostname=desired.name,
            admin_name=admin.get("user") or ci.get("admin_name") or None,
            root_enabled=bool(ci.get("root_enabled", True)),
            data_disks=[guest_disk_path(bus, i) for i in range(1, len(spec["disks"]))],
            data_path=ci.get("data_path") or "/opt/data",
            network_config=self.store.guest_network_config(desired.id),
        )
        digest = hashlib.sha256(json.dumps(
            {**inputs, "admin_generation": admin.get("generation", 0)}, sort_keys=True
        ).encode()).hexdigest()[:32]
        return inputs, digest

    def _write_seed(self, desired: Any, drv: Any, place: Placement) -> str:
        """Build the guest's cloud-init seed ISO, write it as its seed volume and return
        its digest. The password goes in as a SHA-512 crypt hash (reconciler/cloudinit.py),
        never in clear: the ISO sits in the cell's storage pool and stays attached."""
        inputs, digest = self._seed(desired)
        iso = build_seed_iso(admin_password=desired.admin_password, **inputs)
        drv.write_volume(place.pool, seed_volume(desired.id), iso)
        return digest

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
            if vol.startswith(names().guest_volumes(desired.id)):
                drv.delete_volume(place.pool, vol)
        if drv.state(name) is not None:
            raise Unavailable(f"domain {name} still exists after undefine; retrying")
        self.store.finish_guest_delete(desired.id)
        self.enqueue(Key("network", desired.cell))  # its DHCP host and port forwards go
        self.enqueue(Key("firewall", desired.cell))
        self._cpu.pop(desired.id, None)
        return Result(actions=(Action(Verb.DELETE, Key("guest", desired.id),
                                      {"domain": name}, None),))

    # -- conditions and status -----------------------------------------------------------------

    def _conditions(self, desired: Any, conditions: list[dict], first: GuestPlan,
                    final: GuestPlan, outcome: dict[str, Any], observed: ObservedGuest,
                    ) -> list[dict]:
        """Every condition from the final plan (made from the last observation) and from
        what this pass found drifted."""
        now = now_text()
        ready, reason, message = ready_reason(final)
        if outcome.get("long_work") and not ready:
            reason = "LongWorkRunning"
            message = f"{outcome['long_work']}; then: {message}"
        if outcome.get("agent_error") and reason == "Converging" and all(
                a.do is Do.SET_PASSWORD for a in final.actions):
            reason = "PasswordPending"
            message = f"the new password waits for the guest agent: {outcome['agent_error']}"
        conditions = set_condition(conditions, READY, ready, reason, message, now)
        restart = [h for h in final.holds if h.reason is HoldReason.RESTART_REQUIRED]
        conditions = set_condition(
            conditions, "RestartRequired", bool(restart),
            "ChangesWaitForRestart" if restart else "InSync",
            "; ".join(h.message for h in restart), now)
        conditions = self._drift(desired, conditions, first, final, now)
        admin = desired.spec.get("admin") or {}
        if outcome.get("password_set"):
            conditions = set_condition(conditions, "AgentReady", True, "PasswordSet",
                                       "the guest agent set the password", now)
        elif outcome.get("agent_error"):
            conditions = set_condition(conditions, "AgentReady", False, "AgentUnavailable",
                                       f"password not set yet: no guest agent answers "
                                       f"({outcome['agent_error']})", now)
        elif pending(admin.get("generation", 0), desired.observed.get("admin_generation")) \
                and not observed.running:
            conditions = set_condition(conditions, "AgentReady", False, "GuestStopped",
                                       "the new password is set by the guest agent once the "
                                       "guest runs", now)
        return conditions

    def _sign_of_life(self, desired: Any, observed: ObservedGuest, link: Any, drv: Any,
                      conditions: list[dict]) -> list[dict]:
        """GuestActive: has the running guest shown any sign of executing code since it
        started (bytes on its serial console, or its agent answering)? Looked for once per
        start: a domain that runs but executes nothing (KVM that runs no guest code) looks
        like any other running domain to libvirt."""
        now = now_text()
        if not observed.running or observed.live is None:
            return set_condition(conditions, "GuestActive", False, "NotRunning",
                                 "the guest is not running", now)
        rec = desired.observed
        boot = observed.live.domain_id
        if rec.get("life_boot") == boot and rec.get("life_seen"):
            return conditions
        since = float(rec.get("running_since") or 0) if rec.get("life_boot") == boot else 0.0
        since = since or time.time()
        name = domain_name(desired.id)
        printed = self._console_bytes(link, desired.id)
        answers = drv.agent_answers(name) if not printed else False
        seen = bool(printed) or answers
        self.store.record_guest_observed(desired.id, observed={
            "life_boot": boot, "running_since": since, "life_seen": seen})
        if seen:
            how = (f"{printed} bytes on its serial console" if printed
                   else "its guest agent answers")
            return set_condition(conditions, "GuestActive", True,
                                 "ConsoleOutput" if printed else "AgentAnswers", how, now)
        waited = int(time.time() - since)
        if waited < self.sign_of_life_seconds:
            return set_condition(conditions, "GuestActive", False, "Booting",
                                 f"running for {waited} s; no serial console output and no "
                                 "guest agent yet", now)
        return set_condition(
            conditions, "GuestActive", False, "NoSignOfLife",
            f"running for {waited} s without a byte on its serial console or an answer from "
            "its guest agent. Normal for a system that uses neither; otherwise the guest "
            "may not execute at all (e.g. a cell where KVM runs no guest code: use "
            "virt_type qemu on it)", now)

    def _console_bytes(self, link: Any, guest_id: str) -> int:
        """Bytes the guest printed on its serial console since it started (0 when the log
        is missing: a domain defined before logs were kept, a simulated cell)."""
        result = link.shell.run(["stat", "-c", "%s", serial_log_path(guest_id)], timeout=15)
        text = result.stdout.strip()
        return int(text) if result.rc == 0 and text.isdigit() else 0

    def _drift(self, desired: Any, conditions: list[dict], first: GuestPlan,
               final: GuestPlan, now: str) -> list[dict]:
        if final.drift:
            text = "; ".join(final.drift)
            return set_condition(conditions, "Drifted", True, "Drift",
                                 f"changed on the cell outside nano: {text}", now)
        if first.drift:
            text = "; ".join(first.drift)
            log.warning("guest %s (%s) drifted and was corrected: %s", desired.name,
                        desired.id, text)
            self.store.add_log(f"guest {desired.name} drifted and was corrected: {text}"[:1000],
                               user="nanod", resource=f"guest/{desired.id}")
            self.store.record_guest_observed(desired.id, observed={
                "last_drift": {"at": now, "changes": list(first.drift)}})
            return set_condition(conditions, "Drifted", False, "Corrected",
                                 f"corrected at {now}: {text}", now)
        previous = get_condition(conditions, "Drifted")
        if previous is not None and previous.reason == "Corrected":
            return conditions  # the last drift, corrected, stays on record
        return set_condition(conditions, "Drifted", False, "InSync", "", now)

    def _record(self, desired: Any, observed: ObservedGuest, final: GuestPlan,
                conditions: list[dict], drv: Any, cell: CellSpec) -> None:
        fresh = self.store.guest_desired(desired.id) or desired
        spec = fresh.spec
        running = observed.running
        live = observed.live
        facts: dict[str, Any] = {
            "running": running, "state": observed.state or "missing",
            "state_reason": observed.state_reason,
            "boot_once_running": bool(running and fresh.observed.get("boot_once_running")),
            "display_protocol": (spec.get("template_spec") or {}).get("control") or "vnc",
            "failed_generation": None,
        }
        media = live.media.source if live and live.media else (
            observed.config.media.source if observed.config and observed.config.media
            and not running else None)
        facts["media_attached"] = bool(media)
        source = spec.get("media", "")
        if media and not source and facts["boot_once_running"]:
            source = (spec.get("boot_once") or {}).get("source", "")
        facts["media_source"] = source if media else ""
        port = live.graphics_port if live and running else None
        facts["display_port"] = port or 0
        address = fresh.interfaces[0]["address"] if fresh.interfaces else ""
        host = cell.address
        display = f"{host}:{port}" if port else ""
        for nic in fresh.interfaces:
            facts[nic["type"]] = {"network_address": nic.get("address", ""),
                                  "allocated_address": nic.get("address", ""),
                                  "display_address": display}
        if not fresh.interfaces:
            facts["internal"] = {"network_address": address, "display_address": display}
        facts["host"] = host
        facts.update(self._stats(desired, drv, running, spec))
        for snap in fresh.snapshots:
            if snap.name in observed.snapshots and snap.phase != "created" and \
                    not snap.deleting:
                self.store.record_snapshot_observed(desired.id, snap.name, phase="created",
                                                    generation=snap.generation)
        phase = "running" if running else "stopped"
        if not observed.defined:
            phase = "failed" if final.blocked else "creating"
        # converged on this generation only when nothing is left to do: a pass that
        # started long work (an image sent) or left an action for the next one has not,
        # and what its next pass finds different is no drift
        self.store.record_guest_observed(desired.id, generation=None if final.actions else
                                         desired.generation, phase=phase, observed=facts,
                                         conditions=conditions, last_error="")

    def _stats(self, desired: Any, drv: Any, running: bool, spec: dict[str, Any]
               ) -> dict[str, Any]:
        name = domain_name(desired.id)
        stats = drv.stats([name]).get(name) if running else None
        total_disk = sum(int(s) for s in spec["disks"])
        if stats is None:
            self._cpu.pop(desired.id, None)
            return {"cpu_usage": 0, "memory_available": 0, "disk_available": total_disk,
                    "bytes_read": 0, "bytes_written": 0, "bytes_received": 0, "bytes_sent": 0}
        now = time.monotonic()
        prev = self._cpu.get(desired.id)
        usage = 0.0
        if prev and now > prev[0] and stats.vcpus:
            usage = 100.0 * (stats.cpu_time_ns - prev[1]) / ((now - prev[0]) * 1e9
                                                             * stats.vcpus)
        self._cpu[desired.id] = (now, stats.cpu_time_ns)
        allocated = sum(stats.disk_allocation.values())
        return {
            "cpu_usage": round(max(0.0, min(100.0, usage)), 2),
            "memory_available": stats.memory_available_bytes,
            "disk_available": max(0, total_disk - allocated),
            "bytes_read": stats.block_read_bytes, "bytes_written": stats.block_write_bytes,
            "bytes_received": stats.net_rx_bytes, "bytes_sent": stats.net_tx_bytes,
        }

    def _long_work_running(self, desired: Any, what: str) -> Result:
        conditions = set_condition(list(self.store.guest_conditions(desired.id)), READY, False,
                                   "LongWorkRunning", what, now_text())
        self.store.record_guest_observed(desired.id, conditions=conditions)
        return Result(requeue_after=5.0, note=what)

    def _blocked(self, desired: Any, plan: GuestPlan, conditions: list[dict]) -> Result:
        """Something the guest needs cannot be had (a capability of the cell, a lost disk):
        nothing is changed; a guest not created yet fails at once, for this spec."""
        hold = plan.blocked
        assert hold is not None
        now = now_text()
        conditions = set_condition(conditions, READY, False, str(hold.reason), hold.message,
                                   now)
        conditions = self._drift(desired, conditions, plan, plan, now)
        created = bool(desired.observed.get("created"))
        log.warning("guest %s (%s): %s", desired.name, desired.id, hold.message)
        self.store.record_guest_observed(
            desired.id, phase=None if created else "failed", last_error=hold.message,
            conditions=conditions, generation=desired.generation,
            observed=None if created else {"failed_generation": desired.generation})
        return Result(requeue_after=self.poll_seconds if created else None,
                      note=f"blocked: {hold.message}")

    def _lost(self, desired: Any, cell: CellSpec) -> Result:
        why = f"cell {cell.name} is offline: {cell.observed.get('error', '')}".rstrip(": ")
        fence = cell.observed.get("fence") or {}
        if fence and not fence.get("ok"):  # a failover pool: nothing starts it elsewhere
            why += f"; failover waits for the fence: {fence.get('message', '')}"
        conditions = set_condition(list(self.store.guest_conditions(desired.id)),
                                   "CellReachable", False, "CellOffline", why, now_text())
        conditions = set_condition(conditions, READY, False, "CellOffline",
                                   f"{why}; the guest's state is unknown until it answers",
                                   now_text())
        phase = "lost" if desired.observed.get("created") else desired.phase
        self.store.record_guest_observed(desired.id, phase=phase, conditions=conditions)
        return Result(requeue_after=self.poll_seconds, note="cell offline")

    def _cell_gone(self, desired: Any) -> Result:
        message = f"cell {desired.cell!r} is not registered any more"
        conditions = set_condition(list(self.store.guest_conditions(desired.id)), READY,
                                   False, "CellMissing", message, now_text())
        self.store.record_guest_observed(
            desired.id, phase="failed" if not desired.observed.get("created") else "lost",
            last_error=message, conditions=conditions)
        return Result(note=message)

    def _record_error(self, desired: Any, exc: NanoError, conditions: list[dict]) -> None:
        conditions = set_condition(conditions, READY, False, "Error", exc.message, now_text())
        created = bool((self.store.guest_desired(desired.id) or desired).observed.get("created"))
        log.warning("guest %s (%s): %s", desired.name, desired.id, exc.message)
        # a cell that cannot be reached (or is not ready) fails no creation: it is retried
        failed = not created and not isinstance(exc, Unavailable)
        self.store.record_guest_observed(
            desired.id, phase="failed" if failed else None, last_error=exc.message,
            conditions=conditions)


def dry_run(store: Any, guest_id: str, changes: Mapping[str, Any], *, max_cores: int,
            stop_grace_seconds: float = 60.0) -> dict[str, Any]:
    """How `changes` (API field -> value, as `POST /guests/{id}/plan` takes them) would take
    effect on the guest: the guest planner run on the proposed spec against the current one
    as the cell holds it once converged. Reads the store only; no cell is contacted.
    Returns {fields: {field: {effect, reason}}, actions: [...], holds: [...]}."""
    desired = store.guest_desired(guest_id)
    if desired is None:
        raise NotFound(f"no guest {guest_id!r}")
    cell = store.cell_spec(desired.cell)
    if cell is None:
        raise NotFound(f"the cell {desired.cell!r} of guest {desired.name} is not registered")
    place = placement_of(desired, cell)
    try:
        spec, snaps, known = propose(desired.spec, desired.snapshots, changes)
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    ids = {spec.get("media"), spec.get("from_image"), desired.spec.get("media"),
           desired.spec.get("from_image"), (spec.get("system_reset") or {}).get("from_image"),
           (desired.spec.get("boot_once") or {}).get("source")}
    images = {i: store.image_source(i) for i in ids if i}

    def want_of(guest: Any) -> tuple[GuestWant, list[ImageNeed]]:
        return guest_want(guest, place, max_cores=max_cores, images=images,
                          paths=lambda v: f"/{place.pool}/{v}", now=time.time(),
                          stop_grace_seconds=stop_grace_seconds)

    current, needs = want_of(desired)
    running = bool(desired.observed.get("running"))
    config = parse_domain_xml(render_domain_xml(current.config))
    live = dataclasses.replace(parse_domain_xml(render_domain_xml(current.running_spec)),
                               domain_id=1) if running else None
    volumes = {v.name: v.size for v in current.volumes}
    if "cloud-init" in desired.spec.get("modules", []):
        volumes[current.seed_volume] = 0
    observed = ObservedGuest(
        defined=bool(desired.observed.get("created")), state="running" if running
        else "stopped", state_reason="" if running else "shutdown", config=config, live=live,
        volumes=volumes, images=frozenset(n.volume for n in needs),
        snapshots=frozenset(s.name for s in desired.snapshots if not s.deleting),
        autostart=bool(desired.spec.get("auto_start")), network=(True, True, ""),
        caps=cell_caps(cell))
    by_name = {s.name: s for s in desired.snapshots}
    proposed = dataclasses.replace(
        desired, spec=spec, generation=desired.generation + 1,
        snapshots=tuple(dataclasses.replace(by_name[n], deleting=d) if n in by_name else
                        SnapshotDesired(n, "", desc, d, 1, "creating", "")
                        for n, desc, d in snaps))
    try:
        want, _ = want_of(proposed)
    except Permanent as exc:
        raise Invalid(exc.message) from None
    plan = plan_guest(want, observed)
    return {
        "fields": dry_run_fields(plan, known, changes),
        "actions": [{"do": str(a.do), "effect": str(a.effect), "field": a.field,
                     "reason": a.reason} for a in plan.actions],
        "holds": [{"reason": str(h.reason), "field": h.field, "effect": str(h.effect),
                   "message": h.message} for h in plan.holds],
    }
