"""The firewall reconciler on the real local cell, with real packets: a guest created with a
security policy group gets the group's rules as its chain in the host's `nano` table; a
real guest (tests/helpers/tinyguest.py, booted with the guest's MAC on the address pool's
network) serves TCP 80 and 81 and a client plugged into the same bridge sees the policy;
a rule added through the API opens a port on the running guest without restarting it; a
hand edit of the chain is reported as drift and undone; deleting the guest removes its
chain and, with no policy left on the cell, the table.

The table is the host's own `nano` table (family chosen by the driver: `inet` through
br_netfilter on kernels without bridge conntrack), dispatching only on our guests' MACs;
the fixture removes it (NftFirewall.remove()) with everything else the test made. A
second test runs the reconciler against a cell whose shell has no nft and checks the
reason in the cell's status.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from reconciler.contract import Key
from reconciler.drivers.nft import NftFirewall
from reconciler.drivers.shell import RC_NOT_FOUND, CommandResult, LocalShell
from reconciler.firewall import chain_name, validate_policy
from reconciler.firewalls import FirewallReconciler
from state.compute import CellSpec
from tests.api.test_compute import until
from tests.conftest import TEST_NAMES_PREFIX as TABLE  # our nft table is named by the prefix
from tests.helpers import tinyguest
from tests.integration.test_networks_real import (  # noqa: F401  (fixtures)
    NetLab,
    allocated,
    boot_tiny,
    cell_status,
    clean_lab,
    condition,
    console_line,
    create,
    delete,
    hosts_become,
    make_lab,
    settings,
    tcp_from,
    tiny_image,
)


@pytest.fixture
def lab(api, io_loop, server, system, qemu_dir) -> Iterator[NetLab]:  # noqa: F811
    made = make_lab(api, io_loop, qemu_dir)
    yield made
    clean_lab(made, server, system)
    NftFirewall(LocalShell()).remove()


def bridge_client(lab: NetLab, last: int) -> tuple[str, str]:
    """A namespace plugged into the pool network's bridge (a veth whose host end is a
    bridge port, like a guest's tap): (namespace, its address)."""
    tag = uuid.uuid4().hex[:6]
    ns, outer = f"nanof{tag}", f"nanop{tag}"
    address = f"{lab.net}.{last}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    lab.namespaces.append(ns)
    for argv in (["ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0",
                  "netns", ns],
                 ["ip", "link", "set", outer, "master", lab.bridge],
                 ["ip", "link", "set", outer, "up"],
                 ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
                 ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{address}/24", "dev",
                  "eth0"],
                 ["ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up"]):
        subprocess.run(argv, check=True, capture_output=True)
    return ns, address


async def probe(ns: str, address: str, port: int) -> str:
    return await asyncio.get_running_loop().run_in_executor(None, tcp_from, ns, address, port,
                                                            3.0)


async def outcome(ns: str, address: str, port: int, want: str, what: str) -> None:
    async def check():
        return await probe(ns, address, port) == want

    await until(check, timeout=45, what=what)


def chain_rules(mac: str) -> list[str]:
    """The statements of the guest's chain as nft prints them (empty when absent)."""
    firewall = NftFirewall(LocalShell())
    done = subprocess.run(["nft", "list", "chain", str(firewall.family()), TABLE,
                           chain_name(mac)], capture_output=True, text=True)
    if done.returncode:
        return []
    body = done.stdout.split("{", 2)[-1]
    return [line.strip() for line in body.splitlines()
            if line.strip() and line.strip() not in ("}",)]


@pytest.mark.integration
@pytest.mark.gen_test(timeout=400)
async def test_policy_on_the_real_cell_with_real_packets(api, lab, server, system):  # noqa: F811
    firewall = NftFirewall(LocalShell())
    ok, reason = firewall.available()
    if not ok:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    image = tiny_image()

    group = await api.ok("POST", "/security_policy_groups/", {
        "name": f"web-{uuid.uuid4().hex[:6]}", "description": "web only",
        "enabled": True, "global": False, "default_action": "reject"})
    for rule in ({"action": "accept", "protocol": "tcp", "to_port": 80},
                 {"action": "accept", "protocol": "icmp"}):
        await api.ok("POST", f"/security_policy_groups/{group['id']}/rules", rule)
    mac = "00:16:3e:7c:" + ":".join(uuid.uuid4().hex[i:i + 2] for i in (0, 2))
    gid = await create(api, lab.guest_body("fw", ethernet_address=mac,
                                           security_policy_group=group["id"]))
    _mac, address = allocated(server, gid)

    # the group's policy, copied into the guest, is its chain in the cell's table
    want = validate_policy(mac, "reject", [{"action": "accept", "protocol": "tcp",
                                            "to_port": 80},
                                           {"action": "accept", "protocol": "icmp"}])

    async def chain_applied():
        return [p for p in firewall.inspect().policies if p.mac == mac] == [want]

    await until(chain_applied, timeout=30, what="the guest's chain in table nano")

    async def firewall_ready():
        status = await cell_status(api, lab.cell)
        ready = condition(status, "FirewallReady")
        return status if ready and ready["status"] else None

    status = await until(firewall_ready, timeout=30, what="FirewallReady")
    assert status["observed"]["firewall"]["family"] == str(firewall.family())

    # a real guest with that MAC, and a client on the same bridge
    await hosts_become(system, lab.network, {mac: address}, "the guest's host entry")
    log = boot_tiny(system, lab, image, mac, "fw")
    assert await console_line(log, tinyguest.ADDRESS_LINE, timeout=240) == address
    await console_line(log, re.compile("NANO-READY"), 60)
    domain_id = lab.domains[0].ID()
    client, _client_ip = bridge_client(lab, 250)
    await outcome(client, address, 80, "hello 80", "port 80 open")
    assert await probe(client, address, 81) == "refused"  # the default: reject (TCP reset)

    # a rule added through the API opens 81 on the running guest, no restart
    await api.ok("POST", f"/guests/{gid}/security_policy/rules",
                 {"action": "accept", "protocol": "tcp", "to_port": 81})
    await outcome(client, address, 81, "hello 81", "port 81 opened by the new rule")
    assert lab.domains[0].ID() == domain_id and log.read_text().count("NANO-BOOT") == 1
    await outcome(client, address, 80, "hello 80", "port 80 still open")

    # a hand edit on the cell: reported as drift and undone
    before = chain_rules(mac)
    subprocess.run(["nft", "insert", "rule", str(firewall.family()), TABLE, chain_name(mac),
                    "tcp", "dport", "22", "accept"], check=True)

    async def corrected():
        status = await cell_status(api, lab.cell)
        last = status["observed"]["firewall"].get("last_drift") or {}
        return last if chain_rules(mac) == before and last.get("changes") else None

    last = await until(corrected, timeout=30, what="drift found and corrected")
    assert any("not written by nano" in change for change in last["changes"])
    logs = (await api.ok("GET", "/logs/?limit=50"))["logs"]
    assert any(f"firewall of cell {lab.cell} drifted" in e["content"] for e in logs)
    await outcome(client, address, 81, "hello 81", "port 81 still open after the fix")

    # the guest goes: its chain goes, and with no policy left on the cell the table
    await delete(api, gid)

    async def chain_gone():
        return not chain_rules(mac)

    await until(chain_gone, timeout=30, what="the guest's chain removed")

    async def no_policies():
        ready = condition(await cell_status(api, lab.cell), "FirewallReady")
        return ready and ready["reason"] == "NoPolicies"

    await until(no_policies, timeout=30, what="FirewallReady: NoPolicies")


# -- a cell without nft ------------------------------------------------------------------


class NoNftShell:
    """A host shell on which `nft` does not exist (what LocalShell and ParamikoShell
    return for a missing program); everything else runs locally."""

    target = "cell-without-nft"

    def run(self, argv, *, input=None, timeout=30):
        if argv[0] == "nft":
            return CommandResult(RC_NOT_FOUND, "", "nft: command not found")
        return LocalShell().run(argv, input=input, timeout=timeout)

    def close(self):
        pass


class OneCellStore:
    """The store calls FirewallReconciler makes, for one cell with one guest policy: cell
    spec, the firewall part of its status, its conditions, the guests with a policy."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {}
        self.conditions: list[dict[str, Any]] = []

    def cell_spec(self, name):
        return CellSpec(name=name, generation=1, pool="p", enabled=True, address="192.0.2.9",
                        libvirt_uri="qemu:///system", ssh={}, virt_type="qemu",
                        storage_path="/var/lib/nano", bridge="", observed={"alive": True})

    def cell_net_status(self, name, key):
        return dict(self.status)

    def firewall_guests(self, cell):
        return [{"id": "g1", "name": "g1", "default_action": "reject", "rules": [],
                 "macs": {"internal": "00:16:3e:00:00:01"}}]

    def cell_conditions(self, name):
        return list(self.conditions)

    def record_cell_net_status(self, name, key, observed, conditions):
        self.status = observed
        self.conditions = list(conditions)
        return True


class Link:
    hypervisor = None
    shell = NoNftShell()


class Connections:
    def link(self, spec):
        return Link()


def test_a_cell_without_nft_says_so_in_its_status():
    store = OneCellStore()
    result = FirewallReconciler(store, Connections(), lambda key: None).reconcile(
        Key("firewall", "c1"))
    ready = condition({"conditions": store.conditions}, "FirewallReady")
    assert ready["status"] is False and ready["reason"] == "NftMissing"
    assert "nft is not installed" in ready["message"]
    assert store.status["available"] is False
    assert result.requeue_after and "unavailable" in result.note
