"""Guests on one cell through libvirt: domains, their volumes, snapshots, live tuning,
statistics and the guest agent. `LibvirtGuests(hypervisor)` works on the connection of a
`LibvirtHypervisor` (reconnects and error translation included).

Called by the guest reconciler (reconciler/guests.py) from worker threads; every method is
blocking. Ownership: we only touch domains whose name starts with `nano-` (the names
prefix, reconciler/naming.py) and whose metadata carries our mark, and volumes named
`nano-...`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import libvirt
import libvirt_qemu

from reconciler import naming
from reconciler.drivers.libvirt_hv import DEFAULT_LIMIT, NAMESPACE, LibvirtHypervisor
from state.errors import Conflict, NanoError, NotFound

log = logging.getLogger(__name__)
T = TypeVar("T")

STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting-down",
    libvirt.VIR_DOMAIN_SHUTOFF: "stopped",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}
SHUTOFF_REASONS = {
    libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN: "unknown",
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: "shutdown",      # the guest powered itself off
    libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_SHUTOFF_SAVED: "saved",
    libvirt.VIR_DOMAIN_SHUTOFF_FAILED: "failed",
    libvirt.VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT: "from_snapshot",
    libvirt.VIR_DOMAIN_SHUTOFF_DAEMON: "daemon",
}
"""libvirt's reason for a stopped domain, as the guest planner reads it."""
# Undefine flags, strongest first: drivers without NVRAM (libvirt's test driver) refuse the
# flag as unsupported, so undefine falls back to the next set.
_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM,
    libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE,
    0,
)


def _owned(name: str) -> None:
    naming.names().require_owned(name, "change domain")


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    path: str
    capacity: int
    allocation: int
    format: str


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    parent: str
    current: bool
    created: int  # epoch seconds
    description: str
    state: str  # shutoff | running


@dataclass(frozen=True)
class DomainStats:
    """Counters of one domain (cumulative since it started)."""

    state: str
    cpu_time_ns: int = 0
    vcpus: int = 0
    memory_bytes: int = 0
    memory_available_bytes: int = 0
    block_read_bytes: int = 0
    block_write_bytes: int = 0
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0
    disk_allocation: dict[str, int] = field(default_factory=dict)


class LibvirtGuests:
    """Guest operations on one cell (see module docstring)."""

    def __init__(self, hypervisor: LibvirtHypervisor) -> None:
        self.hv = hypervisor

    def _call(self, what: str, fn: Callable[[libvirt.virConnect], T], *,
              timeout: float | None = DEFAULT_LIMIT) -> T:
        return self.hv.call(what, fn, timeout=timeout)

    def _dom(self, conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
        return conn.lookupByName(name)

    # -- domains -------------------------------------------------------------------------

    def domain_xml(self, name: str, *, inactive: bool = False,
                   migratable: bool = False) -> str | None:
        """The domain's XML with secrets (VNC password), or None when it does not exist;
        `migratable`: as a migration's destination XML must start from."""
        flags = libvirt.VIR_DOMAIN_XML_SECURE
        if inactive:
            flags |= libvirt.VIR_DOMAIN_XML_INACTIVE
        if migratable:
            flags |= libvirt.VIR_DOMAIN_XML_MIGRATABLE
        try:
            return self._call(f"read domain {name}",
                              lambda c: self._dom(c, name).XMLDesc(flags))
        except NotFound:
            return None

    def state(self, name: str) -> str | None:
        """running | stopped | paused | crashed | ..., or None when it does not exist."""
        try:
            st = self._call(f"state of {name}", lambda c: self._dom(c, name).state()[0])
        except NotFound:
            return None
        return STATE_NAMES.get(st, "nostate")

    def power(self, name: str) -> tuple[str, str] | None:
        """(state, reason) of a domain, e.g. ("stopped", "destroyed"), or None when it
        does not exist. The reason is given for stopped domains only ("" otherwise)."""
        try:
            st, reason = self._call(f"state of {name}", lambda c: self._dom(c, name).state())
        except NotFound:
            return None
        text = SHUTOFF_REASONS.get(reason, "unknown") if st == libvirt.VIR_DOMAIN_SHUTOFF else ""
        return STATE_NAMES.get(st, "nostate"), text

    def presence(self, name: str) -> tuple[str, bool] | None:
        """(state, persistent) of a domain, or None when the cell has no such domain."""
        try:
            st, persistent = self._call(f"state of {name}", lambda c: (
                lambda d: (d.state()[0], bool(d.isPersistent())))(self._dom(c, name)))
        except NotFound:
            return None
        return STATE_NAMES.get(st, "nostate"), persistent

    def migrating(self, name: str) -> bool:
        """Whether libvirt runs a job (a migration) on the domain right now."""
        try:
            kind = self._call(f"job of {name}", lambda c: self._dom(c, name).jobInfo()[0])
        except (NotFound, Conflict):  # gone, or not running (it has just left): no job
            return False
        return kind not in (libvirt.VIR_DOMAIN_JOB_NONE, libvirt.VIR_DOMAIN_JOB_COMPLETED)

    def cpu_refusal(self, domain_xml: str, virt_type: str) -> str:
        """"" when the CPU of `domain_xml` (a running domain's, as libvirt expanded it)
        runs on this cell's hypervisor, else libvirt's reason (the features it lacks)."""
        root = ET.fromstring(domain_xml)
        cpu, os_type = root.find("cpu"), root.find("os/type")
        if cpu is None or os_type is None:
            return ""
        text = ET.tostring(cpu, encoding="unicode")

        def compare(conn: libvirt.virConnect) -> str:
            try:
                conn.compareHypervisorCPU(
                    None, os_type.get("arch"), os_type.get("machine"), virt_type, text,
                    libvirt.VIR_CONNECT_COMPARE_CPU_FAIL_INCOMPATIBLE)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_CPU_INCOMPATIBLE:
                    return exc.get_error_message()
                raise
            return ""

        return self._call("compare the guest's CPU", compare)

    def define(self, xml: str) -> None:
        name = ET.fromstring(xml).findtext("name") or ""
        _owned(name)
        self._call(f"define domain {name}", lambda c: c.defineXML(xml))

    def undefine(self, name: str) -> None:
        _owned(name)

        def go(conn: libvirt.virConnect) -> None:
            dom = self._dom(conn, name)
            if dom.isActive():
                dom.destroy()
            for flags in _UNDEFINE_FLAGS:
                try:
                    dom.undefineFlags(flags) if flags else dom.undefine()
                    return
                except libvirt.libvirtError as exc:
                    unsupported = exc.get_error_code() in (libvirt.VIR_ERR_INVALID_ARG,
                                                           libvirt.VIR_ERR_NO_SUPPORT)
                    if not unsupported or not flags:
                        raise

        with contextlib.suppress(NotFound):
            self._call(f"undefine domain {name}", go)

    def start(self, name: str) -> None:
        self._call(f"start {name}", lambda c: self._dom(c, name).create())

    def shutdown(self, name: str) -> None:
        """ACPI power button (and the agent when present): the guest decides."""
        self._call(f"shut down {name}", lambda c: self._dom(c, name).shutdown())

    def destroy(self, name: str) -> None:
        self._call(f"power off {name}", lambda c: self._dom(c, name).destroy())

    def reboot(self, name: str) -> None:
        self._call(f"reboot {name}", lambda c: self._dom(c, name).reboot(0))

    def reset(self, name: str) -> None:
        self._call(f"reset {name}", lambda c: self._dom(c, name).reset(0))

    def autostart(self, name: str) -> bool:
        return bool(self._call(f"autostart of {name}",
                               lambda c: self._dom(c, name).autostart()))

    def set_autostart(self, name: str, enable: bool) -> None:
        self._call(f"set autostart of {name}",
                   lambda c: self._dom(c, name).setAutostart(1 if enable else 0))

    # -- live and persistent changes --------------------------------------------------------

    @staticmethod
    def _flags(live: bool) -> int:
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if live:
            flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
        return flags

    def set_vcpus(self, name: str, count: int, *, live: bool) -> None:
        self._call(f"set vcpus of {name}",
                   lambda c: self._dom(c, name).setVcpusFlags(count, self._flags(live)))

    def set_memory(self, name: str, memory_bytes: int, *, live: bool) -> None:
        self._call(f"set memory of {name}",
                   lambda c: self._dom(c, name).setMemoryFlags(memory_bytes // 1024,
                                                               self._flags(live)))

    def set_cpu_shares(self, name: str, shares: int, *, live: bool) -> None:
        self._call(f"set cpu shares of {name}",
                   lambda c: self._dom(c, name).setSchedulerParametersFlags(
                       {"cpu_shares": shares}, self._flags(live)))

    def set_iotune(self, name: str, dev: str, tune: dict[str, int], *, live: bool) -> None:
        params = {k: int(tune.get(k, 0)) for k in
                  ("read_bytes_sec", "write_bytes_sec", "read_iops_sec", "write_iops_sec")}
        self._call(f"set disk QoS of {name} {dev}",
                   lambda c: self._dom(c, name).setBlockIoTune(dev, params, self._flags(live)))

    def set_bandwidth(self, name: str, mac: str, inbound_kib: int, outbound_kib: int, *,
                      live: bool) -> None:
        params = {"inbound.average": inbound_kib, "outbound.average": outbound_kib}
        self._call(f"set network QoS of {name}",
                   lambda c: self._dom(c, name).setInterfaceParameters(mac, params,
                                                                       self._flags(live)))

    def update_device(self, name: str, device_xml: str, *, live: bool) -> None:
        """Change a device in place, e.g. the media of a cdrom."""
        self._call(f"update device of {name}",
                   lambda c: self._dom(c, name).updateDeviceFlags(device_xml,
                                                                  self._flags(live)))

    # -- statistics ---------------------------------------------------------------------------

    def stats(self, names: list[str] | None = None) -> dict[str, DomainStats]:
        """Counters of our domains (all `nano-` domains when `names` is None), one bulk
        call."""
        flags = (libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
                 | libvirt.VIR_DOMAIN_STATS_BALLOON | libvirt.VIR_DOMAIN_STATS_VCPU
                 | libvirt.VIR_DOMAIN_STATS_INTERFACE | libvirt.VIR_DOMAIN_STATS_BLOCK)

        def read(conn: libvirt.virConnect) -> dict[str, DomainStats]:
            if names is not None:
                doms = []
                for n in names:
                    with contextlib.suppress(libvirt.libvirtError):
                        doms.append(conn.lookupByName(n))
                records = conn.domainListGetStats(doms, flags) if doms else []
            else:
                records = conn.getAllDomainStats(flags)
            out = {}
            ours = naming.names().owned
            for dom, rec in records:
                if not dom.name().startswith(ours):
                    continue
                out[dom.name()] = _stats(rec)
            return out

        return self._call("domain statistics", read)

    # -- guest agent ------------------------------------------------------------------------

    def agent_answers(self, name: str) -> bool:
        """Whether the guest agent of a running domain answers a ping (within 2 s)."""
        def ping(conn: libvirt.virConnect) -> bool:
            libvirt_qemu.qemuAgentCommand(self._dom(conn, name), '{"execute": "guest-ping"}',
                                          2, 0)
            return True

        try:
            return self._call(f"ping the guest agent of {name}", ping)
        except NanoError:  # not connected, not answering, or a driver without agents
            return False

    def set_user_password(self, name: str, user: str, password: str) -> None:
        """Through qemu-guest-agent; raises Unavailable when no agent answers."""
        self._call(f"set password of {user} in {name} (guest agent)",
                   lambda c: self._dom(c, name).setUserPassword(user, password, 0))

    # -- snapshots ---------------------------------------------------------------------------

    def snapshots(self, name: str) -> list[SnapshotInfo]:
        def read(conn: libvirt.virConnect) -> list[SnapshotInfo]:
            dom = self._dom(conn, name)
            out = []
            for snap in dom.listAllSnapshots():
                root = ET.fromstring(snap.getXMLDesc())
                out.append(SnapshotInfo(
                    name=snap.getName(),
                    parent=root.findtext("parent/name") or "",
                    current=bool(snap.isCurrent()),
                    created=int(root.findtext("creationTime") or 0),
                    description=root.findtext("description") or "",
                    state=root.findtext("state") or "",
                ))
            return out

        try:
            return self._call(f"snapshots of {name}", read)
        except NotFound:
            return []

    def create_snapshot(self, name: str, snapshot: str, description: str) -> None:
        root = ET.Element("domainsnapshot")
        ET.SubElement(root, "name").text = snapshot
        ET.SubElement(root, "description").text = description
        xml = ET.tostring(root, encoding="unicode")
        # long work (the guest's memory is saved): no call limit
        self._call(f"create snapshot {snapshot} of {name}",
                   lambda c: self._dom(c, name).snapshotCreateXML(xml, 0), timeout=None)

    def revert_snapshot(self, name: str, snapshot: str) -> None:
        def go(conn: libvirt.virConnect) -> None:
            dom = self._dom(conn, name)
            dom.revertToSnapshot(dom.snapshotLookupByName(snapshot), 0)

        self._call(f"restore snapshot {snapshot} of {name}", go, timeout=None)  # long work

    def delete_snapshot(self, name: str, snapshot: str) -> None:
        def go(conn: libvirt.virConnect) -> None:
            self._dom(conn, name).snapshotLookupByName(snapshot).delete(0)

        with contextlib.suppress(NotFound):
            self._call(f"delete snapshot {snapshot} of {name}", go)

    # -- volumes -----------------------------------------------------------------------------

    def volume(self, pool: str, name: str) -> VolumeInfo | None:
        def read(conn: libvirt.virConnect) -> VolumeInfo:
            p = conn.storagePoolLookupByName(pool)
            vol = p.storageVolLookupByName(name)
            _kind, capacity, allocation = vol.info()
            fmt = ET.fromstring(vol.XMLDesc()).find("target/format")
            return VolumeInfo(name, vol.path(), capacity, allocation,
                              fmt.get("type", "raw") if fmt is not None else "raw")

        try:
            return self._call(f"read volume {pool}/{name}", read)
        except NotFound:
            return None

    def refresh_pool(self, pool: str) -> None:
        """Re-read a pool's volumes (after a file changed behind libvirt's back)."""
        self._call(f"refresh pool {pool}",
                   lambda c: c.storagePoolLookupByName(pool).refresh(0))

    def volumes(self, pool: str) -> list[str]:
        """The volumes of `pool`; none when the pool itself is missing."""
        return self.pool_volumes(pool) or []

    def pool_volumes(self, pool: str) -> list[str] | None:
        """The volumes of `pool`, or None when the cell has no such pool (not "no
        volumes": a guest whose disks seem gone because their pool is not there yet must
        wait for it, not be reported as having lost its data)."""
        def read(conn: libvirt.virConnect) -> list[str]:
            p = conn.storagePoolLookupByName(pool)
            with contextlib.suppress(libvirt.libvirtError):
                p.refresh(0)
            return [v.name() for v in p.listAllVolumes()]

        try:
            return self._call(f"list volumes of {pool}", read)
        except NotFound:
            return None

    def create_volume(self, pool: str, name: str, capacity: int, *, fmt: str = "qcow2",
                      backing: str | None = None) -> VolumeInfo:
        """An empty volume, or a copy of volume `backing` of the same pool grown to
        `capacity` (a full copy: guests never share a backing file)."""
        _owned(name)
        root = ET.Element("volume")
        ET.SubElement(root, "name").text = name
        ET.SubElement(root, "capacity", unit="bytes").text = str(int(capacity))
        target = ET.SubElement(root, "target")
        ET.SubElement(target, "format", type=fmt)
        xml = ET.tostring(root, encoding="unicode")

        def go(conn: libvirt.virConnect) -> None:
            p = conn.storagePoolLookupByName(pool)
            if backing:
                source = p.storageVolLookupByName(backing)
                vol = p.createXMLFrom(xml, source, 0)
                if vol.info()[1] < capacity:
                    vol.resize(int(capacity), 0)
            else:
                p.createXML(xml, 0)

        try:
            # a copy of an image is long work: no call limit
            self._call(f"create volume {pool}/{name}", go,
                       timeout=None if backing else DEFAULT_LIMIT)
        except Conflict:
            pass  # made by an earlier, interrupted reconcile: observed and checked below
        info = self.volume(pool, name)
        if info is None:
            raise NotFound(f"volume {pool}/{name} vanished right after its creation")
        return info

    def resize_volume(self, pool: str, name: str, capacity: int, *, shrink: bool = False) -> None:
        flags = libvirt.VIR_STORAGE_VOL_RESIZE_SHRINK if shrink else 0
        self._call(f"resize volume {pool}/{name}",
                   lambda c: c.storagePoolLookupByName(pool).storageVolLookupByName(name)
                   .resize(int(capacity), flags))

    def block_resize(self, domain: str, dev: str, capacity: int) -> None:
        """Grow a disk of a running guest (the guest sees the new size at once)."""
        self._call(f"grow {dev} of {domain}",
                   lambda c: self._dom(c, domain).blockResize(
                       dev, int(capacity), libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES))

    def delete_volume(self, pool: str, name: str) -> None:
        _owned(name)

        def go(conn: libvirt.virConnect) -> None:
            conn.storagePoolLookupByName(pool).storageVolLookupByName(name).delete(0)

        with contextlib.suppress(NotFound):
            self._call(f"delete volume {pool}/{name}", go)

    def write_volume(self, pool: str, name: str, data: bytes, *, fmt: str = "raw") -> None:
        """Create (or replace) a small volume with `data` (a cloud-init seed ISO) through
        a libvirt upload stream; the bytes are read back and compared."""
        _owned(name)
        self.delete_volume(pool, name)
        self.create_volume(pool, name, len(data), fmt=fmt)

        def upload(conn: libvirt.virConnect) -> None:
            vol = conn.storagePoolLookupByName(pool).storageVolLookupByName(name)
            stream = conn.newStream(0)
            vol.upload(stream, 0, len(data), 0)
            view = memoryview(data)
            sent = 0
            while sent < len(data):
                sent += stream.send(bytes(view[sent:sent + (1 << 20)]))
            stream.finish()

        self._call(f"upload volume {pool}/{name}", upload)
        if hashlib.sha1(self.read_volume(pool, name, len(data))).digest() != \
                hashlib.sha1(data).digest():
            raise Conflict(f"volume {pool}/{name} does not hold what was uploaded")

    def read_volume(self, pool: str, name: str, length: int) -> bytes:
        def download(conn: libvirt.virConnect) -> bytes:
            vol = conn.storagePoolLookupByName(pool).storageVolLookupByName(name)
            stream = conn.newStream(0)
            vol.download(stream, 0, length, 0)
            chunks = []
            while True:
                chunk = stream.recv(1 << 20)
                if chunk in (-2, b"") or not chunk:
                    break
                chunks.append(chunk)
            stream.finish()
            return b"".join(chunks)

        return self._call(f"download volume {pool}/{name}", download)


def _stats(rec: dict[str, Any]) -> DomainStats:
    state = STATE_NAMES.get(rec.get("state.state", 0), "nostate")
    rx = tx = rd = wr = 0
    for i in range(int(rec.get("net.count", 0))):
        rx += int(rec.get(f"net.{i}.rx.bytes", 0))
        tx += int(rec.get(f"net.{i}.tx.bytes", 0))
    allocation = {}
    for i in range(int(rec.get("block.count", 0))):
        rd += int(rec.get(f"block.{i}.rd.bytes", 0))
        wr += int(rec.get(f"block.{i}.wr.bytes", 0))
        dev = rec.get(f"block.{i}.name")
        if dev:
            allocation[dev] = int(rec.get(f"block.{i}.allocation", 0))
    current = int(rec.get("balloon.current", 0)) * 1024
    usable = rec.get("balloon.usable", rec.get("balloon.available"))
    return DomainStats(
        state=state,
        cpu_time_ns=int(rec.get("cpu.time", 0)),
        vcpus=int(rec.get("vcpu.current", 0)),
        memory_bytes=current,
        memory_available_bytes=int(usable) * 1024 if usable is not None else current,
        block_read_bytes=rd, block_write_bytes=wr, net_rx_bytes=rx, net_tx_bytes=tx,
        disk_allocation=allocation,
    )


def owned_guest_id(domain_xml: str) -> str | None:
    """Our guest id from a domain's XML metadata, None when it carries no mark."""
    root = ET.fromstring(domain_xml)
    mark = root.find(f"metadata/{{{NAMESPACE}}}guest")
    return mark.get("id") if mark is not None else None
