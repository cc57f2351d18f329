"""LibvirtHypervisor against libvirt's test driver (one private `test:///` file per cell),
then against the real libvirtd: `qemu:///system` storage pools, and `qemu+ssh://` through a
real sshd on loopback (the remote path: node info, domains, events, reconnect)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reconciler.drivers.libvirt_hv import (
    NAMESPACE,
    DomainState,
    LibvirtHypervisor,
    LifecycleEvent,
    NodeInfo,
    ObservedDomain,
    parse_owned_id,
    render_netfs_pool_xml,
    render_owner_metadata,
)
from state.errors import Conflict, Invalid, NotFound, Permanent, Unavailable
from tests.conftest import TEST_NAMES_PREFIX as PREFIX
from tests.helpers.sshd import SshServer
from tests.helpers.testdriver import TestCell, write_test_cell

GiB_KIB = 1024 * 1024


class Events:
    """Collects lifecycle callbacks and waits for the ones a test expects."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None, str]] = []
        self._cond = threading.Condition()

    def __call__(self, name: str, owned_id: str | None, event: LifecycleEvent) -> None:
        with self._cond:
            self.seen.append((name, owned_id, str(event)))
            self._cond.notify_all()

    def wait_for(self, *expected: tuple[str, str | None, str], timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not all(e in self.seen for e in expected):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {expected}, saw {self.seen}")
                self._cond.wait(left)


@pytest.fixture
def cell(tmp_path: Path) -> TestCell:
    return write_test_cell(tmp_path / "cell-1.xml", cpus=16, memory_kib=64 * GiB_KIB, domains=3)


@pytest.fixture
def hv(cell: TestCell) -> Iterator[LibvirtHypervisor]:
    hypervisor = LibvirtHypervisor(cell.uri)
    try:
        yield hypervisor
    finally:
        hypervisor.close()


# -- pure ------------------------------------------------------------------------------


def test_ownership_mark_round_trips() -> None:
    mark = render_owner_metadata("4f1c-guest")
    element = ET.fromstring(mark)
    assert element.tag == f"{{{NAMESPACE}}}guest" and element.get("id") == "4f1c-guest"
    assert parse_owned_id(mark) == "4f1c-guest"
    # as dom.metadata() returns it: namespace declared, prefix gone
    assert parse_owned_id(f'<guest xmlns="{NAMESPACE}" id="g1"/>') == "g1"
    whole = f"<domain type='kvm'><name>x</name><metadata>{mark}</metadata></domain>"
    assert parse_owned_id(whole) == "4f1c-guest"
    assert parse_owned_id("<domain><name>x</name></domain>") is None
    assert parse_owned_id("<other id='x'/>") is None
    assert parse_owned_id(None) is None and parse_owned_id("not xml <") is None


def test_netfs_pool_xml_escapes_and_names_every_part() -> None:
    xml = render_netfs_pool_xml(f"{PREFIX}-shared", "nfs.example", "/export/a&b", "/mnt/shared/")
    pool = ET.fromstring(xml)
    assert pool.get("type") == "netfs" and pool.findtext("name") == f"{PREFIX}-shared"
    assert pool.find("source/host").get("name") == "nfs.example"  # type: ignore[union-attr]
    assert pool.find("source/dir").get("path") == "/export/a&b"  # type: ignore[union-attr]
    assert pool.find("source/format").get("type") == "nfs"  # type: ignore[union-attr]
    assert pool.findtext("target/path") == "/mnt/shared"


# -- test driver -----------------------------------------------------------------------


def test_node_info_of_a_simulated_cell(hv: LibvirtHypervisor) -> None:
    info = hv.node_info()
    assert info == NodeInfo(cpus=16, memory_bytes=64 * GiB_KIB * 1024, model="x86_64",
                            hostname=info.hostname)  # fmt: skip
    assert info.hostname
    assert hv.libvirt_version().count(".") == 2


def test_domains_listed_with_owned_ids(hv: LibvirtHypervisor, cell: TestCell) -> None:
    expected = {
        d.name: ObservedDomain(d.name, d.uuid, DomainState.RUNNING, d.owned_id, 1, 128 << 20)
        for d in cell.domains
    }
    assert {d.name: d for d in hv.list_domains()} == expected
    assert all(d.owned_id for d in expected.values())


def test_cells_are_private_and_unowned_domains_have_no_id(tmp_path: Path) -> None:
    other = write_test_cell(tmp_path / "cell-2.xml", cpus=4, memory_kib=8 * GiB_KIB,
                            domains=2, owned=False, running=False, name_prefix="vm")  # fmt: skip
    empty = write_test_cell(tmp_path / "cell-3.xml", cpus=2, memory_kib=GiB_KIB)
    first, second = LibvirtHypervisor(other.uri), LibvirtHypervisor(empty.uri)
    try:
        listed = first.list_domains()
        assert sorted(d.name for d in listed) == ["vm0", "vm1"]
        assert {(d.owned_id, d.state) for d in listed} == {(None, DomainState.STOPPED)}
        assert second.list_domains() == []
        assert second.node_info().cpus == 2
    finally:
        first.close()
        second.close()


def test_lifecycle_events_arrive_with_owned_ids(hv: LibvirtHypervisor, cell: TestCell) -> None:
    events = Events()
    hv.register_lifecycle_events(events)
    d0, d1 = cell.domains[0], cell.domains[1]
    conn = hv._connection()  # the test driver's state lives in this connection only

    conn.lookupByName(d0.name).destroy()
    events.wait_for((d0.name, d0.owned_id, "stopped"))
    assert {d.name: d.state for d in hv.list_domains()}[d0.name] == DomainState.STOPPED
    conn.lookupByName(d0.name).create()
    events.wait_for((d0.name, d0.owned_id, "started"))

    dom = conn.lookupByName(d1.name)
    dom.suspend()
    dom.resume()
    dom.destroy()
    dom.undefine()  # gone: its id comes from what the hypervisor saw before
    events.wait_for(
        (d1.name, d1.owned_id, "suspended"),
        (d1.name, d1.owned_id, "resumed"),
        (d1.name, d1.owned_id, "undefined"),
    )

    guest_id, theirs = str(uuid.uuid4()), str(uuid.uuid4())
    for name, gid in ((f"{PREFIX}-{guest_id}", guest_id), (f"nano-{theirs}", theirs)):
        conn.defineXML(  # ours, and a guest of another nanod (the production prefix)
            f"<domain type='test'><name>{name}</name><metadata>{render_owner_metadata(gid)}"
            "</metadata><memory>65536</memory><os><type>hvm</type></os></domain>"
        )
    conn.defineXML("<domain type='test'><name>foreign</name><memory>65536</memory>"
                   "<os><type>hvm</type></os></domain>")  # fmt: skip
    events.wait_for((f"{PREFIX}-{guest_id}", guest_id, "defined"),
                    (f"nano-{theirs}", None, "defined"), ("foreign", None, "defined"))


def test_pools_on_the_test_driver(hv: LibvirtHypervisor, tmp_path: Path) -> None:
    state = hv.ensure_dir_pool(f"{PREFIX}-local", str(tmp_path / "images"))
    assert (state.name, state.active, state.error, state.type) == (f"{PREFIX}-local", True, None, "dir")
    assert state.capacity > 0 and state.path == str(tmp_path / "images")
    assert hv.ensure_dir_pool(f"{PREFIX}-local", str(tmp_path / "images")) == state
    assert hv.pool_state(f"{PREFIX}-local") == state
    with pytest.raises(Conflict, match="exists as dir at .*/images, wanted dir at .*/elsewhere"):
        hv.ensure_dir_pool(f"{PREFIX}-local", str(tmp_path / "elsewhere"))
    hv.delete_pool(f"{PREFIX}-local")
    hv.delete_pool(f"{PREFIX}-local")  # already gone: fine
    with pytest.raises(NotFound, match=f"{PREFIX}-local"):
        hv.pool_state(f"{PREFIX}-local")


def test_only_our_pools_are_touched(hv: LibvirtHypervisor, tmp_path: Path) -> None:
    hv._connection().storagePoolCreateXML(  # somebody else's pool on the cell
        f"<pool type='dir'><name>default</name><target><path>{tmp_path}</path></target></pool>"
    )
    with pytest.raises(Invalid, match="'default' is not ours"):
        hv.delete_pool("default")
    with pytest.raises(Invalid):
        hv.ensure_dir_pool("default", str(tmp_path / "other"))
    untouched = hv.pool_state("default")
    assert untouched.active and untouched.path == str(tmp_path)


def test_errors_are_translated(tmp_path: Path) -> None:
    broken = tmp_path / "broken.xml"
    broken.write_text("<node><domain>")
    with pytest.raises(Permanent, match=f"connect test://{broken}"):
        LibvirtHypervisor(f"test://{broken}").node_info()
    unreachable = LibvirtHypervisor(f"qemu+unix:///system?socket={tmp_path}/no-such-sock")
    with pytest.raises(Unavailable, match="no-such-sock"):
        unreachable.list_domains()


def test_close_then_use_again_reconnects(hv: LibvirtHypervisor, cell: TestCell) -> None:
    assert len(hv.list_domains()) == 3
    hv.close()
    # a fresh open of the file: the hypervisor starts again from the file's contents
    assert len(hv.list_domains()) == len(cell.domains)


# -- real libvirtd ---------------------------------------------------------------------


@pytest.mark.integration
def test_dir_pool_on_system_libvirt(system_hv: LibvirtHypervisor, tmp_path: Path) -> None:
    name, path = f"{PREFIX}-test-{uuid.uuid4().hex[:8]}", tmp_path / "pool"
    try:
        state = system_hv.ensure_dir_pool(name, str(path))
        assert state.active and state.error is None and path.is_dir()
        fs = os.statvfs(path)
        assert state.capacity == fs.f_blocks * fs.f_frsize
        assert 0 < state.available <= state.capacity
        assert system_hv.ensure_dir_pool(name, str(path)).active  # converged: no change

        (path / "disk.qcow2").write_bytes(b"\0" * 4096)  # a volume appears after refresh
        with pytest.raises(Conflict, match="still holds 1 volume"):
            system_hv.delete_pool(name)
        (path / "disk.qcow2").unlink()

        system_hv.delete_pool(name)
        with pytest.raises(NotFound):
            system_hv.pool_state(name)
        assert path.is_dir()  # files are never deleted with the pool
    finally:
        system_hv.delete_pool(name)


@pytest.mark.integration
def test_netfs_pool_that_cannot_mount_reports_why(
    system_hv: LibvirtHypervisor, tmp_path: Path
) -> None:
    """No NFS client on this machine (and no server): the pool stays defined, inactive,
    autostarted, with the mount error to show the user."""
    name = f"{PREFIX}-nfs-{uuid.uuid4().hex[:8]}"
    try:
        state = system_hv.ensure_netfs_pool(name, "127.0.0.1", "/srv/nano", str(tmp_path / "m"))
        assert not state.active and state.type == "netfs"
        assert state.error and "mount" in state.error and "nfs" in state.error
        again = system_hv.ensure_netfs_pool(name, "127.0.0.1", "/srv/nano", str(tmp_path / "m"))
        assert not again.active and again.error
        assert system_hv.pool_state(name).active is False
    finally:
        system_hv.delete_pool(name)


@pytest.fixture
def remote_hv(sshd: SshServer, system_hv: LibvirtHypervisor) -> Iterator[LibvirtHypervisor]:
    hypervisor = LibvirtHypervisor(sshd.libvirt_uri())
    try:
        yield hypervisor
    finally:
        hypervisor.close()


@pytest.mark.integration
def test_remote_cell_over_qemu_ssh(
    remote_hv: LibvirtHypervisor, system_hv: LibvirtHypervisor, sshd: SshServer
) -> None:
    assert remote_hv.uri.startswith(f"qemu+ssh://root@127.0.0.1:{sshd.port}/system?keyfile=")
    assert remote_hv.node_info() == system_hv.node_info()
    assert remote_hv.libvirt_version() == system_hv.libvirt_version()
    assert remote_hv.list_domains() == system_hv.list_domains()


def virsh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virsh", "-q", "-c", "qemu:///system", *args], capture_output=True, text=True, timeout=30
    )


@pytest.fixture
def tiny_domain(tmp_path: Path) -> Iterator[Callable[[], tuple[str, str]]]:
    """Defines (on demand) a diskless 32 MiB TCG domain on qemu:///system with our mark;
    destroys and undefines it afterwards."""
    names: list[str] = []

    def define() -> tuple[str, str]:
        guest_id = str(uuid.uuid4())
        name = f"{PREFIX}-{guest_id}"  # ours: the mark and our names prefix
        xml = tmp_path / f"{name}.xml"
        xml.write_text(
            f"<domain type='qemu'><name>{name}</name>"
            f"<metadata>{render_owner_metadata(guest_id)}</metadata>"
            "<memory unit='MiB'>32</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64'>hvm</type></os><devices>"
            "<graphics type='vnc' listen='127.0.0.1' autoport='yes'/></devices></domain>"
        )
        names.append(name)
        done = virsh("define", str(xml))
        assert done.returncode == 0, done.stderr
        return name, guest_id

    yield define
    for name in names:
        virsh("destroy", name)
        virsh("undefine", name)


@pytest.mark.integration
def test_remote_lifecycle_events(
    remote_hv: LibvirtHypervisor, tiny_domain: Callable[[], tuple[str, str]]
) -> None:
    events = Events()
    remote_hv.register_lifecycle_events(events)
    name, guest_id = tiny_domain()
    events.wait_for((name, guest_id, "defined"))
    assert virsh("start", name).returncode == 0
    events.wait_for((name, guest_id, "started"))
    listed = {d.name: d for d in remote_hv.list_domains()}
    assert listed[name].state == DomainState.RUNNING and listed[name].owned_id == guest_id
    assert listed[name].memory_bytes == 32 << 20 and listed[name].vcpus == 1
    assert virsh("destroy", name).returncode == 0
    assert virsh("undefine", name).returncode == 0
    events.wait_for((name, guest_id, "stopped"), (name, guest_id, "undefined"))


@pytest.mark.integration
def test_remote_connection_is_reopened_with_its_callbacks(
    remote_hv: LibvirtHypervisor, sshd: SshServer, tiny_domain: Callable[[], tuple[str, str]]
) -> None:
    events = Events()
    remote_hv.register_lifecycle_events(events)
    before = remote_hv.node_info()
    for pid in sshd.session_pids():  # cut the SSH connection under libvirt
        os.kill(pid, signal.SIGTERM)
    assert remote_hv.node_info() == before  # reconnected once, transparently
    name, guest_id = tiny_domain()
    events.wait_for((name, guest_id, "defined"))  # events flow on the new connection


def test_long_work_runs_in_its_callers_thread(hv: LibvirtHypervisor) -> None:
    """Calls without a limit (streams, copies, live migrations) never take the cell's own
    threads, which its probes and status calls need: two migrations from one cell once
    held all of them and the cell looked offline."""
    caller = threading.current_thread()
    seen = hv.call("long work", lambda conn: threading.current_thread(), timeout=None)
    assert seen is caller
    limited = hv.call("status", lambda conn: threading.current_thread())
    assert limited is not caller  # a limited call runs in the cell's threads
