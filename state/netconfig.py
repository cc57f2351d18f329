"""The cloud-init network configuration of a guest whose address pool uses provider
`cloudinit`: its static addresses, the gateway and DNS, each NIC matched by its MAC.

A mixin of `state.store.Store`; the guest reconciler calls `guest_network_config` when it
builds a guest's NoCloud seed ISO (reconciler/guests.py `_write_seed`), so the guest
configures itself without DHCP. Pure apart from the reads; cloud-init network config
version 2 (netplan-shaped, rendered by cloud-init itself on distributions without netplan).
"""

from __future__ import annotations

from ipaddress import IPv4Network
from typing import Any

from state.models import AddressPool, AddressRange, ComputePool, Guest, GuestInterface

CLOUDINIT = "cloudinit"


def network_config(interfaces: list[dict[str, str]], *, gateway: str, prefixes: dict[str, int],
                   dns: list[str]) -> dict[str, Any] | None:
    """Cloud-init network config v2 for `interfaces` ([{type, mac, address}]); `prefixes`
    maps a NIC type to the prefix length of its range. The default route goes through the
    pool gateway on the internal NIC when it has an address, else on the external one;
    without explicit DNS servers the internal NIC asks the gateway (the network's
    dnsmasq forwards). None when no NIC has an address."""
    ethernets: dict[str, Any] = {}
    routed = False
    for kind in ("internal", "external"):
        nic = next((n for n in interfaces if n["type"] == kind and n.get("address")), None)
        if nic is None:
            continue
        entry: dict[str, Any] = {
            "match": {"macaddress": nic["mac"].lower()},
            "dhcp4": False,
            "addresses": [f"{nic['address']}/{prefixes[kind]}"],
        }
        if not routed:
            entry["routes"] = [{"to": "0.0.0.0/0", "via": gateway}]
            routed = True
        servers = list(dns) or ([gateway] if kind == "internal" else [])
        if servers:
            entry["nameservers"] = {"addresses": servers}
        ethernets[kind] = entry
    if not ethernets:
        return None
    return {"version": 2, "ethernets": ethernets}


class NetConfigStore:
    """Mixin of `state.store.Store`: per-guest network config for cloud-init."""

    def guest_network_config(self, guest_id: str) -> dict[str, Any] | None:
        """The network-config of guest `guest_id`'s seed ISO, or None when the guest's
        address pool does not use provider `cloudinit` (it then uses DHCP) or the guest has
        no address of it."""
        guest = Guest.get_or_none(Guest.id == guest_id)
        if guest is None:
            return None
        compute = ComputePool.get_or_none(ComputePool.name == guest.pool)
        if compute is None or not compute.network:
            return None
        pool = AddressPool.get_or_none(AddressPool.name == compute.network)
        if pool is None or pool.provider != CLOUDINIT:
            return None
        prefixes: dict[str, int] = {}
        for rng in AddressRange.select().where(AddressRange.pool == pool.id):
            net = IPv4Network(f"{pool.gateway}/{rng.netmask}", strict=False)
            prefixes.setdefault(rng.type, net.prefixlen)
        nics = [{"type": n.type, "mac": n.mac, "address": n.address}
                for n in GuestInterface.select().where(GuestInterface.guest == guest_id)
                if n.address and n.type in prefixes]
        return network_config(nics, gateway=pool.gateway, prefixes=prefixes,
                              dns=list(pool.dns or []))
