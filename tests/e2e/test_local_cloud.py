"""examples/local-cloud on the real local libvirtd (qemu:///system): apply, re-apply (all ok),
--check and --diff of a change, the change, export -> apply round trip, delete; beside what
scripts/setup makes (cell `local` in compute pool `default`), which is as it was before
after every step; and drift reported after a change made directly in libvirt on a real cell.
No example declares what scripts/setup makes.

Names, the subnet and the storage path come from the environment (the example's
${VAR:-default}s), so the test stays apart from an installation or another run on the same
host; every libvirt object the cells get (storage pools `nanotest-<cell>`, networks named
after the test's names) is removed at the end.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nanod import manifests
from tests.conftest import ADMIN
from tests.conftest import TEST_NAMES_PREFIX as PREFIX
from tests.e2e.conftest import EXAMPLES, Nanod, lines

pytestmark = pytest.mark.integration
EXAMPLE = EXAMPLES / "local-cloud"


def virsh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def libvirt_names(qemu_dir: Path) -> Iterator[dict[str, str]]:
    """Names for this run; tests take it before `nanod`, so its cleanup runs after nanod
    stopped (a running reconciler would recreate the pool)."""
    if shutil.which("virsh") is None or virsh("uri").returncode != 0:
        pytest.skip("needs the local libvirtd (qemu:///system): scripts/start-services")
    tag = uuid.uuid4().hex[:6]
    env = {"NANO_CELL": f"e2e-{tag}", "NANO_POOL": f"lab-{tag}", "NANO_NET": f"net-{tag}",
           "NANO_TEMPLATE": f"tpl-{tag}", "NANO_POLICY": f"pol-{tag}",
           "NANO_SUBNET": f"10.246.{1 + int(tag, 16) % 250}",  # unlikely to meet another's
           "NANO_STORAGE_PATH": str(qemu_dir / "images"), "NANO_VIRT_TYPE": "qemu",
           "SETUP_STORAGE_PATH": str(qemu_dir / "setup-images")}
    yield env
    for pool in (f"{PREFIX}-{env['NANO_CELL']}", f"{PREFIX}-{SETUP_CELL}"):
        for domain in virsh("list", "--all", "--name").stdout.split():
            if f"pool='{pool}'" in virsh("dumpxml", domain).stdout:  # left by a failure
                virsh("destroy", domain)
                virsh("undefine", domain, "--snapshots-metadata", "--remove-all-storage")
        virsh("pool-destroy", pool)
        virsh("pool-undefine", pool)
    nets = virsh("net-list", "--all", "--name").stdout.split()
    for net in nets:
        if tag in net:
            virsh("net-destroy", net)
            virsh("net-undefine", net)
    # nanod was stopped before its reconcilers could remove their nft tables
    from reconciler.drivers.networks import delete_nft_table
    from reconciler.drivers.nft import NftFirewall
    from reconciler.drivers.shell import LocalShell
    from reconciler.networking import nat_table

    delete_nft_table(LocalShell(), "ip", nat_table(env["NANO_NET"]))
    NftFirewall(LocalShell()).remove()


def example_copy(tmp_path: Path) -> Path:
    """A copy of the example that the test may edit."""
    copy = tmp_path / "local-cloud"
    shutil.copytree(EXAMPLE, copy)
    return copy


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


SETUP_CELL, SETUP_POOL = "local", "default"  # what scripts/setup (nanod init) registers
SETUP_NAMES = {("Cell", SETUP_CELL), ("ComputePool", SETUP_POOL), ("User", ADMIN),
               ("UserGroup", "admin"), ("Role", "super")}


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir()))
def test_no_example_declares_what_setup_made(example, tmp_path):
    """With their defaults, the examples name none of setup's resources, so applying and
    deleting them cannot take over or delete the set-up."""
    docs = manifests.load([EXAMPLES / example], environ={"NANO_EXAMPLE_DIR": str(tmp_path)})
    assert docs
    assert not {(d.kind, d.name) for d in docs} & SETUP_NAMES


def setup_state(nanod: Nanod) -> dict[str, Any]:
    """What a user sees of setup's cell and pool (status left out: it moves with time)."""
    cell = nanod.data_of(f"/cells/{SETUP_CELL}")
    return {"cell": {k: v for k, v in cell.items() if k not in ("status", "alive")},
            "pool": nanod.data_of(f"/compute_pools/{SETUP_POOL}"),
            "pool cells": sorted(c["name"] for c in nanod.data_of(
                f"/compute_pool_cells/{SETUP_POOL}/"))}


def register_like_setup(nanod: Nanod, storage_path: str) -> dict[str, Any]:
    """Cell `local` (qemu:///system) in compute pool `default`, as `nanod init` registers
    them; on a storage directory of the test's own (libvirt refuses a second pool on the
    directory of a production installation's pool)."""
    for method, path, body in (
            ("POST", f"/compute_pools/{SETUP_POOL}", {}),
            ("POST", f"/cells/{SETUP_CELL}", {"libvirt_uri": "qemu:///system",
                                              "virt_type": "qemu",
                                              "storage_path": storage_path}),
            ("POST", f"/compute_pool_cells/{SETUP_POOL}/{SETUP_CELL}", {})):
        reply = nanod.call(method, path, body)
        assert reply["error_code"] == 0, (path, reply)
    wait_for(lambda: nanod.data_of(f"/cells/{SETUP_CELL}")["alive"], 30, "setup cell alive")
    return setup_state(nanod)


def test_local_cloud_example_lifecycle(libvirt_names, nanod: Nanod, tmp_path: Path):
    env = libvirt_names
    setup = register_like_setup(nanod, env["SETUP_STORAGE_PATH"])
    example = example_copy(tmp_path)
    docs = [d for p in sorted(example.glob("*.yaml")) for d in yaml.safe_load_all(
        p.read_text())]
    count = len(docs)

    first = nanod.run("apply", "-f", str(example), "--wait", "180", extra_env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    out = lines(first.stdout)
    assert f"ok=0 changed={count} failed=0" in out, first.stdout
    assert any(line.startswith("converged:") for line in out), first.stdout
    cell = nanod.data_of(f"/cells/{env['NANO_CELL']}")
    assert cell["pool"] == env["NANO_POOL"] and cell["status"]["phase"] == "online"
    assert virsh("pool-info", f"{PREFIX}-{env['NANO_CELL']}").returncode == 0
    assert setup_state(nanod) == setup

    again = nanod.run("apply", "-f", str(example), extra_env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert lines(again.stdout)[-1] == f"ok={count} changed=0 failed=0", again.stdout

    # An operator's change: more of everything that can change in place.
    expected = []
    if (example / "catalog.yaml").exists():
        catalog = (example / "catalog.yaml").read_text()
        if "kind: Template" in catalog:
            edit(example / "catalog.yaml", "tablet: usb", "tablet: ''")
            expected.append("~ tablet: 'usb' -> '' [guests copy a template when "
                            "created: existing ones keep theirs]")
        if "kind: SecurityPolicyGroup" in catalog:
            edit(example / "catalog.yaml", "to_port: 80", "to_port: 443")
    if "kind: AddressPool" in (example / "infrastructure.yaml").read_text():
        edit(example / "infrastructure.yaml", "  ranges:\n",
             f"  ranges:\n    - start: {env['NANO_SUBNET']}.100\n"
             f"      end: {env['NANO_SUBNET']}.120\n      netmask: 255.255.255.0\n")
    if (example / "guests.yaml").exists():
        edit(example / "guests.yaml", "cores: 1", "cores: 2")
        # the example's guests are stopped: new cores need no restart (the server's planner)
        expected.append("~ cores: 1 -> 2 [live]")
    check = nanod.run("apply", "-f", str(example), "--check", "--diff", extra_env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    out = lines(check.stdout)
    for line in expected:
        assert line in out, check.stdout
    assert not lines(nanod.run("apply", "-f", str(example), "--check", extra_env=env).stdout)[
        -1].endswith("changed=0 failed=0")
    applied = nanod.run("apply", "-f", str(example), "--diff", extra_env=env)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    settled = nanod.run("apply", "-f", str(example), extra_env=env)
    assert lines(settled.stdout)[-1] == f"ok={count} changed=0 failed=0", settled.stdout

    exported = nanod.run("export")
    assert exported.returncode == 0, exported.stderr
    dump = tmp_path / "export.yaml"
    dump.write_text(exported.stdout)
    round_trip = nanod.run("apply", "-f", str(dump))
    assert round_trip.returncode == 0, round_trip.stdout + round_trip.stderr
    assert lines(round_trip.stdout)[-1].endswith(" changed=0 failed=0"), round_trip.stdout

    assert setup_state(nanod) == setup
    deleted = nanod.run("delete", "-f", str(example), "--diff", extra_env=env)
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert lines(deleted.stdout)[-1] == f"ok=0 changed={count} failed=0", deleted.stdout
    assert [c["name"] for c in nanod.data_of("/cells/")] == [SETUP_CELL]
    assert setup_state(nanod) == setup  # the set-up as it was: same pool, spec, generation
    gone = nanod.run("delete", "-f", str(example), extra_env=env)
    assert lines(gone.stdout)[-1] == f"ok={count} changed=0 failed=0", gone.stdout


def wait_for(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_drift_reported_after_a_change_made_directly_in_libvirt(libvirt_names, nanod: Nanod,
                                                                tmp_path: Path):
    env = libvirt_names
    cell, path = env["NANO_CELL"], Path(env["NANO_STORAGE_PATH"])
    manifest = tmp_path / "cell.yaml"
    manifest.write_text(f"kind: Cell\nname: {cell}\nspec:\n  libvirt_uri: qemu:///system\n"
                        f"  virt_type: qemu\n  storage_path: {path}\n")
    done = nanod.run("apply", "-f", str(manifest), "--wait", "60")
    assert done.returncode == 0, done.stdout + done.stderr
    assert lines(nanod.run("drift").stdout)[-1] == "drifted=0"

    # Behind nanod's back: the cell's storage pool is destroyed and undefined in libvirt,
    # and its directory replaced by a file, so the reconciler cannot bring it back.
    path.rmdir()
    path.write_text("not a directory")
    assert virsh("pool-destroy", f"{PREFIX}-{cell}").returncode == 0
    assert virsh("pool-undefine", f"{PREFIX}-{cell}").returncode == 0

    def drifted():
        out = nanod.run("drift")
        return out if out.returncode == 1 else None

    report = wait_for(drifted, 30, "nanod drift to report the cell")
    assert f"Cell/{cell}: not ready: StorageFailed: start pool {PREFIX}-{cell}: " in report.stdout
    assert "Not a directory" in report.stdout
    table = lines(nanod.run("get", "cell", cell).stdout)
    assert table[1].startswith(f"{cell} online False ") and "StorageReady=False" in table[1]

    path.unlink()  # repaired: the reconciler recreates the pool and the drift goes away
    wait_for(lambda: nanod.run("drift").returncode == 0, 30, "the drift to be repaired")
    assert virsh("pool-info", f"{PREFIX}-{cell}").returncode == 0
    deleted = nanod.run("delete", "-f", str(manifest))
    assert lines(deleted.stdout)[-1] == "ok=0 changed=1 failed=0"
