"""The second host on this machine (scripts/second-host, issue 15's test rig): a second
libvirtd reached over `qemu+ssh://` that believes it is another host (its own hostname,
host UUID, /etc/libvirt, processes and network), runs a real TCG QEMU domain, is registered
by nanod as a cell through the API, shares one directory at the same path with this host,
and leaves nothing behind when it goes down. For failover tests it can hang (`freeze`,
`thaw`) and be fenced (`kill`: every process gone, its disk and network kept), then power
on again with the domains defined before.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.api.test_compute import until
from tests.conftest import TEST_NAMES_PREFIX as PREFIX
from tests.conftest import reconciling
from tests.helpers.bootsector import boot_disk
from tests.helpers.second_host import (
    STATE_DIR,
    SecondHost,
    run_script,
    second_host_up,
    unavailable,
)

pytestmark = pytest.mark.integration


def _host_libvirt() -> libvirt.virConnect:
    try:
        return libvirt.openReadOnly("qemu:///system")
    except libvirt.libvirtError as exc:
        pytest.skip(f"qemu:///system is not reachable here: {exc}")


def _uuid_of(capabilities: str) -> str:
    found = re.search(r"<host>\s*<uuid>([0-9a-f-]+)</uuid>", capabilities)
    assert found, capabilities[:500]
    return found.group(1)


def test_its_libvirtd_answers_over_ssh_as_another_host(second_host: SecondHost) -> None:
    conn = libvirt.open(second_host.uri())
    try:
        host = _host_libvirt()
        assert conn.getHostname() == f"nano-{second_host.name}" != socket.gethostname()
        theirs, ours = _uuid_of(conn.getCapabilities()), _uuid_of(host.getCapabilities())
        assert theirs == second_host.state["host_uuid"] and theirs != ours
        assert conn.getURI().startswith(f"qemu+ssh://root@{second_host.address}:22/system")
        # none of this host's domains, pools or networks: its /etc/libvirt is its own
        assert conn.listAllDomains() == []
        assert conn.listAllStoragePools() == []
        assert [n.name() for n in conn.listAllNetworks()] == ["default"]
        host.close()
    finally:
        conn.close()
    # its processes: a PID namespace whose init is the rig's, mounts and name its own
    init = second_host.ssh("cat", "/proc/1/cmdline")
    assert init.returncode == 0, init.stderr
    assert "_init" in init.stdout.split("\0")
    assert second_host.ssh("hostname").stdout.strip() == f"nano-{second_host.name}"
    conf = second_host.ssh("grep", "^host_uuid", "/etc/libvirt/libvirtd.conf").stdout
    assert second_host.state["host_uuid"] in conf
    assert not re.search(r"^host_uuid", Path("/etc/libvirt/libvirtd.conf").read_text(), re.M)
    addresses = second_host.ssh("ip", "-4", "-o", "addr").stdout
    assert f"{second_host.address}/30" in addresses and "192.0.2." not in addresses
    routes = second_host.ssh("ip", "route").stdout
    assert "default" not in routes  # it reaches nothing but this host's veth end


def _tcg_domain(shared: Path, name: str) -> tuple[str, Path, Path, str]:
    """A TCG domain's XML whose boot sector prints a line on its serial console (a file in
    `shared`), then halts: (xml, disk, console, message)."""
    disk = shared / f"{name}.qcow2"
    console = shared / f"{name}.console"
    message = f"hello from {name}"
    boot_disk(disk, message, power_off=False)
    xml = f"""<domain type='qemu'>
  <name>{name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{disk}'/><target dev='hda' bus='ide'/></disk>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""
    return xml, disk, console, message


def _wait_printed(console: Path, message: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while message not in (console.read_text(errors="replace") if console.exists() else ""):
        assert time.monotonic() < deadline, f"the guest printed nothing in {timeout} s"
        time.sleep(0.2)


def test_a_tcg_domain_runs_inside_it(second_host: SecondHost) -> None:
    name = f"{PREFIX}-h2-{uuid.uuid4().hex[:8]}"
    xml, disk, console, message = _tcg_domain(second_host.shared, name)
    conn = libvirt.open(second_host.uri())
    dom = conn.defineXML(xml)
    try:
        dom.create()
        _wait_printed(console, message)
        assert dom.isActive() and "<domain type='qemu'" in dom.XMLDesc(0)
        # this host's libvirtd knows nothing of it
        host = _host_libvirt()
        with pytest.raises(libvirt.libvirtError):
            host.lookupByName(name)
        host.close()
        # its QEMU is this host's binary, running in the second host's PID namespace
        pid_text = second_host.ssh("cat", f"/run/libvirt/qemu/{name}.pid").stdout.strip()
        qemu = second_host.host_pid(int(pid_text))
        assert os.readlink(f"/proc/{qemu}/exe").startswith("/usr/bin/qemu-system-")
        assert os.readlink(f"/proc/{qemu}/ns/pid") == \
            os.readlink(f"/proc/{second_host.init_pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
        # its cgroups are its own (a cgroup namespace over a subtree of this host's), and
        # live CPU tuning works there as on a real host
        assert os.readlink(f"/proc/{qemu}/ns/cgroup") == \
            os.readlink(f"/proc/{second_host.init_pid}/ns/cgroup")
        assert f"/nano-second-host-{second_host.name}/machine/" in \
            Path(f"/proc/{qemu}/cgroup").read_text()
        dom.setSchedulerParameters({"cpu_shares": 512})
        assert dom.schedulerParameters()["cpu_shares"] == 512
        # virtlockd holds the disk's lease (lock_manager = "lockd"): a lock on its inode
        if "virtlockd" in second_host.state.get("daemons", {}):
            lockd = second_host.host_pid(second_host.state["daemons"]["virtlockd"])
            st = disk.stat()
            inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
            holders = [line.split()[4] for line in Path("/proc/locks").read_text().splitlines()
                       if line.split()[5] == inode]
            assert str(lockd) in holders, (inode, holders)
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
        conn.close()
        for path in (disk, console):
            path.unlink(missing_ok=True)


def test_the_shared_directory_is_one_directory_at_one_path(second_host: SecondHost) -> None:
    shared = second_host.shared
    (shared / "from-host").write_text("written on the first host\n")
    assert second_host.ssh("cat", str(shared / "from-host")).stdout == \
        "written on the first host\n"
    # ssh joins its words into one command line for the remote shell
    done = second_host.ssh(f"echo written on {second_host.name} > {shared / 'from-second'}")
    assert done.returncode == 0, done.stderr
    assert (shared / "from-second").read_text() == f"written on {second_host.name}\n"
    st = shared.stat()
    assert second_host.ssh("stat", "-c", "%d:%i", str(shared)).stdout.strip() == \
        f"{st.st_dev}:{st.st_ino}"
    # while its libvirt directories are the rig's private ones, not this host's
    for target, sub in (("/var/lib/libvirt", "lib"), ("/etc/libvirt", "etc"),
                        ("/run/libvirt", "run")):
        private, ours = Path(second_host.state["root"]) / sub, Path(target).stat()
        theirs = second_host.ssh("stat", "-c", "%d:%i", target).stdout.strip()
        assert theirs == f"{private.stat().st_dev}:{private.stat().st_ino}" != \
            f"{ours.st_dev}:{ours.st_ino}"
    for name in ("from-host", "from-second"):
        (shared / name).unlink()


def _virsh(uri: str, *args: str, timeout: float) -> tuple[int | None, str]:
    """`virsh -c uri ARGS` in a session of its own: (exit code, output), or (None, ...) when
    it did not end in `timeout` s; then its group (virsh, the ssh it ran) is killed by id."""
    proc = subprocess.Popen(["virsh", "-c", uri, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None, f"no answer in {timeout} s"
    return proc.returncode, out


def _proc_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (R, S, T...); "" when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return ""
    return fields[0]


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return ""


def test_freeze_hangs_it_and_thaw_brings_it_back(second_host: SecondHost) -> None:
    uri, address = second_host.uri(), second_host.address
    code, out = _virsh(uri, "list", timeout=30)
    assert code == 0, out
    pid_ns = os.readlink(f"/proc/{second_host.init_pid}/ns/pid")
    done = second_host.freeze()
    try:
        assert done.stdout.startswith("froze ") and done.stdout.count("\n") == 1
        members = _namespace_pids(pid_ns)
        assert len(members) >= 5 and second_host.init_pid in members
        assert {p: _proc_state(p) for p in members} == {p: "T" for p in members}
        assert second_host.condition() == "frozen"
        # a hung host: its kernel accepts the TCP connection, nothing answers on it
        with socket.create_connection((address, 22), timeout=2) as sock:
            sock.settimeout(1)
            with pytest.raises(TimeoutError):
                sock.recv(4)
        assert _virsh(uri, "list", timeout=2)[0] is None
    finally:
        thawed = second_host.thaw(check=False)
    assert thawed.returncode == 0, thawed.stderr
    assert second_host.condition() == "running"
    assert not [p for p in _namespace_pids(pid_ns) if _proc_state(p) in ("T", "t")]
    code, out = _virsh(uri, "list", timeout=30)
    assert code == 0, out


@pytest.fixture
def settings(settings, second_host: SecondHost):
    settings["ssh"]["key_dir"] = str(Path(second_host.state["key_file"]).parent)
    return reconciling(settings, probe_seconds=0.5, offline_after=2)


@pytest.mark.gen_test(timeout=120)
async def test_nanod_registers_it_as_a_cell(api, second_host: SecondHost, figure) -> None:
    name = second_host.name
    started = time.monotonic()
    await api.ok("POST", f"/cells/{name}", second_host.body)

    async def alive():
        rec = await api.ok("GET", f"/cells/{name}")
        return rec if rec["alive"] else None

    rec = await until(alive, timeout=60, what="the second host's cell alive")
    figure(f"second host: registered to alive in {time.monotonic() - started:.1f} s")
    assert rec["libvirt_uri"].startswith(f"qemu+ssh://root@{second_host.address}:22/system")
    facts = rec["status"]["observed"]["facts"]
    assert facts["cpus"] == os.cpu_count()  # the same machine's CPUs
    assert facts["memory_total"] > facts["memory_available"] > 0
    assert facts["libvirt"] and facts["qemu"]
    conds = {c["type"]: c["status"] for c in rec["status"]["conditions"]}
    assert conds["CellReachable"] is True
    # its storage pool is made on the second host, in its own /var/lib/libvirt
    conn = libvirt.open(second_host.uri())
    try:
        pool = conn.storagePoolLookupByName(f"{PREFIX}-{name}")
        assert pool.isActive() and "<path>/var/lib/libvirt/images</path>" in pool.XMLDesc()
        host = _host_libvirt()
        assert f"{PREFIX}-{name}" not in [p.name() for p in host.listAllStoragePools()]
        host.close()

        await api.ok("DELETE", f"/cells/{name}")

        async def gone():
            return (await api.call("GET", f"/cells/{name}")).code == 404

        await until(gone, timeout=30, what="cell deleted")
        assert f"{PREFIX}-{name}" not in [p.name() for p in conn.listAllStoragePools()]
    finally:
        conn.close()


def _namespace_pids(ns_link: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") == ns_link:
                    found.append(int(entry))
            except OSError:
                pass
    return found


def _assert_gone(name: str, state: dict, pid_ns: str) -> None:
    """Nothing of the rig `state` describes is left: processes, netns, veth, mounts, temp
    directories, cgroups, state file."""
    assert _namespace_pids(pid_ns) == []
    for pid in (state["init_pid"], state["unshare_pid"]):
        assert not Path(f"/proc/{pid}").exists() or \
            os.readlink(f"/proc/{pid}/ns/pid") != pid_ns
    assert state["netns"] not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                text=True).stdout
    assert not Path(f"/sys/class/net/{state['veth']}").exists()
    assert not Path(state["root"]).exists() and not Path(state["shared"]).exists()
    assert state["root"] not in Path("/proc/self/mountinfo").read_text()
    assert state["cgroups"] and not any(Path(g["path"]).exists() for g in state["cgroups"])
    assert not (STATE_DIR / f"{name}.json").exists()


def test_up_twice_is_one_host_and_down_leaves_nothing(figure) -> None:
    why = unavailable()
    if why:
        pytest.skip(why)
    name = f"d{os.getpid() % 10000000}"
    started = time.monotonic()
    first = second_host_up(name)
    up_seconds = time.monotonic() - started
    try:
        again = second_host_up(name)
        assert again.body == first.body and again.init_pid == first.init_pid
        state = first.state
        pid_ns = os.readlink(f"/proc/{first.init_pid}/ns/pid")
        members = _namespace_pids(pid_ns)
        assert len(members) >= 5  # init, virtlogd, virtlockd, libvirtd, sshd
        assert state["netns"] in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                text=True).stdout
        assert Path(f"/sys/class/net/{state['veth']}").exists()
        assert all(Path(g["path"]).is_dir() for g in state["cgroups"])
    finally:
        started = time.monotonic()
        done = first.down()
        down_seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    figure(f"second host: up {up_seconds:.1f} s, down {down_seconds:.1f} s")
    _assert_gone(name, state, pid_ns)
    again_down = run_script("down", "--name", name)
    assert again_down.returncode == 0 and "nothing to do" in again_down.stderr


def test_a_killed_host_comes_up_anew_and_down_removes_both(second_host_name: str) -> None:
    """SIGKILL to its init is the whole host dying (the kernel kills its PID namespace):
    `status` says so, `up` removes the remains and starts a new one, `down` leaves nothing
    of either."""
    first = second_host_up(second_host_name)
    dead_ns = os.readlink(f"/proc/{first.init_pid}/ns/pid")
    os.kill(first.init_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _namespace_pids(dead_ns):
        assert time.monotonic() < deadline, "its processes outlived its init"
        time.sleep(0.1)
    status = run_script("status", "--name", second_host_name)
    assert '"running": false' in status.stdout
    second = second_host_up(second_host_name)
    try:
        assert second.init_pid != first.init_pid
        assert not Path(first.state["root"]).exists()  # the dead one's remains are gone
        conn = libvirt.open(second.uri())
        assert conn.getHostname() == f"nano-{second_host_name}"
        conn.close()
        live_ns = os.readlink(f"/proc/{second.init_pid}/ns/pid")
    finally:
        done = second.down()
    assert done.returncode == 0, done.stderr
    _assert_gone(second_host_name, second.state, live_ns)


@pytest.fixture
def second_host_name() -> Iterator[str]:
    why = unavailable()
    if why:
        pytest.skip(why)
    name = f"k{os.getpid() % 10000000}"
    yield name
    run_script("down", "--name", name)  # when the test failed half way


def test_kill_fences_it_and_up_powers_it_on_with_its_domains(second_host_name: str) -> None:
    """`kill` (the fence) while a TCG guest runs there: every process of it gone (by pid),
    the guest's disk lease free, its definition, directories, netns and veth kept; `up`
    powers the same host on, its libvirtd with that domain defined and shut off."""
    host = second_host_up(second_host_name)
    dom_name = f"{PREFIX}-h2-{uuid.uuid4().hex[:8]}"
    xml, disk, console, message = _tcg_domain(host.shared, dom_name)
    conn = libvirt.open(host.uri())
    try:
        conn.defineXML(xml).create()
        _wait_printed(console, message)
    finally:
        conn.close()
    qemu = host.host_pid(int(host.ssh("cat", f"/run/libvirt/qemu/{dom_name}.pid").stdout))
    pid_ns = os.readlink(f"/proc/{host.init_pid}/ns/pid")
    members = {p: _start_time(p) for p in [*_namespace_pids(pid_ns), host.state["unshare_pid"]]}
    members = {p: t for p, t in members.items() if t}  # not those that ended meanwhile
    assert qemu in members and host.init_pid in members and len(members) >= 7
    definition = Path(host.state["root"]) / "etc" / "qemu" / f"{dom_name}.xml"
    assert definition.is_file()

    done = host.kill()
    assert done.stdout.startswith("killed ") and done.stdout.count("\n") == 1, done.stdout
    assert "qemu-system" in done.stdout and "libvirtd" in done.stdout
    assert _namespace_pids(pid_ns) == []
    left = [p for p, t in members.items() if _start_time(p) == t and _proc_state(p) != "Z"]
    assert left == [], [(p, _proc_state(p), Path(f"/proc/{p}/cmdline").read_bytes())
                        for p in left]
    state = host.status()
    assert state["state"] == "killed" and state["running"] is False
    # what a host keeps on its disk, and its network
    assert dom_name in definition.read_text()
    assert Path(f"/run/netns/{host.state['netns']}").exists()
    assert Path(f"/sys/class/net/{host.state['veth']}").exists()
    # the guest's disk lease went with its virtlockd: another host may start it now
    st = disk.stat()
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    assert not [line for line in Path("/proc/locks").read_text().splitlines()
                if line.split()[5] == inode]
    with pytest.raises(OSError):  # nothing answers at its address
        socket.create_connection((host.address, 22), timeout=0.5).close()

    again = host.up()
    try:
        assert again.body == host.body and again.init_pid not in members
        for key in ("root", "hostname", "host_uuid", "netns", "veth", "key_file"):
            assert again.state[key] == host.state[key], key
        conn = libvirt.open(again.uri())
        try:
            assert conn.getHostname() == f"nano-{second_host_name}"
            assert _uuid_of(conn.getCapabilities()) == host.state["host_uuid"]
            dom = conn.lookupByName(dom_name)
            assert dom.isPersistent() and not dom.isActive()
            console.unlink()
            dom.create()  # it boots again there
            _wait_printed(console, message)
            dom.destroy()  # (`down` would wait for a QEMU run with -no-shutdown)
        finally:
            conn.close()
        live_ns = os.readlink(f"/proc/{again.init_pid}/ns/pid")
    finally:
        done = again.down()
    assert done.returncode == 0, done.stderr
    _assert_gone(second_host_name, again.state, live_ns)


def test_a_frozen_host_can_be_killed_and_down_removes_a_killed_or_frozen_one(
        second_host_name: str) -> None:
    first = second_host_up(second_host_name)
    pid_ns = os.readlink(f"/proc/{first.init_pid}/ns/pid")
    first.freeze()
    done = first.kill()
    assert done.stdout.startswith("killed ") and "init" in done.stdout
    assert _namespace_pids(pid_ns) == [] and first.condition() == "killed"
    assert "already killed" in first.kill().stdout
    refused = first.freeze(check=False)
    assert refused.returncode == 1 and "killed" in refused.stderr
    done = first.down()
    assert done.returncode == 0, done.stderr
    _assert_gone(second_host_name, first.state, pid_ns)

    second = second_host_up(second_host_name)  # a new one: `down` removed the killed one
    assert second.state["root"] != first.state["root"]
    pid_ns = os.readlink(f"/proc/{second.init_pid}/ns/pid")
    second.freeze()
    assert second.condition() == "frozen"
    done = second.down()
    assert done.returncode == 0, done.stderr
    _assert_gone(second_host_name, second.state, pid_ns)
