"""Fixtures for driver tests: the loopback `sshd` (tests/helpers/sshd.py) and a local
`qemu:///system` hypervisor that skips, saying why, where libvirtd is not running."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from reconciler.drivers.libvirt_hv import LibvirtHypervisor
from state.errors import NanoError
from tests.helpers.sshd import sshd

__all__ = ["sshd", "system_hv"]


@pytest.fixture
def system_hv() -> Iterator[LibvirtHypervisor]:
    hv = LibvirtHypervisor("qemu:///system")
    try:
        hv.libvirt_version()
    except NanoError as exc:
        hv.close()
        pytest.skip(f"qemu:///system cannot be opened: {exc.message}")
    try:
        yield hv
    finally:
        hv.close()
