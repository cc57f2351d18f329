"""Address pool networks on the real local libvirtd, through the API and nanod's reconcilers:
the pool's libvirt network with its gateway and one DHCP host per guest (changed live as
guests come and go, hand edits found and undone), the NAT table read back from the host's
nft, a real guest (Debian's kernel + busybox, tests/helpers/tinyguest.py) that gets
exactly the address nanod allocated by DHCP and answers through its port forward, and the
`cloudinit` provider's network-config read back from the seed ISO.

Everything runs inside objects the tests make: a cell of their own, an address pool with a
random 10.x.y.0/24 subnet, its network and bridge, the `ip nano_nat_<hash>` table of that
network (only its ports and subnet match), a veth to a client namespace. The fixture
removes them all (domains, volumes, the storage pool, the network, the NAT table, the
namespace) once nanod's reconciler stopped. The NAT table test needs only `ip netns`.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest

from reconciler.cloudinit import read_seed_iso
from reconciler.drivers.domains import LibvirtGuests
from reconciler.drivers.libvirt_hv import LibvirtHypervisor
from reconciler.drivers.networks import delete_nft_table
from reconciler.drivers.shell import LocalShell
from reconciler.networking import (
    NatSpec,
    PortForward,
    bridge_name,
    nat_table,
    network_name,
    parse_nat_listing,
    plan_nat,
    render_nat_script,
)
from tests.api.test_compute import until
from tests.conftest import TEST_NAMES_PREFIX as PREFIX
from tests.helpers import tinyguest
from tests.helpers.netns import netns_unusable
from tests.integration.conftest import remove_cell_leftovers

pytestmark = pytest.mark.integration
MiB = 1 << 20
PORTS = (47100, 47199)  # the cell ports handed to guests in these tests


@pytest.fixture
def settings(settings):
    settings["reconciler"] = {"enabled": True, "workers": 4, "resync_seconds": 5,
                              "probe_seconds": 1, "offline_after": 3,
                              "guest_poll_seconds": 1}
    settings["limits"] = {**settings.get("limits", {}), "guest_ports": list(PORTS)}
    return settings


@dataclass
class NetLab:
    """A cell, compute pool and address pool of one test, and what they make on the host."""

    cell: str
    compute: str
    pool: str
    net: str  # "10.x.y": the pool's /24
    qemu_dir: Path
    namespaces: list[str]
    domains: list[Any]

    @property
    def gateway(self) -> str:
        return f"{self.net}.1"

    @property
    def network(self) -> str:
        return network_name(self.pool)

    @property
    def bridge(self) -> str:
        return bridge_name(self.pool)

    @property
    def table(self) -> str:
        return nat_table(self.pool)

    def guest_body(self, name: str, **extra: Any) -> dict[str, Any]:
        body = {"name": name, "owner": "admin", "group": "admin", "pool": self.compute,
                "cores": 1, "memory": 128 * MiB, "disks": [64 * MiB], "auto_start": False,
                "template": "", "modules": [],
                "qos": {"cpu_priority": "medium", "write_speed": 0, "write_iops": 0,
                        "read_speed": 0, "read_iops": 0, "receive_speed": 0,
                        "send_speed": 0}}
        body.update(extra)
        return body


def _tag() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:6]
    return tag, f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}"


async def _alive(api, name):
    rec = await api.ok("GET", f"/cells/{name}")
    return rec if rec["alive"] else None


def make_lab(api, io_loop, qemu_dir, *, provider: str = "dhcp") -> NetLab:
    tag, net = _tag()
    lab = NetLab(cell=f"net-{tag}", compute=f"cp-{tag}", pool=f"ap-{tag}", net=net,
                 qemu_dir=qemu_dir, namespaces=[], domains=[])

    async def setup():
        await api.ok("POST", f"/cells/{lab.cell}", {"libvirt_uri": "qemu:///system",
                                                   "virt_type": "qemu",
                                                   "storage_path": str(qemu_dir / "pool")})
        await until(lambda: _alive(api, lab.cell), timeout=30, what="cell alive")
        await api.ok("POST", f"/address_pools/{lab.pool}", {
            "gateway": lab.gateway, "dns": ["192.0.2.53"], "provider": provider,
            "mode": "internal"})
        await api.ok("POST", f"/address_pools/{lab.pool}/internal/ranges/{net}.10",
                     {"end": f"{net}.99", "netmask": "255.255.255.0"})
        await api.ok("POST", f"/compute_pools/{lab.compute}", {"network": lab.pool})
        await api.ok("POST", f"/compute_pool_cells/{lab.compute}/{lab.cell}", {})

    io_loop.run_sync(setup)
    return lab


def clean_lab(lab: NetLab, server: Any, system: Any) -> None:
    """Remove everything the lab made, nanod's reconciler stopped first."""
    if server.controller:
        server.controller.stop(10.0)
    for dom in lab.domains:
        try:
            dom.destroy()
        except libvirt.libvirtError:
            pass
    remove_cell_leftovers(system, f"{PREFIX}-{lab.cell}")
    try:
        net = system.networkLookupByName(lab.network)
        if net.isActive():
            net.destroy()
        net.undefine()
    except libvirt.libvirtError:
        pass
    delete_nft_table(LocalShell(), "ip", lab.table)
    for ns in lab.namespaces:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def lab(api, io_loop, server, system, qemu_dir) -> Iterator[NetLab]:
    made = make_lab(api, io_loop, qemu_dir)
    yield made
    clean_lab(made, server, system)


@pytest.fixture
def cloudinit_lab(api, io_loop, server, system, qemu_dir) -> Iterator[NetLab]:
    made = make_lab(api, io_loop, qemu_dir, provider="cloudinit")
    yield made
    clean_lab(made, server, system)


# -- helpers ------------------------------------------------------------------------------


async def create(api, body) -> str:
    reply = await api.call("POST", "/guests/", body)
    assert reply.code == 0, reply.message
    gid = reply.data["id"]

    async def created():
        got = await api.call("GET", f"/guests/{gid}")
        if got.data and got.data.get("error"):
            raise AssertionError(f"creation failed: {got.data['error']}")
        return got.data if got.status == 200 and got.data.get("created") else None

    await until(created, timeout=90, what=f"guest {body['name']} created")
    return gid


async def delete(api, gid) -> None:
    await api.ok("DELETE", f"/guests/{gid}", {"force": True})

    async def gone():
        return (await api.call("GET", f"/guests/{gid}")).code == 404

    await until(gone, timeout=60, what="guest deleted")


def hosts_of(system, name) -> dict[str, str] | None:
    """{mac: ip} of the running network's DHCP hosts; None while it is not active."""
    try:
        net = system.networkLookupByName(name)
    except libvirt.libvirtError:
        return None
    if not net.isActive():
        return None
    root = ET.fromstring(net.XMLDesc(0))
    return {h.get("mac").lower(): h.get("ip") for h in root.findall("ip/dhcp/host")}


async def hosts_become(system, name, want: dict[str, str], what: str) -> None:
    async def check():
        return hosts_of(system, name) == want

    await until(check, timeout=60, what=what)


def ifindex(name: str) -> int:
    out = subprocess.run(["ip", "-j", "link", "show", name], capture_output=True, text=True,
                         check=True).stdout
    return int(json.loads(out)[0]["ifindex"])


def allocated(server, gid) -> tuple[str, str]:
    nic = server.store.guest_desired(gid).interfaces[0]
    return nic["mac"], nic["address"]


async def cell_status(api, cell) -> dict[str, Any]:
    return (await api.ok("GET", f"/cells/{cell}"))["status"]


def condition(status, kind):
    return next((c for c in status["conditions"] if c["type"] == kind), None)


async def console_line(log: Path, pattern: re.Pattern[str], timeout: float) -> str:
    async def check():
        try:
            found = pattern.search(log.read_text(errors="replace"))
        except OSError:
            return None
        return (found.group(1) if pattern.groups else found.group(0)) if found else None

    try:
        return await until(check, timeout=timeout, what=f"{pattern.pattern} on the console")
    except AssertionError:
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else "(no log)"
        raise AssertionError(f"no {pattern.pattern} on the console; its tail: {tail}") from None


def tiny_image():
    reason = tinyguest.unavailable()
    if not reason:
        try:
            return tinyguest.build()
        except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
            reason = f"cannot build the tiny guest: {exc}"
    print(f"skipping: {reason}")
    pytest.skip(reason)


def boot_tiny(system, lab: NetLab, image, mac: str, name: str) -> Path:
    log = lab.qemu_dir / f"{name}.console"
    xml = tinyguest.domain_xml(f"nanotest-{name}-{uuid.uuid4().hex[:6]}", image, mac=mac,
                               network=lab.network, console_log=log)
    lab.domains.append(system.createXML(xml, 0))
    return log


def client_namespace(lab: NetLab) -> tuple[str, str, str]:
    """A namespace behind a veth to the host: (namespace, host side address, client
    address). Its traffic to the host side address is what a client outside the cell
    sends to the cell's address."""
    tag = uuid.uuid4().hex[:6]
    ns, outer = f"nanoc{tag}", f"nanov{tag}"
    third = int(tag[:2], 16)
    host_ip, client_ip = f"172.31.{third}.1", f"172.31.{third}.2"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    lab.namespaces.append(ns)
    for argv in (["ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0",
                  "netns", ns],
                 ["ip", "addr", "add", f"{host_ip}/30", "dev", outer],
                 ["ip", "link", "set", outer, "up"],
                 ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
                 ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{client_ip}/30",
                  "dev", "eth0"],
                 ["ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up"],
                 ["ip", "netns", "exec", ns, "ip", "route", "add", "default", "via",
                  host_ip]):
        subprocess.run(argv, check=True, capture_output=True)
    return ns, host_ip, client_ip


def tcp_from(ns: str | None, address: str, port: int, timeout: float = 5.0) -> str:
    """From namespace `ns` (None: the host): what a TCP connection to address:port reads
    ('refused', 'timeout' or the first line the server sent)."""
    code = ("import socket,sys\n"
            "try:\n"
            f"    s=socket.create_connection(({address!r},{port}),{timeout})\n"
            f"    s.settimeout({timeout}); print(s.recv(64).decode().strip())\n"
            "except ConnectionRefusedError: print('refused')\n"
            "except OSError: print('timeout')\n")
    where = ["ip", "netns", "exec", ns] if ns else []
    done = subprocess.run([*where, "python3", "-c", code], capture_output=True, text=True,
                          timeout=timeout * 3 + 10)
    return done.stdout.strip() or done.stderr.strip()


# -- tests --------------------------------------------------------------------------------


def test_nat_table_round_trip_through_real_nft():
    """Render, load into a namespace's nft, read back: no difference; a hand edit is
    found; loading again replaces the table whole."""
    reason = netns_unusable()
    if reason:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    ns = f"nanonat{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        from tests.helpers.netns import NetnsShell

        shell = NetnsShell(ns)
        spec = NatSpec("nano_nat_0badc0de", "10.231.5.0/24", (
            PortForward(47100, 80, "10.231.5.10", "g-1"),
            PortForward(47101, 22, "10.231.5.11", "g-2")))
        assert plan_nat(spec, parse_nat_listing(None))  # nothing there yet
        assert shell.run(["nft", "-f", "-"], input=render_nat_script(spec).encode()).ok
        listing = shell.run(["nft", "-j", "list", "table", "ip", spec.table]).stdout
        assert plan_nat(spec, parse_nat_listing(listing)) == []
        assert shell.run(["nft", "add", "rule", "ip", spec.table, "prerouting", "tcp", "dport",
                          "47199", "accept"]).ok
        listing = shell.run(["nft", "-j", "list", "table", "ip", spec.table]).stdout
        drift = plan_nat(spec, parse_nat_listing(listing))
        assert [a.reason for a in drift] == ["rule not written by nano"]
        assert shell.run(["nft", "-f", "-"], input=render_nat_script(spec).encode()).ok
        listing = shell.run(["nft", "-j", "list", "table", "ip", spec.table]).stdout
        assert plan_nat(spec, parse_nat_listing(listing)) == []
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.gen_test(timeout=300)
async def test_address_pool_network_follows_guests(api, lab, server, system):
    # the cell's network appears with the gateway on its bridge, nothing to serve yet
    async def network_up():
        return hosts_of(system, lab.network) == {}

    await until(network_up, timeout=60, what="network active")
    root = ET.fromstring(system.networkLookupByName(lab.network).XMLDesc(0))
    assert root.find("forward").get("mode") == "route"
    assert root.find("bridge").get("name") == lab.bridge
    assert (root.find("ip").get("address"), root.find("ip").get("netmask")) == (
        lab.gateway, "255.255.255.0")
    addresses = json.loads(subprocess.run(["ip", "-j", "addr", "show", lab.bridge],
                                          capture_output=True, text=True, check=True).stdout)
    assert f"{lab.gateway}" in [a["local"] for a in addresses[0]["addr_info"]]
    bridge_index = ifindex(lab.bridge)

    # two guests: one host entry each, exactly the allocated MAC and address
    g1 = await create(api, lab.guest_body("n1", ports=[80, 443]))
    g2 = await create(api, lab.guest_body("n2", ethernet_address="00:16:3e:7a:00:02"))
    (mac1, ip1), (mac2, ip2) = allocated(server, g1), allocated(server, g2)
    assert mac2 == "00:16:3e:7a:00:02" and ip1 != ip2
    assert ip1.startswith(lab.net + ".") and ip2.startswith(lab.net + ".")
    await hosts_become(system, lab.network, {mac1: ip1, mac2: ip2}, "both host entries")

    # port forwards: in the guest's status and in the NAT table on the host
    async def ports_shown():
        ports = server.store.guest_desired(g1).observed.get("ports") or []
        return ports if [p["guest_port"] for p in ports] == [80, 443] and all(
            p["forwarded"] for p in ports) else None

    ports = await until(ports_shown, timeout=30, what="ports in the guest's status")
    assert all(PORTS[0] <= p["port"] <= PORTS[1] for p in ports)
    listing = subprocess.run(["nft", "-j", "list", "table", "ip", lab.table],
                             capture_output=True, text=True, check=True).stdout
    wanted = NatSpec(lab.table, f"{lab.net}.0/24", tuple(sorted(
        PortForward(p["port"], p["guest_port"], ip1, g1) for p in ports)))
    assert plan_nat(wanted, parse_nat_listing(listing)) == []

    # a hand-made host entry and a hand-made NAT rule are drift: reported and undone
    net = system.networkLookupByName(lab.network)
    net.update(libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST,
               libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, -1,
               f"<host mac='00:16:3e:7a:00:99' ip='{lab.net}.200'/>",
               libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE | libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG)
    subprocess.run(["nft", "add", "rule", "ip", lab.table, "prerouting", "tcp", "dport",
                    str(PORTS[1]), "accept"], check=True)

    # both edits may land in one reconcile or two: the log names each correction
    async def both_seen():
        logs = (await api.ok("GET", "/logs/?limit=50"))["logs"]
        text = " ".join(e["content"] for e in logs if "drifted and was corrected" in
                        e["content"])
        return "00:16:3e:7a:00:99" in text and "not written by nano" in text

    await until(both_seen, timeout=30, what="drift reported")
    await hosts_become(system, lab.network, {mac1: ip1, mac2: ip2}, "foreign host removed")

    async def nat_clean():
        out = subprocess.run(["nft", "-j", "list", "table", "ip", lab.table],
                             capture_output=True, text=True).stdout
        return plan_nat(wanted, parse_nat_listing(out)) == []

    await until(nat_clean, timeout=30, what="NAT table corrected")
    observed = (await cell_status(api, lab.cell))["observed"]["address_network"]
    assert observed["last_drift"]["changes"]

    async def settled():
        status = await cell_status(api, lab.cell)
        ready = condition(status, "NetworkReady")
        drifted = condition(status, "NetworkDrifted")
        return ready and ready["status"] and drifted and not drifted["status"]

    await until(settled, timeout=30, what="NetworkReady and no drift")

    # a guest leaves: its entry and forwards go, live (the bridge was never recreated)
    await delete(api, g1)
    await hosts_become(system, lab.network, {mac2: ip2}, "host entry of n1 removed")

    async def forwards_gone():
        out = subprocess.run(["nft", "-j", "list", "table", "ip", lab.table],
                             capture_output=True, text=True).stdout
        return plan_nat(NatSpec(lab.table, f"{lab.net}.0/24"), parse_nat_listing(out)) == []

    await until(forwards_gone, timeout=30, what="port forwards of n1 removed")
    assert ifindex(lab.bridge) == bridge_index
    pool = await api.ok("GET", f"/address_pools/{lab.pool}")
    assert [a["address"] for a in pool["allocated"]] == [ip2]

    # the address pool itself reports converged on its cells
    async def pool_ready():
        for item in await api.ok("GET", "/resource_status/"):
            if item["kind"] == "AddressPool" and item["name"] == lab.pool:
                return item if item["observed_generation"] == item["generation"] else None
        return None

    item = await until(pool_ready, timeout=30, what="address pool converged")
    assert condition(item, "Ready")["status"] is True
    await delete(api, g2)

    # the cell leaves the pool: the network and its NAT table are removed
    await api.ok("DELETE", f"/compute_pool_cells/{lab.compute}/{lab.cell}")

    async def network_gone():
        try:
            system.networkLookupByName(lab.network)
        except libvirt.libvirtError:
            out = subprocess.run(["nft", "list", "table", "ip", lab.table],
                                 capture_output=True, text=True)
            return out.returncode != 0
        return False

    await until(network_gone, timeout=60, what="network and NAT table removed")


@pytest.mark.gen_test(timeout=400)
async def test_tiny_guest_gets_the_allocated_address_and_its_port_forward(api, lab, server,
                                                                          system):
    image = tiny_image()
    mac = "00:16:3e:7b:" + ":".join(uuid.uuid4().hex[i:i + 2] for i in (0, 2))
    gid = await create(api, lab.guest_body("tiny", ethernet_address=mac, ports=[80]))
    got_mac, address = allocated(server, gid)
    assert got_mac == mac
    await hosts_become(system, lab.network, {mac: address}, "host entry of the guest")

    # the nanod guest stays stopped; a tiny domain with its MAC stands in for its OS
    log = boot_tiny(system, lab, image, mac, "tiny")
    seen = await console_line(log, tinyguest.ADDRESS_LINE, timeout=240)
    assert seen == address
    assert await console_line(log, re.compile(r"NANO-ROUTER=(\S+)"), 10) == lab.gateway
    await console_line(log, re.compile("NANO-READY"), 60)

    # from outside the cell: the forwarded cell port reaches the guest's port 80
    ns, host_ip, _client = client_namespace(lab)
    ports = server.store.guest_desired(gid).observed.get("ports") or []
    assert [p["guest_port"] for p in ports] == [80]
    answer = await asyncio.get_running_loop().run_in_executor(
        None, tcp_from, ns, host_ip, ports[0]["port"])
    assert answer == "hello 80"
    # the cell's own connections to its (non-loopback) address are forwarded too
    mine = await asyncio.get_running_loop().run_in_executor(
        None, tcp_from, None, host_ip, ports[0]["port"])
    assert mine == "hello 80"
    # a cell port nobody forwards is not the guest's
    other = await asyncio.get_running_loop().run_in_executor(
        None, tcp_from, ns, host_ip, PORTS[1])
    assert other == "refused"


@pytest.mark.gen_test(timeout=300)
async def test_cloudinit_provider_puts_the_address_in_network_config(api, cloudinit_lab,
                                                                     server, system):
    lab = cloudinit_lab
    body = lab.guest_body("ci", modules=["cloud-init"], cloud_init={
        "root_enabled": True, "admin_name": "nano", "admin_secret": "Secret-pass1",
        "data_path": "/opt/data"})
    gid = await create(api, body)
    mac, address = allocated(server, gid)
    drv = LibvirtGuests(LibvirtHypervisor("qemu:///system"))
    try:
        info = drv.volume(f"{PREFIX}-{lab.cell}", f"{PREFIX}-{gid}-seed.iso")
        assert info is not None
        files = read_seed_iso(drv.read_volume(f"{PREFIX}-{lab.cell}", info.name, info.capacity))
    finally:
        drv.hv.close()
    import yaml

    config = yaml.safe_load(files["network-config"])
    assert config["version"] == 2
    (nic,) = config["ethernets"].values()
    assert nic["match"] == {"macaddress": mac}
    assert nic["addresses"] == [f"{address}/24"]
    assert nic["routes"] == [{"to": "0.0.0.0/0", "via": lab.gateway}]
    assert nic["nameservers"] == {"addresses": ["192.0.2.53"]}
    assert nic["dhcp4"] is False
