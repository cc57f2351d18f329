"""Shared pieces of the real-libvirt tests: the `system` connection (skipped, saying why,
where libvirtd does not answer), the `second_host` (tests/helpers/second_host.py) and the
removal of what a test cell left on the local libvirtd (guest domains on the cell's pool,
its volumes, the pool)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import libvirt
import pytest

from reconciler.naming import names
from tests.conftest import TEST_NAMES_PREFIX
from tests.helpers.second_host import second_host

__all__ = ["default_network_as_found", "remove_cell_leftovers", "second_host", "system"]


@pytest.fixture
def system() -> Iterator[libvirt.virConnect]:
    try:
        conn = libvirt.open("qemu:///system")
    except libvirt.libvirtError as exc:
        pytest.skip(f"qemu:///system is not reachable here: {exc}")
    yield conn
    conn.close()


def remove_cell_leftovers(conn: libvirt.virConnect, pool_name: str) -> None:
    """Domains whose disks live in `pool_name`, then the pool's volumes and the pool.
    Volume jobs still under way make libvirt refuse for a while: retried."""
    for dom in conn.listAllDomains():
        try:
            if dom.name().startswith(names().owned) and \
                    f"pool='{pool_name}'" in dom.XMLDesc(0):
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        except libvirt.libvirtError as exc:  # gone meanwhile (another test's, or its own)
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
    last = None
    for _attempt in range(40):
        try:
            pool = conn.storagePoolLookupByName(pool_name)
            if pool.isActive():  # an inactive pool lists no volumes: undefined as it is
                pool.refresh(0)
                for vol in pool.listAllVolumes():
                    vol.delete(0)
                pool.destroy()
            pool.undefine()
            return
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
                return
            last = exc
            time.sleep(0.5)
    # left behind, the pool would keep the next test's cell from converging
    raise AssertionError(f"cannot remove storage pool {pool_name}: {last}")


def remove_cell_pools(cells: Iterable[str]) -> None:
    """Remove the (empty) local storage pools of the tests' cells `cells` from the real
    libvirtd, once their reconciler has stopped (else it would make them again)."""
    conn = libvirt.open("qemu:///system")
    try:
        for name in (f"{TEST_NAMES_PREFIX}-{cell}" for cell in cells):
            try:
                pool = conn.storagePoolLookupByName(name)
            except libvirt.libvirtError:
                continue
            if pool.isActive():
                pool.destroy()
            pool.undefine()
    finally:
        conn.close()


@pytest.fixture(autouse=True)
def default_network_as_found() -> Iterator[None]:
    """Cells of pools without an address pool start libvirt's `default` network (and mark
    it autostart): put it back as the test found it."""
    try:
        conn = libvirt.open("qemu:///system")
        net = conn.networkLookupByName("default")
        was = (bool(net.isActive()), bool(net.autostart()))
    except libvirt.libvirtError:
        yield
        return
    try:
        yield
    finally:
        try:
            net.setAutostart(int(was[1]))
            if net.isActive() and not was[0]:
                net.destroy()
        except libvirt.libvirtError:
            pass
        conn.close()
