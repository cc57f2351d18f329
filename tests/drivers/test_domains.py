"""LibvirtGuests on the real local libvirtd: volumes (create, copy, grow, upload/download
through streams), a tiny TCG domain (define, start, statistics, stop), snapshots of a
stopped qcow2 guest (create, tree, revert, delete) and undefine. Everything is made in a
temporary dir pool and removed."""

from __future__ import annotations

import time
import uuid

import libvirt
import pytest

from reconciler.drivers.domains import LibvirtGuests, owned_guest_id
from reconciler.drivers.libvirt_hv import LibvirtHypervisor, render_owner_metadata
from state.errors import Invalid
from tests.conftest import TEST_NAMES_PREFIX as PREFIX

pytestmark = pytest.mark.integration


@pytest.fixture
def guests(qemu_dir):
    try:
        libvirt.open("qemu:///system").close()
    except libvirt.libvirtError as exc:
        pytest.skip(f"qemu:///system not reachable: {exc}")
    hv = LibvirtHypervisor("qemu:///system")
    pool = f"{PREFIX}-test-{uuid.uuid4().hex[:8]}"
    hv.ensure_dir_pool(pool, str(qemu_dir / "pool"))
    drv = LibvirtGuests(hv)
    yield drv, pool
    for name in drv.volumes(pool):
        drv.delete_volume(pool, name)
    hv.delete_pool(pool)
    hv.close()


def domain_xml(name: str, guest_id: str, pool: str, volume: str) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <metadata>{render_owner_metadata(guest_id)}</metadata>
  <memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices>
    <disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>
      <source pool='{pool}' volume='{volume}'/><target dev='sda' bus='sata'/></disk>
    <graphics type='vnc' listen='127.0.0.1' autoport='yes' passwd='abcdefgh'/>
  </devices>
</domain>"""


def test_volumes_streams_and_growth(guests):
    drv, pool = guests
    info = drv.create_volume(pool, f"{PREFIX}-v1", 64 << 20)
    assert info.capacity == 64 << 20 and info.format == "qcow2"
    drv.resize_volume(pool, f"{PREFIX}-v1", 128 << 20)
    assert drv.volume(pool, f"{PREFIX}-v1").capacity == 128 << 20
    copy = drv.create_volume(pool, f"{PREFIX}-v2", 256 << 20, backing=f"{PREFIX}-v1")
    assert copy.capacity == 256 << 20

    payload = bytes(range(256)) * 4096  # 1 MiB
    drv.write_volume(pool, f"{PREFIX}-seed", payload)
    assert drv.read_volume(pool, f"{PREFIX}-seed", len(payload)) == payload
    assert sorted(drv.volumes(pool)) == [f"{PREFIX}-seed", f"{PREFIX}-v1", f"{PREFIX}-v2"]
    drv.delete_volume(pool, f"{PREFIX}-v2")
    assert drv.volume(pool, f"{PREFIX}-v2") is None
    with pytest.raises(Invalid):
        drv.delete_volume(pool, "not-ours")


def test_domain_lifecycle_stats_and_snapshots(guests):
    drv, pool = guests
    gid = str(uuid.uuid4())
    name = f"{PREFIX}-{gid}"
    drv.create_volume(pool, f"{PREFIX}-{gid}-0", 32 << 20)
    drv.define(domain_xml(name, gid, pool, f"{PREFIX}-{gid}-0"))
    try:
        assert drv.state(name) == "stopped"
        xml = drv.domain_xml(name)
        assert owned_guest_id(xml) == gid and "passwd='abcdefgh'" in xml

        drv.create_snapshot(name, "s1", "first")
        drv.create_snapshot(name, "s2", "second")
        snaps = {s.name: s for s in drv.snapshots(name)}
        assert snaps["s1"].parent == "" and snaps["s2"].parent == "s1"
        assert snaps["s2"].current and snaps["s1"].description == "first"
        drv.revert_snapshot(name, "s1")
        assert {s.name for s in drv.snapshots(name) if s.current} == {"s1"}
        drv.delete_snapshot(name, "s2")
        assert [s.name for s in drv.snapshots(name)] == ["s1"]

        drv.start(name)
        assert drv.state(name) == "running"
        deadline = time.monotonic() + 10
        stats = drv.stats([name])[name]
        while stats.cpu_time_ns == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
            stats = drv.stats([name])[name]
        assert stats.state == "running" and stats.cpu_time_ns > 0 and stats.vcpus == 1
        assert stats.memory_bytes == 64 << 20
        drv.set_vcpus(name, 1, live=True)
        drv.destroy(name)
        assert drv.state(name) == "stopped"
    finally:
        drv.undefine(name)
    assert drv.state(name) is None and drv.domain_xml(name) is None


def _cpu_domain(features: str) -> str:
    return ("<domain type='qemu'><name>x</name><os><type arch='x86_64' machine='pc'>hvm"
            "</type></os><cpu mode='custom' match='exact'><model fallback='forbid'>qemu64"
            f"</model>{features}</cpu></domain>")


def test_a_guest_cpu_the_cell_cannot_run_is_named_before_a_migration(system_hv) -> None:
    """What a live migration checks first (reconciler/migration.py): TCG runs qemu64, not
    a CPU that needs AVX-512; libvirt's reason names the missing feature."""
    guests = LibvirtGuests(system_hv)
    assert guests.cpu_refusal(_cpu_domain(""), "qemu") == ""
    refusal = guests.cpu_refusal(
        _cpu_domain("<feature policy='require' name='avx512f'/>"), "qemu")
    assert "avx512f" in refusal, refusal
