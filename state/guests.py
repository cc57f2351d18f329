"""Guests in the store: the desired state the API writes and the guest reconciler makes
libvirt match, the status the reconciler records, and every read the API answers from them.

Called by the guest routes (`api/guests.py`), the batch store (`state/batches.py`), the
snapshot store (`state/snapshots.py`), `api/compute.py` (instance status) and, on the other
side of the contract, by the guest reconciler (`reconciler/guests.py`). The verbs on
existing guests (start, stop, resize, ...) live in `state/guest_changes.py`.

The contract with the guest reconciler
======================================

Who writes what: the API writes the spec columns (`name`, `pool`, `cell`, `owner`, `group`,
`batch`, `spec`, `generation`, `deleting`, the guest's `GuestInterface` and `Snapshot` rows);
the reconciler writes only status, through `record_guest_observed` and
`record_snapshot_observed` (`phase`, `progress`, `observed`, `observed_generation`,
`last_error`, `conditions`), and removes rows only through `finish_guest_delete` and
`finish_snapshot_delete`. It reads a guest as a `GuestDesired` value (`guest_desired`).

Store functions the reconciler calls (all safe from worker threads, each one transaction):
  guest_ids(*, cell=None) -> list[str]                    what a resync enqueues
  guest_desired(guest_id) -> GuestDesired | None          None once the row is gone
  guest_conditions(guest_id) -> list[dict]
  record_guest_observed(guest_id, *, generation=None, phase=None, progress=None,
                        observed=None, last_error=None, conditions=None) -> bool
  finish_guest_delete(guest_id) -> bool                   only for a deleting guest
  record_snapshot_observed(guest_id, name, *, phase=None, last_error=None, observed=None,
                           generation=None) -> bool       (state/snapshots.py)
  finish_snapshot_delete(guest_id, name) -> bool          only for a deleting snapshot

Guest row (spec side)
  id          uuid4 string; libvirt names derive from it, never from `name`
  name        unique within the pool, [A-Za-z0-9_-]{1,64}; renaming changes no libvirt name
  pool, cell  compute pool, and the cell chosen at create (state/placement.py); fixed
  owner, group, batch (id of the batch task that created it, or "")
  generation  bumped by every spec change; `deleting` true once DELETE was accepted

Guest.spec (JSON), every key always present:
  cores, memory (bytes), disks [bytes; 0 = system disk, 1.. data disks]
  auto_start        libvirt autostart flag (it never changes `power`)
  system            "linux" | "windows" (the template's unless given)
  template          template id, "" = built-in default
  template_spec     a COPY made at create time of the template's admin, operating_system,
                    disk, network, display, control, usb, tablet
  modules           subset of ["qemu", "cloud-init"]
  cloud_init        {root_enabled, admin_name, admin_secret, data_path} when "cloud-init" is
                    in modules, else {}; admin_secret is kept equal to admin.password, so a
                    seed rebuilt after a system reset carries the current password (both
                    sealed: see below)
  qos               {cpu_priority high|medium|low, write_speed, write_iops, read_speed,
                    read_iops, receive_speed, send_speed} (bytes/s and IOPS, 0 = unlimited)
  ethernet_address  MAC of the first (internal) NIC
  network_address   the address the client asked for ("" = any)
  ports             guest ports to forward; each gets a free port of the cell in the create
                    transaction (state/networks.py: guest_ports(id) lists them)
  from_image        disk image the system disk was cloned from ("" = blank disk)
  security_policy_group  the policy group whose rules were copied into the guest's
                    GuestPolicy at create ("" = none; state/policies.py)
  monitor_secret    VNC/SPICE password (8 characters); PUT .../monitor/secret replaces it
  instance_id       cloud-init instance id; a new one on each system reset
  power             "running" | "stopped": the last start/stop request
  power_request     counter bumped by every start/stop request (and a forced delete).
                    Apply `power` only when observed.power_request < power_request, then
                    record it: a guest that powers itself off stays off
  stop_mode         "shutdown" (ACPI) | "destroy": how the last stop asked to stop
  restart           {counter, mode "reboot"|"reset"}: each reboot request bumps counter;
                    record observed.restart_counter when done
  boot_once         None, {request, source: media image id} (start from media) or
                    {request, network: true} (PXE); record observed.boot_once_request = the
                    request id once used, so it is used once
  media             media image id that should be in the cdrom ("" = none)
  admin             {user, password, generation}: generation 0 is the initial password (given
                    to cloud-init, or set with the guest agent at first boot when only
                    "qemu" is in modules; "" when neither: unknown); each PUT /auth bumps
                    it: set it with the guest agent, record observed.admin_generation.
                    The password is stored sealed (state/secrets.py), never in clear: the
                    reconciler reads it opened, as GuestDesired.admin_password
  system_reset      None or {from_image, generation}: recreate the system disk from the
                    image; record observed.system_reset_generation
  restore           None or {target, generation}: revert to snapshot `target`; record
                    observed.restore_generation
  current_snapshot  the snapshot that should be current after the last snapshot request
  disk_shrink       {"<disk index>": generation}: compact that disk (qemu-img convert);
                    record observed.disk_shrink = {"<index>": generation done}
  immediate         {"cores": bool, "memory": bool, "disks": {"<index>": bool}}: the last
                    change of that value asked to apply it live when running

Deletion: DELETE marks `deleting` (and with force also power "stopped", stop_mode
"destroy"); the reconciler destroys the domain, removes volumes and seed ISO, then calls
`finish_guest_delete(id)`, which releases addresses and port forwards and removes the rows.

GuestInterface rows: one per NIC, {type internal|external, mac (unique), address}; the
internal one always (its MAC is spec.ethernet_address; address "" without an address pool),
an external one when the pool's address pool gives external addresses. Addresses come from
state/networks.py (`allocate_guest_addresses`) in the create transaction.

Status (written by the reconciler):
  phase     "creating" (set by the API at create), then "stopped" | "running" | "lost" |
            "migrating" | "failed" | "deleting"
  progress  0-100 while creating
  last_error  why the last reconcile failed; a failed creation keeps phase "failed", its
            record and the reason until the guest is deleted
  observed  merged key by key by record_guest_observed: created (bool: domain and volumes
            exist), create_time, running, host, display_protocol, cpu_usage (percent),
            memory_available, disk_available, bytes_read, bytes_written, bytes_received,
            bytes_sent, media_attached, media_source, internal/external {network_address,
            display_address, allocated_address}, current_snapshot, and the request
            counters named above; the reconciler may keep its own bookkeeping keys here
Placement (state/placement.py) counts every guest row on a cell, whatever its phase, by its
spec's cores, memory and disks against the cell's capacity times its overcommit ratios: a
guest promises the same while "creating" as once it exists, and releases its room only when
`finish_guest_delete` removes its row. Resizes (state/guest_changes.py) grow a guest's
promise only within what its cell has left.

Replies: GET /guests/{id} and GET /instances/{id} answer HTTP 201 {name, created: false,
progress} until observed.created, plus `error` (last_error) once phase is "failed": the
portal keeps polling and shows no error, API clients see why; then 200 with the guest.

Visibility (COMPATIBILITY.md): a caller sees a guest it owns, or one of its own group when
its group's `instance_visible` flag is on; every function taking a `SessionInfo` answers
"no guest" for guests the caller may not see.
"""

from __future__ import annotations

import copy
import secrets
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import peewee

from state.compute import GUEST_STATES
from state.db import db
from state.errors import Conflict, Invalid, NotFound
from state.identity import SessionInfo, format_time
from state.models import Cell, ComputePool, Guest, GuestInterface, Image, Snapshot, User, now
from state.placement import (
    Amounts,
    CellRoom,
    Overcommit,
    check_cell,
    choose_cell,
    guest_need,
)
from state.policies import locked
from state.quotas import guest_usage
from state.secrets import SecretBox, secret_box

MAC_PREFIX = "00:16:3e"
MODULES = ("qemu", "cloud-init")
QOS_DEFAULTS: dict[str, Any] = {
    "cpu_priority": "medium", "write_speed": 0, "write_iops": 0, "read_speed": 0,
    "read_iops": 0, "receive_speed": 0, "send_speed": 0,
}
CREATING = "creating"
DEFAULT_DATA_PATH = "/opt/data"
GIB = 1 << 30
_ALNUM = string.ascii_letters + string.digits


class _Raced(Exception):
    """Another writer changed the guest between our read and our write."""


def generate_secret(length: int = 8) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(length))


def generate_password() -> str:
    """12 letters and digits with at least one upper, one lower and one digit (what
    Windows' default complexity rule accepts)."""
    while True:
        pw = generate_secret(12)
        if any(c.isupper() for c in pw) and any(c.islower() for c in pw) and any(
                c.isdigit() for c in pw):
            return pw


def generate_mac() -> str:
    return MAC_PREFIX + "".join(f":{secrets.randbelow(256):02x}" for _ in range(3))


def check_mac(mac: str) -> str | None:
    """Why `mac` (already shaped like aa:bb:cc:dd:ee:ff) cannot be a NIC's address."""
    first = int(mac[:2], 16)
    if first & 1:
        return f"ethernet_address: {mac} is a multicast address (odd first octet)"
    if mac == "00:00:00:00:00:00":
        return "ethernet_address: 00:00:00:00:00:00 is not a usable address"
    return None


def visible(session: SessionInfo) -> peewee.Expression:
    """The guests `session` may see and change."""
    cond = Guest.owner == session.user
    if session.group and session.visibility.get("instance_visible"):
        cond = cond | (Guest.group == session.group)
    return cond


@dataclass(frozen=True)
class SnapshotDesired:
    name: str
    parent: str
    description: str
    deleting: bool
    generation: int
    phase: str
    create_time: str


@dataclass(frozen=True)
class GuestDesired:
    """One guest as the reconciler reads it (a copy: changing it changes nothing)."""

    id: str
    name: str
    pool: str
    cell: str
    owner: str
    group: str
    batch: str
    generation: int
    deleting: bool
    spec: dict[str, Any]
    storage_pool: str  # the compute pool's storage pool, "" = the cell's local storage
    address_pool: str  # the compute pool's address pool, "" = the cell's default network
    interfaces: tuple[dict[str, str], ...]  # {type internal|external, mac, address}
    snapshots: tuple[SnapshotDesired, ...]
    phase: str
    observed_generation: int
    observed: dict[str, Any] = field(default_factory=dict)
    # the admin password opened (spec holds it sealed): for the seed ISO's hash and the
    # guest agent only; "" when unknown. Never printed with the rest.
    admin_password: str = field(default="", repr=False)


def _promise_columns() -> tuple[peewee.Node, peewee.Node, peewee.Node]:
    """SQL for what one guest row is promised: the cores, memory and sum of disks of its
    spec, as `guest_need` (state/placement.py) counts them. In SQL so that placement sums a
    pool of thousands of guests in the database instead of loading every spec (ten times
    faster on 5000 guests); tests/state/test_placement_store.py checks both agree."""
    if isinstance(db.obj, peewee.SqliteDatabase):
        return (peewee.SQL("COALESCE(json_extract(spec, '$.cores'), 0)"),
                peewee.SQL("COALESCE(json_extract(spec, '$.memory'), 0)"),
                peewee.SQL("(SELECT COALESCE(SUM(value), 0) FROM json_each(spec, '$.disks'))"))
    return (peewee.SQL("COALESCE((spec::json->>'cores')::bigint, 0)"),
            peewee.SQL("COALESCE((spec::json->>'memory')::bigint, 0)"),
            peewee.SQL("(SELECT COALESCE(SUM(d::bigint), 0) "
                       "FROM json_array_elements_text(spec::json->'disks') AS d)"))


def _guest_sums(where: peewee.Expression) -> tuple[int, int, int, int]:
    """(count, cores, memory, disk bytes) of the guest rows matching `where`, summed in
    SQL as `_promise_columns` counts them: what quotas count per group (state/quotas.py)."""
    cores, memory, disks = _promise_columns()
    row = (Guest.select(peewee.fn.COUNT(Guest.id), peewee.fn.SUM(cores), peewee.fn.SUM(memory),
                        peewee.fn.SUM(disks)).where(where).tuples().first())
    return tuple(int(v or 0) for v in row or (0, 0, 0, 0))  # type: ignore[return-value]


def _promised(cells: list[str]) -> dict[str, Amounts]:
    """What the guests placed on each of `cells` are promised together: every guest row,
    whatever its phase (a deleting guest until its row is gone)."""
    cores, memory, disks = _promise_columns()
    out: dict[str, Amounts] = {}
    for start in range(0, len(cells), 500):  # stay under SQLite's variable limit
        query = (Guest.select(Guest.cell, peewee.fn.SUM(cores), peewee.fn.SUM(memory),
                              peewee.fn.SUM(disks))
                 .where(Guest.cell.in_(cells[start:start + 500])).group_by(Guest.cell))
        for cell, *sums in query.tuples():
            out[cell] = Amounts(*(int(v or 0) for v in sums))
    return out


class GuestStore:
    """Mixin of `state.store.Store`: guests (see the module docstring for the contract)."""

    limits: dict[str, int]
    overcommit: Overcommit  # the `overcommit` setting: ratios of cells without their own
    data_dir: str = ""  # where the key that seals admin passwords lives (state/secrets.py)

    @property
    def vault(self) -> SecretBox:
        return secret_box(self.data_dir)

    @staticmethod
    def guest_sums(where: peewee.Expression) -> tuple[int, int, int, int]:
        """(count, cores, memory, disk bytes) of the guests matching `where`."""
        return _guest_sums(where)

    # -- finding guests -------------------------------------------------------------------

    def _guest(self, session: SessionInfo, guest_id: str) -> Guest:
        row = Guest.get_or_none((Guest.id == guest_id) & visible(session))
        if row is None:
            raise NotFound(f"no guest {guest_id!r} that you can see")
        return row

    def _live_guest(self, session: SessionInfo, guest_id: str) -> Guest:
        row = self._guest(session, guest_id)
        if row.deleting:
            raise Conflict(f"guest {row.name!r} is being deleted")
        return row

    @staticmethod
    def _require_created(row: Guest, what: str) -> None:
        if not (row.observed or {}).get("created"):
            state = "failed to be created" if row.phase == "failed" else "is not created yet"
            raise Conflict(f"guest {row.name!r} {state}: cannot {what}")

    @staticmethod
    def _running(row: Guest) -> bool:
        return bool((row.observed or {}).get("running"))

    def _check_image(self, session: SessionInfo, kind: str, image_id: str, field_name: str
                     ) -> Image:
        """A disk or media image the caller sees and that has a file."""
        label = "disk image" if kind == "disk" else "media image"
        flag = "disk_image_visible" if kind == "disk" else "media_image_visible"
        cond = Image.owner == session.user
        if session.group and session.visibility.get(flag):
            cond = cond | (Image.group == session.group)
        row = Image.get_or_none((Image.id == image_id) & (Image.kind == kind) & cond)
        if row is None:
            raise NotFound(f"{field_name}: no {label} {image_id!r} that you can see")
        if row.version < 1 or row.deleting:
            raise Conflict(f"{field_name}: {label} {row.name!r} has no file yet: upload one or "
                           "wait until it is created")
        return row

    # -- create ---------------------------------------------------------------------------

    def _guest_owner(self, session: SessionInfo, body: dict[str, Any]) -> tuple[str, str]:
        """Owner and group of a new guest: the caller and its group by default. Only
        administrators (menu tag 'user') may create guests for other users or groups."""
        owner = body.get("owner") or session.user
        admin = session.allows("user")
        if owner != session.user and not admin:
            raise Invalid(f"owner: you may not create guests for {owner!r}: leave 'owner' "
                          "empty or ask an administrator")
        user = User.get_or_none(User.name == owner)
        if user is None:
            raise NotFound(f"owner: no user named {owner!r}")
        group = body.get("group") or (session.group if owner == session.user
                                      else user.group_id or "")
        if group != session.group and not admin:
            raise Invalid(f"group: you may not create guests in group {group!r}: use your "
                          f"own group {session.group!r} or ask an administrator")
        if not group:
            raise Invalid(f"group: user {owner!r} belongs to no group: give 'group'")
        return owner, group

    def plan_guest(self, session: SessionInfo, body: dict[str, Any]) -> dict[str, Any]:
        """Check a create body (already schema-valid) against the store and the limits;
        returns what `insert_guest` needs. Writes nothing. Raises Invalid listing every
        problem it found at once."""
        owner, group = self._guest_owner(session, body)
        pool = self._pool(body["pool"])  # type: ignore[attr-defined]
        problems: list[str] = []
        cores, memory = int(body["cores"]), int(body["memory"])
        disks = [int(d) for d in body["disks"]]
        limits = self.limits
        if cores > limits["max_cores"]:
            problems.append(f"cores: {cores} is more than the limit of {limits['max_cores']} "
                            "(setting limits.max_cores)")
        if memory > limits["max_memory"] * GIB:
            problems.append(f"memory: {memory} bytes is more than the limit of "
                            f"{limits['max_memory']} GiB (setting limits.max_memory)")
        for i, size in enumerate(disks):
            if size > limits["max_disk"] * GIB:
                problems.append(f"disks.{i}: {size} bytes is more than the limit of "
                                f"{limits['max_disk']} GiB (setting limits.max_disk)")
        template_id = body.get("template") or ""
        template_spec = self.template_values(template_id)  # type: ignore[attr-defined]
        modules = list(dict.fromkeys(body.get("modules") or []))
        unknown = [m for m in modules if m not in MODULES]
        if unknown:
            problems.append(f"modules: unknown module(s) {', '.join(map(repr, unknown))}: "
                            f"choose from {', '.join(MODULES)}")
        given_ci = body.get("cloud_init")
        if given_ci and "cloud-init" not in modules:
            problems.append("cloud_init: add 'cloud-init' to modules, or leave cloud_init out")
        mac = (body.get("ethernet_address") or "").lower()
        if mac:
            problem = check_mac(mac)
            if problem:
                problems.append(problem)
            elif GuestInterface.select().where(GuestInterface.mac == mac).exists():
                raise Conflict(f"ethernet_address: {mac} is already used by another guest")
        network_address = body.get("network_address") or ""
        if network_address and not pool.network:
            problems.append(f"network_address: compute pool {pool.name!r} has no address "
                            "pool to take it from: leave it empty, or give the pool an "
                            "address pool")
        policy = body.get("security_policy_group") or ""
        if problems:
            raise Invalid("invalid guest: " + "; ".join(problems), details=problems)
        from_image = body.get("from_image") or ""
        if from_image:
            self._check_image(session, "disk", from_image, "from_image")
        if policy:
            self.security_policy_group(policy, session)  # type: ignore[attr-defined]
        pinned = body.get("cell") or ""
        # The password: given, or generated per guest by insert_guest (a batch must not
        # give all its guests one password); unknown ("") without a module to set it.
        password = ""  # sealed
        cloud_init: dict[str, Any] = {}
        admin_user = template_spec["admin"]
        if "cloud-init" in modules:
            ci = given_ci or {}
            password = self.vault.seal(ci.get("admin_secret") or "")
            admin_user = ci.get("admin_name") or "root"
            cloud_init = {"root_enabled": bool(ci.get("root_enabled", True)),
                          "admin_name": admin_user, "admin_secret": password,
                          "data_path": ci.get("data_path") or DEFAULT_DATA_PATH}
        generate = not password and bool(set(modules) & set(MODULES))
        spec = {
            "cores": cores, "memory": memory, "disks": disks,
            "auto_start": bool(body.get("auto_start", False)),
            "system": body.get("system") or template_spec["operating_system"],
            "template": template_id, "template_spec": template_spec,
            "modules": modules, "cloud_init": cloud_init,
            "qos": {**QOS_DEFAULTS, **(body.get("qos") or {})},
            "ethernet_address": mac, "network_address": network_address,
            "ports": sorted(int(p) for p in body.get("ports") or []),
            "from_image": from_image, "security_policy_group": policy,
            "monitor_secret": "", "instance_id": "",
            "power": "stopped", "power_request": 0, "stop_mode": "shutdown",
            "stop_escalate": False,
            "restart": {"counter": 0, "mode": "reboot"}, "boot_once": None, "media": "",
            "admin": {"user": admin_user, "password": password, "generation": 0},
            "system_reset": None, "restore": None, "current_snapshot": "", "disk_shrink": {},
            "immediate": {"cores": False, "memory": False, "disks": {}},
        }
        return {"owner": owner, "group": group, "pool": pool.name, "network": pool.network,
                "cell": pinned, "spec": spec, "generate_password": generate}

    def _cell_rooms(self, pool: str | None = None, *, cells: list[str] | None = None
                    ) -> list[CellRoom]:
        """Each cell of `pool` (or the named `cells`) as placement counts it
        (state/placement.py): its host figures from the last observed stats (kept while
        it is offline), its overcommit ratios (the setting, under the cell's own
        `overcommit`), and the sum of what every guest placed on it is promised."""
        if pool is not None and db.in_transaction():
            # a placement: on PostgreSQL, placements in one pool take turns (the pool's
            # row locked until the commit), whichever replica or thread makes them
            locked(ComputePool.select(ComputePool.name).where(ComputePool.name == pool)
                   ).execute()
        query = Cell.select()
        query = query.where(Cell.pool == pool) if cells is None else query.where(
            Cell.name.in_(cells))
        rows = list(query.order_by(Cell.name))
        promised = _promised([c.name for c in rows])
        rooms = []
        for c in rows:
            obs = c.observed or {}
            stats = obs.get("stats") or {}
            rooms.append(CellRoom(
                # a draining cell takes no new guests (state/migrations.py)
                name=c.name, alive=bool(obs.get("alive")),
                enabled=c.enabled and not (c.spec or {}).get("drain"),
                host=Amounts(int(stats.get("max_cpu", 0)), int(stats.get("max_memory", 0)),
                             int(stats.get("max_disk", 0))),
                ratios=self.overcommit.over((c.spec or {}).get("overcommit")),
                promised=promised.get(c.name, Amounts())))
        return rooms

    def _cell_room(self, name: str) -> CellRoom:
        """One cell as placement counts it (see `_cell_rooms`)."""
        rooms = self._cell_rooms(cells=[name])
        if not rooms:
            raise NotFound(f"no cell named {name!r}")
        return rooms[0]

    def check_guest_fits(self, guest_id: str, cell: str) -> None:
        """Refuse unless cell `cell` (alive, enabled) has room for all of guest `guest_id`
        besides what it already promised: what a migration checks before it moves a guest
        to `cell`. NotFound, Unavailable, Conflict or NoRoom (state/placement.py), each
        naming the cell and what is short."""
        row = Guest.get_or_none(Guest.id == guest_id)
        if row is None:
            raise NotFound(f"no guest {guest_id!r}")
        if row.cell == cell:
            raise Conflict(f"guest {row.name!r} is already on cell {cell!r}")
        check_cell(self._cell_room(cell), guest_need(row.spec or {}),
                   purpose=f"for guest {row.name!r}")

    def _new_mac(self) -> str:
        for _ in range(100):
            mac = generate_mac()
            if not GuestInterface.select().where(GuestInterface.mac == mac).exists():
                return mac
        raise Conflict("cannot find an unused MAC address in 00:16:3e:xx:xx:xx: retry")

    def _check_guest_name(self, pool: str, name: str, *, but: str = "") -> None:
        query = Guest.select().where((Guest.pool == pool) & (Guest.name == name)
                                     & (Guest.id != but))
        if query.exists():
            raise Conflict(f"a guest named {name!r} already exists in compute pool {pool!r}: "
                           "choose another name")

    def insert_guest(self, plan: dict[str, Any], name: str | Callable[[str, dict], str], *,
                     batch: str = "", rooms: list[CellRoom] | None = None) -> Guest:
        """Place, allocate and insert one planned guest; call inside a transaction (batch
        creates call it once per guest in one). `name` may be a function of the guest's
        MAC and allocated addresses (batch name rules). `rooms`: the pool's cells as
        `_cell_rooms` gives them, kept up to date here across a batch (so a batch reads the
        pool's guests once, not once per guest). Returns the new row."""
        spec = copy.deepcopy(plan["spec"])
        need = guest_need(spec)
        if rooms is None:
            rooms = self._cell_rooms(plan["pool"])
        cell = choose_cell(plan["pool"], rooms, need, pinned=plan["cell"])
        for i, room in enumerate(rooms):
            if room.name == cell:
                rooms[i] = room.promise(need)
        guest_id = str(uuid.uuid4())
        spec["ethernet_address"] = spec["ethernet_address"] or self._new_mac()
        spec["monitor_secret"] = generate_secret(8)
        spec["instance_id"] = str(uuid.uuid4())
        if plan["generate_password"]:
            spec["admin"]["password"] = self.vault.seal(generate_password())
            if spec["cloud_init"]:
                spec["cloud_init"]["admin_secret"] = spec["admin"]["password"]
        final = name if isinstance(name, str) else ""
        if final:
            self._check_guest_name(plan["pool"], final)
        row = Guest.create(id=guest_id, name=final or guest_id, pool=plan["pool"], cell=cell,
                           owner=plan["owner"], group=plan["group"], batch=batch, spec=spec,
                           phase=CREATING, progress=0)
        addresses: dict[str, str] = {}
        if plan["network"]:
            addresses = self.allocate_guest_addresses(  # type: ignore[attr-defined]
                guest_id, plan["network"], requested=spec["network_address"] or None)
        try:
            GuestInterface.create(guest=guest_id, type="internal", mac=spec["ethernet_address"],
                                  address=addresses.get("internal", "") or "")
            if addresses.get("external"):
                GuestInterface.create(guest=guest_id, type="external", mac=self._new_mac(),
                                      address=addresses["external"])
        except peewee.IntegrityError:
            raise Conflict(f"ethernet_address: {spec['ethernet_address']} is already used by "
                           "another guest") from None
        if callable(name):
            final = name(spec["ethernet_address"], addresses)
            self._check_guest_name(plan["pool"], final)
            Guest.update(name=final).where(Guest.id == guest_id).execute()
            row.name = final
        if spec["ports"]:
            self.allocate_guest_ports(guest_id, cell, spec["ports"])  # type: ignore[attr-defined]
        if spec["security_policy_group"]:
            self.copy_policy_to_guest(  # type: ignore[attr-defined]
                spec["security_policy_group"], guest_id)
        return row

    def create_guest(self, session: SessionInfo, body: dict[str, Any]) -> dict[str, str]:
        """POST /guests/: store a new guest in phase "creating"; returns {id, name, cell}."""
        plan = self.plan_guest(session, body)
        try:
            with db.atomic():
                # first: on PostgreSQL this locks the group's quota until the commit
                self.check_quota(  # type: ignore[attr-defined]
                    plan["group"], guest_usage(plan["spec"]),
                    f"creating guest {body['name']!r}")
                row = self.insert_guest(plan, body["name"])
        except peewee.IntegrityError:  # a concurrent create took the name or the MAC
            self._check_guest_name(plan["pool"], body["name"])
            raise
        return {"id": row.id, "name": row.name, "cell": row.cell}

    # -- reads ----------------------------------------------------------------------------

    @staticmethod
    def _hosts() -> dict[str, str]:
        return {c.name: (c.spec or {}).get("address", "") for c in Cell.select(Cell.name,
                                                                                Cell.spec)}

    @staticmethod
    def _nics(ids: list[str]) -> dict[str, dict[str, GuestInterface]]:
        out: dict[str, dict[str, GuestInterface]] = {}
        if not ids:
            return out
        for start in range(0, len(ids), 500):  # stay under SQLite's variable limit
            for nic in GuestInterface.select().where(
                    GuestInterface.guest.in_(ids[start:start + 500])):
                out.setdefault(nic.guest_id, {})[nic.type] = nic
        return out

    @staticmethod
    def _render_guest(row: Guest, hosts: dict[str, str], nics: dict[str, GuestInterface]
                  ) -> dict[str, Any]:
        """InstanceStatus (a superset of InstanceData) of one guest."""
        spec, obs = row.spec or {}, row.observed or {}
        created = bool(obs.get("created"))
        data: dict[str, Any] = {
            "id": row.id, "name": row.name, "owner": row.owner, "group": row.group,
            "pool": row.pool, "cell": row.cell,
            "host": obs.get("host") or hosts.get(row.cell, ""),
            "created": created, "running": bool(obs.get("running")),
            "lost": row.phase == "lost", "progress": 100 if created else row.progress,
            "cores": spec.get("cores", 0), "memory": spec.get("memory", 0),
            "disks": list(spec.get("disks", [])),
            "total_disk": sum(spec.get("disks", [])),
            "auto_start": bool(spec.get("auto_start")), "system": spec.get("system", ""),
            "template": spec.get("template", ""), "modules": list(spec.get("modules", [])),
            "qos": dict(spec.get("qos", QOS_DEFAULTS)),
            "ethernet_address": spec.get("ethernet_address", ""),
            "network_address": spec.get("network_address", ""),
            "ports": list(spec.get("ports", [])), "from_image": spec.get("from_image", ""),
            # extension: which cell port forwards to which guest port, as observed
            "port_forwards": list(obs.get("ports", [])),
            "security_policy_group": spec.get("security_policy_group", ""),
            "monitor_secret": spec.get("monitor_secret", ""),
            "display_protocol": obs.get("display_protocol")
            or spec.get("template_spec", {}).get("control", "vnc"),
            "create_time": obs.get("create_time") or format_time(row.created_at),
            "media_attached": bool(obs.get("media_attached")),
            "media_source": obs.get("media_source", ""),
            "cpu_usage": obs.get("cpu_usage", 0), "memory_available":
            obs.get("memory_available", 0), "disk_available": obs.get("disk_available", 0),
            "bytes_read": obs.get("bytes_read", 0), "bytes_written": obs.get("bytes_written", 0),
            "bytes_received": obs.get("bytes_received", 0), "bytes_sent": obs.get("bytes_sent", 0),
            "phase": row.phase, "deleting": row.deleting,
        }
        if spec.get("cloud_init"):
            data["cloud_init"] = {k: v for k, v in spec["cloud_init"].items()
                                  if k != "admin_secret"}
        for kind in ("internal", "external"):
            nic, seen = nics.get(kind), obs.get(kind) or {}
            if nic is None and not seen:
                continue
            allocated = nic.address if nic else ""
            data[kind] = {"network_address": seen.get("network_address") or allocated,
                          "display_address": seen.get("display_address", ""),
                          "allocated_address": allocated}
        if "internal" not in data:
            data["internal"] = {"network_address": "", "display_address": "",
                                "allocated_address": ""}
        if row.last_error:
            data["error"] = row.last_error
        return data

    def _render_guests(self, rows: list[Guest]) -> list[dict[str, Any]]:
        hosts = self._hosts()
        nics = self._nics([r.id for r in rows])
        return [self._render_guest(r, hosts, nics.get(r.id, {})) for r in rows]

    def guest_status(self, session: SessionInfo, guest_id: str) -> tuple[bool, dict[str, Any]]:
        """(created, data) for GET /guests/{id} and GET /instances/{id}: the short creating
        form until the reconciler observed the guest created, then InstanceStatus."""
        row = self._guest(session, guest_id)
        if not (row.observed or {}).get("created"):
            data: dict[str, Any] = {"name": row.name, "created": False,
                                    "progress": row.progress}
            if row.phase == "failed" and row.last_error:
                data["error"] = row.last_error
            return False, data
        return True, self._render_guests([row])[0]

    def guest_search(self, session: SessionInfo, *, pool: str | None = None,
                     cell: str | None = None, owner: str | None = None,
                     group: str | None = None, status: str | None = None,
                     created: bool | None = None) -> list[dict[str, Any]]:
        """GET /guest_search/: visible guests by pool, cell, owner, group, status (a number
        as in the statistics arrays: 0 stopped, 1 running, 2 lost, 3 migrating; or a phase
        name) and created."""
        query = Guest.select().where(visible(session))
        if pool:
            self._pool(pool)  # type: ignore[attr-defined]
            query = query.where(Guest.pool == pool)
        if cell:
            query = query.where(Guest.cell == cell)
        if owner:
            query = query.where(Guest.owner == owner)
        if group:
            query = query.where(Guest.group == group)
        if status not in (None, ""):
            phase = str(status)
            if phase.isdigit():
                if int(phase) >= len(GUEST_STATES):
                    raise Invalid(f"status: {phase} is not one of 0 (stopped), 1 (running), "
                                  "2 (lost), 3 (migrating)")
                phase = GUEST_STATES[int(phase)]
            query = query.where(Guest.phase == phase)
        rows = list(query.order_by(Guest.name, Guest.id))
        if created is not None:
            rows = [r for r in rows if bool((r.observed or {}).get("created")) == created]
        return self._render_guests(rows)

    def search_guests(self, session: SessionInfo, *, limit: int = 20, offset: int = 0,
                      pool: str = "", cell: str = "", keyword: str = "") -> dict[str, Any]:
        """POST /search/guests/: a page of visible guests; `keyword` matches (case
        insensitive, substring) the guest's name or addresses, or its cell's name or
        address. Filtering by keyword happens here, not in SQL: addresses live in observed
        JSON and cell specs."""
        query = Guest.select().where(visible(session))
        if pool:
            query = query.where(Guest.pool == pool)
        if cell:
            query = query.where(Guest.cell == cell)
        rows = list(query.order_by(Guest.name, Guest.id))
        result = self._render_guests(rows)
        word = keyword.strip().lower()
        if word:
            def hit(g: dict[str, Any]) -> bool:
                texts = [g["name"], g["cell"], g["host"]]
                for kind in ("internal", "external"):
                    texts += [g.get(kind, {}).get("network_address", ""),
                              g.get(kind, {}).get("allocated_address", "")]
                return any(word in (t or "").lower() for t in texts)
            result = [g for g in result if hit(g)]
        return {"result": result[offset:offset + limit], "total": len(result),
                "limit": limit, "offset": offset}

    def instance_statuses(self, session: SessionInfo, pool: str, cell: str | None = None
                          ) -> list[dict[str, Any]]:
        """GET /instance_status/{pool}[/{cell}]: InstanceStatus of the visible guests."""
        query = Guest.select().where(visible(session) & (Guest.pool == pool))
        if cell is not None:
            query = query.where(Guest.cell == cell)
        return self._render_guests(list(query.order_by(Guest.name, Guest.id)))

    def guest_auth(self, session: SessionInfo, guest_id: str) -> dict[str, str]:
        """GET /guests/{id}/auth (the document's "Get Administrator Password"): the one
        read that gives the admin password, opened from its sealed form."""
        admin = (self._guest(session, guest_id).spec or {}).get("admin", {})
        return {"user": admin.get("user", ""),
                "password": self.vault.unseal(admin.get("password", ""))}

    # -- changes --------------------------------------------------------------------------

    @staticmethod
    def _write_spec(row: Guest, spec: dict[str, Any], **columns: Any) -> bool:
        """Store `spec` (and other spec `columns`) with the generation bumped, unless the
        guest changed since `row` was read (then False and nothing written)."""
        return bool(Guest.update(spec=spec, generation=Guest.generation + 1, modified_at=now(),
                                 **columns).where((Guest.id == row.id)
                                                  & (Guest.generation == row.generation))
                    .execute())

    def _change(self, session: SessionInfo, guest_id: str,
                change: Callable[[Guest, dict[str, Any]], Any], **columns: Any) -> Any:
        """Apply `change(row, spec)` to a copy of a live guest's spec and store it with the
        generation bumped, in one transaction with whatever else `change` writes.
        Compare-and-set on the generation (SQLite has no SELECT FOR UPDATE): when another
        change got in between, everything is rolled back and done again from a fresh read.
        Returns what `change` returned."""
        for _ in range(5):
            try:
                with db.atomic():
                    row = self._live_guest(session, guest_id)
                    spec = copy.deepcopy(row.spec or {})
                    result = change(row, spec)
                    if not self._write_spec(row, spec, **columns):
                        raise _Raced
                return result
            except _Raced:
                continue
        raise Conflict("the guest changed concurrently several times: try again")

    # -- for the reconciler ---------------------------------------------------------------

    def guest_ids(self, *, cell: str | None = None) -> list[str]:
        """Every guest id (of one cell): what a resync enqueues."""
        query = Guest.select(Guest.id).order_by(Guest.id)
        if cell is not None:
            query = query.where(Guest.cell == cell)
        return [g.id for g in query]

    def guest_desired(self, guest_id: str) -> GuestDesired | None:
        """The guest as the reconciler converges it; None once the row is gone."""
        row = Guest.get_or_none(Guest.id == guest_id)
        if row is None:
            return None
        pool = ComputePool.get_or_none(ComputePool.name == row.pool)
        nics = tuple({"type": n.type, "mac": n.mac, "address": n.address}
                     for n in GuestInterface.select().where(GuestInterface.guest == row.id)
                     .order_by(GuestInterface.type.desc()))  # internal first
        snaps = tuple(SnapshotDesired(name=s.name, parent=s.parent, description=s.description,
                                      deleting=s.deleting, generation=s.generation,
                                      phase=s.phase, create_time=format_time(s.created_at))
                      for s in Snapshot.select().where(Snapshot.guest == row.id)
                      .order_by(Snapshot.created_at, Snapshot.id))
        return GuestDesired(
            id=row.id, name=row.name, pool=row.pool, cell=row.cell, owner=row.owner,
            group=row.group, batch=row.batch, generation=row.generation, deleting=row.deleting,
            spec=copy.deepcopy(row.spec or {}), storage_pool=pool.storage if pool else "",
            address_pool=pool.network if pool else "", interfaces=nics, snapshots=snaps,
            phase=row.phase, observed_generation=row.observed_generation,
            observed=copy.deepcopy(row.observed or {}),
            admin_password=self._admin_password(row.spec or {}))

    def _admin_password(self, spec: dict[str, Any]) -> str:
        sealed = (spec.get("admin") or {}).get("password") or \
            (spec.get("cloud_init") or {}).get("admin_secret") or ""
        return self.vault.unseal(sealed) if sealed else ""

    def guest_conditions(self, guest_id: str) -> list[dict[str, Any]]:
        row = Guest.get_or_none(Guest.id == guest_id)
        return list(row.conditions or []) if row else []

    def record_guest_observed(self, guest_id: str, *, generation: int | None = None,
                              phase: str | None = None, progress: int | None = None,
                              observed: dict[str, Any] | None = None,
                              last_error: str | None = None,
                              conditions: list[dict[str, Any]] | None = None) -> bool:
        """Record what the reconciler observed: `observed` is merged key by key into the
        stored facts (a key given replaces, a key left out keeps its value); the other
        arguments replace their column when given. `generation` is the spec generation the
        reconcile worked from (observed_generation). Returns False once the guest is gone.
        Writes status columns only, so it never races with the API's spec writes."""
        with db.atomic():
            row = Guest.get_or_none(Guest.id == guest_id)
            if row is None:
                return False
            columns: dict[Any, Any] = {}
            if observed is not None:
                columns[Guest.observed] = {**(row.observed or {}), **observed}
            if generation is not None:
                columns[Guest.observed_generation] = generation
            if phase is not None:
                columns[Guest.phase] = phase
            if progress is not None:
                columns[Guest.progress] = max(0, min(100, int(progress)))
            if last_error is not None:
                columns[Guest.last_error] = last_error
            if conditions is not None:
                columns[Guest.conditions] = conditions
            if columns:
                Guest.update(columns).where(Guest.id == guest_id).execute()
        return True

    def finish_guest_delete(self, guest_id: str) -> bool:
        """The reconciler observed everything of a deleting guest gone: release its
        addresses and remove its rows. Returns False when it was already gone; refuses a
        guest that is not marked deleting."""
        with db.atomic():
            row = Guest.get_or_none(Guest.id == guest_id)
            if row is None:
                return False
            if not row.deleting:
                raise Conflict(f"guest {row.name!r} is not being deleted: refusing to remove it")
            self.release_guest_addresses(guest_id)  # type: ignore[attr-defined]
            self.release_guest_ports(guest_id)  # type: ignore[attr-defined]
            GuestInterface.delete().where(GuestInterface.guest == guest_id).execute()
            Snapshot.delete().where(Snapshot.guest == guest_id).execute()
            row.delete_instance(recursive=True)
        return True

