"""libvirt networks on one cell: the NAT networks of address pools (ours, named `nano-...`
for names prefix `nano`, reconciler/naming.py)
and libvirt's own `default` network, which guests of pools without an address pool use;
and the nftables NAT tables that go with our networks.

Called by the cell reconciler (networks a cell needs) and the network reconciler
(reconciler/networking.py) from worker threads. DHCP host entries of our networks are
changed live with `networkUpdate`, so guests keep running. The nft helpers run `nft` with
argv lists through the cell's `HostShell` (scripts on stdin, one transaction each).
"""

from __future__ import annotations

import contextlib
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt

from reconciler import naming
from reconciler.drivers.libvirt_hv import LibvirtHypervisor
from reconciler.drivers.shell import RC_NOT_FOUND, HostShell, check
from state.errors import Invalid, NotFound, Permanent


@dataclass(frozen=True)
class NetworkState:
    name: str
    active: bool
    xml: str
    error: str = ""


def network_state(hv: LibvirtHypervisor, name: str) -> NetworkState | None:
    def read(conn: libvirt.virConnect) -> NetworkState:
        net = conn.networkLookupByName(name)
        return NetworkState(name, bool(net.isActive()), net.XMLDesc(0))

    try:
        return hv.call(f"read network {name}", read)
    except NotFound:
        return None


def ensure_started(hv: LibvirtHypervisor, name: str) -> NetworkState:
    """Start a defined network (and mark it autostart) when it is not active. A network
    that cannot start is reported in `error`, not raised: the cell says why."""
    def start(conn: libvirt.virConnect) -> NetworkState:
        net = conn.networkLookupByName(name)
        if not net.isActive():
            try:
                net.create()
            except libvirt.libvirtError as exc:
                return NetworkState(name, False, net.XMLDesc(0), str(exc.get_error_message()))
        with contextlib.suppress(libvirt.libvirtError):
            net.setAutostart(1)
        return NetworkState(name, True, net.XMLDesc(0))

    return hv.call(f"start network {name}", start)


def define_network(hv: LibvirtHypervisor, xml: str) -> NetworkState:
    """Define (or redefine) one of our networks and start it; an active network whose
    definition changed is restarted (guests on it reattach when libvirt restarts it? no:
    callers change DHCP hosts live and redefine only when addressing changed)."""
    name = ET.fromstring(xml).findtext("name") or ""
    naming.names().require_owned(name, "define network")

    def go(conn: libvirt.virConnect) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            old = conn.networkLookupByName(name)
            if old.isActive():
                old.destroy()
        conn.networkDefineXML(xml)

    hv.call(f"define network {name}", go)
    return ensure_started(hv, name)


def delete_network(hv: LibvirtHypervisor, name: str) -> None:
    naming.names().require_owned(name, "delete network")

    def go(conn: libvirt.virConnect) -> None:
        net = conn.networkLookupByName(name)
        if net.isActive():
            net.destroy()
        net.undefine()

    with contextlib.suppress(NotFound):
        hv.call(f"delete network {name}", go)


def update_dhcp_host(hv: LibvirtHypervisor, name: str, mac: str, address: str, *,
                     add: bool) -> None:
    """Add or remove one static DHCP host entry of a running network, live and persistent."""
    host = f"<host mac='{mac}' ip='{address}'/>"
    command = (libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST if add
               else libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE)
    flags = libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE | libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG

    def go(conn: libvirt.virConnect) -> None:
        net = conn.networkLookupByName(name)
        if not net.isActive():
            flags_now = libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG
        else:
            flags_now = flags
        net.update(command, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, -1, host, flags_now)

    hv.call(f"update DHCP host {mac} on {name}", go)


def list_networks(hv: LibvirtHypervisor, prefix: str) -> list[NetworkState]:
    """Every network (defined or transient) whose name starts with `prefix`, by name."""
    def read(conn: libvirt.virConnect) -> list[NetworkState]:
        out = []
        for net in conn.listAllNetworks(0):
            name = net.name()
            if not name.startswith(prefix):
                continue
            try:
                out.append(NetworkState(name, bool(net.isActive()), net.XMLDesc(0)))
            except libvirt.libvirtError as exc:  # removed while we listed
                if exc.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
                    raise
        return sorted(out, key=lambda n: n.name)

    return hv.call(f"list networks {prefix}*", read)


def network_ports(hv: LibvirtHypervisor, name: str) -> int:
    """How many guest interfaces are plugged into the running network `name` (0 when it
    is not running or does not exist): a restart would cut them off. Where libvirt cannot
    list a network's ports (the test driver), running domains' interfaces are counted."""
    def read(conn: libvirt.virConnect) -> int:
        net = conn.networkLookupByName(name)
        if not net.isActive():
            return 0
        try:
            return len(net.listAllPorts(0))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                raise
        count = 0
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            root = ET.fromstring(dom.XMLDesc(0))
            count += sum(1 for src in root.findall("devices/interface/source")
                         if src.get("network") == name)
        return count

    try:
        return hv.call(f"list ports of network {name}", read)
    except NotFound:
        return 0


def define_network_config(hv: LibvirtHypervisor, xml: str) -> None:
    """Replace the persistent definition of one of our networks without touching the
    running one (the change applies at its next start)."""
    name = ET.fromstring(xml).findtext("name") or ""
    naming.names().require_owned(name, "define network")
    hv.call(f"define network {name}", lambda conn: conn.networkDefineXML(xml))


# -- nftables tables that go with our networks (NAT), run through the cell's HostShell --------


def nft_table_listing(shell: HostShell, family: str, table: str) -> str | None:
    """`nft -j list table <family> <table>`, None when the table does not exist. Raises
    Permanent when nft is missing or fails otherwise."""
    result = shell.run(["nft", "-j", "list", "table", family, table], timeout=60)
    if result.rc == RC_NOT_FOUND:
        raise Permanent("nft is not installed on the cell: install nftables")
    if result.ok:
        return result.stdout
    if "No such file or directory" in result.stderr:
        return None
    check(result, f"nft list table {family} {table}")
    return None


def load_nft(shell: HostShell, script: str, what: str) -> None:
    """Run an `nft -f -` script (one transaction: all of it or nothing)."""
    result = shell.run(["nft", "-f", "-"], input=script.encode(), timeout=120)
    if result.rc == RC_NOT_FOUND:
        raise Permanent("nft is not installed on the cell: install nftables")
    check(result, what)


def delete_nft_table(shell: HostShell, family: str, table: str) -> None:
    """Delete one table of ours if it exists (idempotent)."""
    ours = naming.names()
    if not ours.owns_nft_table(table):
        raise Invalid(f"refusing to delete nft table {table!r}: not ours (prefix "
                      f"{ours.prefix!r})")
    if nft_table_listing(shell, family, table) is not None:
        load_nft(shell, f"delete table {family} {table}\n", f"nft delete table {family} {table}")


def nft_table_names(shell: HostShell, family: str) -> list[str]:
    """Names of the tables of one family (`nft -j list tables <family>`; it reads the whole
    ruleset, so callers do it rarely)."""
    result = shell.run(["nft", "-j", "list", "tables", family], timeout=120)
    if result.rc == RC_NOT_FOUND:
        raise Permanent("nft is not installed on the cell: install nftables")
    check(result, f"nft list tables {family}")
    try:
        items = json.loads(result.stdout)["nftables"]
    except (ValueError, KeyError, TypeError) as exc:
        raise Permanent(f"nft list tables {family}: not a JSON listing ({exc})") from exc
    return sorted(item["table"]["name"] for item in items
                  if isinstance(item, dict) and "table" in item)


def existing_links(shell: HostShell, names: list[str]) -> set[str]:
    """Which of the network interfaces `names` exist on the cell."""
    if not names:
        return set()
    script = 'for n; do [ -e "/sys/class/net/$n" ] && echo "$n"; done; true'
    result = check(shell.run(["sh", "-c", script, "sh", *names], timeout=60),
                   "look for network interfaces")
    return set(result.stdout.split())
