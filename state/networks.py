"""Address pools, their ranges and IP address management (IPAM), cell port forwards, and the
network view the network reconciler renders.

Called by the API (`api/networks.py`) for the seed's "Address Pool" and "Address Range"
routes, by guest creation and deletion (`allocate_guest_addresses`, `release_guest_addresses`,
`allocate_guest_ports`, `release_guest_ports`, inside the caller's transaction) and by the
network reconciler (`address_pool_network`). Security policies live in `state/policies.py`;
`NetworkStore` carries them too, so the Store gains both with one base.

Allocation is safe under concurrency without a global lock: candidates are the lowest free
addresses (ports), each insert runs in a savepoint, and the unique index on (pool, address)
(cell, port) decides a race; the loser rolls back its savepoint and tries the next one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import peewee

from state.db import db
from state.errors import Conflict, Invalid, NotFound
from state.identity import check_name
from state.models import (
    AddressAllocation,
    AddressPool,
    AddressRange,
    ComputePool,
    GuestInterface,
    PortAllocation,
    now,
)
from state.policies import PolicyStore, locked, validate_rule, write_transaction

__all__ = ["NetworkStore", "validate_rule", "check_range", "RANGE_TYPES"]

PROVIDERS = ("dhcp", "cloudinit")
MODES = ("internal", "external", "both")
RANGE_TYPES = ("internal", "external")
MIN_PREFIX, MAX_PREFIX = 8, 30
DEFAULT_PORT_RANGE = (20000, 29999)


# -- pure checks -----------------------------------------------------------------------------


def ipv4(value: Any, field: str) -> IPv4Address:
    """An IPv4 address from its dotted form, or Invalid naming the field."""
    if not isinstance(value, str):
        raise Invalid(f"{field}: must be an IPv4 address such as 192.168.1.1, "
                      f"got {type(value).__name__}")
    try:
        return IPv4Address(value)
    except ValueError:
        raise Invalid(f"{field}: {value!r} is not an IPv4 address such as 192.168.1.1") from None


def prefix_of(netmask: Any) -> int:
    """The prefix length of a dotted netmask ('255.255.255.0' -> 24)."""
    if not isinstance(netmask, str):
        raise Invalid("netmask: must be a dotted netmask such as 255.255.255.0")
    try:
        net = IPv4Network(f"0.0.0.0/{netmask}")
    except ValueError:
        net = None
    # IPv4Network also takes host masks (0.0.0.255) and bare lengths: insist on a netmask
    if net is None or str(net.netmask) != netmask:
        raise Invalid(f"netmask: {netmask!r} is not a netmask such as 255.255.255.0")
    if not MIN_PREFIX <= net.prefixlen <= MAX_PREFIX:
        raise Invalid(f"netmask: {netmask} (/{net.prefixlen}) must be between "
                      f"/{MIN_PREFIX} (255.0.0.0) and /{MAX_PREFIX} (255.255.255.252)")
    return net.prefixlen


def subnet_of(gateway: str, netmask: str) -> IPv4Network:
    """The pool's subnet: the gateway's network under the ranges' netmask."""
    return IPv4Network(f"{gateway}/{prefix_of(netmask)}", strict=False)


def check_gateway(value: Any) -> str:
    address = ipv4(value, "gateway")
    if (address.is_unspecified or address.is_multicast or address.is_loopback
            or address == IPv4Address("255.255.255.255")):
        raise Invalid(f"gateway: {value} cannot be a gateway (unspecified, loopback, "
                      "multicast or broadcast)")
    return str(address)


def check_dns(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise Invalid("dns: must be a list of IPv4 addresses, e.g. [\"8.8.8.8\"]")
    out = [str(ipv4(item, f"dns.{i}")) for i, item in enumerate(value)]
    if len(set(out)) != len(out):
        raise Invalid("dns: lists an address twice")
    return out


def _one_of(spec: dict[str, Any], key: str, options: tuple[str, ...], default: str) -> str:
    value = spec.get(key, default)
    if value not in options:
        raise Invalid(f"{key}: {value!r} is not one of {', '.join(options)}")
    return value


def check_range(gateway: str, start: str, end: str, netmask: str,
                others: Iterable[tuple[str, str, str]] = ()) -> tuple[IPv4Address, IPv4Address]:
    """Refuse a range that does not fit its pool: start <= end, both inside the gateway's
    subnet under `netmask` (never its network or broadcast address), the gateway outside the
    range, and no overlap with `others` ((start, end, netmask) of the pool's other ranges,
    which must share the netmask: one pool, one subnet). Returns (start, end)."""
    first, last = ipv4(start, "start"), ipv4(end, "end")
    subnet = subnet_of(gateway, netmask)
    where = f"the subnet {subnet} of gateway {gateway} with netmask {netmask}"
    for name, address in (("start", first), ("end", last)):
        if address not in subnet:
            raise Invalid(f"{name}: {address} is outside {where}")
        if address in (subnet.network_address, subnet.broadcast_address):
            raise Invalid(f"{name}: {address} is the network or broadcast address of {subnet}")
    if first > last:
        raise Invalid(f"start {first} is after end {last}: give the lower address as start")
    gw = IPv4Address(gateway)
    if first <= gw <= last:
        raise Invalid(f"the gateway {gateway} lies inside {first}-{last}: a range must leave "
                      "the gateway out (split it in two around the gateway)")
    for o_start, o_end, o_netmask in others:
        if o_netmask != netmask:
            raise Invalid(f"netmask: {netmask} differs from {o_netmask} of the pool's other "
                          "ranges: every range of a pool uses the pool's one subnet")
        if not (last < IPv4Address(o_start) or first > IPv4Address(o_end)):
            raise Conflict(f"{first}-{last} overlaps the existing range {o_start}-{o_end}")
    return first, last


def _range_size(start: str, end: str) -> int:
    return int(IPv4Address(end)) - int(IPv4Address(start)) + 1


def _addresses(ranges: Iterable[AddressRange]) -> Iterator[IPv4Address]:
    """Every address of `ranges`, lowest first."""
    for row in sorted(ranges, key=lambda r: IPv4Address(r.start)):
        for n in range(int(IPv4Address(row.start)), int(IPv4Address(row.end)) + 1):
            yield IPv4Address(n)


def _ip_key(address: str) -> int:
    return int(IPv4Address(address))


def _range_dict(row: AddressRange) -> dict[str, str]:
    return {"start": row.start, "end": row.end, "netmask": row.netmask, "type": row.type}


def _allocation_dict(row: AddressAllocation) -> dict[str, str]:
    return {"address": row.address, "instance": row.guest, "type": row.type}


def _check_type(kind: str) -> str:
    if kind not in RANGE_TYPES:
        raise Invalid(f"range type {kind!r} is not one of {', '.join(RANGE_TYPES)}")
    return kind


class NetworkStore(PolicyStore):
    """Mixin of `state.store.Store`: address pools, ranges, IPAM, port forwards (and, via
    PolicyStore, security policy groups and guest security policies)."""

    limits: dict[str, Any]

    # -- address pools --------------------------------------------------------------------

    def _address_pool(self, name: str, *, lock: str | None = None) -> AddressPool:
        query = AddressPool.select().where(AddressPool.name == name)
        row = (locked(query, lock) if lock else query).first()
        if row is None:
            raise NotFound(f"no address pool named {name!r}: create it with "
                           f"POST /api/v1/address_pools/{name}")
        return row

    def list_address_pools(self) -> list[dict[str, Any]]:
        """AddressPoolSummary of every pool: addresses = size of all ranges."""
        sizes: dict[int, int] = {}
        for r in AddressRange.select(AddressRange.pool, AddressRange.start, AddressRange.end):
            sizes[r.pool_id] = sizes.get(r.pool_id, 0) + _range_size(r.start, r.end)
        used: dict[int, int] = {
            pool: count for pool, count in AddressAllocation.select(
                AddressAllocation.pool, peewee.fn.COUNT(AddressAllocation.id))
            .group_by(AddressAllocation.pool).tuples()}
        return [{"name": p.name, "gateway": p.gateway, "provider": p.provider, "mode": p.mode,
                 "addresses": sizes.get(p.id, 0), "allocated": used.get(p.id, 0)}
                for p in AddressPool.select().order_by(AddressPool.name)]

    def address_pool(self, name: str) -> dict[str, Any]:
        """AddressPoolStatus: configuration, ranges and allocated addresses."""
        row = self._address_pool(name)
        ranges = sorted(row.ranges, key=lambda r: (RANGE_TYPES.index(r.type), _ip_key(r.start)))
        allocated = sorted(row.allocations, key=lambda a: _ip_key(a.address))
        return {"name": row.name, "gateway": row.gateway, "dns": list(row.dns or []),
                "provider": row.provider, "mode": row.mode,
                "ranges": [_range_dict(r) for r in ranges],
                "allocated": [_allocation_dict(a) for a in allocated]}

    def create_address_pool(self, name: str, spec: dict[str, Any]) -> None:
        check_name("address pool", name)
        if "gateway" not in spec:
            raise Invalid("gateway: is required (the address guests route through)")
        values = {
            "gateway": check_gateway(spec["gateway"]),
            "dns": check_dns(spec.get("dns", [])),
            "provider": _one_of(spec, "provider", PROVIDERS, "dhcp"),
            "mode": _one_of(spec, "mode", MODES, "internal"),
        }
        try:
            with write_transaction():
                AddressPool.create(name=name, **values)
        except peewee.IntegrityError:  # the unique name, also when two creates race
            raise Conflict(f"address pool {name!r} already exists: use PUT to change it") \
                from None

    def modify_address_pool(self, name: str, spec: dict[str, Any]) -> None:
        """Change the given fields. The gateway is fixed while addresses are allocated (the
        guests hold addresses of its subnet); provider, mode and dns may change any time."""
        with write_transaction():
            row = self._address_pool(name, lock="FOR UPDATE")
            gateway = check_gateway(spec["gateway"]) if "gateway" in spec else row.gateway
            if gateway != row.gateway:
                held = row.allocations.count()
                if held:
                    raise Conflict(f"address pool {name!r} has {held} allocated address(es): "
                                   "the gateway can change only when no guest holds an "
                                   "address of the pool")
                for r in row.ranges:  # every range must still fit the new gateway
                    check_range(gateway, r.start, r.end, r.netmask)
            row.gateway = gateway
            if "dns" in spec:
                row.dns = check_dns(spec["dns"])
            row.provider = _one_of(spec, "provider", PROVIDERS, row.provider)
            row.mode = _one_of(spec, "mode", MODES, row.mode)
            row.generation += 1
            row.modified_at = now()
            row.save()

    def delete_address_pool(self, name: str) -> None:
        with write_transaction():
            row = self._address_pool(name, lock="FOR UPDATE")
            users = [p.name for p in ComputePool.select(ComputePool.name)
                     .where(ComputePool.network == name).order_by(ComputePool.name)]
            if users:
                raise Conflict(f"address pool {name!r} is used by compute pool(s) "
                               f"{', '.join(users)}: change their network first")
            held = row.allocations.count()
            if held:
                raise Conflict(f"address pool {name!r} has {held} allocated address(es): "
                               "delete the guests holding them first")
            AddressRange.delete().where(AddressRange.pool == row.id).execute()
            row.delete_instance()

    # -- address ranges -------------------------------------------------------------------

    def address_ranges(self, name: str, kind: str) -> list[dict[str, str]]:
        _check_type(kind)
        row = self._address_pool(name)
        rows = row.ranges.where(AddressRange.type == kind)
        return [_range_dict(r) for r in sorted(rows, key=lambda r: _ip_key(r.start))]

    def _address_range(self, pool: AddressPool, kind: str, start: str) -> AddressRange:
        _check_type(kind)
        address = str(ipv4(start, "start"))
        found = pool.ranges.where((AddressRange.type == kind)
                                  & (AddressRange.start == address)).first()
        if found is None:
            raise NotFound(f"address pool {pool.name!r} has no {kind} range starting at "
                           f"{address}")
        return found

    def _range_allocations(self, pool: AddressPool, rng: AddressRange) -> list[AddressAllocation]:
        first, last = _ip_key(rng.start), _ip_key(rng.end)
        rows = pool.allocations.where(AddressAllocation.type == rng.type)
        return sorted((a for a in rows if first <= _ip_key(a.address) <= last),
                      key=lambda a: _ip_key(a.address))

    def address_range(self, name: str, kind: str, start: str) -> dict[str, Any]:
        pool = self._address_pool(name)
        rng = self._address_range(pool, kind, start)
        return {"start": rng.start, "end": rng.end, "netmask": rng.netmask, "type": rng.type,
                "allocated": [_allocation_dict(a) for a in self._range_allocations(pool, rng)]}

    def add_address_range(self, name: str, kind: str, start: str, spec: dict[str, Any]) -> None:
        _check_type(kind)
        for key in ("end", "netmask"):
            if key not in spec:
                raise Invalid(f"{key}: is required")
        with write_transaction():
            pool = self._address_pool(name, lock="FOR UPDATE")
            others = [(r.start, r.end, r.netmask) for r in pool.ranges]
            first, last = check_range(pool.gateway, start, spec["end"], spec["netmask"], others)
            try:
                with db.atomic():
                    AddressRange.create(pool=pool, type=kind, start=str(first), end=str(last),
                                        netmask=spec["netmask"])
            except peewee.IntegrityError:
                raise Conflict(f"address pool {name!r} already has a {kind} range starting "
                               f"at {first}") from None
            AddressPool.update(generation=AddressPool.generation + 1, modified_at=now()).where(
                AddressPool.id == pool.id).execute()

    def remove_address_range(self, name: str, kind: str, start: str) -> None:
        with write_transaction():
            pool = self._address_pool(name, lock="FOR UPDATE")
            rng = self._address_range(pool, kind, start)
            held = self._range_allocations(pool, rng)
            if held:
                raise Conflict(f"range {rng.start}-{rng.end} of address pool {name!r} has "
                               f"{len(held)} allocated address(es) (first {held[0].address}, "
                               f"guest {held[0].guest}): delete those guests first")
            rng.delete_instance()
            AddressPool.update(generation=AddressPool.generation + 1, modified_at=now()).where(
                AddressPool.id == pool.id).execute()

    # -- IPAM -----------------------------------------------------------------------------

    def allocate_guest_addresses(self, guest_id: str, network: str, *,
                                 requested: str | None = None) -> dict[str, str]:
        """Give guest `guest_id` its addresses in address pool `network`: {'internal': ...}
        for mode internal, {'external': ...} for external, both for 'both'. `requested` (the
        guest's network_address) asks for a specific address of the first type.

        Idempotent: a guest that already holds an address of a type keeps it (a restart, a
        retried create). Runs inside the caller's transaction (in a savepoint) or in its own.
        Raises NotFound (no such pool), Invalid (bad or out-of-range request), Conflict
        (requested address taken, no range of a type, pool full)."""
        if not network:
            return {}
        with write_transaction():
            # FOR SHARE: allocations run side by side; a gateway change or range removal
            # (FOR UPDATE) waits for them and then sees their rows
            pool = self._address_pool(network, lock="FOR SHARE")
            kinds = ["internal", "external"] if pool.mode == "both" else [pool.mode]
            held = {a.type: a.address for a in AddressAllocation.select().where(
                (AddressAllocation.pool == pool.id) & (AddressAllocation.guest == guest_id))}
            out: dict[str, str] = {}
            for i, kind in enumerate(kinds):
                want = requested if i == 0 else None
                if kind in held:
                    if want and str(ipv4(want, "network_address")) != held[kind]:
                        raise Conflict(f"guest {guest_id} already holds {kind} address "
                                       f"{held[kind]} of address pool {network!r}")
                    out[kind] = held[kind]
                else:
                    out[kind] = self._allocate(pool, kind, guest_id, want)
            return out

    def _allocate(self, pool: AddressPool, kind: str, guest_id: str,
                  requested: str | None) -> str:
        ranges = list(pool.ranges.where(AddressRange.type == kind))
        if not ranges:
            raise Conflict(f"address pool {pool.name!r} (mode {pool.mode}) has no {kind} "
                           f"address range: add one with POST /api/v1/address_pools/"
                           f"{pool.name}/{kind}/ranges/{{start}}")
        if requested is not None:
            address = ipv4(requested, "network_address")
            if not any(IPv4Address(r.start) <= address <= IPv4Address(r.end) for r in ranges):
                spans = ", ".join(f"{r.start}-{r.end}" for r in ranges)
                raise Invalid(f"network_address: {address} is outside every {kind} range of "
                              f"address pool {pool.name!r} ({spans})")
            if not self._insert_allocation(pool, kind, str(address), guest_id):
                owner = AddressAllocation.get_or_none(
                    (AddressAllocation.pool == pool.id)
                    & (AddressAllocation.address == str(address)))
                who = f" by guest {owner.guest}" if owner else ""
                raise Conflict(f"network_address: {address} of address pool {pool.name!r} is "
                               f"already allocated{who}: pick another or omit it")
            return str(address)
        lost: set[str] = set()  # addresses a concurrent allocation took under our feet
        while True:
            taken = lost | {a.address for a in AddressAllocation.select(AddressAllocation.address)
                            .where(AddressAllocation.pool == pool.id)}
            candidate = next((str(a) for a in _addresses(ranges) if str(a) not in taken), None)
            if candidate is None:
                total = sum(_range_size(r.start, r.end) for r in ranges)
                label = "" if kind == "internal" else f"{kind} "
                raise Conflict(f"no free {label}address in address pool {pool.name} "
                               f"({total} {label}addresses, all allocated)")
            if self._insert_allocation(pool, kind, candidate, guest_id):
                return candidate
            lost.add(candidate)

    def _insert_allocation(self, pool: AddressPool, kind: str, address: str,
                           guest_id: str) -> bool:
        """Insert one allocation in a savepoint; False when the address is taken (the
        unique index refused it), leaving the enclosing transaction usable."""
        try:
            with db.atomic():
                AddressAllocation.create(pool=pool.id, type=kind, address=address,
                                         guest=guest_id)
            return True
        except peewee.IntegrityError:
            return False

    def release_guest_addresses(self, guest_id: str) -> None:
        """Give back every address the guest holds (its deletion); idempotent."""
        with db.atomic():
            AddressAllocation.delete().where(AddressAllocation.guest == guest_id).execute()

    def guest_addresses(self, guest_id: str) -> dict[str, str]:
        """{type: address} of what the guest holds ({} when nothing)."""
        return {a.type: a.address for a in AddressAllocation.select()
                .where(AddressAllocation.guest == guest_id).order_by(AddressAllocation.type)}

    def address_pool_network(self, name: str) -> dict[str, Any]:
        """What the network reconciler renders for address pool `name` on each cell of the
        compute pools using it: the subnet (gateway, netmask, prefix, network), dns,
        provider, mode, ranges, and the static host entries of allocated addresses whose
        guest interface (MAC) is known: `hosts` for internal addresses (the DHCP host
        entries of the libvirt network), `external_hosts` for external ones; each entry is
        (mac, address, guest_id), sorted by address. A pool without ranges has netmask ""
        and prefix 0 (nothing to serve yet)."""
        pool = self._address_pool(name)
        ranges = sorted(pool.ranges, key=lambda r: (RANGE_TYPES.index(r.type), _ip_key(r.start)))
        netmask = ranges[0].netmask if ranges else ""
        subnet = subnet_of(pool.gateway, netmask) if netmask else None
        macs = {(i.guest_id, i.type): i.mac for i in GuestInterface.select(
            GuestInterface.guest, GuestInterface.type, GuestInterface.mac).where(
            GuestInterface.guest.in_(AddressAllocation.select(AddressAllocation.guest)
                                     .where(AddressAllocation.pool == pool.id)))}
        hosts: dict[str, list[tuple[str, str, str]]] = {"internal": [], "external": []}
        for a in sorted(pool.allocations, key=lambda a: _ip_key(a.address)):
            mac = macs.get((a.guest, a.type))
            if mac:
                hosts[a.type].append((mac, a.address, a.guest))
        return {
            "name": pool.name, "generation": pool.generation, "gateway": pool.gateway,
            "netmask": netmask, "prefix": subnet.prefixlen if subnet else 0,
            "network": str(subnet) if subnet else "",
            "dns": list(pool.dns or []), "provider": pool.provider, "mode": pool.mode,
            "ranges": [_range_dict(r) for r in ranges],
            "hosts": hosts["internal"], "external_hosts": hosts["external"],
        }

    def compute_pools_of_network(self, name: str) -> list[str]:
        """Names of the compute pools whose guests use address pool `name`."""
        return [p.name for p in ComputePool.select(ComputePool.name)
                .where(ComputePool.network == name).order_by(ComputePool.name)]

    # -- cell port forwards ---------------------------------------------------------------

    def guest_port_range(self) -> tuple[int, int]:
        """Cell ports handed to guests: limits.guest_ports of the settings, or 20000-29999."""
        low, high = self.limits.get("guest_ports", DEFAULT_PORT_RANGE)
        return int(low), int(high)

    def allocate_guest_ports(self, guest_id: str, cell: str,
                             ports: list[int]) -> list[dict[str, int]]:
        """Forward a free port of `cell` to each guest port of `ports`; returns
        [{port (on the cell), guest_port}] in the order given. A guest port the guest
        already forwards on that cell keeps its cell port (idempotent). One transaction
        (or the caller's); the unique index on (cell, port) decides races."""
        wanted: list[int] = []
        for i, port in enumerate(ports):
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise Invalid(f"ports.{i}: {port!r} is not a port number 1-65535")
            if port in wanted:
                raise Invalid(f"ports: guest port {port} is listed twice")
            wanted.append(port)
        low, high = self.guest_port_range()
        with write_transaction():
            held = {p.guest_port: p.port for p in PortAllocation.select().where(
                (PortAllocation.guest == guest_id) & (PortAllocation.cell == cell))}
            lost: set[int] = set()
            out = []
            for guest_port in wanted:
                while guest_port not in held:
                    taken = lost | {p.port for p in PortAllocation.select(PortAllocation.port)
                                    .where((PortAllocation.cell == cell)
                                           & PortAllocation.port.between(low, high))}
                    free = next((n for n in range(low, high + 1) if n not in taken), None)
                    if free is None:
                        raise Conflict(f"no free port on cell {cell!r} ({high - low + 1} "
                                       f"ports {low}-{high}, all forwarded)")
                    try:
                        with db.atomic():
                            PortAllocation.create(cell=cell, port=free, guest=guest_id,
                                                  guest_port=guest_port)
                        held[guest_port] = free
                    except peewee.IntegrityError:
                        lost.add(free)
                out.append({"port": held[guest_port], "guest_port": guest_port})
            return out

    def release_guest_ports(self, guest_id: str) -> None:
        with db.atomic():
            PortAllocation.delete().where(PortAllocation.guest == guest_id).execute()

    def guest_ports(self, guest_id: str) -> list[dict[str, Any]]:
        """[{cell, port, guest_port}] the guest forwards, by cell port."""
        return [{"cell": p.cell, "port": p.port, "guest_port": p.guest_port}
                for p in PortAllocation.select().where(PortAllocation.guest == guest_id)
                .order_by(PortAllocation.cell, PortAllocation.port)]
