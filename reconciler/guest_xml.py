"""Guest domains as libvirt XML: render a `DomainSpec`, parse what libvirt returns, diff.

The guest planner builds a `DomainSpec` from the stored guest and its template, defines
`render_domain_xml(spec)` on the cell, and on every reconcile compares the spec with
`parse_domain_xml(dom.XMLDesc(VIR_DOMAIN_XML_SECURE))` through `diff_domain`: the changes
it returns, each marked live-capable or restart-needed, become the plan's actions and the
RestartRequired condition. The drivers call the small `render_*_xml` helpers for live
device updates (media insert/eject, a new monitor secret, metadata).

Pure (STYLE.md "Rendering and parsing are pure and round-trip"): no I/O, no libvirt
import, `xml.etree` only. `diff_domain(spec, parse_domain_xml(render_domain_xml(spec)))`
is empty, and stays empty after libvirt has defined the XML and returned its own version
(addresses, aliases, implicit controllers, defaults): tests/unit/test_guest_xml.py and
tests/drivers/test_guest_xml_libvirt.py prove both, or the loop would never converge.

Device identity survives libvirt's rewriting through persistent user aliases
(`ua-nano-disk0`, `ua-nano-media`, ...); XML order is the fallback for domains defined
without them.
"""

from __future__ import annotations

import ipaddress
import random
import re
import secrets
import string
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Protocol

from reconciler.naming import names

NANO_NS = "https://nano.cloud/xmlns/guest/1"
"""Namespace of our `<metadata>` mark (the same URI as `reconciler.drivers.libvirt_hv`)."""
NANO_PREFIX = "nano"
"""The XML prefix of our `<metadata>` element (not the names prefix of reconciler/naming.py)."""
MAC_OUI = "00:16:3e"
SECRET_LENGTH = 8
CPU_SHARES = {"high": 2000, "medium": 1000, "low": 500}
"""API `cpu_priority` -> `<cputune><shares>` (COMPATIBILITY.md, QoS defaults)."""

# Persistent user aliases (libvirt >= 3.9 keeps `ua-` aliases in the inactive definition).
_DISK_ALIAS = "ua-nano-disk"
_NIC_ALIAS = "ua-nano-nic"
MEDIA_ALIAS = "ua-nano-media"
SEED_ALIAS = "ua-nano-seed"
# Uniquely generated ids for guests whose id is not itself a UUID.
_UUID_NAMESPACE = uuid.UUID("0b1a6e7c-3c55-4d0e-9a8c-6e616e6f2d67")
_IDE_SLOTS = 4  # two IDE buses, master and slave


class VirtType(StrEnum):
    KVM = "kvm"
    QEMU = "qemu"  # TCG: CI and hosts without /dev/kvm
    TEST = "test"  # libvirt's test driver (simulated cells)


class OsType(StrEnum):
    LINUX = "linux"
    WINDOWS = "windows"


class DiskBus(StrEnum):
    SCSI = "scsi"
    SATA = "sata"
    IDE = "ide"


class NicModel(StrEnum):
    VIRTIO = "virtio"
    E1000 = "e1000"
    RTL8139 = "rtl8139"


class Display(StrEnum):
    VGA = "vga"
    CIRRUS = "cirrus"
    QXL = "qxl"
    VIRTIO = "virtio"
    NONE = "none"


class Control(StrEnum):
    VNC = "vnc"
    SPICE = "spice"


class UsbModel(StrEnum):
    DEFAULT = ""  # no controller in our XML: libvirt adds its default (piix3-uhci on pc)
    NEC_XHCI = "nec-xhci"


class Tablet(StrEnum):
    NONE = ""
    USB = "usb"
    VIRTIO = "virtio"


class Boot(StrEnum):
    HD = "hd"
    CDROM = "cdrom"
    NETWORK = "network"


_BOOT_ORDER: dict[Boot, tuple[str, ...]] = {
    Boot.HD: ("hd",),
    Boot.CDROM: ("cdrom", "hd"),
    Boot.NETWORK: ("network", "hd"),
}


# -- the desired domain ------------------------------------------------------------------


@dataclass(frozen=True)
class IoTune:
    """Per-disk limits (API QoS); 0 is unlimited and is not rendered."""

    read_bytes_sec: int = 0
    write_bytes_sec: int = 0
    read_iops_sec: int = 0
    write_iops_sec: int = 0

    def limits(self) -> dict[str, int]:
        """The non-zero limits, keyed by libvirt's `<iotune>` element names."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}


@dataclass(frozen=True, kw_only=True)
class DiskSpec:
    """One qcow2 disk; `index` 0 is the system disk, 1.. the data disks, in order.

    With `pool` and `volume` the disk is rendered as `<disk type='volume'>` (libvirt
    resolves the path on the cell); otherwise `path` is a file path. `size` (bytes) is
    the volume's business, not the domain's: it is carried for the planner, not rendered.
    `bus` None means the template's `DomainSpec.disk_bus`.
    """

    index: int
    path: str = ""
    pool: str = ""
    volume: str = ""
    size: int = 0
    bus: DiskBus | None = None

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ValueError(f"disk index must be >= 0, not {self.index}")
        if not ((self.pool and self.volume) or self.path):
            raise ValueError(f"disk {self.index}: give pool and volume, or a path")
        if self.bus is not None:
            object.__setattr__(self, "bus", DiskBus(self.bus))

    @property
    def source(self) -> str:
        """`pool/volume` or the path: how changes name the source."""
        return f"{self.pool}/{self.volume}" if self.pool and self.volume else self.path


@dataclass(frozen=True, kw_only=True)
class InterfaceSpec:
    """One NIC on a libvirt network (`network`) or a host bridge (`bridge`), exactly one.

    Bandwidth is libvirt's unit, KiB/s (`kib_per_sec` converts the API's bytes/s);
    inbound is what the guest receives, outbound what it sends; 0 is unlimited.
    `model` None means the template's `DomainSpec.nic_model`.
    """

    mac: str
    network: str | None = None
    bridge: str | None = None
    model: NicModel | None = None
    inbound_kib: int = 0
    outbound_kib: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mac", normalize_mac(self.mac))
        if bool(self.network) == bool(self.bridge):
            raise ValueError(f"interface {self.mac}: give exactly one of network, bridge")
        if self.model is not None:
            object.__setattr__(self, "model", NicModel(self.model))
        if self.inbound_kib < 0 or self.outbound_kib < 0:
            raise ValueError(f"interface {self.mac}: bandwidth must be >= 0")


@dataclass(frozen=True, kw_only=True)
class DomainSpec:
    """Everything the domain XML is rendered from: guest + template + QoS + placement.

    Template values are validated into their enums, so plain strings from the store are
    fine. `max_vcpus`/`max_memory_bytes` 0 mean "same as current"; the current values can
    change live up to them. `name` and `uuid` default to `domain_name(guest_id)` and
    `domain_uuid(guest_id)`: keep the defaults, or a redefine becomes a second domain.
    `cdrom` is the inserted media ISO (the drive is always present, empty when None);
    `seed_iso` the cloud-init seed (no drive when None). `boot` orders the boot devices of
    the next start. `generation` is the stored spec generation this XML was rendered from.
    """

    guest_id: str
    title: str
    vcpus: int
    memory_bytes: int
    max_vcpus: int = 0
    max_memory_bytes: int = 0
    name: str = ""
    uuid: str = ""
    virt_type: VirtType = VirtType.KVM
    os_type: OsType = OsType.LINUX
    disk_bus: DiskBus = DiskBus.SCSI
    nic_model: NicModel = NicModel.VIRTIO
    display: Display = Display.VGA
    control: Control = Control.VNC
    usb: UsbModel = UsbModel.DEFAULT
    tablet: Tablet = Tablet.USB
    disks: tuple[DiskSpec, ...] = ()
    cdrom: str | None = None
    seed_iso: str | None = None
    interfaces: tuple[InterfaceSpec, ...] = ()
    vnc_listen: str = "127.0.0.1"
    monitor_secret: str = ""
    cpu_shares: int = CPU_SHARES["medium"]
    iotune: IoTune = field(default_factory=IoTune)
    boot: Boot = Boot.HD
    generation: int = 0

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        if not self.guest_id:
            raise ValueError("guest_id is required")
        put("name", self.name or domain_name(self.guest_id))
        put("uuid", str(uuid.UUID(self.uuid)) if self.uuid else domain_uuid(self.guest_id))
        for name, enum in (
            ("virt_type", VirtType),
            ("os_type", OsType),
            ("disk_bus", DiskBus),
            ("nic_model", NicModel),
            ("display", Display),
            ("control", Control),
            ("usb", UsbModel),
            ("tablet", Tablet),
            ("boot", Boot),
        ):
            put(name, enum(getattr(self, name)))
        put("disks", tuple(self.disks))
        put("interfaces", tuple(self.interfaces))
        put("max_vcpus", self.max_vcpus or self.vcpus)
        put("max_memory_bytes", self.max_memory_bytes or self.memory_bytes)
        if not 1 <= self.vcpus <= self.max_vcpus:
            raise ValueError(f"vcpus must be within 1..max_vcpus ({self.max_vcpus})")
        if not 1024 <= self.memory_bytes <= self.max_memory_bytes:
            raise ValueError("memory_bytes must be within 1 KiB..max_memory_bytes")
        if [d.index for d in self.disks] != list(range(len(self.disks))):
            raise ValueError("disks must be indexed 0, 1, 2, ... in order")
        if self.cpu_shares < 0:
            raise ValueError("cpu_shares must be >= 0")
        macs = [nic.mac for nic in self.interfaces]
        if len(set(macs)) != len(macs):
            raise ValueError("interface MACs must be distinct")
        if self.vnc_listen:
            ipaddress.ip_address(self.vnc_listen)  # an address, not a name: ValueError
        # target names must exist for every drive (IDE has four slots)
        _cdrom_targets(self)

    def disk_bus_of(self, disk: DiskSpec) -> DiskBus:
        return disk.bus or self.disk_bus

    def nic_model_of(self, nic: InterfaceSpec) -> NicModel:
        return nic.model or self.nic_model

    @property
    def cdrom_bus(self) -> DiskBus:
        """Cdroms sit on SATA, or on IDE for IDE templates (virtio-scsi cdroms would need
        guest drivers the templates do not assume)."""
        return DiskBus.IDE if self.disk_bus == DiskBus.IDE else DiskBus.SATA

    @property
    def boot_order(self) -> tuple[str, ...]:
        return _BOOT_ORDER[self.boot]


def domain_name(guest_id: str) -> str:
    """The libvirt domain name of a guest, `nano-<guest id>` for names prefix `nano`:
    deterministic, so a lost create is found."""
    return names().domain(guest_id)


def serial_log_path(guest_id: str) -> str:
    """Where virtlogd writes what a guest prints on its serial console (on its cell)."""
    return f"/var/log/libvirt/qemu/{domain_name(guest_id)}-serial.log"


def domain_uuid(guest_id: str) -> str:
    """The libvirt UUID of a guest: its id when that is a UUID, else derived from it.

    Fixed, because libvirt refuses to redefine a name under a new UUID and generates a
    random one for XML that has none."""
    try:
        return str(uuid.UUID(guest_id))
    except ValueError:
        return str(uuid.uuid5(_UUID_NAMESPACE, guest_id))


DISK_SERIAL = "nano-disk"
"""Disk N carries serial `nano-diskN`: the guest's udev names it /dev/disk/by-id/...,
a name that holds whatever order the guest's kernel found the disks in."""


def disk_serial(index: int) -> str:
    return f"{DISK_SERIAL}{index}"


def guest_disk_path(bus: DiskBus | str, index: int) -> str:
    """Where a Linux guest finds disk `index`: the /dev/disk/by-id link udev makes from
    its serial (`scsi-0QEMU_QEMU_HARDDISK_<serial>` on virtio-scsi, `ata-QEMU_HARDDISK_
    <serial>` on SATA and IDE). The sdX names follow the order the kernel probed the disks
    in, not the domain's targets: a Debian guest on virtio-scsi came up with its data disk
    as sda and its system disk as sdb."""
    serial = disk_serial(index)
    if DiskBus(bus) == DiskBus.SCSI:
        return f"/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_{serial}"
    return f"/dev/disk/by-id/ata-QEMU_HARDDISK_{serial}"


def disk_target(bus: DiskBus | str, index: int) -> str:
    """Target dev by bus and slot: sda.. for SCSI/SATA, hda.. for IDE (never vd*: the
    templates do not use virtio-blk)."""
    prefix = "hd" if DiskBus(bus) == DiskBus.IDE else "sd"
    letters = ""
    n = index
    while True:  # a..z, aa..az, ... like libvirt's virDiskNameToIndex
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
        if n < 0:
            return prefix + letters


def kib_per_sec(bytes_per_sec: int) -> int:
    """API bytes/s -> libvirt KiB/s, rounded up so a small limit never becomes 0
    (unlimited)."""
    if bytes_per_sec < 0:
        raise ValueError("a speed limit cannot be negative")
    return -(-bytes_per_sec // 1024)


def _cdrom_targets(spec: DomainSpec) -> tuple[str, str | None]:
    """(media target, seed target or None): the slots after the disks on the cdrom bus.

    SCSI disks and SATA cdroms share the `sd` names, so cdroms never reuse a disk's name.
    """
    first = len(spec.disks)
    slots = 2 if spec.seed_iso else 1
    if spec.cdrom_bus == DiskBus.IDE and first + slots > _IDE_SLOTS:
        raise ValueError(
            f"IDE has {_IDE_SLOTS} slots: {len(spec.disks)} disks and {slots} cdrom drives "
            "do not fit"
        )
    media = disk_target(spec.cdrom_bus, first)
    seed = disk_target(spec.cdrom_bus, first + 1) if spec.seed_iso else None
    return media, seed


# -- rendering ---------------------------------------------------------------------------


def render_domain_xml(spec: DomainSpec) -> str:
    """The complete persistent definition of `spec` for `virDomainDefineXML`."""
    dom = ET.Element("domain", type=str(spec.virt_type))
    ET.SubElement(dom, "name").text = spec.name
    ET.SubElement(dom, "uuid").text = spec.uuid
    if spec.title:
        ET.SubElement(dom, "title").text = spec.title
    ET.SubElement(dom, "metadata").append(_metadata_element(spec, qualified=True))
    ET.SubElement(dom, "memory", unit="KiB").text = str(spec.max_memory_bytes // 1024)
    ET.SubElement(dom, "currentMemory", unit="KiB").text = str(spec.memory_bytes // 1024)
    vcpu = ET.SubElement(dom, "vcpu", placement="static")
    if spec.vcpus != spec.max_vcpus:
        vcpu.set("current", str(spec.vcpus))
    vcpu.text = str(spec.max_vcpus)
    ET.SubElement(ET.SubElement(dom, "cputune"), "shares").text = str(spec.cpu_shares)

    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type").text = "hvm"
    for dev in spec.boot_order:
        ET.SubElement(os_el, "boot", dev=dev)

    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    windows = spec.os_type == OsType.WINDOWS
    if windows and spec.virt_type == VirtType.KVM:
        # Hyper-V enlightenments are a KVM feature; TCG rejects some of them
        hyperv = ET.SubElement(features, "hyperv")
        ET.SubElement(hyperv, "relaxed", state="on")
        ET.SubElement(hyperv, "vapic", state="on")
        ET.SubElement(hyperv, "spinlocks", state="on", retries="8191")
    if spec.virt_type == VirtType.KVM:
        # qemu64 lacks what current guests (Windows 8.1+, RHEL 9) require
        ET.SubElement(dom, "cpu", mode="host-passthrough", check="none")

    clock = ET.SubElement(dom, "clock", offset="localtime" if windows else "utc")
    ET.SubElement(clock, "timer", name="rtc", tickpolicy="catchup")
    ET.SubElement(clock, "timer", name="pit", tickpolicy="delay")
    ET.SubElement(clock, "timer", name="hpet", present="no")
    if windows and spec.virt_type == VirtType.KVM:
        ET.SubElement(clock, "timer", name="hypervclock", present="yes")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"

    devices = ET.SubElement(dom, "devices")
    for disk in spec.disks:
        devices.append(_disk_element(spec, disk))
    devices.append(_cdrom_element(spec, "media"))
    if spec.seed_iso:
        devices.append(_cdrom_element(spec, "seed"))
    if any(spec.disk_bus_of(d) == DiskBus.SCSI for d in spec.disks):
        ET.SubElement(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    if spec.usb != UsbModel.DEFAULT:
        ET.SubElement(devices, "controller", type="usb", index="0", model=str(spec.usb))
    for i, nic in enumerate(spec.interfaces):
        devices.append(_interface_element(spec, i, nic))
    serial = ET.SubElement(devices, "serial", type="pty")
    if spec.virt_type != VirtType.TEST:
        # virtlogd keeps what the guest prints, per start: the status tells a guest that
        # never printed a byte (nor answered its agent) from one that booted
        ET.SubElement(serial, "log", file=serial_log_path(spec.guest_id), append="off")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    if spec.tablet != Tablet.NONE:
        ET.SubElement(devices, "input", type="tablet", bus=str(spec.tablet))
    devices.append(_graphics_element(spec))
    video = ET.SubElement(devices, "video")
    ET.SubElement(video, "model", type=str(spec.display))
    ET.SubElement(devices, "memballoon", model="virtio")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def render_cdrom_xml(spec: DomainSpec, role: str = "media") -> str:
    """One cdrom drive (`role` "media" or "seed") as `virDomainUpdateDeviceFlags` wants
    it: insert or eject media on a running guest by updating the same target."""
    if role == "seed" and not spec.seed_iso:
        raise ValueError("the spec has no seed ISO drive")
    return ET.tostring(_cdrom_element(spec, role), encoding="unicode")


def render_graphics_xml(spec: DomainSpec) -> str:
    """The `<graphics>` device for `virDomainUpdateDeviceFlags` (a new monitor secret is
    applied live this way)."""
    return ET.tostring(_graphics_element(spec), encoding="unicode")


def render_metadata_xml(spec: DomainSpec) -> str:
    """Our mark as `virDomainSetMetadata(VIR_DOMAIN_METADATA_ELEMENT, xml, "nano",
    NANO_NS)` wants it: the element without a namespace (libvirt adds NANO_NS)."""
    return ET.tostring(_metadata_element(spec, qualified=False), encoding="unicode")


def _metadata_element(spec: DomainSpec, *, qualified: bool) -> ET.Element:
    attrs = {"id": spec.guest_id, "generation": str(spec.generation), "name": spec.title}
    if not qualified:
        return ET.Element("guest", attrs)
    # A literal prefix + xmlns attribute, like the drivers' mark: no global registration
    return ET.Element(f"{NANO_PREFIX}:guest", {f"xmlns:{NANO_PREFIX}": NANO_NS, **attrs})


def _disk_element(spec: DomainSpec, disk: DiskSpec) -> ET.Element:
    bus = spec.disk_bus_of(disk)
    volume = bool(disk.pool and disk.volume)
    el = ET.Element("disk", type="volume" if volume else "file", device="disk")
    ET.SubElement(el, "driver", name="qemu", type="qcow2", discard="unmap")
    if volume:
        ET.SubElement(el, "source", pool=disk.pool, volume=disk.volume)
    else:
        ET.SubElement(el, "source", file=disk.path)
    ET.SubElement(el, "target", dev=disk_target(bus, disk.index), bus=str(bus))
    ET.SubElement(el, "serial").text = disk_serial(disk.index)
    limits = spec.iotune.limits()
    if limits:
        iotune = ET.SubElement(el, "iotune")
        for name, value in limits.items():
            ET.SubElement(iotune, name).text = str(value)
    ET.SubElement(el, "alias", name=f"{_DISK_ALIAS}{disk.index}")
    return el


def _cdrom_element(spec: DomainSpec, role: str) -> ET.Element:
    media_target, seed_target = _cdrom_targets(spec)
    target: str | None
    if role == "media":
        target, source, alias = media_target, spec.cdrom, MEDIA_ALIAS
    elif role == "seed":
        target, source, alias = seed_target, spec.seed_iso, SEED_ALIAS
    else:
        raise ValueError(f"cdrom role is media or seed, not {role!r}")
    el = ET.Element("disk", type="file", device="cdrom")
    ET.SubElement(el, "driver", name="qemu", type="raw")
    if source:
        ET.SubElement(el, "source", file=source)
    ET.SubElement(el, "target", dev=str(target), bus=str(spec.cdrom_bus))
    ET.SubElement(el, "readonly")
    ET.SubElement(el, "alias", name=alias)
    return el


def _interface_element(spec: DomainSpec, index: int, nic: InterfaceSpec) -> ET.Element:
    kind = "network" if nic.network else "bridge"
    el = ET.Element("interface", type=kind)
    ET.SubElement(el, "mac", address=nic.mac)
    ET.SubElement(el, "source", {kind: str(nic.network or nic.bridge)})
    ET.SubElement(el, "model", type=str(spec.nic_model_of(nic)))
    if nic.inbound_kib or nic.outbound_kib:
        bandwidth = ET.SubElement(el, "bandwidth")
        if nic.inbound_kib:
            ET.SubElement(bandwidth, "inbound", average=str(nic.inbound_kib))
        if nic.outbound_kib:
            ET.SubElement(bandwidth, "outbound", average=str(nic.outbound_kib))
    ET.SubElement(el, "alias", name=f"{_NIC_ALIAS}{index}")
    return el


def _graphics_element(spec: DomainSpec) -> ET.Element:
    el = ET.Element("graphics", type=str(spec.control), autoport="yes")
    if spec.vnc_listen:
        el.set("listen", spec.vnc_listen)
    if spec.monitor_secret:
        el.set("passwd", spec.monitor_secret)
    if spec.vnc_listen:
        ET.SubElement(el, "listen", type="address", address=spec.vnc_listen)
    return el


# -- parsing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ObservedDisk:
    """A `device='disk'` as libvirt reports it. `index` comes from our alias, else from
    XML order; `pool`/`volume` for `type='volume'`, `path` for file/block sources."""

    index: int
    target: str
    bus: str
    pool: str | None
    volume: str | None
    path: str | None
    iotune: IoTune
    alias: str | None = None

    @property
    def source(self) -> str | None:
        return f"{self.pool}/{self.volume}" if self.pool and self.volume else self.path


@dataclass(frozen=True)
class ObservedCdrom:
    target: str
    bus: str
    source: str | None  # the inserted ISO's path; None when the drive is empty
    alias: str | None = None


@dataclass(frozen=True)
class ObservedInterface:
    index: int
    mac: str
    network: str | None
    bridge: str | None
    model: str
    inbound_kib: int
    outbound_kib: int
    target: str | None = None  # the host tap device while running
    alias: str | None = None


@dataclass(frozen=True)
class ObservedDomainSpec:
    """Every field of a domain the planner compares, as parsed from libvirt's XML.

    `guest_id` is None for a domain without our mark; `generation` None when the mark has
    none. Memory is in bytes (libvirt's KiB * 1024). `os_type` is inferred from the clock
    (Windows keeps local time). `monitor_secret` is the graphics password, present only
    when the XML was read with VIR_DOMAIN_XML_SECURE. `domain_id` and `graphics_port` are
    set while the domain runs.
    """

    name: str
    uuid: str
    guest_id: str | None
    generation: int | None
    title: str
    virt_type: str
    os_type: str
    vcpus: int
    max_vcpus: int
    memory_bytes: int
    max_memory_bytes: int
    cpu_shares: int
    disks: tuple[ObservedDisk, ...]
    media: ObservedCdrom | None
    seed: ObservedCdrom | None
    scsi_controller: str | None
    interfaces: tuple[ObservedInterface, ...]
    control: str
    graphics_listen: str
    graphics_port: int | None
    monitor_secret: str | None
    display: str
    usb: str
    tablet: str
    boot_order: tuple[str, ...]
    domain_id: int | None = None

    @property
    def active(self) -> bool:
        """True when parsed from a running domain's live XML."""
        return self.domain_id is not None


def parse_domain_xml(xml: str) -> ObservedDomainSpec:
    """Parse our rendered XML or libvirt's `XMLDesc` (live or inactive) of a domain.

    Raises ValueError for XML that is not a domain."""
    try:
        dom = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ValueError(f"not XML: {exc}") from exc
    if dom.tag != "domain":
        raise ValueError(f"not a domain: <{dom.tag}>")

    mark = dom.find(f"metadata/{{{NANO_NS}}}guest")
    guest_id = (mark.get("id") or None) if mark is not None else None
    generation = _int_or_none(mark.get("generation")) if mark is not None else None
    title = (mark.get("name") if mark is not None else None) or _text(dom, "title")

    vcpu = dom.find("vcpu")
    max_vcpus = int((vcpu.text or "1").strip()) if vcpu is not None else 1
    vcpus = int(vcpu.get("current", max_vcpus)) if vcpu is not None else max_vcpus
    max_memory = _memory_bytes(dom.find("memory"))
    current_el = dom.find("currentMemory")
    memory = _memory_bytes(current_el) if current_el is not None else max_memory
    shares = _int_or_none(_text(dom, "cputune/shares")) or 0

    clock = dom.find("clock")
    localtime = clock is not None and clock.get("offset") == "localtime"

    disks: list[ObservedDisk] = []
    cdroms: list[ObservedCdrom] = []
    for el in dom.findall("devices/disk"):
        device = el.get("device", "disk")
        if device == "cdrom":
            cdroms.append(_parse_cdrom(el))
        elif device in ("disk", "lun"):
            disks.append(_parse_disk(el, len(disks)))
    media, seed = _assign_cdroms(cdroms)

    scsi_controller = None
    usb = ""
    for el in dom.findall("devices/controller"):
        if el.get("type") == "scsi" and el.get("index", "0") == "0":
            scsi_controller = el.get("model") or ""
        if el.get("type") == "usb" and el.get("index", "0") == "0":
            usb = el.get("model") or ""

    interfaces = tuple(
        _parse_interface(el, i) for i, el in enumerate(dom.findall("devices/interface"))
    )

    graphics = dom.find("devices/graphics")
    control = listen = ""
    port = None
    secret = None
    if graphics is not None:
        control = graphics.get("type", "")
        listen = graphics.get("listen") or ""
        if not listen:
            child = graphics.find("listen[@type='address']")
            listen = (child.get("address") or "") if child is not None else ""
        port = _int_or_none(graphics.get("port"))
        if port is not None and port < 0:
            port = None  # autoport before start
        secret = graphics.get("passwd")

    tablet = ""
    for el in dom.findall("devices/input"):
        if el.get("type") == "tablet":
            tablet = el.get("bus") or "usb"
    video = dom.find("devices/video/model")

    return ObservedDomainSpec(
        name=_text(dom, "name"),
        uuid=_text(dom, "uuid"),
        guest_id=guest_id,
        generation=generation,
        title=title,
        virt_type=dom.get("type", ""),
        os_type=str(OsType.WINDOWS if localtime else OsType.LINUX),
        vcpus=vcpus,
        max_vcpus=max_vcpus,
        memory_bytes=memory,
        max_memory_bytes=max_memory,
        cpu_shares=shares,
        disks=tuple(sorted(disks, key=lambda d: d.index)),
        media=media,
        seed=seed,
        scsi_controller=scsi_controller,
        interfaces=tuple(sorted(interfaces, key=lambda n: n.index)),
        control=control,
        graphics_listen=listen,
        graphics_port=port,
        monitor_secret=secret,
        display=(video.get("type") or "") if video is not None else "",
        usb=usb,
        tablet=tablet,
        boot_order=tuple(b.get("dev", "") for b in dom.findall("os/boot")) or ("hd",),
        domain_id=_int_or_none(dom.get("id")),
    )


def _parse_disk(el: ET.Element, position: int) -> ObservedDisk:
    alias = _alias(el)
    index = position
    if alias and alias.startswith(_DISK_ALIAS) and alias[len(_DISK_ALIAS) :].isdigit():
        index = int(alias[len(_DISK_ALIAS) :])
    source = el.find("source")
    pool = volume = path = None
    if source is not None:
        if el.get("type") == "volume":
            pool, volume = source.get("pool"), source.get("volume")
        path = source.get("file") or source.get("dev") or source.get("name")
    target = el.find("target")
    iotune = el.find("iotune")
    limits: dict[str, int] = {}
    if iotune is not None:
        for f in fields(IoTune):
            value = _int_or_none(_text(iotune, f.name))
            if value:
                limits[f.name] = value
    return ObservedDisk(
        index=index,
        target=(target.get("dev") or "") if target is not None else "",
        bus=(target.get("bus") or "") if target is not None else "",
        pool=pool,
        volume=volume,
        path=path,
        iotune=IoTune(**limits),
        alias=alias,
    )


def _parse_cdrom(el: ET.Element) -> ObservedCdrom:
    source = el.find("source")
    path = None
    if source is not None:
        path = source.get("file") or source.get("dev") or None
        if el.get("type") == "volume" and source.get("pool") and source.get("volume"):
            path = path or f"{source.get('pool')}/{source.get('volume')}"
    target = el.find("target")
    return ObservedCdrom(
        target=(target.get("dev") or "") if target is not None else "",
        bus=(target.get("bus") or "") if target is not None else "",
        source=path,
        alias=_alias(el),
    )


def _assign_cdroms(
    cdroms: list[ObservedCdrom],
) -> tuple[ObservedCdrom | None, ObservedCdrom | None]:
    """Media and seed drives by alias; without aliases the first drive is the media
    drive and the second the seed drive (the order we render them in)."""
    media = next((c for c in cdroms if c.alias == MEDIA_ALIAS), None)
    seed = next((c for c in cdroms if c.alias == SEED_ALIAS), None)
    rest = [c for c in cdroms if c.alias not in (MEDIA_ALIAS, SEED_ALIAS)]
    if media is None and rest:
        media = rest.pop(0)
    if seed is None and rest:
        seed = rest.pop(0)
    return media, seed


def _parse_interface(el: ET.Element, position: int) -> ObservedInterface:
    alias = _alias(el)
    index = position
    if alias and alias.startswith(_NIC_ALIAS) and alias[len(_NIC_ALIAS) :].isdigit():
        index = int(alias[len(_NIC_ALIAS) :])
    source = el.find("source")
    kind = el.get("type")
    mac = el.find("mac")
    model = el.find("model")
    target = el.find("target")
    # a running type='network' NIC's <source> also names the network's bridge: not ours
    return ObservedInterface(
        index=index,
        mac=((mac.get("address") or "") if mac is not None else "").lower(),
        network=source.get("network") if source is not None and kind == "network" else None,
        bridge=source.get("bridge") if source is not None and kind == "bridge" else None,
        model=(model.get("type") or "") if model is not None else "",
        inbound_kib=_int_or_none(_attr(el, "bandwidth/inbound", "average")) or 0,
        outbound_kib=_int_or_none(_attr(el, "bandwidth/outbound", "average")) or 0,
        target=target.get("dev") if target is not None else None,
        alias=alias,
    )


def _alias(el: ET.Element) -> str | None:
    alias = el.find("alias")
    return alias.get("name") if alias is not None else None


def _text(el: ET.Element, path: str) -> str:
    found = el.find(path)
    return (found.text or "").strip() if found is not None else ""


def _attr(el: ET.Element, path: str, name: str) -> str | None:
    found = el.find(path)
    return found.get(name) if found is not None else None


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text not in (None, "") else None
    except ValueError:
        return None


def _memory_bytes(el: ET.Element | None) -> int:
    """A libvirt scaled integer (`unit` as virScaleInteger reads it) in bytes."""
    if el is None:
        return 0
    value = int((el.text or "0").strip())
    unit = (el.get("unit") or "KiB").lower()
    if unit in ("b", "bytes"):
        return value
    if unit[0] not in "kmgtpe" or unit[1:] not in ("", "ib", "b"):
        raise ValueError(f"unknown memory unit {el.get('unit')!r}")
    base = 1000 if unit[1:] == "b" else 1024
    return value * base ** ("kmgtpe".index(unit[0]) + 1)


# -- diffing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One difference between desired and observed.

    `live`: applicable to the running domain without a restart (besides the redefined
    persistent XML, which always receives every change); False means it takes effect at
    the next cold start: while the guest runs, the guest shows RestartRequired.
    `device` names the device concerned: a disk/cdrom target dev or a MAC.
    """

    field: str
    before: object
    after: object
    live: bool
    device: str | None = None


def restart_required(changes: Iterable[Change]) -> bool:
    return any(not c.live for c in changes)


class _Change(Protocol):
    """The shape of `diff_domain`'s recording callback."""

    def __call__(
        self, name: str, before: object, after: object, live: bool, device: str | None = None
    ) -> None: ...


def diff_domain(desired: DomainSpec, observed: ObservedDomainSpec) -> list[Change]:
    """What differs between `desired` and the domain libvirt reports, in a fixed order.

    Live-capable: current vCPUs (within the running maximum), current memory (within the
    maximum), CPU shares, disk iotune, NIC bandwidth, cdrom media and seed ISO, monitor
    secret, title and generation (metadata). Everything else needs a restart: maximum
    vCPUs/memory, virt and OS type, buses, models, display, control, USB, tablet, boot
    order, disks and NICs added, removed or re-sourced. Empty when converged. Assumes the
    domain is this guest's (matched by name and mark); `uuid` differs only for a domain
    that must be replaced (libvirt keeps a name's UUID).

    Converge on the persistent definition, `XMLDesc(SECURE | INACTIVE)`: live changes are
    applied with LIVE | CONFIG, so it records them too. A diff of the live XML finds live
    drift, except in current memory, which live XML reports as the balloon's actual size
    (the guest's driver decides it; without one it stays at the maximum): skipped there.
    """
    out: list[Change] = []

    def change(
        name: str, before: object, after: object, live: bool, device: str | None = None
    ) -> None:
        if before != after:
            out.append(Change(name, before, after, live, device))

    change("uuid", observed.uuid, desired.uuid, False)
    change("title", observed.title, desired.title, True)
    change("generation", observed.generation, desired.generation, True)
    change("virt_type", observed.virt_type, str(desired.virt_type), False)
    change("os_type", observed.os_type, str(desired.os_type), False)
    change("max_vcpus", observed.max_vcpus, desired.max_vcpus, False)
    change("vcpus", observed.vcpus, desired.vcpus, desired.vcpus <= observed.max_vcpus)
    # compared in KiB: libvirt's unit
    want_max_kib, want_kib = desired.max_memory_bytes // 1024, desired.memory_bytes // 1024
    change("max_memory_bytes", observed.max_memory_bytes // 1024 * 1024, want_max_kib * 1024, False)
    if not observed.active:
        change(
            "memory_bytes",
            observed.memory_bytes // 1024 * 1024,
            want_kib * 1024,
            want_kib * 1024 <= observed.max_memory_bytes,
        )
    change("cpu_shares", observed.cpu_shares, desired.cpu_shares, True)

    _diff_disks(desired, observed, change)
    if any(desired.disk_bus_of(d) == DiskBus.SCSI for d in desired.disks):
        change("scsi_controller", observed.scsi_controller, "virtio-scsi", False)
    _diff_cdroms(desired, observed, change)
    _diff_interfaces(desired, observed, change)

    change("control", observed.control, str(desired.control), False)
    change("graphics_listen", observed.graphics_listen, desired.vnc_listen, False)
    change("monitor_secret", observed.monitor_secret or "", desired.monitor_secret, True)
    change("display", observed.display, str(desired.display), False)
    want_usb = str(desired.usb)
    have_usb = observed.usb if observed.usb == str(UsbModel.NEC_XHCI) else ""
    change("usb", have_usb, want_usb, False)
    change("tablet", observed.tablet, str(desired.tablet), False)
    change("boot_order", observed.boot_order, desired.boot_order, False)
    return out


def _diff_disks(desired: DomainSpec, observed: ObservedDomainSpec, change: _Change) -> None:
    have = {d.index: d for d in observed.disks}
    for disk in desired.disks:
        bus = desired.disk_bus_of(disk)
        target = disk_target(bus, disk.index)
        name = f"disks[{disk.index}]"
        found = have.pop(disk.index, None)
        if found is None:
            change(
                name,
                None,
                {"target": target, "bus": str(bus), "source": disk.source},
                False,
                target,
            )
            continue
        change(f"{name}.target", found.target, target, False, found.target)
        change(f"{name}.bus", found.bus, str(bus), False, found.target)
        if not _same_source(disk, found):
            change(f"{name}.source", found.source, disk.source, False, found.target)
        change(f"{name}.iotune", found.iotune, desired.iotune, True, found.target)
    for index, extra in sorted(have.items()):
        change(
            f"disks[{index}]",
            {"target": extra.target, "bus": extra.bus, "source": extra.source},
            None,
            False,
            extra.target,
        )


def _same_source(disk: DiskSpec, found: ObservedDisk) -> bool:
    """Volume for volume by pool and name; otherwise by path. libvirt may report a
    volume disk as a plain file (adopted or older domains): then the file's name must be
    the volume's and the path, when the spec knows it, the same."""
    if found.pool and found.volume:
        return (found.pool, found.volume) == (disk.pool, disk.volume)
    if disk.pool and disk.volume:
        if not found.path or found.path.rsplit("/", 1)[-1] != disk.volume:
            return False
        return not disk.path.startswith("/") or disk.path == found.path
    return disk.path == found.path


def _diff_cdroms(desired: DomainSpec, observed: ObservedDomainSpec, change: _Change) -> None:
    media_target, seed_target = _cdrom_targets(desired)
    bus = str(desired.cdrom_bus)
    drives = (
        ("media", observed.media, media_target, desired.cdrom),
        ("seed", observed.seed, seed_target, desired.seed_iso),
    )
    for role, have, target, source in drives:
        want_drive = None if target is None else {"target": target, "bus": bus}
        have_drive = None if have is None else {"target": have.target, "bus": have.bus}
        if have_drive != want_drive:
            # cdrom drives cannot be hot-plugged on SATA/IDE
            device = target or (have.target if have is not None else None)
            change(f"{role}_drive", have_drive, want_drive, False, device)
            continue
        if have is not None:
            change(role, have.source, source, True, have.target)


def _diff_interfaces(desired: DomainSpec, observed: ObservedDomainSpec, change: _Change) -> None:
    have = {n.index: n for n in observed.interfaces}
    for i, nic in enumerate(desired.interfaces):
        name = f"interfaces[{i}]"
        model = str(desired.nic_model_of(nic))
        found = have.pop(i, None)
        if found is None:
            change(
                name,
                None,
                {"mac": nic.mac, "network": nic.network, "bridge": nic.bridge, "model": model},
                False,
                nic.mac,
            )
            continue
        change(f"{name}.mac", found.mac, nic.mac, False, found.mac)
        change(
            f"{name}.source",
            (found.network, found.bridge),
            (nic.network, nic.bridge),
            False,
            found.mac,
        )
        change(f"{name}.model", found.model, model, False, found.mac)
        change(
            f"{name}.bandwidth",
            (found.inbound_kib, found.outbound_kib),
            (nic.inbound_kib, nic.outbound_kib),
            True,
            found.mac,
        )
    for index, extra in sorted(have.items()):
        change(
            f"interfaces[{index}]",
            {
                "mac": extra.mac,
                "network": extra.network,
                "bridge": extra.bridge,
                "model": extra.model,
            },
            None,
            False,
            extra.mac,
        )


# -- identities and secrets --------------------------------------------------------------

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def normalize_mac(mac: str) -> str:
    """Lower-case colon form; ValueError unless it is a unicast MAC."""
    text = mac.strip().lower().replace("-", ":")
    if not _MAC_RE.match(text):
        raise ValueError(f"not a MAC address: {mac!r}")
    if int(text[:2], 16) & 1:
        raise ValueError(f"a multicast MAC cannot be a NIC's: {mac!r}")
    return text


def generate_mac(rng: random.Random | None = None) -> str:
    """A MAC in 00:16:3e:xx:xx:xx (the Xen/KVM OUI Nano uses). `rng` for tests;
    default: the system's CSPRNG."""
    source = rng or random.SystemRandom()
    tail = ":".join(f"{source.randrange(256):02x}" for _ in range(3))
    return f"{MAC_OUI}:{tail}"


def ensure_mac(
    mac: str | None, *, taken: Collection[str] = (), rng: random.Random | None = None
) -> str:
    """The given MAC normalized, or a new generated one not in `taken`.

    A given MAC already in `taken` is a ValueError (the API reports a conflict)."""
    used = {normalize_mac(m) for m in taken}
    if mac:
        wanted = normalize_mac(mac)
        if wanted in used:
            raise ValueError(f"MAC {wanted} is in use")
        return wanted
    for _ in range(1000):
        candidate = generate_mac(rng)
        if candidate not in used:
            return candidate
    raise ValueError("no free MAC after 1000 tries")


def generate_secret(length: int = SECRET_LENGTH) -> str:
    """A monitor (VNC) secret: letters and digits from the `secrets` module. VNC uses the
    first 8 characters only, hence the default length."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def cpu_shares(priority: str) -> int:
    """API `cpu_priority` (high|medium|low) -> shares."""
    try:
        return CPU_SHARES[priority]
    except KeyError:
        raise ValueError(f"cpu_priority is high, medium or low, not {priority!r}") from None
