"""The guest planner: what one reconcile must do to make a guest's domain, volumes, power
state, snapshots and password on its cell match the stored spec, as values.

`plan_guest(want, observed)` is pure (no libvirt, no store, no clock: the time is an
input). The guest reconciler (reconciler/guests.py) gathers `ObservedGuest` from the cell,
builds `GuestWant` from the store, executes the returned actions in order with its
drivers, observes again and plans again: what the second plan still holds becomes the
guest's conditions, so status is derived from the last observation, never from the calls
that were made. The same planner answers dry runs (`dry_run_fields`, behind
`POST /guests/{id}/plan`), which `nanod apply --diff/--check` use to classify guest
changes: the knowledge of how a change takes effect lives here only.

The vocabulary is closed: `Do` lists every action kind, `Effect` how it touches the running
guest (live, needs restart, replaces, destructive), `Hold` why something that differs is not
done now (each hold becomes a condition reason a user can act on).

Power semantics (the original's, kept): a start or stop request is applied once
(`spec.power_request` against `observed.power_request`). A guest that powers itself off
stays off and says so (`PoweredOffByGuest`); one that crashed stays off (`GuestCrashed`);
one stopped behind nano's back (virsh destroy, a host that lost it) while the last request
was "running" is drift, reported and started again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from reconciler.contract import Action, Effect, Key, Verb
from reconciler.guest_xml import Change, DomainSpec, ObservedDomainSpec, diff_domain


class Do(StrEnum):
    """Every kind of action the guest planner can ask for (a closed set)."""

    SEND_IMAGE = "send_image"          # an image version into the cell's pool (cache)
    CREATE_VOLUME = "create_volume"    # a disk volume, blank or backed by an image
    WRITE_SEED = "write_seed"          # the cloud-init seed ISO
    DEFINE = "define"                  # define or redefine the persistent domain
    SET_AUTOSTART = "set_autostart"
    RESET_SYSTEM = "reset_system"      # recreate the system disk from an image
    RESTORE_SNAPSHOT = "restore_snapshot"
    DELETE_SNAPSHOT = "delete_snapshot"
    CREATE_SNAPSHOT = "create_snapshot"
    SHRINK_DISK = "shrink_disk"        # compact a stopped guest's disk file
    GROW_VOLUME = "grow_volume"        # resize a stopped guest's volume
    GROW_DISK_LIVE = "grow_disk_live"  # block resize of a running guest's disk
    CHANGE_LIVE = "change_live"        # one live-capable change to the running domain
    START = "start"
    SHUTDOWN = "shutdown"
    DESTROY = "destroy"
    REBOOT = "reboot"
    RESET = "reset"
    SET_PASSWORD = "set_password"      # through the guest agent
    RECORD = "record"                  # a request found already satisfied: remember it
    UNDEFINE = "undefine"              # delete the domain and the guest's volumes


_EFFECT_ORDER = (Effect.LIVE, Effect.RESTART, Effect.REPLACE, Effect.DESTRUCTIVE)

_VERBS = {
    Do.SEND_IMAGE: Verb.CREATE, Do.CREATE_VOLUME: Verb.CREATE, Do.WRITE_SEED: Verb.CREATE,
    Do.DEFINE: Verb.UPDATE, Do.SET_AUTOSTART: Verb.UPDATE, Do.RESET_SYSTEM: Verb.REPLACE,
    Do.RESTORE_SNAPSHOT: Verb.UPDATE, Do.DELETE_SNAPSHOT: Verb.DELETE,
    Do.CREATE_SNAPSHOT: Verb.CREATE, Do.SHRINK_DISK: Verb.UPDATE, Do.GROW_VOLUME: Verb.UPDATE,
    Do.GROW_DISK_LIVE: Verb.UPDATE, Do.CHANGE_LIVE: Verb.UPDATE, Do.START: Verb.START,
    Do.SHUTDOWN: Verb.STOP, Do.DESTROY: Verb.STOP, Do.REBOOT: Verb.RESTART,
    Do.RESET: Verb.RESTART, Do.SET_PASSWORD: Verb.UPDATE, Do.RECORD: Verb.UPDATE,
    Do.UNDEFINE: Verb.DELETE,
}


@dataclass(frozen=True)
class GuestAction:
    """One step of a guest plan. `field` is the API field the step serves (cores, memory,
    disks, qos, media, power, snapshots, from_image, auto_start, ...); `args` what the
    executor needs (volume names, sizes, image ids, the domain change); `reason` is for
    people and never branched on."""

    do: Do
    effect: Effect
    field: str
    reason: str
    before: Any = None
    after: Any = None
    args: Mapping[str, Any] = field(default_factory=dict)

    def action(self, guest_id: str) -> Action:
        """As the loop's generic `Action` (for `nanod reconcile --once` and results)."""
        before = None if self.before is None else {self.field: self.before}
        after = None if self.after is None else {self.field: self.after}
        return Action(_VERBS[self.do], Key("guest", guest_id), before, after,
                      reason=f"{self.do}: {self.reason}" if self.reason else str(self.do),
                      live=self.effect is Effect.LIVE)

    def describe(self) -> str:
        return f"{self.do} ({self.effect}): {self.reason}" if self.reason else str(self.do)


class HoldReason(StrEnum):
    """Why something that differs from the spec is not done now: a condition reason."""

    CREATING = "Creating"                      # work in progress (not an obstacle)
    RESTART_REQUIRED = "RestartRequired"       # a change waits for the next restart
    WAITING_FOR_STOP = "WaitingForStop"        # stopped-only work while the guest runs
    STOPPING = "Stopping"                      # a shutdown was sent, the guest still runs
    NOT_STOPPED = "RunningAgainstRequest"      # runs although the last request stopped it
    POWERED_OFF_BY_GUEST = "PoweredOffByGuest"
    CRASHED = "GuestCrashed"
    PAUSED = "GuestPaused"
    PASSWORD_PENDING = "PasswordPending"       # the agent sets it once the guest runs
    NETWORK_NOT_READY = "NetworkNotReady"
    VOLUME_MISSING = "VolumeMissing"
    MISSING_CAPABILITY = "MissingCapability"


# Holds that stop a guest from being created or changed at all until its spec (or the
# cell) changes: a new guest with one of them fails at once instead of retrying.
BLOCKING = frozenset({HoldReason.MISSING_CAPABILITY, HoldReason.VOLUME_MISSING})


@dataclass(frozen=True)
class Hold:
    reason: HoldReason
    message: str
    field: str = ""
    effect: Effect = Effect.LIVE

    @property
    def blocking(self) -> bool:
        return self.reason in BLOCKING


@dataclass(frozen=True)
class GuestPlan:
    """What to do now (`actions`, in order), what differs and waits (`holds`), and what
    was changed on the cell behind nano's back (`drift`, descriptions for people)."""

    actions: tuple[GuestAction, ...] = ()
    holds: tuple[Hold, ...] = ()
    drift: tuple[str, ...] = ()

    @property
    def converged(self) -> bool:
        return not self.actions and not self.holds

    @property
    def blocked(self) -> Hold | None:
        return next((h for h in self.holds if h.blocking), None)


# -- inputs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellCaps:
    """What a cell can do that guests may need (from its facts; None = not known)."""

    volume_streams: bool = True     # libvirt volume upload/download (images, seeds)
    bandwidth: bool | None = None   # tc sfq, which libvirt needs for NIC bandwidth limits
    bandwidth_missing: str = ""     # why not, for the message
    cell: str = ""


@dataclass(frozen=True)
class VolumeWant:
    """One disk of the guest: its volume name, size, and the image volume backing the
    system disk at creation ("" = blank)."""

    index: int
    name: str
    size: int
    image: str = ""      # disk image id
    image_volume: str = ""


@dataclass(frozen=True)
class GuestWant:
    """Everything the planner compares against, built by the reconciler from the store.

    `config` is the persistent definition the guest should have; `running_spec` what the
    running domain should match (differs from `config` only while a one-time boot from
    media keeps that media inserted). `spec` and `observed` are the stored guest's spec and
    recorded bookkeeping (request counters); `images` maps each image volume the guest needs
    on its cell to the image id."""

    guest_id: str
    name: str
    spec: Mapping[str, Any]
    recorded: Mapping[str, Any]
    generation: int
    observed_generation: int
    config: DomainSpec
    running_spec: DomainSpec
    volumes: tuple[VolumeWant, ...]
    seed_volume: str
    seed_digest: str = ""       # digest of the seed the spec asks for ("" = not compared)
    media_volume: str = ""      # the media image volume when media is wanted
    network: str | None = None  # libvirt network its NIC needs
    snapshots: tuple[tuple[str, str, bool], ...] = ()  # (name, description, deleting)
    deleting: bool = False
    now: float = 0.0
    stop_grace_seconds: float = 60.0

    @property
    def converged_before(self) -> bool:
        """This spec generation was already converged once: differences now are drift."""
        return self.observed_generation >= self.generation and bool(self.recorded.get(
            "created"))


@dataclass(frozen=True)
class ObservedGuest:
    """What the cell has for one guest, read in one observation."""

    defined: bool
    state: str | None = None            # running | stopped | paused | crashed | ...
    state_reason: str = ""              # libvirt's reason: shutdown, destroyed, crashed, ...
    config: ObservedDomainSpec | None = None  # the persistent definition
    live: ObservedDomainSpec | None = None    # the running domain
    volumes: Mapping[str, int] = field(default_factory=dict)  # name -> capacity
    images: frozenset[str] = frozenset()  # image volumes present and verified on the cell
    snapshots: frozenset[str] = frozenset()
    autostart: bool = False
    network: tuple[bool, bool, str] | None = None  # (defined, active, error) of its network
    caps: CellCaps = field(default_factory=CellCaps)

    @property
    def running(self) -> bool:
        return self.state == "running"


# -- the planner -------------------------------------------------------------------------

# Domain change fields (guest_xml.diff_domain) -> the API field a user changes.
def api_field(change_field: str) -> str:
    head = change_field.split("[", 1)[0].split(".", 1)[0]
    if change_field.endswith(".iotune") or change_field.endswith(".bandwidth") or \
            head == "cpu_shares":
        return "qos"
    return {
        "vcpus": "cores", "max_vcpus": "cores", "memory_bytes": "memory",
        "max_memory_bytes": "memory", "media": "media", "media_drive": "media",
        "seed": "modules", "seed_drive": "modules", "monitor_secret": "monitor_secret",
        "title": "name", "generation": "name", "boot_order": "power", "disks": "disks",
        "interfaces": "network", "virt_type": "cell", "os_type": "system",
    }.get(head, "template")


_METADATA = ("generation", "title")  # our bookkeeping in the domain, not the guest's


def _pending(spec_value: Any, recorded_value: Any) -> bool:
    return int(spec_value or 0) > int(recorded_value or 0)


def _describe(changes: list[Change]) -> str:
    return ", ".join(f"{c.field} {c.before!r} -> {c.after!r}" for c in changes
                     if c.field not in ("monitor_secret",)) or "monitor secret"


def plan_guest(want: GuestWant, observed: ObservedGuest) -> GuestPlan:
    """The actions that make the cell match `want`, in execution order, what differs but
    waits (holds) and what drifted. Pure; see the module docstring for the semantics."""
    if want.deleting:
        if observed.defined or observed.volumes:
            return GuestPlan((GuestAction(Do.UNDEFINE, Effect.DESTRUCTIVE, "guest",
                                          "the guest is being deleted"),))
        return GuestPlan()
    plan = _Planner(want, observed)
    plan.capabilities()
    if plan.blocked():
        return plan.result()
    if not observed.defined:
        plan.create()
    else:
        plan.stopped_work()
        plan.volumes()
        plan.seed_and_media()
        plan.definition()
        plan.live_changes()
    plan.power()
    plan.password()
    return plan.result()


class _Planner:
    """One planning pass (a namespace for the steps of `plan_guest`)."""

    def __init__(self, want: GuestWant, observed: ObservedGuest) -> None:
        self.w, self.o = want, observed
        self.spec, self.rec = want.spec, want.recorded
        self.actions: list[GuestAction] = []
        self.holds: list[Hold] = []
        self.drift: list[str] = []
        self.defining = False

    def add(self, do: Do, effect: Effect, field: str, reason: str, before: Any = None,
            after: Any = None, **args: Any) -> None:
        self.actions.append(GuestAction(do, effect, field, reason, before, after, args))

    def hold(self, reason: HoldReason, message: str, field: str = "",
             effect: Effect = Effect.LIVE) -> None:
        self.holds.append(Hold(reason, message, field, effect))

    def blocked(self) -> bool:
        return any(h.blocking for h in self.holds)

    def result(self) -> GuestPlan:
        if self.blocked():  # nothing is changed while something blocks the guest
            return GuestPlan((), tuple(self.holds), tuple(self.drift))
        return GuestPlan(tuple(self.actions), tuple(self.holds), tuple(self.drift))

    # -- what the cell cannot do ------------------------------------------------------

    def capabilities(self) -> None:
        caps = self.o.caps
        if not caps.volume_streams:
            needs = []
            image = self.w.volumes[0].image if self.w.volumes else ""
            if image and (not self.o.defined or self._reset_pending()):
                needs.append(f"a system disk from disk image {image}")
            if "cloud-init" in self.spec.get("modules", []):
                needs.append("a cloud-init seed")
            if self.w.media_volume and self.w.media_volume not in self.o.images:
                needs.append("media")
            if needs:
                self.hold(HoldReason.MISSING_CAPABILITY,
                          f"cell {caps.cell} cannot receive volume data (its libvirt driver "
                          f"has no volume streams), and this guest needs {' and '.join(needs)}"
                          ": use a cell with qemu:///system or qemu+ssh://, or create the "
                          "guest without them", "cell")
        limits = [nic for nic in self.w.config.interfaces if nic.inbound_kib or nic.outbound_kib]
        if limits and caps.bandwidth is False:
            self.hold(HoldReason.MISSING_CAPABILITY,
                      f"cell {caps.cell} cannot limit network speed: {caps.bandwidth_missing}."
                      " Set receive_speed and send_speed to 0 (PUT /guests/{id}/qos/network) "
                      "or use a cell whose kernel has the sfq qdisc (CONFIG_NET_SCH_SFQ)",
                      "qos")

    # -- a guest without a domain -----------------------------------------------------

    def create(self) -> None:
        created_before = bool(self.rec.get("created"))
        if created_before:
            self.drift.append("the domain vanished from the cell (undefined outside nano)")
        missing = [v for v in self.w.volumes if v.name not in self.o.volumes]
        if created_before and missing:
            self.hold(HoldReason.VOLUME_MISSING,
                      f"the domain and disk(s) {', '.join(v.name for v in missing)} vanished "
                      "from the cell: their data is gone. Delete the guest, or reset its "
                      "system (PUT /guests/{id}/system) once the disks are back", "disks")
            return
        for vol in missing:
            if vol.image_volume and vol.image_volume not in self.o.images:
                self.add(Do.SEND_IMAGE, Effect.LIVE, "from_image",
                         f"disk image {vol.image} to the cell", image=vol.image,
                         kind="disk", volume=vol.image_volume)
            self.add(Do.CREATE_VOLUME, Effect.LIVE, "disks",
                     f"disk {vol.index} ({vol.size} bytes"
                     + (f", from image {vol.image})" if vol.image else ")"),
                     None, vol.size, index=vol.index, volume=vol.name, size=vol.size,
                     backing=vol.image_volume)
        if "cloud-init" in self.spec.get("modules", []) and \
                self.w.seed_volume not in self.o.volumes:
            self.add(Do.WRITE_SEED, Effect.LIVE, "modules", "cloud-init seed ISO",
                     volume=self.w.seed_volume)
        elif self.w.seed_digest and self.w.seed_volume in self.o.volumes and \
                self.rec.get("seed_digest") != self.w.seed_digest and \
                not self._reset_pending():
            self.add(Do.WRITE_SEED, Effect.LIVE, "modules",
                     "cloud-init seed ISO out of date (name, admin, disks or addresses "
                     "changed since it was written)", volume=self.w.seed_volume)
        self._media_image()
        self.add(Do.DEFINE, Effect.LIVE, "domain",
                 "define the domain again" if created_before else "define the domain",
                 None, self.w.config.name, spec=self.w.config, first=not created_before)
        self.defining = True
        if self.spec.get("auto_start"):
            self.add(Do.SET_AUTOSTART, Effect.LIVE, "auto_start", "autostart on", False, True,
                     enable=True)

    # -- stopped-only work ------------------------------------------------------------

    def _reset_pending(self) -> bool:
        reset = self.spec.get("system_reset") or {}
        return bool(reset) and _pending(reset.get("generation", 0),
                                        self.rec.get("system_reset_generation"))

    def stopped_work(self) -> None:
        spec, rec = self.spec, self.rec
        work: list[tuple[Do, Effect, str, str, dict[str, Any]]] = []
        if self._reset_pending():
            reset = spec["system_reset"]
            system = self.w.volumes[0]
            if system.image_volume and system.image_volume not in self.o.images:
                work.append((Do.SEND_IMAGE, Effect.LIVE, "from_image",
                             f"disk image {reset['from_image']} to the cell",
                             {"image": reset["from_image"], "kind": "disk",
                              "volume": system.image_volume}))
            work.append((Do.RESET_SYSTEM, Effect.DESTRUCTIVE, "from_image",
                         f"recreate the system disk from image {reset['from_image']}",
                         {"image": reset["from_image"], "volume": system.name,
                          "size": system.size, "backing": system.image_volume,
                          "generation": reset["generation"],
                          "seed": "cloud-init" in spec.get("modules", [])}))
        restore = spec.get("restore") or {}
        if restore and _pending(restore.get("generation", 0), rec.get("restore_generation")):
            work.append((Do.RESTORE_SNAPSHOT, Effect.DESTRUCTIVE, "snapshots",
                         f"revert to snapshot {restore['target']}",
                         {"snapshot": restore["target"], "generation": restore["generation"]}))
        # deletions first: they free room the new snapshots may need
        for name, description, deleting in sorted(self.w.snapshots, key=lambda s: not s[2]):
            if deleting:
                work.append((Do.DELETE_SNAPSHOT, Effect.DESTRUCTIVE, "snapshots",
                             f"delete snapshot {name}",
                             {"snapshot": name, "present": name in self.o.snapshots}))
            elif name not in self.o.snapshots:
                work.append((Do.CREATE_SNAPSHOT, Effect.LIVE, "snapshots",
                             f"take snapshot {name}", {"snapshot": name,
                                                      "description": description}))
        done = rec.get("disk_shrink") or {}
        for index, generation in sorted((spec.get("disk_shrink") or {}).items()):
            if _pending(generation, done.get(index)):
                work.append((Do.SHRINK_DISK, Effect.LIVE, "disks", f"compact disk {index}",
                             {"index": int(index), "generation": generation}))
        if not work:
            return
        if self.o.running:
            for fld in dict.fromkeys(w[2] for w in work):
                mine = [w for w in work if w[2] == fld]
                self.hold(HoldReason.WAITING_FOR_STOP,
                          "done once the guest is stopped: " + "; ".join(w[3] for w in mine),
                          fld, max((w[1] for w in mine), key=_EFFECT_ORDER.index))
            return
        for do, effect, fld, reason, args in work:
            self.add(do, effect, fld, reason, **args)

    # -- volumes, seed, media ---------------------------------------------------------

    def volumes(self) -> None:
        immediate = (self.spec.get("immediate") or {}).get("disks", {})
        reset = self._reset_pending() and not self.o.running
        for vol in self.w.volumes:
            have = self.o.volumes.get(vol.name)
            if have is None:
                if vol.index == 0 and reset:
                    continue  # the reset creates it
                self.hold(HoldReason.VOLUME_MISSING,
                          f"disk {vol.index} (volume {vol.name}) is missing on the cell: its "
                          "data is gone or its storage is not mounted. Bring the storage "
                          "back, reset the system (disk 0), or delete the guest", "disks")
                continue
            if have >= vol.size:
                continue
            if not self.o.running:
                self.add(Do.GROW_VOLUME, Effect.LIVE, "disks", f"grow disk {vol.index}",
                         have, vol.size, index=vol.index, volume=vol.name, size=vol.size)
            elif immediate.get(str(vol.index)):
                self.add(Do.GROW_DISK_LIVE, Effect.LIVE, "disks",
                         f"grow disk {vol.index} of the running guest", have, vol.size,
                         index=vol.index, volume=vol.name, size=vol.size)
            else:
                self.hold(HoldReason.RESTART_REQUIRED,
                          f"disk {vol.index} grows from {have} to {vol.size} bytes once the "
                          "guest is stopped", "disks", Effect.RESTART)

    def seed_and_media(self) -> None:
        if "cloud-init" in self.spec.get("modules", []) and \
                self.w.seed_volume not in self.o.volumes and not self._reset_pending():
            if self.w.converged_before:
                self.drift.append(f"the cloud-init seed {self.w.seed_volume} vanished")
            self.add(Do.WRITE_SEED, Effect.LIVE, "modules", "cloud-init seed ISO",
                     volume=self.w.seed_volume)
        elif self.w.seed_digest and self.w.seed_volume in self.o.volumes and \
                self.rec.get("seed_digest") != self.w.seed_digest and \
                not self._reset_pending():
            self.add(Do.WRITE_SEED, Effect.LIVE, "modules",
                     "cloud-init seed ISO out of date (name, admin, disks or addresses "
                     "changed since it was written)", volume=self.w.seed_volume)
        self._media_image()

    def _media_image(self) -> None:
        if self.w.media_volume and self.w.media_volume not in self.o.images:
            media = self.spec.get("media") or (self.spec.get("boot_once") or {}).get("source")
            self.add(Do.SEND_IMAGE, Effect.LIVE, "media", f"media image {media} to the cell",
                     image=media, kind="media", volume=self.w.media_volume)

    # -- the persistent definition and the running domain ----------------------------

    def definition(self) -> None:
        assert self.o.config is not None
        # the generation in our metadata alone is no reason to redefine: it is rewritten
        # with the next real change
        changes = [c for c in diff_domain(self.w.config, self.o.config)
                   if c.field != "generation"]
        if changes:
            shown = [c for c in changes if c.field not in _METADATA]
            if self.w.converged_before and shown:
                self.drift.append("definition changed on the cell: " + _describe(shown))
            fields = tuple(sorted({api_field(c.field) for c in changes}))
            self.add(Do.DEFINE, Effect.LIVE, fields[0] if len(fields) == 1 else "definition",
                     "update the persistent definition: " + _describe(changes),
                     {c.field: c.before for c in changes}, {c.field: c.after for c in changes},
                     spec=self.w.config, first=False, fields=fields)
        if bool(self.o.autostart) != bool(self.spec.get("auto_start")):
            if self.w.converged_before:
                self.drift.append("autostart was switched on the cell")
            enable = bool(self.spec.get("auto_start"))
            self.add(Do.SET_AUTOSTART, Effect.LIVE, "auto_start",
                     f"autostart {'on' if enable else 'off'}", not enable, enable, enable=enable)

    def live_changes(self) -> None:
        if not self.o.running or self.o.live is None:
            return
        immediate = self.spec.get("immediate") or {}
        restart: list[Change] = []
        for change in diff_domain(self.w.running_spec, self.o.live):
            if change.field in _METADATA:
                continue
            gate = {"vcpus": "cores", "memory_bytes": "memory"}.get(change.field)
            if change.live and (gate is None or immediate.get(gate)):
                if self.w.converged_before:
                    self.drift.append(f"running domain changed: {_describe([change])}")
                self.add(Do.CHANGE_LIVE, Effect.LIVE, api_field(change.field),
                         f"{change.field} of the running guest", change.before, change.after,
                         change=change, spec=self.w.running_spec)
            else:
                restart.append(change)
        for fld in sorted({api_field(c.field) for c in restart}):
            names = [c for c in restart if api_field(c.field) == fld]
            self.hold(HoldReason.RESTART_REQUIRED,
                      "takes effect at the next restart: " + _describe(names), fld,
                      Effect.RESTART)

    # -- power ------------------------------------------------------------------------

    def power(self) -> None:
        spec, rec, o = self.spec, self.rec, self.o
        state = o.state if o.defined else None
        running = o.running
        request = int(spec.get("power_request", 0) or 0)
        wanted = spec.get("power", "stopped")
        if _pending(request, rec.get("power_request")):
            if wanted == "running" and not running:
                self._start(f"start request {request}")
                return
            if wanted == "stopped" and running:
                mode = spec.get("stop_mode", "shutdown")
                self.add(Do.DESTROY if mode == "destroy" else Do.SHUTDOWN, Effect.LIVE,
                         "power", f"stop request {request} ({mode})", "running", "stopped",
                         request=request)
                return
            self.add(Do.RECORD, Effect.LIVE, "power",
                     f"power request {request} already satisfied (guest {state or 'new'})",
                     request=request)
        elif wanted == "running" and not running and self.defined_or_defining():
            reason = o.state_reason if o.defined else ""
            if state in ("paused", "suspended"):
                self.hold(HoldReason.PAUSED, f"the guest is {state} on the cell (outside "
                          "nano): resume it (virsh resume) or stop it", "power")
            elif state == "shutting-down":
                self.hold(HoldReason.STOPPING, "the guest is shutting itself down", "power")
            elif state == "crashed" or reason == "crashed":
                self.hold(HoldReason.CRASHED, "the guest crashed and stays off: start it "
                          "again with POST /instances/{id}", "power")
            elif reason in ("shutdown", "from_snapshot"):
                self.hold(HoldReason.POWERED_OFF_BY_GUEST,
                          "the guest powered itself off and stays off (Nano semantics): "
                          "start it with POST /instances/{id}"
                          if reason == "shutdown" else "the guest is off (it powered itself "
                          "off, then a snapshot was restored): start it with "
                          "POST /instances/{id}", "power")
            else:
                why = f"stopped outside nano ({reason or 'no reason given'})" if o.defined \
                    else "lost with its domain"
                self.drift.append(f"the guest should run but was {why}")
                self._start(f"the guest should run but was {why}")
        elif wanted == "stopped" and running:
            sent = float(rec.get("stop_sent_at") or 0)
            waited = self.w.now - sent
            if spec.get("stop_escalate") and spec.get("stop_mode") == "shutdown" and \
                    waited > self.w.stop_grace_seconds:
                self.add(Do.DESTROY, Effect.LIVE, "power",
                         f"shutdown ignored for {int(waited)} s: power off", "running",
                         "stopped", request=request, escalated=True)
            elif sent and spec.get("stop_mode") == "shutdown" and \
                    waited <= max(self.w.stop_grace_seconds, 1.0) * 5:
                self.hold(HoldReason.STOPPING, f"shutdown sent {int(max(waited, 0))} s ago; "
                          "waiting for the guest to power off"
                          + (" (powered off after the grace period)"
                             if spec.get("stop_escalate") else
                             " (force it with DELETE /instances/{id} {\"force\": true})"),
                          "power")
            else:
                self.hold(HoldReason.NOT_STOPPED,
                          "the guest runs although the last request stopped it (a shutdown "
                          "it ignored, an autostart or a start outside nano): stop it "
                          "again, or start it through the API", "power")
        restart = spec.get("restart") or {}
        if _pending(restart.get("counter", 0), rec.get("restart_counter")):
            counter = restart.get("counter", 0)
            if running:
                mode = restart.get("mode", "reboot")
                self.add(Do.RESET if mode == "reset" else Do.REBOOT, Effect.LIVE, "power",
                         f"{mode} request {counter}", counter=counter)
            else:
                self.add(Do.RECORD, Effect.LIVE, "power",
                         f"restart request {counter}: the guest is not running",
                         restart_counter=counter)

    def defined_or_defining(self) -> bool:
        return self.o.defined or self.defining

    def _start(self, reason: str) -> None:
        if self.w.network:
            defined, active, error = self.o.network or (False, False, "")
            if not active and (error or not defined):
                self.hold(HoldReason.NETWORK_NOT_READY,
                          f"waiting for network {self.w.network} to start the guest: "
                          + (error or "it is not defined on the cell yet"), "power")
                return
        once = self.spec.get("boot_once") or {}
        use_once = bool(once) and str(once.get("request")) != str(
            self.rec.get("boot_once_request"))
        self.add(Do.START, Effect.LIVE, "power", reason, "stopped", "running",
                 request=int(self.spec.get("power_request", 0) or 0),
                 boot_once=dict(once) if use_once else None)

    # -- the guest agent --------------------------------------------------------------

    def password(self) -> None:
        admin = self.spec.get("admin") or {}
        if not _pending(admin.get("generation", 0), self.rec.get("admin_generation")):
            return
        will_run = self.o.running or any(a.do is Do.START for a in self.actions)
        if self.o.running:
            self.add(Do.SET_PASSWORD, Effect.LIVE, "admin",
                     f"set the password of {admin.get('user') or 'root'} (guest agent)",
                     generation=admin.get("generation", 0), user=admin.get("user") or "root")
        elif not will_run:
            self.hold(HoldReason.PASSWORD_PENDING,
                      "the new password is set by the guest agent once the guest runs",
                      "admin")


# -- reading a plan: effects per API field, conditions -----------------------------------


def field_effects(plan: GuestPlan) -> dict[str, tuple[Effect, str]]:
    """The strongest effect per API field of a plan, with the reasons: what `nanod apply
    --diff` shows for each changed field."""
    out: dict[str, tuple[Effect, str]] = {}
    items = [(fld, a.effect, a.reason) for a in plan.actions
             for fld in (a.args.get("fields") or (a.field,))] + \
            [(h.field, h.effect, h.message) for h in plan.holds if h.field]
    for fld, effect, reason in items:
        have = out.get(fld)
        if have is None or _EFFECT_ORDER.index(effect) > _EFFECT_ORDER.index(have[0]):
            out[fld] = (effect, reason)
    return out


def ready_reason(plan: GuestPlan) -> tuple[bool, str, str]:
    """The Ready condition (status, reason, message) that a plan made from the final
    observation implies: true only when nothing is left to do and nothing waits."""
    if plan.converged:
        return True, "Converged", "the domain matches the spec"
    if plan.holds:
        first = plan.blocked or plan.holds[0]
        rest = [h.message for h in plan.holds if h is not first]
        return False, str(first.reason), "; ".join([first.message, *rest])
    return False, "Converging", "still to do: " + "; ".join(a.describe() for a in plan.actions)


# -- dry runs: how a proposed change of a guest would take effect ------------------------

FIXED_AT_CREATION = ("owner", "group", "system", "template", "modules", "cloud_init",
                     "security_policy_group", "network_address", "ethernet_address", "ports",
                     "pool")
"""Guest fields no API route changes: a different value means a new guest (replaced)."""

CHANGEABLE = ("name", "cores", "memory", "disks", "auto_start", "qos", "from_image", "media",
              "power", "snapshots")
"""Fields a dry run applies to the stored spec the way the API's routes would."""


def propose(spec: Mapping[str, Any], snapshots: tuple[Any, ...], changes: Mapping[str, Any],
            ) -> tuple[dict[str, Any], list[tuple[str, str, bool]], dict[str, tuple[Effect,
                                                                                   str]]]:
    """The spec and snapshot list the API would store for `changes` (API field -> new
    value; image ids, not names), and the fields whose effect is known without planning
    (fixed at creation, or refused). Pure; raises ValueError naming a field it cannot
    take."""
    new = {k: (dict(v) if isinstance(v, dict) else v) for k, v in spec.items()}
    snaps = [(s.name, s.description, s.deleting) for s in snapshots]
    known: dict[str, tuple[Effect, str]] = {}
    for fld, value in changes.items():
        if fld in FIXED_AT_CREATION:
            known[fld] = (Effect.REPLACE, "fixed at creation: the guest is deleted and "
                                          "created again")
        elif fld not in CHANGEABLE:
            raise ValueError(f"{fld}: not a guest field a plan can change; fields: "
                             f"{', '.join(CHANGEABLE + FIXED_AT_CREATION)}")
        elif fld == "cores":
            new["cores"] = int(value)
            new["immediate"] = {**new["immediate"], "cores": False}
        elif fld == "memory":
            new["memory"] = int(value)
            new["immediate"] = {**new["immediate"], "memory": False}
        elif fld == "disks":
            old, want = list(spec["disks"]), [int(v) for v in value]
            if len(old) != len(want):
                known[fld] = (Effect.REPLACE, "the number of disks is fixed at creation")
            elif any(n < o for o, n in zip(old, want, strict=True)):
                known[fld] = (Effect.DESTRUCTIVE, "disk shrink: disks only grow (the API "
                                                  "compacts disk files, it cannot shrink them)")
            else:
                new["disks"] = want
                new["immediate"] = {**new["immediate"], "disks": {}}
        elif fld == "auto_start":
            new["auto_start"] = bool(value)
        elif fld == "qos":
            new["qos"] = {**spec["qos"], **dict(value)}
        elif fld == "from_image":
            if value and value != spec.get("from_image"):
                generation = int((spec.get("system_reset") or {}).get("generation", 0)) + 1
                new["system_reset"] = {"from_image": value, "generation": generation}
                new["from_image"] = value
        elif fld == "media":
            new["media"] = value or ""
        elif fld == "power":
            new["power"] = value
            new["power_request"] = int(spec.get("power_request", 0) or 0) + 1
            new["stop_mode"], new["stop_escalate"] = "shutdown", True
        elif fld == "snapshots":
            wanted = list(value or [])
            snaps = [(n, d, deleting or n not in wanted) for n, d, deleting in snaps]
            snaps += [(n, "", False) for n in wanted if n not in {s[0] for s in snaps}]
        elif fld == "name":
            known[fld] = (Effect.LIVE, "renamed in nano; libvirt names do not change")
    return new, snaps, known


def dry_run_fields(plan: GuestPlan, known: Mapping[str, tuple[Effect, str]],
                   changes: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """{field: {effect, reason}} for every changed field: from the plan of the proposed
    spec against the current one (the reconciler's own knowledge), or known up front."""
    effects = field_effects(plan)
    out: dict[str, dict[str, str]] = {}
    for fld in changes:
        effect, reason = known.get(fld) or effects.get(fld) or (Effect.LIVE, "no change needed")
        out[fld] = {"effect": str(effect), "reason": reason}
    return out
