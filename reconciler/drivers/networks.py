"""libvirt networks on one cell: the NAT networks of address pools (ours, named `nano-...`)
and libvirt's own `default` network, which guests of pools without an address pool use.

Called by the cell reconciler (networks a cell needs) from worker threads. DHCP host
entries of our networks are changed live with `networkUpdate`, so guests keep running.
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt

from reconciler.drivers.libvirt_hv import LibvirtHypervisor
from state.errors import Invalid, NotFound


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
    if not name.startswith("nano-"):
        raise Invalid(f"refusing to define network {name!r}: not a nano-owned name")

    def go(conn: libvirt.virConnect) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            old = conn.networkLookupByName(name)
            if old.isActive():
                old.destroy()
        conn.networkDefineXML(xml)

    hv.call(f"define network {name}", go)
    return ensure_started(hv, name)


def delete_network(hv: LibvirtHypervisor, name: str) -> None:
    if not name.startswith("nano-"):
        raise Invalid(f"refusing to delete network {name!r}: not a nano-owned name")

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
