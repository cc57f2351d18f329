"""The KVM probe (reconciler/drivers/kvmprobe.py) on the real libvirtd: under TCG its boot
sector prints both markers (so the probe can see a guest's output at all), and
`nanod init --virt-type auto` registers the local cell with the virt type the probe chose,
saying why. Nothing is left behind: no probe domain, no work directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.drivers.kvmprobe import (
    LOOP_ITERATIONS,
    OK_MARKER,
    START_MARKER,
    WORK_BASE,
    boot_sector,
    run_probe,
)
from tests.conftest import ADMIN, ADMIN_PASSWORD

NANOD = str(Path(sys.executable).with_name("nanod"))


def test_boot_sector_is_one_bootable_sector_with_both_markers():
    sector = boot_sector()
    assert len(sector) == 512 and sector.endswith(b"\x55\xaa")
    assert START_MARKER in sector and OK_MARKER in sector
    assert LOOP_ITERATIONS.to_bytes(4, "little") in sector
    assert boot_sector(7) != sector and (7).to_bytes(4, "little") in boot_sector(7)


def leftovers(system_hv) -> tuple[list[str], list[str]]:
    domains = system_hv.call("list", lambda c: [d.name() for d in c.listAllDomains()])
    return ([d for d in domains if d.startswith("nanoprobe-kvm-")],
            [p for p in os.listdir(WORK_BASE) if p.startswith("nanoprobe-kvm-")])


@pytest.mark.integration
def test_probe_sees_the_boot_sector_print_under_tcg(system_hv):
    before = leftovers(system_hv)
    result = run_probe("qemu:///system", "qemu")
    assert result.ok, result
    assert result.started and result.error == ""
    assert START_MARKER.decode() in result.output and OK_MARKER.decode() in result.output
    assert result.seconds < result.timeout
    assert result.why().startswith(f"a qemu guest ran {LOOP_ITERATIONS:,} loop iterations")
    assert leftovers(system_hv) == before


@pytest.mark.integration
def test_init_registers_the_local_cell_with_the_probed_virt_type(system_hv, tmp_path):
    """On a host whose KVM emulates guest code (this CI VM class) the answer is qemu with
    the reason; where KVM works it is kvm, backed by the probe's output."""
    before = leftovers(system_hv)
    done = subprocess.run([NANOD, "init", "--data-dir", str(tmp_path / "data"), "--user",
                           ADMIN, "--password", ADMIN_PASSWORD, "--virt-type", "auto"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    chosen = [line for line in done.stdout.splitlines() if line.startswith("virt_type ")]
    assert len(chosen) == 1, done.stdout
    print(chosen[0])  # the decision on this host, for the log
    virt = chosen[0].split()[1].rstrip(":")
    if virt == "kvm":
        assert "a kvm guest ran" in chosen[0], chosen[0]
    else:
        assert virt == "qemu", chosen[0]
        assert chosen[0].endswith(": using TCG (qemu)"), chosen[0]
        if os.path.exists("/dev/kvm"):
            assert any(why in chosen[0] for why in (
                "KVM started but executed no guest code in 10 s",
                "KVM ran the probe's first instructions but not",
                "kvm guest could not start:")), chosen[0]
    assert f"registered this host as cell 'local' (qemu:///system, virt_type {virt})" \
        in done.stdout, done.stdout
    assert leftovers(system_hv) == before
