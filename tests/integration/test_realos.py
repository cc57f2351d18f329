"""A real guest OS end to end: the Debian 12 image of scripts/build-guest-image uploaded to a
nanod process as a disk image, guests created from it with cloud-init on the real local
libvirtd (TCG), and everything checked from the host the way a user would: SSH (paramiko)
into the guest, TCP through its port forward and its security policy, the serial console
log, and what the guest itself reports (hostname, addresses, disks, cores, memory).

One nanod serves the module; two guests boot at once and are shared by the checks:
`vm` (address pool with the `dhcp` provider, admin `nano`, root refused, a data disk, a
port forward) and `rootvm` (`cloudinit` provider, root as admin, root allowed). A third
guest boots a tiny ISO from media (the portal's "install from media" flow).

Everything made here is named `realos*` (cells, compute pools, address pools, networks'
namespaces) under the suite's `nanotest` prefix, and removed at the end: guests through
the API, then what a cell left (domains, volumes, pool), the networks and NAT tables,
namespaces and the nanod process (by its pid). Run alone with `scripts/test -m realos`.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import pycdlib
import pytest

from reconciler.bootsector import hello_sector
from reconciler.drivers.networks import delete_nft_table
from reconciler.drivers.shell import LocalShell
from reconciler.guest_xml import serial_log_path
from reconciler.networking import bridge_name, nat_table, network_name
from tests.api.test_images import make_iso
from tests.conftest import ADMIN, ADMIN_PASSWORD, write_nanod_config
from tests.conftest import TEST_NAMES_PREFIX as PREFIX
from tests.helpers.realos import (
    GiB,
    MiB,
    Nano,
    Ssh,
    TcpClient,
    free_port,
    guest_image,
    logs_in,
    serve_nanod,
    ssh_ready,
    start_guest_server,
    stop_process,
    tcp_greeting,
    wait,
)
from tests.integration.conftest import remove_cell_leftovers
from tests.integration.test_networks_real import client_namespace

pytestmark = [pytest.mark.integration, pytest.mark.realos]

PORTS = (47400, 47499)      # cell ports for these guests' port forwards
BOOT = 420                  # seconds from start to SSH under TCG, with room for a busy host
ADMIN_SECRET = "Realos-First-7x"
NEW_SECRET = "Realos-Second-9y"
ROOT_SECRET = "Realos-Root-5z"
DNS = "192.0.2.53"          # a documentation address: only its presence in the guest counts
DATA_PATH = "/srv/data"
SYSTEM_DISK = 3 * GiB       # the image is 2 GiB: cloud-init grows the root partition
DATA_DISK = 256 * MiB


@dataclass
class Net:
    """A cell with a compute pool whose address pool (provider `provider`) is 10.x.y.0/24."""

    provider: str
    cell: str
    compute: str
    pool: str
    net: str

    @property
    def gateway(self) -> str:
        return f"{self.net}.1"


@dataclass
class Realos:
    nano: Nano
    proc: Any
    system: libvirt.virConnect
    workdir: Path
    image_id: str
    nets: dict[str, Net] = field(default_factory=dict)
    guests: dict[str, str] = field(default_factory=dict)   # name -> id
    namespaces: list[str] = field(default_factory=list)
    secrets: dict[str, str] = field(default_factory=dict)  # name -> admin password now
    started: dict[str, float] = field(default_factory=dict)  # name -> when it was started

    def address(self, name: str) -> str:
        return self.nano.ok("GET", f"/guests/{self.guests[name]}")["internal"][
            "allocated_address"]

    def ssh(self, name: str, user: str = "nano", timeout: float = BOOT) -> Ssh:
        return ssh_ready(self.address(name), user, self.secrets[name], timeout)

    def serial_log(self, name: str) -> str:
        path = Path(serial_log_path(self.guests[name]))
        return path.read_text(errors="replace") if path.exists() else ""

    def domain(self, name: str) -> libvirt.virDomain:
        try:
            return self.system.lookupByName(f"{PREFIX}-{self.guests[name]}")
        except libvirt.libvirtError:  # libvirtd restarted (another suite may restart it)
            self.system = libvirt.open("qemu:///system")
            return self.system.lookupByName(f"{PREFIX}-{self.guests[name]}")


def _net(nano: Nano, provider: str, storage: Path) -> Net:
    tag = uuid.uuid4().hex[:6]
    net = Net(provider, cell=f"realos-{provider}", compute=f"realos-{provider}",
              pool=f"realos-{provider}-{tag}",
              net=f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}")
    nano.ok("POST", f"/cells/{net.cell}", {"libvirt_uri": "qemu:///system", "virt_type": "qemu",
                                           "storage_path": str(storage / net.cell)})
    wait(lambda: nano.ok("GET", f"/cells/{net.cell}")["alive"], 60, f"cell {net.cell} alive")
    nano.ok("POST", f"/address_pools/{net.pool}", {"gateway": net.gateway, "dns": [DNS],
                                                   "provider": provider, "mode": "internal"})
    nano.ok("POST", f"/address_pools/{net.pool}/internal/ranges/{net.net}.10",
            {"end": f"{net.net}.99", "netmask": "255.255.255.0"})
    nano.ok("POST", f"/compute_pools/{net.compute}", {"network": net.pool})
    nano.ok("POST", f"/compute_pool_cells/{net.compute}/{net.cell}", {})
    return net


def guest_body(net: Net, name: str, image_id: str, **extra: Any) -> dict[str, Any]:
    body = {"name": name, "owner": ADMIN, "group": "admin", "pool": net.compute, "cores": 1,
            "memory": 512 * MiB, "disks": [SYSTEM_DISK, DATA_DISK], "auto_start": False,
            "template": "", "from_image": image_id, "modules": ["cloud-init", "qemu"],
            "qos": {"cpu_priority": "medium", "write_speed": 0, "write_iops": 0,
                    "read_speed": 0, "read_iops": 0, "receive_speed": 0, "send_speed": 0}}
    body.update(extra)
    return body


def _teardown(lab: Realos) -> None:
    for gid in list(lab.guests.values()):
        try:
            lab.nano.delete_guest(gid)
        except AssertionError as exc:  # removed below with the cell's leftovers
            print(f"guest {gid} not deleted through the API: {exc}")
    stop_process(lab.proc)
    lab.system.close()
    lab.system = libvirt.open("qemu:///system")  # a fresh one: libvirtd may have restarted
    for net in lab.nets.values():
        remove_cell_leftovers(lab.system, f"{PREFIX}-{net.cell}")
        try:
            network = lab.system.networkLookupByName(network_name(net.pool))
            if network.isActive():
                network.destroy()
            network.undefine()
        except libvirt.libvirtError:
            pass
        delete_nft_table(LocalShell(), "ip", nat_table(net.pool))
    for ns in lab.namespaces:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    lab.system.close()
    shutil.rmtree(lab.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def realos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Realos]:
    """nanod with the image uploaded and both guests created and started (they boot while
    the first checks wait for them)."""
    image, reason = guest_image()
    if image is None:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    try:
        system = libvirt.open("qemu:///system")
    except libvirt.libvirtError as exc:
        pytest.skip(f"qemu:///system is not reachable here: {exc}")
    base = Path("/var/tmp/nano-tests")
    base.mkdir(mode=0o755, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="realos-", dir=base))
    workdir.chmod(0o755)  # QEMU (libvirt-qemu) reaches the volumes below
    data = workdir / "data"
    data.mkdir()
    config = write_nanod_config(workdir / "nanod.yaml", {
        "reconciler": {"enabled": True, "workers": 4, "resync_seconds": 5,
                       "probe_seconds": 1, "offline_after": 3, "guest_poll_seconds": 1},
        "limits": {"guest_ports": list(PORTS)}})
    port = free_port()
    log = tmp_path_factory.mktemp("realos") / "nanod.log"  # kept by pytest, for a look
    print(f"nanod's log: {log}")
    proc = serve_nanod(data, port, config, log)
    nano = Nano(port)
    lab = Realos(nano, proc, system, workdir, image_id="")
    try:
        nano.ok("POST", "/system/", {"user": ADMIN, "password": ADMIN_PASSWORD})
        nano.login(ADMIN, ADMIN_PASSWORD)
        started = time.monotonic()
        lab.image_id = nano.upload_disk_image("realos-debian12", image)
        print(f"image {image} ({image.stat().st_size >> 20} MiB) uploaded in "
              f"{time.monotonic() - started:.1f} s")
        for provider in ("dhcp", "cloudinit"):
            lab.nets[provider] = _net(nano, provider, workdir)
        lab.secrets = {"realos-vm": ADMIN_SECRET, "realos-rootvm": ROOT_SECRET}
        bodies = {
            "realos-vm": guest_body(lab.nets["dhcp"], "realos-vm", lab.image_id, ports=[8000],
                                    cloud_init={"root_enabled": False, "admin_name": "nano",
                                                "admin_secret": ADMIN_SECRET,
                                                "data_path": DATA_PATH}),
            "realos-rootvm": guest_body(lab.nets["cloudinit"], "realos-rootvm", lab.image_id,
                                        disks=[SYSTEM_DISK],
                                        cloud_init={"root_enabled": True,
                                                    "admin_secret": ROOT_SECRET}),
        }
        for name, body in bodies.items():
            lab.guests[name] = nano.ok("POST", "/guests/", body)["id"]
        for name, gid in lab.guests.items():
            nano.created(gid)
            nano.ok("POST", f"/instances/{gid}", {})
            lab.started[name] = time.monotonic()
        yield lab
    finally:
        _teardown(lab)


@pytest.fixture(scope="module")
def vm(realos: Realos) -> str:
    """`realos-vm` once its admin logs in over SSH (first boot: cloud-init done)."""
    with realos.ssh("realos-vm") as ssh:
        ssh.run("cloud-init status --wait >/dev/null; true", timeout=BOOT)
    print(f"realos-vm: start to SSH ready and cloud-init done in "
          f"{time.monotonic() - realos.started['realos-vm']:.0f} s")
    return "realos-vm"


# -- first boot: what cloud-init made -----------------------------------------------------


def test_cloud_init_hostname_admin_and_root_refused(realos: Realos, vm: str) -> None:
    with realos.ssh(vm) as ssh:
        assert ssh.run("hostname") == vm
        assert ssh.run("id -un") == "nano"
        assert ssh.sudo("id -un") == "root"  # the admin has passwordless sudo
        assert "status: done" in ssh.run("cloud-init status")
        # the seed carried a hash: /etc/shadow holds a SHA-512 crypt hash for nano
        assert ssh.sudo("getent shadow nano | cut -d: -f2").startswith("$6$")
    # root_enabled false: root cannot log in over SSH, not even with the admin password
    assert not logs_in(realos.address(vm), "root", ADMIN_SECRET)
    log = realos.serial_log(vm)
    assert "Cloud-init v." in log and "finished" in log, log[-2000:]
    assert re.search(rf"{vm} login:", log), log[-2000:]  # getty on ttyS0


def test_root_disk_grown_and_data_disk_mounted(realos: Realos, vm: str) -> None:
    with realos.ssh(vm) as ssh:
        root_dev = ssh.run("findmnt -no SOURCE /")
        disk = "/dev/" + ssh.run(f"lsblk -no PKNAME {root_dev}")
        assert int(ssh.run(f"lsblk -bdno SIZE {disk}")) == SYSTEM_DISK
        part = int(ssh.run(f"lsblk -bdno SIZE {root_dev}"))
        fs = int(ssh.run("df -B1 --output=size / | tail -1"))
        assert part > SYSTEM_DISK - 8 * MiB, "growpart did not grow the root partition"
        assert fs > SYSTEM_DISK * 0.9, f"the root filesystem is {fs} bytes"
        source, fstype = ssh.run(f"findmnt -no SOURCE,FSTYPE {DATA_PATH}").split()
        assert fstype == "ext4"
        data_disk = "/dev/" + ssh.run(f"lsblk -no PKNAME {source}")
        # whatever sdX names the kernel gave them: the serials say which disk is which
        assert ssh.run(f"lsblk -dno SERIAL {disk}") == "nano-disk0"
        assert ssh.run(f"lsblk -dno SERIAL {data_disk}") == "nano-disk1"
        assert int(ssh.run(f"lsblk -bdno SIZE {data_disk}")) == DATA_DISK
        size = int(ssh.run(f"df -B1 --output=size {DATA_PATH} | tail -1"))
        assert DATA_DISK * 0.8 < size <= DATA_DISK
        ssh.sudo(f"touch {DATA_PATH}/written && rm {DATA_PATH}/written")


def test_dhcp_provider_address_gateway_and_dns(realos: Realos, vm: str) -> None:
    net = realos.nets["dhcp"]
    guest = realos.nano.ok("GET", f"/guests/{realos.guests[vm]}")
    address = guest["internal"]["allocated_address"]
    assert address.startswith(net.net + ".")
    with realos.ssh(vm) as ssh:
        assert ssh.run("ip -4 -o addr show scope global | awk '{print $4}'") == f"{address}/24"
        assert "dynamic" in ssh.run("ip -4 -o addr show scope global")  # a DHCP lease
        assert ssh.run("ip -4 route show default | awk '{print $3}'") == net.gateway
        assert DNS in ssh.run("resolvectl dns")


def test_cloudinit_provider_static_address_and_root_login(realos: Realos) -> None:
    name, net = "realos-rootvm", realos.nets["cloudinit"]
    address = realos.address(name)
    assert address.startswith(net.net + ".")
    # root is the admin and root_enabled is true: root logs in over SSH with its password
    with realos.ssh(name, user="root") as ssh:
        ssh.run("cloud-init status --wait >/dev/null; true", timeout=BOOT)
        assert ssh.run("hostname") == name
        assert ssh.run("ip -4 -o addr show scope global | awk '{print $4}'") == f"{address}/24"
        assert ssh.run("ip -4 route show default | awk '{print $3}'") == net.gateway
        assert DNS in ssh.run("resolvectl dns")
        # the address came from the seed's network-config, not from a DHCP lease
        assert "dynamic" not in ssh.run("ip -4 -o addr show scope global")
        assert int(ssh.run("lsblk -bdno SIZE /dev/$(lsblk -no PKNAME "
                           "$(findmnt -no SOURCE /))")) == SYSTEM_DISK
    assert not logs_in(address, "root", "Not-the-password-1")


# -- networking seen from outside the guest ----------------------------------------------


def bridge_client(lab: Realos, net: Net, last: int) -> str:
    """A namespace plugged into the address pool's bridge like another guest: its name."""
    tag = uuid.uuid4().hex[:6]
    ns, outer = f"realosb{tag}", f"realosp{tag}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    lab.namespaces.append(ns)
    for argv in (["ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0",
                  "netns", ns],
                 ["ip", "link", "set", outer, "master", bridge_name(net.pool)],
                 ["ip", "link", "set", outer, "up"],
                 ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
                 ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{net.net}.{last}/24",
                  "dev", "eth0"],
                 ["ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up"]):
        subprocess.run(argv, check=True, capture_output=True)
    return ns


def test_port_forward_carries_a_connection_into_the_guest(realos: Realos, vm: str) -> None:
    gid = realos.guests[vm]
    with realos.ssh(vm) as ssh:
        start_guest_server(ssh, 8000)

    def forwarded():
        ports = realos.nano.ok("GET", f"/guests/{gid}")["port_forwards"]
        return ports if ports and all(p["forwarded"] for p in ports) else None

    (forward,) = wait(forwarded, 60, "port forward in the guest's status")
    assert forward["guest_port"] == 8000 and PORTS[0] <= forward["port"] <= PORTS[1]
    ns, host_ip, _client = client_namespace(realos)  # a client outside the cell
    client = TcpClient(ns, host_ip, forward["port"])
    try:
        assert client.greeting == "hello 8000"
        assert client.say("through the forward") == "echo through the forward"
    finally:
        client.close()
    # a cell port nobody forwards does not reach the guest
    assert tcp_greeting(ns, host_ip, PORTS[1]) == "refused"


def test_security_policy_seen_with_real_packets(realos: Realos, vm: str) -> None:
    gid, net = realos.guests[vm], realos.nets["dhcp"]
    address = realos.address(vm)
    with realos.ssh(vm) as ssh:
        start_guest_server(ssh, 8001)
        start_guest_server(ssh, 8002)
    ns = bridge_client(realos, net, 200)
    assert tcp_greeting(ns, address, 8001) == "hello 8001"
    held = TcpClient(ns, address, 8002)  # established before the rules change
    try:
        assert held.greeting == "hello 8002"
        for rule in ({"action": "accept", "protocol": "tcp", "to_port": 22},
                     {"action": "accept", "protocol": "tcp", "to_port": 8001}):
            realos.nano.ok("POST", f"/guests/{gid}/security_policy/rules/", rule)
        realos.nano.ok("PUT", f"/guests/{gid}/security_policy/default_action",
                       {"action": "reject"})
        policy = realos.nano.ok("GET", f"/guests/{gid}/security_policy/")
        assert policy["default_action"] == "reject" and len(policy["rules"]) == 2
        wait(lambda: tcp_greeting(ns, address, 8002) == "refused", 60,
             "port 8002 refused by the default action")
        assert tcp_greeting(ns, address, 8001) == "hello 8001"
        # the connection made before the change carries on
        assert held.say("still here") == "echo still here"
        # and SSH, accepted by a rule, still logs in
        with realos.ssh(vm, timeout=30) as ssh:
            assert ssh.run("hostname") == vm
        # removing the rule for 8001 closes it to new connections
        realos.nano.ok("DELETE", f"/guests/{gid}/security_policy/rules/1")
        wait(lambda: tcp_greeting(ns, address, 8001) == "refused", 60, "8001 refused")
    finally:
        held.close()
        realos.nano.ok("PUT", f"/guests/{gid}/security_policy/default_action",
                       {"action": "accept"})
    wait(lambda: tcp_greeting(ns, address, 8002) == "hello 8002", 60, "policy open again")


# -- changes made through the API, seen inside --------------------------------------------


def test_password_reset_through_the_guest_agent(realos: Realos, vm: str) -> None:
    gid = realos.guests[vm]
    address = realos.address(vm)
    assert realos.nano.ok("PUT", f"/guests/{gid}/auth", {"password": NEW_SECRET})[
        "password"] == NEW_SECRET
    wait(lambda: logs_in(address, "nano", NEW_SECRET), 120, "the new password logs in")
    realos.secrets[vm] = NEW_SECRET
    assert not logs_in(address, "nano", ADMIN_SECRET)


def test_media_inserted_read_in_the_guest_and_ejected(realos: Realos, vm: str) -> None:
    gid = realos.guests[vm]
    payload = f"media {uuid.uuid4().hex}\n".encode()
    media_id = realos.nano.upload_media_image("realos-media", "hello.iso",
                                              make_iso("REALOSMEDIA", payload))
    realos.nano.ok("POST", f"/instances/{gid}/media", {"source": media_id, "type": 0})
    wait(lambda: realos.nano.ok("GET", f"/instances/{gid}")["media_attached"], 60,
         "media attached")
    with realos.ssh(vm) as ssh:
        def readable():
            return ssh.sudo("blkid -o value -s LABEL /dev/sr0", check=False) == "REALOSMEDIA"

        wait(readable, 30, "the media's label on /dev/sr0")
        ssh.sudo("mkdir -p /mnt/media && mount -o ro /dev/sr0 /mnt/media")
        assert ssh.run("cat /mnt/media/hello.txt") == payload.decode().strip()
        ssh.sudo("umount /mnt/media")
        realos.nano.ok("DELETE", f"/instances/{gid}/media")
        wait(lambda: not realos.nano.ok("GET", f"/instances/{gid}")["media_attached"], 60,
             "media ejected")
        wait(lambda: "No medium" in ssh.sudo("dd if=/dev/sr0 of=/dev/null count=1 2>&1",
                                             check=False), 30, "/dev/sr0 empty")
    realos.nano.ok("DELETE", f"/media_images/{media_id}")


def boot_id(lab: Realos, name: str, user: str = "nano", timeout: float = BOOT) -> str:
    with lab.ssh(name, user=user, timeout=timeout) as ssh:
        return ssh.run("cat /proc/sys/kernel/random/boot_id")


def test_acpi_reboot_changes_the_boot_id(realos: Realos, vm: str) -> None:
    gid = realos.guests[vm]
    before = boot_id(realos, vm)
    realos.nano.ok("DELETE", f"/instances/{gid}", {"reboot": True, "force": False})
    started = time.monotonic()
    def new_boot() -> str | None:
        try:
            now = boot_id(realos, vm, timeout=5)
        except AssertionError:  # SSH down while it reboots
            return None
        return now if now != before else None

    after = wait(new_boot, BOOT, "a new boot id")
    print(f"ACPI reboot to SSH in {time.monotonic() - started:.0f} s")
    assert after != before
    assert realos.nano.ok("GET", f"/instances/{gid}")["running"] is True


def test_acpi_stop_is_a_clean_shutdown_within_60_s(realos: Realos, vm: str) -> None:
    gid = realos.guests[vm]
    boot_id(realos, vm)  # up
    started = time.monotonic()
    realos.nano.ok("DELETE", f"/instances/{gid}", {"reboot": False, "force": False})
    realos.nano.running(gid, False, timeout=60)
    took = time.monotonic() - started
    print(f"ACPI shutdown took {took:.1f} s")
    assert took <= 60
    # the guest powered off; libvirt shows SHUTDOWN until QEMU has exited, then SHUTOFF
    state, reason = wait(lambda: (s := realos.domain(vm).state())[0] ==
                         libvirt.VIR_DOMAIN_SHUTOFF and s, 10, "QEMU gone")
    assert reason == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN, "not shut down by the guest itself"
    assert "reboot: Power down" in realos.serial_log(vm)


def test_cores_memory_and_disk_resize_seen_inside(realos: Realos, vm: str) -> None:
    gid = realos.guests[vm]
    if realos.nano.ok("GET", f"/instances/{gid}")["running"]:
        realos.nano.ok("DELETE", f"/instances/{gid}", {"reboot": False, "force": True})
        realos.nano.running(gid, False)
    realos.nano.ok("PUT", f"/guests/{gid}/cores", {"cores": 2, "immediate": False})
    realos.nano.ok("PUT", f"/guests/{gid}/memory", {"memory": 768 * MiB, "immediate": False})
    realos.nano.ok("PUT", f"/guests/{gid}/disks/resize/1", {"size": 384 * MiB})
    realos.nano.converged(gid)  # the reconciler made the changes; the guest starts with them
    realos.nano.ok("POST", f"/instances/{gid}", {})
    with realos.ssh(vm) as ssh:
        assert ssh.run("nproc") == "2"
        mem_kib = int(ssh.run("awk '/MemTotal/ {print $2}' /proc/meminfo"))
        assert 640 * 1024 < mem_kib <= 768 * 1024, mem_kib
        source = ssh.run(f"findmnt -no SOURCE {DATA_PATH}")
        data_disk = "/dev/" + ssh.run(f"lsblk -no PKNAME {source}")
        assert int(ssh.run(f"lsblk -bdno SIZE {data_disk}")) == 384 * MiB


def test_snapshot_then_revert_loses_the_file(realos: Realos, vm: str) -> None:
    gid = realos.guests[vm]
    realos.nano.ok("DELETE", f"/instances/{gid}", {"reboot": False, "force": False})
    realos.nano.running(gid, False, timeout=60)
    realos.nano.ok("POST", f"/instances/{gid}/snapshots/", {"name": "clean",
                                                           "description": "before"})
    wait(lambda: "clean" in realos.nano.ok("GET", f"/instances/{gid}/snapshots/"), 60,
         "snapshot made")
    realos.nano.ok("POST", f"/instances/{gid}/", {})
    with realos.ssh(vm) as ssh:
        ssh.run("echo written-after-the-snapshot > ~/marker && sync")
        assert ssh.run("cat ~/marker") == "written-after-the-snapshot"
    realos.nano.ok("DELETE", f"/instances/{gid}", {"reboot": False, "force": False})
    realos.nano.running(gid, False, timeout=60)
    realos.nano.ok("PUT", f"/instances/{gid}/snapshots/", {"target": "clean"})
    wait(lambda: realos.domain(vm).snapshotCurrent().getName() == "clean", 60,
         "reverted to the snapshot")
    realos.nano.ok("POST", f"/instances/{gid}", {})
    with realos.ssh(vm) as ssh:
        assert ssh.run("test -e ~/marker && echo present || echo gone") == "gone"


# -- install from media -------------------------------------------------------------------


def bootable_iso(message: str) -> bytes:
    """A tiny El Torito ISO (no emulation) whose boot image prints `message` on COM1 and
    halts: an installer's first sign of life."""
    boot = hello_sector(message, power_off=False).ljust(2048, b"\0")
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, vol_ident="REALOSINSTALL")
    iso.add_fp(io.BytesIO(boot), len(boot), "/BOOT.IMG;1")
    iso.add_eltorito("/BOOT.IMG;1", "/BOOT.CAT;1", media_name="noemul", boot_load_size=4)
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def test_guest_from_a_template_boots_its_install_iso(realos: Realos) -> None:
    nano, net = realos.nano, realos.nets["dhcp"]
    template = nano.ok("POST", "/templates/", {
        "name": f"realos-legacy-{uuid.uuid4().hex[:6]}", "admin": "root",
        "operating_system": "linux", "disk": "ide", "network": "rtl8139",
        "display": "cirrus", "control": "vnc", "usb": "", "tablet": ""})["id"]
    message = f"REALOS-INSTALLER-{uuid.uuid4().hex[:8]}"
    media_id = nano.upload_media_image("realos-installer", "installer.iso",
                                       bootable_iso(message))
    body = guest_body(net, "realos-install", "", template=template, modules=[],
                      disks=[64 * MiB], memory=128 * MiB)
    del body["from_image"]
    gid = nano.ok("POST", "/guests/", body)["id"]
    realos.guests["realos-install"] = gid
    nano.created(gid)
    nano.ok("POST", f"/instances/{gid}", {"from_media": True, "source": media_id})
    nano.running(gid, True)
    wait(lambda: message in realos.serial_log("realos-install"), 120,
         "the installer's line on the serial console")
    xml = realos.domain("realos-install").XMLDesc(0)
    assert "<boot dev='cdrom'/>" in xml and "bus='ide'" in xml and "rtl8139" in xml
    nano.delete_guest(gid)
    del realos.guests["realos-install"]
    nano.ok("DELETE", f"/media_images/{media_id}")
    nano.ok("DELETE", f"/templates/{template}")

