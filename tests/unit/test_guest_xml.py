"""Pure tests of reconciler/guest_xml.py: rendering per template, parse(render(spec))
round trips, parsing libvirt's own (live) XML, diff classification, MACs and secrets.

The key property (ARCHITECTURE.md §5): every field the planner compares survives
render -> parse, so `diff_domain` of a freshly rendered spec is empty and the loop
converges. tests/drivers/test_guest_xml_libvirt.py proves the same through real libvirt.
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
import xml.etree.ElementTree as ET

import pytest

from reconciler.guest_xml import (
    CPU_SHARES,
    MEDIA_ALIAS,
    NANO_NS,
    SEED_ALIAS,
    Change,
    DiskSpec,
    DomainSpec,
    InterfaceSpec,
    IoTune,
    NicModel,
    VirtType,
    cpu_shares,
    diff_domain,
    disk_target,
    domain_name,
    domain_uuid,
    ensure_mac,
    generate_mac,
    generate_secret,
    kib_per_sec,
    parse_domain_xml,
    render_cdrom_xml,
    render_domain_xml,
    render_graphics_xml,
    render_metadata_xml,
    restart_required,
)
from tests.conftest import TEST_NAMES_PREFIX
from tests.helpers.templates import TEMPLATES

GUEST = "2e8f2e23-d0e4-4db2-842c-f3f191252bc3"
MAC = "00:16:3e:12:34:56"
MiB = 1 << 20

def make_spec(template: str = "default", /, **overrides: object) -> DomainSpec:
    """A full guest: system + data disk (one volume, one file), seed ISO, a NIC with
    bandwidth, QoS limits, a secret."""
    values: dict[str, object] = dict(
        guest_id=GUEST,
        title="web-1",
        vcpus=2,
        max_vcpus=4,
        memory_bytes=512 * MiB,
        max_memory_bytes=1024 * MiB,
        virt_type="qemu",
        disks=(
            DiskSpec(index=0, pool="nano-cell1", volume="sys.qcow2", size=8 << 30),
            DiskSpec(index=1, path="/var/lib/nano/data.qcow2", size=4 << 30),
        ),
        seed_iso="/var/lib/nano/seed.iso",
        interfaces=(
            InterfaceSpec(mac=MAC, network="nano-net1", inbound_kib=1024, outbound_kib=512),
        ),
        monitor_secret="Ab3dEf7h",
        cpu_shares=CPU_SHARES["high"],
        iotune=IoTune(
            read_bytes_sec=10 * MiB, write_bytes_sec=5 * MiB, read_iops_sec=100, write_iops_sec=50
        ),
        generation=7,
    )
    values.update({**TEMPLATES["default"], **TEMPLATES[template]})
    values.update(overrides)
    return DomainSpec(**values)  # type: ignore[arg-type]


def devices(xml: str, tag: str) -> list[ET.Element]:
    return ET.fromstring(xml).findall(f"devices/{tag}")


# -- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("virt_type", ["kvm", "qemu", "test"])
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_parse_of_render_keeps_every_compared_field(template: str, virt_type: str) -> None:
    spec = make_spec(template, virt_type=virt_type)
    observed = parse_domain_xml(render_domain_xml(spec))
    assert diff_domain(spec, observed) == []
    assert observed.guest_id == GUEST and observed.generation == 7
    assert (observed.name, observed.uuid, observed.title) == (domain_name(GUEST), GUEST, "web-1")
    assert (observed.vcpus, observed.max_vcpus) == (2, 4)
    assert (observed.memory_bytes, observed.max_memory_bytes) == (512 * MiB, 1024 * MiB)
    assert observed.cpu_shares == 2000
    assert [d.source for d in observed.disks] == [
        "nano-cell1/sys.qcow2",
        "/var/lib/nano/data.qcow2",
    ]
    assert all(d.iotune == spec.iotune for d in observed.disks)
    assert observed.media is not None and observed.media.source is None
    assert observed.seed is not None and observed.seed.source == "/var/lib/nano/seed.iso"
    (nic,) = observed.interfaces
    assert (nic.mac, nic.network, nic.inbound_kib, nic.outbound_kib) == (
        MAC,
        "nano-net1",
        1024,
        512,
    )
    assert observed.monitor_secret == "Ab3dEf7h" and observed.graphics_listen == "127.0.0.1"
    assert observed.os_type == spec.os_type and observed.virt_type == virt_type
    assert not observed.active


def test_minimal_spec_round_trips() -> None:
    spec = DomainSpec(guest_id="g1", title="", vcpus=1, memory_bytes=64 * MiB)
    observed = parse_domain_xml(render_domain_xml(spec))
    assert diff_domain(spec, observed) == []
    assert (spec.max_vcpus, spec.max_memory_bytes) == (1, 64 * MiB)
    assert observed.disks == () and observed.interfaces == () and observed.seed is None
    assert observed.media is not None  # the empty media drive is always there


@pytest.mark.parametrize("boot", ["hd", "cdrom", "network"])
def test_boot_order_round_trips(boot: str) -> None:
    spec = make_spec(boot=boot, cdrom="/isos/install.iso")
    observed = parse_domain_xml(render_domain_xml(spec))
    assert observed.boot_order[0] == boot
    assert diff_domain(spec, observed) == []


# -- what the XML says -------------------------------------------------------------------


def test_domain_identity_and_mark() -> None:
    xml = render_domain_xml(make_spec(title='a&b<"quoted">'))
    root = ET.fromstring(xml)
    assert root.get("type") == "qemu"
    assert root.findtext("name") == f"{TEST_NAMES_PREFIX}-{GUEST}"
    assert root.findtext("uuid") == GUEST
    assert root.findtext("title") == 'a&b<"quoted">'
    mark = root.find(f"metadata/{{{NANO_NS}}}guest")
    assert mark is not None
    assert (mark.get("id"), mark.get("generation"), mark.get("name")) == (
        GUEST,
        "7",
        'a&b<"quoted">',
    )
    assert NANO_NS == "https://nano.cloud/xmlns/guest/1"


def test_uuid_is_the_guest_id_or_derived_from_it_stably() -> None:
    assert domain_uuid(GUEST) == GUEST
    derived = domain_uuid("not-a-uuid")
    assert re.fullmatch(r"[0-9a-f-]{36}", derived)
    assert derived == domain_uuid("not-a-uuid") != domain_uuid("not-a-uuid2")
    assert DomainSpec(guest_id="x", title="", vcpus=1, memory_bytes=MiB).uuid == domain_uuid("x")


def test_cpu_and_memory_can_grow_live_up_to_the_maximum() -> None:
    root = ET.fromstring(render_domain_xml(make_spec()))
    vcpu = root.find("vcpu")
    assert vcpu is not None
    assert (vcpu.get("placement"), vcpu.get("current"), vcpu.text) == ("static", "2", "4")
    assert (root.findtext("memory"), root.findtext("currentMemory")) == ("1048576", "524288")
    assert root.findtext("cputune/shares") == "2000"
    same = ET.fromstring(render_domain_xml(make_spec(vcpus=4)))
    assert same.find("vcpu").get("current") is None  # type: ignore[union-attr]


def test_lifecycle_features_and_clock() -> None:
    linux = ET.fromstring(render_domain_xml(make_spec()))
    assert [linux.findtext(t) for t in ("on_poweroff", "on_reboot", "on_crash")] == [
        "destroy",
        "restart",
        "destroy",
    ]
    assert linux.find("features/acpi") is not None and linux.find("features/apic") is not None
    assert linux.find("clock").get("offset") == "utc"  # type: ignore[union-attr]
    assert linux.find("devices/emulator") is None  # libvirt picks it
    assert linux.find("cpu") is None  # TCG: libvirt's default model
    win = ET.fromstring(render_domain_xml(make_spec("windows2012", virt_type="kvm")))
    assert win.find("clock").get("offset") == "localtime"  # type: ignore[union-attr]
    assert win.find("features/hyperv/relaxed") is not None
    assert win.find("clock/timer[@name='hypervclock']") is not None
    assert win.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]
    win_tcg = ET.fromstring(render_domain_xml(make_spec("windows2012", virt_type="qemu")))
    assert win_tcg.find("features/hyperv") is None  # Hyper-V enlightenments are KVM's


@pytest.mark.parametrize(
    ("template", "disk_bus", "disk_prefix", "cdrom_bus", "cdroms"),
    [
        ("default", "scsi", "sd", "sata", ["sdc", "sdd"]),
        ("centos6", "sata", "sd", "sata", ["sdc", "sdd"]),
        ("legacy", "ide", "hd", "ide", ["hdc", "hdd"]),
    ],
)
def test_disks_and_cdroms_by_bus(
    template: str, disk_bus: str, disk_prefix: str, cdrom_bus: str, cdroms: list[str]
) -> None:
    xml = render_domain_xml(make_spec(template))
    disks = [d for d in devices(xml, "disk") if d.get("device") == "disk"]
    drives = [d for d in devices(xml, "disk") if d.get("device") == "cdrom"]
    assert [d.find("target").attrib for d in disks] == [  # type: ignore[union-attr]
        {"dev": disk_prefix + "a", "bus": disk_bus},
        {"dev": disk_prefix + "b", "bus": disk_bus},
    ]
    assert "vd" not in xml
    volume, file_ = disks
    assert volume.get("type") == "volume"
    assert volume.find("source").attrib == {"pool": "nano-cell1", "volume": "sys.qcow2"}  # type: ignore[union-attr]
    assert file_.get("type") == "file"
    assert file_.find("source").get("file") == "/var/lib/nano/data.qcow2"  # type: ignore[union-attr]
    assert all(d.find("driver").get("type") == "qcow2" for d in disks)  # type: ignore[union-attr]
    # a serial each: the guest finds disk N at /dev/disk/by-id/...nano-diskN
    assert [d.findtext("serial") for d in disks] == ["nano-disk0", "nano-disk1"]
    assert [d.find("target").attrib for d in drives] == [  # type: ignore[union-attr]
        {"dev": cdroms[0], "bus": cdrom_bus},
        {"dev": cdroms[1], "bus": cdrom_bus},
    ]
    assert [d.find("alias").get("name") for d in drives] == [MEDIA_ALIAS, SEED_ALIAS]  # type: ignore[union-attr]
    assert drives[0].find("source") is None  # empty media drive, ready for live insert
    assert all(d.find("readonly") is not None for d in drives)
    scsi = [c for c in devices(xml, "controller") if c.get("type") == "scsi"]
    assert [c.get("model") for c in scsi] == (["virtio-scsi"] if disk_bus == "scsi" else [])


def test_iotune_renders_only_limits_that_are_set() -> None:
    xml = render_domain_xml(make_spec(iotune=IoTune(write_iops_sec=30)))
    tune = devices(xml, "disk")[0].find("iotune")
    assert tune is not None and [(c.tag, c.text) for c in tune] == [("write_iops_sec", "30")]
    unlimited = render_domain_xml(make_spec(iotune=IoTune()))
    assert "<iotune" not in unlimited


def test_interfaces_bandwidth_in_kib_and_omitted_when_unlimited() -> None:
    nics = (
        InterfaceSpec(mac=MAC, network="nano-net1", inbound_kib=kib_per_sec(10485760)),
        InterfaceSpec(mac="00:16:3e:00:00:02", bridge="br0", model=NicModel.E1000),
    )
    xml = render_domain_xml(make_spec(interfaces=nics))
    first, second = devices(xml, "interface")
    assert first.get("type") == "network"
    assert first.find("source").attrib == {"network": "nano-net1"}  # type: ignore[union-attr]
    assert first.find("model").get("type") == "virtio"  # type: ignore[union-attr]
    assert first.find("bandwidth/inbound").get("average") == "10240"  # type: ignore[union-attr]
    assert first.find("bandwidth/outbound") is None
    assert second.get("type") == "bridge"
    assert second.find("source").attrib == {"bridge": "br0"}  # type: ignore[union-attr]
    assert second.find("model").get("type") == "e1000"  # type: ignore[union-attr]
    assert second.find("bandwidth") is None
    assert [n.find("mac").get("address") for n in (first, second)] == [  # type: ignore[union-attr]
        MAC,
        "00:16:3e:00:00:02",
    ]


@pytest.mark.parametrize(
    ("speed", "kib"), [(0, 0), (1, 1), (1024, 1), (1025, 2), (10485760, 10240)]
)
def test_kib_per_sec_rounds_up_so_a_limit_never_becomes_unlimited(speed: int, kib: int) -> None:
    assert kib_per_sec(speed) == kib


def test_agent_channel_console_balloon_always_present() -> None:
    for template in TEMPLATES:
        xml = render_domain_xml(make_spec(template))
        (channel,) = devices(xml, "channel")
        assert channel.get("type") == "unix"
        assert channel.find("target").attrib == {  # type: ignore[union-attr]
            "type": "virtio",
            "name": "org.qemu.guest_agent.0",
        }
        assert devices(xml, "serial")[0].get("type") == "pty"
        assert devices(xml, "console")[0].find("target").get("type") == "serial"  # type: ignore[union-attr]
        assert devices(xml, "memballoon")[0].get("model") == "virtio"


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_template_devices(template: str) -> None:
    values = {**TEMPLATES["default"], **TEMPLATES[template]}
    xml = render_domain_xml(make_spec(template))
    usb = [c.get("model") for c in devices(xml, "controller") if c.get("type") == "usb"]
    # "" = no controller of ours: libvirt adds its default one, which the USB tablet needs
    assert usb == ([values["usb"]] if values["usb"] else [])
    tablets = [i.get("bus") for i in devices(xml, "input") if i.get("type") == "tablet"]
    assert tablets == ([values["tablet"]] if values["tablet"] else [])
    (video,) = devices(xml, "video")
    assert video.find("model").get("type") == values["display"]  # type: ignore[union-attr]
    (graphics,) = devices(xml, "graphics")  # kept even without video: the console
    assert graphics.get("type") == values["control"]
    assert (graphics.get("autoport"), graphics.get("listen"), graphics.get("passwd")) == (
        "yes",
        "127.0.0.1",
        "Ab3dEf7h",
    )
    assert graphics.find("listen").attrib == {"type": "address", "address": "127.0.0.1"}  # type: ignore[union-attr]


def test_ide_has_four_slots() -> None:
    three = tuple(DiskSpec(index=i, path=f"/d{i}.qcow2") for i in range(3))
    with pytest.raises(ValueError, match="IDE has 4 slots"):
        make_spec("legacy", disks=three)
    spec = make_spec("legacy", disks=three, seed_iso=None)  # 3 disks + media drive fit
    assert parse_domain_xml(render_domain_xml(spec)).media.target == "hdd"  # type: ignore[union-attr]


def test_disk_target_names() -> None:
    assert [disk_target("scsi", i) for i in (0, 1, 25, 26, 27)] == [
        "sda",
        "sdb",
        "sdz",
        "sdaa",
        "sdab",
    ]
    assert disk_target("ide", 2) == "hdc" and disk_target("sata", 3) == "sdd"


def test_device_helpers_for_live_updates() -> None:
    spec = make_spec(cdrom="/isos/tools.iso")
    media = ET.fromstring(render_cdrom_xml(spec))
    assert media.get("device") == "cdrom"
    assert media.find("target").attrib == {"dev": "sdc", "bus": "sata"}  # type: ignore[union-attr]
    assert media.find("source").get("file") == "/isos/tools.iso"  # type: ignore[union-attr]
    eject = ET.fromstring(render_cdrom_xml(dataclasses.replace(spec, cdrom=None)))
    assert eject.find("source") is None and eject.find("target").get("dev") == "sdc"  # type: ignore[union-attr]
    seed = ET.fromstring(render_cdrom_xml(spec, "seed"))
    assert seed.find("source").get("file") == "/var/lib/nano/seed.iso"  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        render_cdrom_xml(dataclasses.replace(spec, seed_iso=None), "seed")
    graphics = ET.fromstring(
        render_graphics_xml(dataclasses.replace(spec, monitor_secret="n3wS3cr3"))
    )
    assert (graphics.tag, graphics.get("passwd")) == ("graphics", "n3wS3cr3")
    mark = ET.fromstring(render_metadata_xml(spec))
    assert (mark.tag, mark.get("id"), mark.get("generation")) == ("guest", GUEST, "7")


# -- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(vcpus=5),
        dict(vcpus=0),
        dict(memory_bytes=2048 * MiB),
        dict(disk_bus="virtio"),
        dict(nic_model="ne2k"),
        dict(display="vmvga"),
        dict(virt_type="xen"),
        dict(disks=(DiskSpec(index=1, path="/a.qcow2"),)),
        dict(interfaces=(InterfaceSpec(mac=MAC, network="n"), InterfaceSpec(mac=MAC, network="m"))),
        dict(vnc_listen="localhost"),
        dict(guest_id=""),
    ],
)
def test_invalid_specs_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make_spec(**overrides)


def test_invalid_devices_are_refused() -> None:
    with pytest.raises(ValueError):
        DiskSpec(index=0)
    with pytest.raises(ValueError):
        InterfaceSpec(mac=MAC)
    with pytest.raises(ValueError):
        InterfaceSpec(mac=MAC, network="n", bridge="b")
    with pytest.raises(ValueError):
        InterfaceSpec(mac="01:16:3e:00:00:01", network="n")  # multicast
    assert InterfaceSpec(mac="00-16-3E-AA-BB-CC", network="n").mac == "00:16:3e:aa:bb:cc"


# -- parsing libvirt's XML -----------------------------------------------------------------

# Captured from libvirt 9.0 / QEMU 7.2 (TCG): XMLDesc(VIR_DOMAIN_XML_SECURE) of
# make_live_spec() defined from render_domain_xml and started. Libvirt added the emulator,
# addresses, implicit controllers, ps2 inputs, audio, a CPU model, a seclabel, `index`
# and <backingStore/> on sources, the network's bridge on the NIC source, the VNC port,
# and reports the balloon's actual size (no guest driver: the maximum) as currentMemory.
LIVE_XML = """\
<domain type='qemu' id='1'>
  <name>nano-2e8f2e23-d0e4-4db2-842c-f3f191252bc3</name>
  <uuid>2e8f2e23-d0e4-4db2-842c-f3f191252bc3</uuid>
  <title>web-1</title>
  <metadata>
    <nano:guest xmlns:nano="https://nano.cloud/xmlns/guest/1" id="2e8f2e23-d0e4-4db2-842c-f3f191252bc3" generation="3" name="web-1"/>
  </metadata>
  <memory unit='KiB'>131072</memory>
  <currentMemory unit='KiB'>131072</currentMemory>
  <vcpu placement='static' current='1'>2</vcpu>
  <cputune>
    <shares>1000</shares>
  </cputune>
  <resource>
    <partition>/machine</partition>
  </resource>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <cpu mode='custom' match='exact' check='full'>
    <model fallback='forbid'>qemu64</model>
    <feature policy='require' name='hypervisor'/>
    <feature policy='require' name='lahf_lm'/>
  </cpu>
  <clock offset='utc'>
    <timer name='rtc' tickpolicy='catchup'/>
    <timer name='pit' tickpolicy='delay'/>
    <timer name='hpet' present='no'/>
  </clock>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source pool='nano-cell1' volume='sys.qcow2' index='3'/>
      <backingStore/>
      <target dev='sda' bus='scsi'/>
      <iotune>
        <read_bytes_sec>10485760</read_bytes_sec>
        <write_iops_sec>100</write_iops_sec>
      </iotune>
      <alias name='ua-nano-disk0'/>
      <address type='drive' controller='0' bus='0' target='0' unit='0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/tmp/nano-fixture/data.qcow2' index='2'/>
      <backingStore/>
      <target dev='sdb' bus='scsi'/>
      <iotune>
        <read_bytes_sec>10485760</read_bytes_sec>
        <write_iops_sec>100</write_iops_sec>
      </iotune>
      <alias name='ua-nano-disk1'/>
      <address type='drive' controller='0' bus='0' target='0' unit='1'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu'/>
      <target dev='sdc' bus='sata'/>
      <readonly/>
      <alias name='ua-nano-media'/>
      <address type='drive' controller='0' bus='0' target='0' unit='2'/>
    </disk>
    <controller type='scsi' index='0' model='virtio-scsi'>
      <alias name='scsi0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </controller>
    <controller type='usb' index='0' model='piix3-uhci'>
      <alias name='usb'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x2'/>
    </controller>
    <controller type='pci' index='0' model='pci-root'>
      <alias name='pci.0'/>
    </controller>
    <controller type='sata' index='0'>
      <alias name='sata0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>
    </controller>
    <controller type='virtio-serial' index='0'>
      <alias name='virtio-serial0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x06' function='0x0'/>
    </controller>
    <interface type='network'>
      <mac address='00:16:3e:12:34:56'/>
      <source network='nano-net1' portid='f3eb1707-bcbb-49d2-b8ce-548e5daf773c' bridge='nanobr1'/>
      <target dev='vnet0'/>
      <model type='virtio'/>
      <alias name='ua-nano-nic0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </interface>
    <serial type='pty'>
      <source path='/dev/pts/0'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
      <alias name='serial0'/>
    </serial>
    <console type='pty' tty='/dev/pts/0'>
      <source path='/dev/pts/0'/>
      <target type='serial' port='0'/>
      <alias name='serial0'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-1-nano-2e8f2e23-d0e4-4/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='disconnected'/>
      <alias name='channel0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
    <input type='tablet' bus='usb'>
      <alias name='input0'/>
      <address type='usb' bus='0' port='1'/>
    </input>
    <input type='mouse' bus='ps2'>
      <alias name='input1'/>
    </input>
    <input type='keyboard' bus='ps2'>
      <alias name='input2'/>
    </input>
    <graphics type='vnc' port='5900' autoport='yes' listen='127.0.0.1' passwd='Ab3dEf7h'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
    <audio id='1' type='none'/>
    <video>
      <model type='vga' vram='16384' heads='1' primary='yes'/>
      <alias name='video0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </video>
    <memballoon model='virtio'>
      <alias name='balloon0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x07' function='0x0'/>
    </memballoon>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+64055:+64055</label>
    <imagelabel>+64055:+64055</imagelabel>
  </seclabel>
</domain>
"""


def make_live_spec() -> DomainSpec:
    return DomainSpec(
        guest_id=GUEST,
        title="web-1",
        vcpus=1,
        max_vcpus=2,
        virt_type=VirtType.QEMU,
        memory_bytes=64 * MiB,
        max_memory_bytes=128 * MiB,
        disks=(
            DiskSpec(index=0, pool="nano-cell1", volume="sys.qcow2"),
            DiskSpec(index=1, path="/var/tmp/nano-fixture/data.qcow2"),
        ),
        interfaces=(InterfaceSpec(mac=MAC, network="nano-net1"),),
        monitor_secret="Ab3dEf7h",
        iotune=IoTune(read_bytes_sec=10485760, write_iops_sec=100),
        generation=3,
    )


def test_parse_libvirt_live_xml_converges() -> None:
    observed = parse_domain_xml(LIVE_XML)
    assert observed.active and observed.domain_id == 1
    assert observed.graphics_port == 5900
    assert observed.interfaces[0].network == "nano-net1"
    assert observed.interfaces[0].bridge is None  # the network's bridge is not our source
    assert observed.interfaces[0].target == "vnet0"
    assert observed.memory_bytes == 128 * MiB  # balloon actual, not the target
    assert observed.usb == "piix3-uhci"  # libvirt's implicit default controller
    assert observed.disks[0].source == "nano-cell1/sys.qcow2"
    assert diff_domain(make_live_spec(), observed) == []


def test_parse_without_our_aliases_falls_back_to_order() -> None:
    spec = make_spec()
    xml = re.sub(r"\s*<alias name=\"ua-nano-[a-z]+\d*\" />", "", render_domain_xml(spec))
    assert "ua-nano" not in xml
    observed = parse_domain_xml(xml)
    assert [d.index for d in observed.disks] == [0, 1]
    assert observed.media is not None and observed.media.source is None
    assert observed.seed is not None and observed.seed.source == spec.seed_iso
    assert diff_domain(spec, observed) == []


def test_a_volume_reported_as_its_file_is_the_same_source() -> None:
    spec = make_spec()
    xml = (
        render_domain_xml(spec)
        .replace('<disk type="volume" device="disk">', '<disk type="file" device="disk">')
        .replace(
            '<source pool="nano-cell1" volume="sys.qcow2" />',
            '<source file="/var/lib/nano/cell1/sys.qcow2" />',
        )
    )
    observed = parse_domain_xml(xml)
    assert observed.disks[0].path == "/var/lib/nano/cell1/sys.qcow2"
    assert diff_domain(spec, observed) == []
    other = xml.replace("/cell1/sys.qcow2", "/cell1/other.qcow2")
    assert [c.field for c in diff_domain(spec, parse_domain_xml(other))] == ["disks[0].source"]


@pytest.mark.parametrize(
    ("unit", "value", "expected"),
    [
        ("KiB", 1024, MiB),
        ("k", 1024, MiB),
        ("MiB", 64, 64 * MiB),
        ("M", 64, 64 * MiB),
        ("GiB", 1, 1 << 30),
        ("b", 4096, 4096),
        ("bytes", 4096, 4096),
        ("MB", 1, 1000 * 1000),
        ("KB", 2, 2000),
    ],
)
def test_memory_units(unit: str, value: int, expected: int) -> None:
    xml = render_domain_xml(make_live_spec()).replace(
        '<memory unit="KiB">131072</memory>', f'<memory unit="{unit}">{value}</memory>'
    )
    assert parse_domain_xml(xml).max_memory_bytes == expected


def test_unmarked_domain_and_garbage() -> None:
    observed = parse_domain_xml("<domain type='kvm'><name>other</name></domain>")
    assert observed.guest_id is None and observed.generation is None
    assert observed.vcpus == 1 and observed.media is None
    with pytest.raises(ValueError):
        parse_domain_xml("<network/>")
    with pytest.raises(ValueError):
        parse_domain_xml("not xml")


# -- diff classification -------------------------------------------------------------------

NEW_NIC = InterfaceSpec(mac="00:16:3e:00:00:09", network="nano-net1")
THIRD_DISK = DiskSpec(index=2, path="/var/lib/nano/data2.qcow2")

# overrides -> the changes they cause, as (field, live, device)
CLASSIFICATION: list[tuple[str, dict[str, object], list[tuple[str, bool, str | None]]]] = [
    ("vcpus within max", dict(vcpus=3), [("vcpus", True, None)]),
    (
        "vcpus beyond max",
        dict(vcpus=6, max_vcpus=8),
        [("max_vcpus", False, None), ("vcpus", False, None)],
    ),
    ("memory within max", dict(memory_bytes=768 * MiB), [("memory_bytes", True, None)]),
    (
        "memory beyond max",
        dict(memory_bytes=2048 * MiB, max_memory_bytes=2048 * MiB),
        [("max_memory_bytes", False, None), ("memory_bytes", False, None)],
    ),
    ("cpu priority", dict(cpu_shares=500), [("cpu_shares", True, None)]),
    (
        "disk qos",
        dict(iotune=IoTune(read_iops_sec=10)),
        [("disks[0].iotune", True, "sda"), ("disks[1].iotune", True, "sdb")],
    ),
    (
        "network qos",
        dict(interfaces=(dataclasses.replace(make_spec().interfaces[0], outbound_kib=64),)),
        [("interfaces[0].bandwidth", True, MAC)],
    ),
    ("insert media", dict(cdrom="/isos/x.iso"), [("media", True, "sdc")]),
    ("new seed", dict(seed_iso="/var/lib/nano/seed-2.iso"), [("seed", True, "sdd")]),
    ("monitor secret", dict(monitor_secret="Zz9Yy8Xx"), [("monitor_secret", True, None)]),
    ("rename", dict(title="web-2"), [("title", True, None)]),
    ("generation", dict(generation=8), [("generation", True, None)]),
    ("seed drive removed", dict(seed_iso=None), [("seed_drive", False, "sdd")]),
    (
        "disk added",
        dict(disks=make_spec().disks + (THIRD_DISK,)),
        [("disks[2]", False, "sdc"), ("media_drive", False, "sdd"), ("seed_drive", False, "sde")],
    ),
    (
        "disk removed",
        dict(disks=make_spec().disks[:1]),
        [("disks[1]", False, "sdb"), ("media_drive", False, "sdb"), ("seed_drive", False, "sdc")],
    ),
    (
        "bus",
        dict(disk_bus="sata"),
        [("disks[0].bus", False, "sda"), ("disks[1].bus", False, "sdb")],
    ),
    ("nic model", dict(nic_model="e1000"), [("interfaces[0].model", False, MAC)]),
    (
        "nic added",
        dict(interfaces=make_spec().interfaces + (NEW_NIC,)),
        [("interfaces[1]", False, NEW_NIC.mac)],
    ),
    ("nic removed", dict(interfaces=()), [("interfaces[0]", False, MAC)]),
    (
        "nic network",
        dict(
            interfaces=(
                InterfaceSpec(mac=MAC, network="other", inbound_kib=1024, outbound_kib=512),
            )
        ),
        [("interfaces[0].source", False, MAC)],
    ),
    (
        "mac",
        dict(
            interfaces=(
                InterfaceSpec(
                    mac="00:16:3e:99:99:99", network="nano-net1", inbound_kib=1024, outbound_kib=512
                ),
            )
        ),
        [("interfaces[0].mac", False, MAC)],
    ),
    ("display", dict(display="qxl"), [("display", False, None)]),
    ("control", dict(control="spice"), [("control", False, None)]),
    ("usb", dict(usb="nec-xhci"), [("usb", False, None)]),
    ("tablet", dict(tablet="virtio"), [("tablet", False, None)]),
    ("boot", dict(boot="cdrom"), [("boot_order", False, None)]),
    ("virt type", dict(virt_type="kvm"), [("virt_type", False, None)]),
    ("os type", dict(os_type="windows"), [("os_type", False, None)]),
    ("listen", dict(vnc_listen="0.0.0.0"), [("graphics_listen", False, None)]),
]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [(o, e) for _, o, e in CLASSIFICATION],
    ids=[name for name, _, _ in CLASSIFICATION],
)
def test_each_kind_of_change_is_classified(
    overrides: dict[str, object], expected: list[tuple[str, bool, str | None]]
) -> None:
    before = make_spec()
    observed = parse_domain_xml(render_domain_xml(before))
    after = dataclasses.replace(before, **overrides)  # type: ignore[arg-type]
    changes = diff_domain(after, observed)
    got = [(c.field, c.live, c.device) for c in changes]
    assert got == expected
    assert restart_required(changes) == any(not live for _, live, _ in expected)
    # and once applied (redefined), the same spec converges
    assert diff_domain(after, parse_domain_xml(render_domain_xml(after))) == []


def test_seed_drive_added_is_a_restart() -> None:
    observed = parse_domain_xml(render_domain_xml(make_spec(seed_iso=None)))
    changes = diff_domain(make_spec(), observed)
    assert [(c.field, c.before, c.after, c.live) for c in changes] == [
        ("seed_drive", None, {"target": "sdd", "bus": "sata"}, False)
    ]


def test_changes_carry_before_and_after() -> None:
    observed = parse_domain_xml(render_domain_xml(make_spec()))
    changes = diff_domain(make_spec(vcpus=3, cdrom="/isos/x.iso"), observed)
    assert changes == [
        Change("vcpus", 2, 3, True),
        Change("media", None, "/isos/x.iso", True, "sdc"),
    ]


def test_live_xml_never_reports_balloon_memory_as_a_change() -> None:
    observed = parse_domain_xml(LIVE_XML)
    spec = dataclasses.replace(make_live_spec(), memory_bytes=96 * MiB)
    assert diff_domain(spec, observed) == []  # converge on the persistent XML instead
    inactive = parse_domain_xml(render_domain_xml(make_live_spec()))
    assert [c.field for c in diff_domain(spec, inactive)] == ["memory_bytes"]


def test_uuid_mismatch_means_replace() -> None:
    observed = parse_domain_xml(render_domain_xml(make_spec()))
    other = dataclasses.replace(make_spec(), uuid="11111111-2222-3333-4444-555555555555")
    assert [(c.field, c.live) for c in diff_domain(other, observed)] == [("uuid", False)]


# -- identities and secrets ----------------------------------------------------------------

MAC_RE = re.compile(r"^00:16:3e(:[0-9a-f]{2}){3}$")


def test_generated_macs() -> None:
    macs = {generate_mac() for _ in range(200)}
    assert all(MAC_RE.match(m) for m in macs) and len(macs) > 190
    assert generate_mac(random.Random(5)) == generate_mac(random.Random(5))


def test_ensure_mac() -> None:
    assert ensure_mac("00:16:3E:0A:0B:0C") == "00:16:3e:0a:0b:0c"
    assert MAC_RE.match(ensure_mac(None))
    with pytest.raises(ValueError):
        ensure_mac("00:16:3e:0a:0b:0c", taken=["00:16:3E:0A:0B:0C"])
    for bad in ("00:16:3e:0a:0b", "zz:16:3e:0a:0b:0c", "03:00:00:00:00:00"):
        with pytest.raises(ValueError):
            ensure_mac(bad)
    # a generated MAC avoids those in use
    taken = [generate_mac(random.Random(1))]
    assert ensure_mac(None, taken=taken, rng=random.Random(1)) not in taken


def test_generated_secrets() -> None:
    secrets_ = {generate_secret() for _ in range(100)}
    alphabet = set(string.ascii_letters + string.digits)
    assert all(len(s) == 8 and set(s) <= alphabet for s in secrets_)
    assert len(secrets_) == 100


def test_cpu_shares_by_priority() -> None:
    assert [cpu_shares(p) for p in ("high", "medium", "low")] == [2000, 1000, 500]
    assert make_spec(cpu_shares=cpu_shares("medium")).cpu_shares == 1000
    with pytest.raises(ValueError):
        cpu_shares("urgent")
