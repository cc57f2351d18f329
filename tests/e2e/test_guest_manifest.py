"""A Guest manifest on the real local cell (qemu:///system, TCG): created running with
`--wait`, media inserted live, stopped with a snapshot to keep, re-applied (all ok),
replaced when a field fixed at creation changes, and deleted with everything it made.

The guest has no operating system: it sits in the firmware, which ignores an ACPI
shutdown. `power: stopped` asks for a shutdown that becomes a power-off after the
reconciler's grace period (nanod/kinds.py says why); this server's grace period is short so
the test stays fast. Names carry a random tag and the address pool a subnet of its own, so
the test stays apart from an installation or another run on the same host; what the cell
made in libvirt (pool, volumes, domains, network, nft tables) is removed at the end.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TEST_NAMES_PREFIX as PREFIX
from tests.e2e.conftest import Nanod, lines

pytestmark = pytest.mark.integration
MIB = 1 << 20


def virsh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def nanod_config() -> str:
    """A 2 s grace period between the shutdown a stop asks for and the power-off."""
    return ("reconciler: {workers: 2, resync_seconds: 2, probe_seconds: 1, offline_after: 2,"
            " guest_poll_seconds: 2, stop_grace_seconds: 2}\n")


@pytest.fixture
def names(qemu_dir: Path) -> Iterator[dict[str, str]]:
    """This run's names; taken before `nanod`, so the cleanup runs after nanod stopped (a
    running reconciler would make the pool again)."""
    if shutil.which("virsh") is None or virsh("uri").returncode != 0:
        pytest.skip("needs the local libvirtd (qemu:///system): scripts/start-services")
    tag = uuid.uuid4().hex[:6]
    net = 1 + int(tag, 16) % 250  # 10.247.<net>.0/24: unlikely to meet another run's
    env = {"cell": f"e2e-{tag}", "pool": f"gpool-{tag}", "net": f"gnet-{tag}",
           "guest": f"g-{tag}", "iso": f"iso-{tag}", "subnet": f"10.247.{net}",
           "storage": str(qemu_dir / "images"), "tag": tag}
    yield env
    import libvirt

    from reconciler.drivers.networks import delete_nft_table
    from reconciler.drivers.shell import LocalShell
    from reconciler.networking import nat_table
    from tests.integration.conftest import remove_cell_leftovers

    conn = libvirt.open("qemu:///system")
    try:
        remove_cell_leftovers(conn, f"{PREFIX}-{env['cell']}")
        for net_obj in conn.listAllNetworks():
            if tag in net_obj.name():
                if net_obj.isActive():
                    net_obj.destroy()
                net_obj.undefine()
    finally:
        conn.close()
    delete_nft_table(LocalShell(), "ip", nat_table(env["net"]))


def make_iso(path: Path) -> None:
    """A small, real ISO 9660 file (pycdlib)."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident="NANOGUEST")
    data = b"hello from a guest manifest\n"
    iso.add_fp(io.BytesIO(data), len(data), "/HELLO.TXT;1")
    iso.write(str(path))
    iso.close()


def write_manifests(folder: Path, env: dict[str, str], **guest: Any) -> None:
    """infrastructure.yaml (address pool, compute pool, cell, media image) and guest.yaml
    (the guest, its spec fields from `guest` in YAML flow style)."""
    s = env["subnet"]
    (folder / "infrastructure.yaml").write_text(f"""\
kind: AddressPool
name: {env['net']}
spec:
  gateway: {s}.1
  dns: [{s}.1]
  provider: dhcp
  mode: internal
  ranges: [{{start: {s}.10, end: {s}.20, netmask: 255.255.255.0}}]
---
kind: ComputePool
name: {env['pool']}
spec: {{network: {env['net']}}}
---
kind: Cell
name: {env['cell']}
spec:
  pool: {env['pool']}
  libvirt_uri: qemu:///system
  virt_type: qemu
  storage_path: {env['storage']}
---
kind: MediaImage
name: {env['iso']}
spec: {{description: a small ISO for the guest manifest test, file: boot.iso}}
""")
    spec = {"pool": env["pool"], "cores": 1, "memory": 64 * MIB, "disks": [32 * MIB],
            "template": "", "modules": [], **guest}
    body = "\n".join(f"  {k}: {to_yaml(v)}" for k, v in spec.items())
    (folder / "guest.yaml").write_text(f"kind: Guest\nname: {env['guest']}\nspec:\n{body}\n")


def to_yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value) if value == "" else value
    if isinstance(value, list):
        return "[" + ", ".join(to_yaml(v) for v in value) + "]"
    return str(value)


def wait_for(check: Callable[[], Any], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, f"timed out waiting for {what}"
            return value
        time.sleep(0.5)


def guest_row(nanod: Nanod, env: dict[str, str]) -> dict[str, Any]:
    rows = [r for r in nanod.data_of(f"/guest_search/?pool={env['pool']}")
            if r["name"] == env["guest"]]
    assert len(rows) == 1, rows
    return rows[0]


def domstate(ident: str) -> str:
    done = virsh("domstate", f"{PREFIX}-{ident}")
    return done.stdout.strip() if done.returncode == 0 else "missing"


def applied(nanod: Nanod, folder: Path, *args: str) -> list[str]:
    done = nanod.run("apply", "-f", str(folder), *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return lines(done.stdout)


def test_guest_manifest_power_media_snapshots_replace(names, nanod: Nanod, tmp_path: Path):
    env = names
    folder = tmp_path / "manifests"
    folder.mkdir()
    make_iso(folder / "boot.iso")
    label = f"Guest/{env['pool']}/{env['guest']}"

    # created running: the guest is made, then started (--wait lets the start follow)
    write_manifests(folder, env, power="running")
    out = applied(nanod, folder, "--wait", "120")
    assert f"changed {label} created" in out, out
    assert "ok=0 changed=5 failed=0" in out and out[-1].startswith("converged:"), out
    first = guest_row(nanod, env)
    assert first["created"] and first["running"], first
    assert domstate(first["id"]) == "running"

    # media inserted live
    write_manifests(folder, env, power="running", media=env["iso"])
    out = applied(nanod, folder, "--diff", "--wait", "60")
    assert f"changed {label} updated media" in out, out
    assert f"~ media: null -> '{env['iso']}' [live]" in out, out
    media_id = next(r["id"] for r in nanod.data_of("/media_images/") if r["name"] == env["iso"])

    def media_in_live_xml() -> bool:
        xml = virsh("dumpxml", f"{PREFIX}-{first['id']}").stdout
        return bool(re.search(r"<disk type='(?:file|volume)' device='cdrom'>.*?<source [^>]*"
                              + re.escape(media_id), xml, re.S))

    wait_for(media_in_live_xml, 30, "the media volume in the live domain XML")
    row = guest_row(nanod, env)
    assert row["media_attached"] and row["media_source"] == media_id, row

    # stopped, with a snapshot to keep: the firmware ignores the shutdown, the grace
    # period ends it with a power-off, then the snapshot is taken of the stopped guest
    write_manifests(folder, env, power="stopped", media=env["iso"], snapshots=["s1"])
    out = applied(nanod, folder, "--diff", "--wait", "60")
    assert f"changed {label} updated power, snapshots" in out, out
    assert "~ power: 'running' -> 'stopped' [live]" in out, out
    assert "~ snapshots: [] -> ['s1'] [live]" in out, out
    reason = virsh("domstate", "--reason", f"{PREFIX}-{first['id']}").stdout.strip()
    assert reason == "shut off (destroyed)", reason  # the ignored shutdown was escalated
    snaps = virsh("snapshot-list", f"{PREFIX}-{first['id']}", "--name")
    assert snaps.returncode == 0 and snaps.stdout.split() == ["s1"], snaps.stdout + snaps.stderr
    assert sorted(nanod.data_of(f"/instances/{first['id']}/snapshots/")) == ["s1"]

    out = applied(nanod, folder)
    assert out[-1] == "ok=5 changed=0 failed=0", out
    drift = nanod.run("drift")  # the uploaded image too: it has nothing left to converge
    assert drift.returncode == 0 and lines(drift.stdout)[-1] == "drifted=0", drift.stdout

    # a second disk is fixed at creation: the guest is replaced (deleted, created again)
    write_manifests(folder, env, power="stopped", media=env["iso"], snapshots=["s1"],
                    disks=[32 * MIB, 32 * MIB])
    # ... but a new guest is created stopped and media goes into running guests only:
    # refused before the old guest is deleted, and --check says so
    refused = f"failed {label} spec.media: a new guest is created stopped and media goes"
    check = nanod.run("apply", "-f", str(folder), "--check", "--diff")
    assert check.returncode == 1, check.stdout + check.stderr
    out = lines(check.stdout)
    assert any(line.startswith(refused) for line in out), out
    assert (f"~ disks: [{32 * MIB}] -> [{32 * MIB}, {32 * MIB}] [replaces: the number of "
            "disks is fixed at creation]") in out, out
    assert out[-1] == "ok=4 changed=0 failed=1", out
    done = nanod.run("apply", "-f", str(folder))
    assert done.returncode == 1, done.stdout + done.stderr
    assert any(line.startswith(refused) for line in lines(done.stdout)), done.stdout
    assert guest_row(nanod, env)["id"] == first["id"]
    assert domstate(first["id"]) == "shut off"

    write_manifests(folder, env, power="stopped", media=None, snapshots=["s1"],
                    disks=[32 * MIB, 32 * MIB])
    out = applied(nanod, folder, "--diff", "--wait", "120")
    assert f"changed {label} updated disks, media" in out, out
    assert f"~ media: '{env['iso']}' -> null [live]" in out, out
    second = guest_row(nanod, env)
    assert second["id"] != first["id"] and second["disks"] == [32 * MIB, 32 * MIB], second
    assert not second["running"] and not second["media_attached"], second
    assert domstate(first["id"]) == "missing"
    assert domstate(second["id"]) == "shut off"
    snaps = virsh("snapshot-list", f"{PREFIX}-{second['id']}", "--name")
    assert snaps.stdout.split() == ["s1"], snaps.stdout + snaps.stderr
    out = applied(nanod, folder)
    assert out[-1] == "ok=5 changed=0 failed=0", out

    # deleted: nothing the test made stays in libvirt (an unregistered cell's own empty
    # storage pool is removed by the reconciler; the fixture would catch a leftover)
    done = nanod.run("delete", "-f", str(folder), "--wait", "120")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok=0 changed=5 failed=0" in lines(done.stdout), done.stdout
    assert not [n for n in done.stdout.splitlines() if n.startswith("note:")], done.stdout
    assert nanod.data_of("/cells/") == []
    assert leftovers(env, [first["id"], second["id"]]) == []


def leftovers(env: dict[str, str], ids: list[str]) -> list[str]:
    """What of this test is still in libvirt or nft: domains and volumes of the guests,
    the storage pool's volumes (cached media too), the address pool's network and NAT table."""
    import libvirt

    from reconciler.networking import nat_table

    conn = libvirt.open("qemu:///system")
    try:
        out = [f"domain {d.name()}" for d in conn.listAllDomains()
               if any(i in d.name() for i in ids)]
        try:
            pool = conn.storagePoolLookupByName(f"{PREFIX}-{env['cell']}")
            pool.refresh(0)
            out += [f"volume {v}" for v in pool.listVolumes()]
        except libvirt.libvirtError:
            pass
        out += [f"network {n.name()}" for n in conn.listAllNetworks() if env["tag"] in n.name()]
    finally:
        conn.close()
    table = nat_table(env["net"])
    if subprocess.run(["nft", "list", "table", "ip", table], capture_output=True).returncode == 0:
        out.append(f"nft table ip {table}")
    return out
