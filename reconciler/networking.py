"""Address pool networks on cells: the libvirt network of a cell's address pool, its static
DHCP hosts, its NAT table (outbound masquerade and the guests' port forwards), and the
address pools' own status.

Registered by `reconciler/kinds.py`: `NetworkReconciler` converges key `network/<cell>`
(enqueued by the cell reconciler on every probe and by the guest reconciler when a guest
comes or goes); `AddressPoolReconciler` converges `address_pool/<name>` (enqueued by the
API) by waking the network of every cell that uses the pool and recording when all of them
serve its current generation.

What a cell gets for address pool P (ARCHITECTURE.md §4 networks):
- libvirt network `nano-net-P` (`render_network_xml`; `nano` is the names prefix,
  reconciler/naming.py): the pool gateway with the pool's
  netmask on bridge `nanobr-<hash>`; `<dhcp>` with no range and one `<host>` per internal
  address allocated to a guest interface (dnsmasq answers only those MACs); the pool's DNS
  servers as dnsmasq's forwarders and, by DHCP, as the guests' DNS servers. Host entries follow guests live (`networkUpdate`), never by a restart.
  Forward mode is `route`, not `nat`: libvirt 9's `nat` mode rejects every new connection
  into the network in its own iptables chains, so no port forward could ever reach a
  guest; in `route` mode libvirt accepts traffic to the subnet and we masquerade outbound
  ourselves. A pool of mode `external` gets an isolated network (no address of ours on
  the bridge: its gateway is an upstream router).
- nftables table `ip nano_nat_<hash>` (`render_nat_script`): masquerade of the subnet
  towards anything outside it, and `fib daddr type local <tcp|udp> dport <cell port>
  dnat to <guest address>:<guest port>` for every port a guest on this cell forwards and
  holds an internal address for. Applied whole with `nft -f -`, read back with `nft -j`
  and compared rule by rule (`plan_nat`). Now and then, NAT tables whose bridge is gone
  (the network was removed behind our back) are deleted. Simulated cells (libvirt test
  driver: their shell is this host's) get the libvirt network but no nftables.

Ownership: the network carries `<metadata><nano:network address_pool=P uid=U/>`; U
identifies the pool record (state/netstatus.py), and the cell's status lists the networks
we defined there (`owned`). We change a network only when its mark is ours and delete only
networks we recorded, when no cell of ours on the same libvirtd needs them and no guest is
plugged in. Drift (the network or table no longer what we last applied) is reported in
the cell's `NetworkDrifted` condition and corrected.

Pure parts (names, render, parse, plans) are module functions; effects go through
`reconciler.drivers.networks`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from reconciler.contract import READY, Action, Key, Result, Verb, format_time, set_condition
from reconciler.naming import names
from state.errors import Conflict, NanoError, Unavailable

log = logging.getLogger("nano.reconciler.networking")

NAMESPACE = "https://nano.cloud/xmlns/network/1"
NETWORK_KEY = "address_network"  # the cell's observed key (state/netstatus.py)
NETWORK_READY = "NetworkReady"
NETWORK_DRIFTED = "NetworkDrifted"
PORT_PROTOCOLS = ("tcp", "udp")
DNAT_COMMENT = "nano port"
MASQUERADE_COMMENT = "nano outbound"


def network_name(pool: str) -> str:
    """The libvirt network of address pool `pool` (reconciler.guests uses the same)."""
    return names().network(pool)


def bridge_name(pool: str) -> str:
    """The host bridge of the pool's network: `nanobr-` + 8 hex digits for prefix `nano`
    (15 characters, the kernel's limit), the same on every cell."""
    return names().bridge(pool)


def nat_table(pool: str) -> str:
    """The `ip` family nftables table holding the pool network's NAT on a cell."""
    return names().nat_table(pool)


def now_text() -> str:
    return format_time(dt.datetime.now().replace(microsecond=0))


# -- the libvirt network: model, render, parse, plan -------------------------------------------


@dataclass(frozen=True, order=True)
class DhcpHost:
    mac: str
    address: str


@dataclass(frozen=True)
class NetworkSpec:
    """A network as we render it and as we read it back (only the fields we write).

    `gateway`/`netmask` empty: an isolated network without an address of ours (external
    mode, or a pool without ranges yet). `forward` is 'route' with a gateway, else ''.
    `pool`/`uid` come from the ownership mark ('' when absent)."""

    name: str
    bridge: str
    pool: str = ""
    uid: str = ""
    forward: str = ""
    gateway: str = ""
    netmask: str = ""
    dns: tuple[str, ...] = ()
    hosts: tuple[DhcpHost, ...] = ()

    def fields(self) -> dict[str, Any]:
        """Everything but the hosts (those change live, one by one)."""
        return {"bridge": self.bridge, "pool": self.pool, "uid": self.uid,
                "forward": self.forward, "gateway": self.gateway, "netmask": self.netmask,
                "dns": list(self.dns)}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.fields(),
                "hosts": [[h.mac, h.address] for h in self.hosts]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetworkSpec:
        return cls(name=str(data["name"]), bridge=str(data.get("bridge", "")),
                   pool=str(data.get("pool", "")), uid=str(data.get("uid", "")),
                   forward=str(data.get("forward", "")), gateway=str(data.get("gateway", "")),
                   netmask=str(data.get("netmask", "")), dns=tuple(data.get("dns") or ()),
                   hosts=tuple(sorted(DhcpHost(str(m), str(a))
                                      for m, a in data.get("hosts") or ())))

    @property
    def subnet(self) -> str:
        """The subnet in CIDR ('' without a gateway)."""
        if not self.gateway or not self.netmask:
            return ""
        return str(IPv4Network(f"{self.gateway}/{self.netmask}", strict=False))


def desired_network(view: Mapping[str, Any], uid: str) -> NetworkSpec:
    """Pure: the network of an address pool from `Store.address_pool_network(name)`.

    Internal addresses whose interface is known become DHCP hosts (external addresses
    live on the host bridge, where DHCP is not ours)."""
    pool = str(view["name"])
    routed = view.get("mode") != "external" and bool(view.get("netmask"))
    hosts = tuple(sorted(DhcpHost(mac.lower(), address)
                         for mac, address, _guest in view.get("hosts") or ()))
    return NetworkSpec(
        name=network_name(pool), bridge=bridge_name(pool), pool=pool, uid=uid,
        forward="route" if routed else "",
        gateway=str(view["gateway"]) if routed else "",
        netmask=str(view["netmask"]) if routed else "",
        dns=tuple(view.get("dns") or ()) if routed else (),
        hosts=hosts if routed else (),
    )


DNSMASQ_NAMESPACE = "http://libvirt.org/schemas/network/dnsmasq/1.0"
"""libvirt's namespace for options passed to a network's dnsmasq as they are."""


def render_network_xml(spec: NetworkSpec) -> str:
    """Pure: the libvirt network XML of `spec` (see the module docstring)."""
    root = ET.Element("network")
    ET.SubElement(root, "name").text = spec.name
    meta = ET.SubElement(root, "metadata")
    ET.SubElement(meta, "nano:network", {"xmlns:nano": NAMESPACE, "address_pool": spec.pool,
                                         "uid": spec.uid})
    if spec.forward:
        ET.SubElement(root, "forward", mode=spec.forward)
    ET.SubElement(root, "bridge", name=spec.bridge, stp="off", delay="0")
    if spec.gateway:
        if spec.dns:
            dns = ET.SubElement(root, "dns")
            for server in spec.dns:
                ET.SubElement(dns, "forwarder", addr=server)
            # DHCP names the pool's DNS servers to the guests, as the `cloudinit` provider's
            # network-config does; without it dnsmasq names itself (the gateway) and a
            # guest never shows the servers its pool says (seen in a Debian guest)
            root.set("xmlns:dnsmasq", DNSMASQ_NAMESPACE)
            options = ET.SubElement(root, "dnsmasq:options")
            ET.SubElement(options, "dnsmasq:option",
                          value="dhcp-option=option:dns-server," + ",".join(spec.dns))
        ip = ET.SubElement(root, "ip", address=spec.gateway, netmask=spec.netmask)
        dhcp = ET.SubElement(ip, "dhcp")  # no <range>: only the hosts below get an answer
        for host in spec.hosts:
            ET.SubElement(dhcp, "host", mac=host.mac, ip=host.address)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode")


def parse_network_xml(xml: str) -> NetworkSpec:
    """Pure: the fields we render, read back from libvirt's network XML (libvirt adds a
    uuid, a bridge MAC and defaults, which are not ours to compare)."""
    root = ET.fromstring(xml)
    mark = root.find(f"metadata/{{{NAMESPACE}}}network")
    forward = root.find("forward")
    bridge = root.find("bridge")
    gateway = netmask = ""
    hosts: list[DhcpHost] = []
    for ip in root.findall("ip"):
        if ip.get("family", "ipv4") != "ipv4":
            continue
        gateway = ip.get("address") or ""
        netmask = ip.get("netmask") or ""
        if not netmask and ip.get("prefix"):
            netmask = str(IPv4Network(f"0.0.0.0/{ip.get('prefix')}").netmask)
        for host in ip.findall("dhcp/host"):
            hosts.append(DhcpHost((host.get("mac") or "").lower(), host.get("ip") or ""))
        break
    return NetworkSpec(
        name=root.findtext("name") or "",
        bridge=(bridge.get("name") or "") if bridge is not None else "",
        pool=(mark.get("address_pool") or "") if mark is not None else "",
        uid=(mark.get("uid") or "") if mark is not None else "",
        forward=(forward.get("mode") or "nat") if forward is not None else "",
        gateway=gateway,
        netmask=netmask,
        dns=tuple(f.get("addr") or "" for f in root.findall("dns/forwarder") if f.get("addr")),
        hosts=tuple(sorted(hosts)),
    )


def diff_hosts(desired: Iterable[DhcpHost], observed: Iterable[DhcpHost]
               ) -> tuple[list[DhcpHost], list[DhcpHost]]:
    """Pure: (entries to remove, entries to add) for the observed DHCP hosts to become the
    desired ones. An entry whose MAC or address moved is removed and added again (dnsmasq
    keys entries by MAC and libvirt refuses a second entry for either)."""
    want, have = set(desired), set(observed)
    return sorted(have - want), sorted(want - have)


def plan_network(desired: NetworkSpec, observed: NetworkSpec | None, *,
                 active: bool) -> list[Action]:
    """What must change for the cell's network to be `desired` (empty: converged).

    CREATE `network/<name>` when missing; REPLACE it when any field but the hosts
    differs (a redefinition, which restarts the network); DELETE/CREATE
    `dhcp_host/<name>/<mac>` per host entry to remove or add live; START when defined but
    not running."""
    key = Key("network", desired.name)
    if observed is None:
        return [Action(Verb.CREATE, key, None, {**desired.fields(),
                                                "hosts": len(desired.hosts)},
                       reason="network missing")]
    actions: list[Action] = []
    before, after = observed.fields(), desired.fields()
    if before != after:
        changed = sorted(k for k in after if before.get(k) != after.get(k))
        actions.append(Action(Verb.REPLACE, key, {k: before[k] for k in changed},
                              {k: after[k] for k in changed},
                              reason=f"definition differs: {', '.join(changed)}"))
    remove, add = diff_hosts(desired.hosts, observed.hosts)
    wanted_macs = {h.mac for h in desired.hosts}
    for host in remove:
        why = "address changed" if host.mac in wanted_macs else "not allocated by nano"
        actions.append(Action(Verb.DELETE, Key("dhcp_host", f"{desired.name}/{host.mac}"),
                              {"address": host.address}, None, reason=why))
    for host in add:
        actions.append(Action(Verb.CREATE, Key("dhcp_host", f"{desired.name}/{host.mac}"),
                              None, {"address": host.address}, reason="allocated address"))
    if not active:
        actions.append(Action(Verb.START, key, {"active": False}, {"active": True},
                              reason="network inactive"))
    return actions


# -- the NAT table: model, render, read back, plan -------------------------------------------


@dataclass(frozen=True, order=True)
class PortForward:
    """Cell port `port` (tcp and udp) forwarded to `address:guest_port` of guest `guest`."""

    port: int
    guest_port: int
    address: str
    guest: str


@dataclass(frozen=True)
class NatSpec:
    """The NAT table of one pool network on one cell. `subnet` '' = no masquerade."""

    table: str
    subnet: str = ""
    forwards: tuple[PortForward, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "subnet": self.subnet,
                "forwards": [asdict(f) for f in self.forwards]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NatSpec:
        return cls(table=str(data["table"]), subnet=str(data.get("subnet", "")),
                   forwards=tuple(sorted(PortForward(**f) for f in data.get("forwards") or ())))

    @property
    def empty(self) -> bool:
        return not self.subnet and not self.forwards


_CHAINS = {
    "prerouting": {"type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"},
    "output": {"type": "nat", "hook": "output", "prio": -100, "policy": "accept"},
    "postrouting": {"type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"},
}
_CHAIN_HEADERS = {
    "prerouting": "type nat hook prerouting priority dstnat; policy accept;",
    "output": "type nat hook output priority -100; policy accept;",
    "postrouting": "type nat hook postrouting priority srcnat; policy accept;",
}


def _payload(protocol: str, fld: str, value: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": {"payload": {"protocol": protocol, "field": fld}},
                      "right": value}}


def _prefix(cidr: str) -> Any:
    net = IPv4Network(cidr)
    if net.prefixlen == 32:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


@dataclass(frozen=True)
class NatRule:
    """One rule as nft text (what we load) and as its `nft -j` form (what we compare)."""

    chain: str
    text: str
    expr: tuple[str, ...]  # each statement as canonical JSON
    comment: str

    @property
    def signature(self) -> str:
        return json.dumps({"expr": list(self.expr), "comment": self.comment})


def _canon(items: Sequence[Any]) -> tuple[str, ...]:
    return tuple(json.dumps(item, sort_keys=True, separators=(",", ":")) for item in items)


def nat_rules(spec: NatSpec) -> list[NatRule]:
    """Pure: the rules of the table in order: DNAT of packets arriving for the cell's
    addresses (prerouting) and of the cell's own connections to them (output; not to
    127.0.0.0/8, whose source address could not leave the host), then the masquerade."""
    rules: list[NatRule] = []
    local = {"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["daddr"]}},
                       "right": "local"}}
    for chain in ("prerouting", "output"):
        for fwd in sorted(spec.forwards):
            comment = f"{DNAT_COMMENT} {fwd.guest}"
            for proto in PORT_PROTOCOLS:
                words = ["fib daddr type local"]
                expr: list[Any] = [local]
                if chain == "output":
                    words.append("ip daddr != 127.0.0.0/8")
                    expr.append(_payload("ip", "daddr", _prefix("127.0.0.0/8"), op="!="))
                words.append(f"{proto} dport {fwd.port} dnat to {fwd.address}:{fwd.guest_port}")
                expr += [_payload(proto, "dport", fwd.port),
                         {"dnat": {"addr": fwd.address, "port": fwd.guest_port}}]
                text = " ".join(words) + f' comment "{comment}"'
                rules.append(NatRule(chain, text, _canon(expr), comment))
    if spec.subnet:
        net = spec.subnet
        for target, text_target in ((_prefix("224.0.0.0/24"), "224.0.0.0/24"),
                                    ("255.255.255.255", "255.255.255.255")):
            text = f"ip saddr {net} ip daddr {text_target} return comment \"{MASQUERADE_COMMENT}\""
            expr = [_payload("ip", "saddr", _prefix(net)), _payload("ip", "daddr", target),
                    {"return": None}]
            rules.append(NatRule("postrouting", text, _canon(expr), MASQUERADE_COMMENT))
        text = f"ip saddr {net} ip daddr != {net} masquerade comment \"{MASQUERADE_COMMENT}\""
        expr = [_payload("ip", "saddr", _prefix(net)),
                _payload("ip", "daddr", _prefix(net), op="!="), {"masquerade": None}]
        rules.append(NatRule("postrouting", text, _canon(expr), MASQUERADE_COMMENT))
    return rules


def _check_forward(fwd: PortForward) -> None:
    # everything that reaches the script is checked here: numbers and an IPv4 address
    IPv4Address(fwd.address)
    for port in (fwd.port, fwd.guest_port):
        if type(port) is not int or not 0 < port <= 65535:
            raise ValueError(f"not a port: {port!r}")
    if not all(c.isalnum() or c == "-" for c in fwd.guest):
        raise ValueError(f"not a guest id: {fwd.guest!r}")


def render_nat_script(spec: NatSpec) -> str:
    """Pure: an `nft -f` script that replaces the table with `spec` in one transaction
    (declare, delete, define: packets see the old table or the new one)."""
    for fwd in spec.forwards:
        _check_forward(fwd)
    if spec.subnet:
        IPv4Network(spec.subnet)
    rules = nat_rules(spec)
    out = [f"table ip {spec.table}", f"delete table ip {spec.table}",
           f"table ip {spec.table} {{"]
    for chain in _CHAINS:
        out.append(f"\tchain {chain} {{")
        out.append(f"\t\t{_CHAIN_HEADERS[chain]}")
        out += [f"\t\t{r.text}" for r in rules if r.chain == chain]
        out.append("\t}")
    out.append("}")
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class ObservedNat:
    """A NAT table as `nft -j list table` shows it: base chain headers and each chain's
    rules as (signature, readable form)."""

    present: bool = False
    chains: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    rules: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    others: tuple[str, ...] = ()  # sets, maps, ... we never write


def parse_nat_listing(json_text: str | None) -> ObservedNat:
    """Pure: read `nft -j list table ip <table>` (None: the table does not exist).
    Raises ValueError when the text is not an nft JSON listing."""
    if json_text is None:
        return ObservedNat()
    try:
        items = json.loads(json_text)["nftables"]
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"not an nft JSON listing: {exc}") from exc
    chains: dict[str, dict[str, Any]] = {}
    rules: dict[str, list[tuple[str, str]]] = {}
    others: list[str] = []
    for item in items:
        if not isinstance(item, dict) or len(item) != 1:
            continue
        ((kind, body),) = item.items()
        if kind == "chain":
            chains[body["name"]] = {k: body.get(k) for k in ("type", "hook", "prio", "policy")}
            rules.setdefault(body["name"], [])
        elif kind == "rule":
            expr = list(body.get("expr") or [])
            signature = json.dumps({"expr": list(_canon(expr)),
                                    "comment": body.get("comment") or ""})
            shown = json.dumps(expr, separators=(",", ":"))
            rules.setdefault(body["chain"], []).append((signature, shown[:200]))
        elif kind in ("set", "map", "flowtable", "counter", "quota", "ct helper", "limit"):
            others.append(f"{kind} {body.get('name')}")
    return ObservedNat(True, chains, {k: tuple(v) for k, v in rules.items()}, tuple(others))


def plan_nat(spec: NatSpec, observed: ObservedNat) -> list[Action]:
    """What must change for the table to be `spec` (empty: the table must not exist).
    CREATE `nat_table/<t>` when missing, DELETE when unwanted; otherwise one action per
    difference: REPLACE `nat_chain/<t>/<chain>` for a wrong or missing base chain,
    CREATE/DELETE `nat_rule/<t>/<chain>` for a rule missing/not ours or out of order, and
    DELETE for anything else in the table. Applying any of them re-declares the table."""
    if spec.empty:
        if observed.present:
            return [Action(Verb.DELETE, Key("nat_table", spec.table),
                           {"present": True}, None, reason="no NAT needed")]
        return []
    table = spec.table
    if not observed.present:
        return [Action(Verb.CREATE, Key("nat_table", table), None,
                       {"forwards": len(spec.forwards), "masquerade": spec.subnet or None},
                       reason="table missing")]
    actions: list[Action] = []
    want = nat_rules(spec)
    for chain, header in _CHAINS.items():
        key = Key("nat_chain", f"{table}/{chain}")
        have = observed.chains.get(chain)
        if have != header:
            actions.append(Action(Verb.REPLACE, key, dict(have) if have else None,
                                  dict(header), reason="base chain differs"))
        wanted = [r for r in want if r.chain == chain]
        present = list(observed.rules.get(chain, ()))
        if [s for s, _ in present] == [r.signature for r in wanted]:
            continue
        signatures = {r.signature for r in wanted}
        have_signatures = [s for s, _ in present]
        for rule in wanted:
            if rule.signature not in have_signatures:
                actions.append(Action(Verb.CREATE, Key("nat_rule", f"{table}/{chain}"), None,
                                      {"rule": rule.text}, reason="rule missing"))
        for signature, shown in present:
            if signature not in signatures:
                actions.append(Action(Verb.DELETE, Key("nat_rule", f"{table}/{chain}"),
                                      {"rule": shown}, None, reason="rule not written by nano"))
        if not any(a.target.id == f"{table}/{chain}" and a.target.kind == "nat_rule"
                   for a in actions):
            actions.append(Action(Verb.UPDATE, Key("nat_rule", f"{table}/{chain}"), None,
                                  None, reason="rules out of order or repeated"))
    for chain in sorted(set(observed.chains) - set(_CHAINS)):
        actions.append(Action(Verb.DELETE, Key("nat_chain", f"{table}/{chain}"), {}, None,
                              reason="chain not written by nano"))
    for other in observed.others:
        actions.append(Action(Verb.DELETE, Key("nat_table", table), None, None,
                              reason=f"{other}: not written by nano"))
    return actions


# -- the reconcilers ---------------------------------------------------------------------------


def _same_hypervisor(a: Any, b: Any) -> bool:
    return bool(a.hypervisor) and a.hypervisor == b.hypervisor


def ports_status(forwards: Iterable[Mapping[str, Any]], host: str, *, applied: bool,
                 error: str = "") -> dict[str, list[dict[str, Any]]]:
    """Pure: per guest, the `ports` its status shows: [{port (on the cell), guest_port,
    address (the cell's), protocols, forwarded, error?}], by cell port."""
    out: dict[str, list[dict[str, Any]]] = {}
    for fwd in sorted(forwards, key=lambda f: f["port"]):
        entry: dict[str, Any] = {"port": fwd["port"], "guest_port": fwd["guest_port"],
                                 "address": host, "protocols": list(PORT_PROTOCOLS)}
        if not fwd.get("address"):
            entry.update(forwarded=False, error="the guest holds no address of the pool's "
                         "address pool: ports are forwarded only to such addresses")
        else:
            entry["forwarded"] = applied
            if error:
                entry["error"] = error
        out.setdefault(fwd["guest"], []).append(entry)
    return out


class NetworkReconciler:
    """Converges the address pool network of one cell per key `network/<cell>`."""

    kind = "network"

    def __init__(self, store: Any, connections: Any, enqueue: Callable[[Key], None], *,
                 retry_seconds: float = 30.0, orphan_seconds: float = 600.0) -> None:
        self.store = store
        self.connections = connections
        self.enqueue = enqueue
        self.retry_seconds = retry_seconds
        self.orphan_seconds = orphan_seconds
        self._orphans_checked: dict[str, float] = {}  # cell -> monotonic time

    def keys(self) -> Iterable[Key]:
        return [Key(self.kind, name) for name in self.store.cell_names()]

    def reconcile(self, key: Key) -> Result:
        spec = self.store.cell_spec(key.id)
        if spec is None:
            return Result()
        status = self.store.cell_net_status(spec.name, NETWORK_KEY)
        pool = spec.address_pool if spec.pool and not spec.deleting else ""
        owned: dict[str, str] = dict(status.get("owned") or {})
        if not pool and not owned:
            if status.get("address_pool"):  # it had one: say it has none now
                self._record(spec.name, {"owned": {}}, ready=(True, "NoAddressPool",
                             "the cell's compute pool uses no address pool"), drift=None)
            return Result()
        if not spec.observed.get("alive"):
            return Result(note="cell offline: its probe enqueues the network again")
        link = self.connections.link(spec)
        try:
            return self._converge(spec, link, pool, status, owned)
        except NanoError as exc:
            if not isinstance(exc, Unavailable):
                self._record(spec.name, {**status, "error": exc.message},
                             ready=(False, "Error", exc.message), drift=None)
            raise

    # -- one reconcile ------------------------------------------------------------------------

    def _converge(self, spec: Any, link: Any, pool: str, status: dict[str, Any],
                  owned: dict[str, str]) -> Result:
        from reconciler.drivers.networks import list_networks

        hv = link.hypervisor
        existing = {n.name: n for n in list_networks(hv, names().network_prefix)}
        actions: list[Action] = []
        drift: list[str] = []
        notes: list[str] = []
        record: dict[str, Any] = {"owned": owned}
        view: dict[str, Any] | None = None
        if pool:
            view = self.store.address_pool_network(pool)
            uid = self.store.address_pool_uid(pool) or ""
            want = desired_network(view, uid)
            done, found_drift, pending = self._network(hv, want, existing.get(want.name),
                                                       status, owned)
            actions += done
            drift += found_drift
            notes += pending
            owned[want.name] = uid
            forwards = self.store.cell_port_forwards(spec.name, pool)
            nat = NatSpec(nat_table(pool), want.subnet,
                          tuple(sorted(PortForward(f["port"], f["guest_port"], f["address"],
                                                   f["guest"])
                                       for f in forwards if f["address"] and want.gateway)))
            nat_done: list[Action] = []
            nat_drift: list[str] = []
            if spec.libvirt_uri.startswith("test:"):
                # a simulated cell shares this host's shell: its nft is not the cell's
                nat_error = "simulated cell: no nftables"
            else:
                nat_done, nat_drift, nat_error = self._nat(link.shell, nat, status)
            actions += nat_done
            drift += nat_drift
            self._guest_ports(spec, forwards, applied=not nat_error, error=nat_error)
            record.update(address_pool=pool, pool_generation=view["generation"],
                          nat_table=nat.table, forwards=len(nat.forwards),
                          applied_nat=nat.to_dict() if not nat_error else
                          status.get("applied_nat"), nat_error=nat_error)
            if nat_error and not spec.libvirt_uri.startswith("test:"):
                notes.append(f"NAT: {nat_error}")
        actions += self._drop_unneeded(spec, hv, existing, owned, pool, notes)
        if not spec.libvirt_uri.startswith("test:"):
            actions += self._drop_orphans(spec, link.shell)
        record["owned"] = owned
        # re-observe: the record says what the cell holds now, not what we asked for
        if pool and view is not None:
            from reconciler.drivers.networks import network_state

            want = desired_network(view, owned[network_name(pool)])
            state = network_state(hv, want.name)
            have = parse_network_xml(state.xml) if state else None
            remaining = plan_network(want, have, active=bool(state and state.active))
            pending_restart = [a for a in remaining if a.verb == Verb.REPLACE]
            others = [a for a in remaining if a.verb != Verb.REPLACE]
            record.update(name=want.name, bridge=want.bridge, active=bool(state and
                          state.active), gateway=want.gateway, netmask=want.netmask,
                          hosts=len(have.hosts) if have else 0,
                          applied=have.to_dict() if have and not others
                          else status.get("applied"),
                          error=state.error if state else "network missing")
            problems = [a.describe() for a in others] + [
                f"{a.describe()} (waits until no guest is plugged in)"
                for a in pending_restart] + notes
            ready = (not problems, "Converged" if not problems else
                     ("RestartPending" if pending_restart and not others else "NotConverged"),
                     "; ".join(problems) or f"{want.name} active on bridge {want.bridge}")
        else:
            record.update(address_pool="", name="", active=False, error="")
            ready = (not notes, "NoAddressPool" if not notes else "NotConverged",
                     "; ".join(notes) or "the cell's compute pool uses no address pool")
        self._record(spec.name, record, ready=ready, drift=drift)
        return Result(requeue_after=None if ready[0] else self.retry_seconds,
                      actions=tuple(actions), note="; ".join(drift))

    def _network(self, hv: Any, want: NetworkSpec, have_state: Any, status: dict[str, Any],
                 owned: dict[str, str]) -> tuple[list[Action], list[str], list[str]]:
        """Converge the libvirt network: (actions done, drift found, what waits)."""
        from reconciler.drivers.networks import (
            define_network,
            define_network_config,
            ensure_started,
            network_ports,
            update_dhcp_host,
        )

        have = parse_network_xml(have_state.xml) if have_state else None
        if have is not None and have.uid != want.uid and owned.get(want.name) != have.uid:
            raise Conflict(f"libvirt network {want.name} exists on this cell but is not ours "
                           f"(its mark names {have.pool or 'nothing'!r} uid "
                           f"{have.uid or '-'}): rename or remove it")
        active = bool(have_state and have_state.active)
        drift = []
        applied = status.get("applied")
        if applied and have is not None and applied.get("name") == want.name:
            before = NetworkSpec.from_dict(applied)
            if before != have:
                drift = [a.describe() for a in plan_network(before, have, active=True)]
        elif applied and have is None and applied.get("name") == want.name:
            drift = [f"network {want.name} vanished from the cell"]
        actions = plan_network(want, have, active=active)
        pending: list[str] = []
        xml = render_network_xml(want)
        if any(a.verb == Verb.CREATE and a.target.kind == "network" for a in actions):
            define_network(hv, xml)
            return actions, drift, pending
        if any(a.verb == Verb.REPLACE for a in actions):
            plugged = network_ports(hv, want.name)
            if not plugged or not active:
                define_network(hv, xml)  # restarts it with the new definition
                return actions, drift, pending
            define_network_config(hv, xml)  # takes effect at its next start
            pending.append(f"{want.name}: the new definition waits for its {plugged} "
                           f"guest interface(s) to be unplugged")
        for action in actions:
            if action.target.kind != "dhcp_host":
                continue
            mac = action.target.id.rsplit("/", 1)[1]
            if action.verb == Verb.DELETE:
                update_dhcp_host(hv, want.name, mac, (action.before or {})["address"],
                                 add=False)
            else:
                update_dhcp_host(hv, want.name, mac, (action.after or {})["address"], add=True)
        if any(a.verb == Verb.START for a in actions):
            state = ensure_started(hv, want.name)
            if state.error:
                pending.append(f"{want.name} cannot start: {state.error}")
        return actions, drift, pending

    def _nat(self, shell: Any, spec: NatSpec, status: dict[str, Any]
             ) -> tuple[list[Action], list[str], str]:
        """Converge the NAT table: (actions done, drift found, error or '')."""
        from reconciler.drivers.networks import delete_nft_table, load_nft, nft_table_listing

        try:
            observed = parse_nat_listing(nft_table_listing(shell, "ip", spec.table))
            drift = []
            applied = status.get("applied_nat")
            if applied and applied.get("table") == spec.table:
                before = NatSpec.from_dict(applied)
                if not before.empty:
                    drift = [a.describe() for a in plan_nat(before, observed)]
            actions = plan_nat(spec, observed)
            if actions:
                if spec.empty:
                    delete_nft_table(shell, "ip", spec.table)
                else:
                    load_nft(shell, render_nat_script(spec), f"nft load table ip {spec.table}")
                after = parse_nat_listing(nft_table_listing(shell, "ip", spec.table))
                left = plan_nat(spec, after)
                if left:
                    return actions, drift, ("the table reads back differently: "
                                            + "; ".join(a.describe() for a in left))
            return actions, drift, ""
        except NanoError as exc:
            if isinstance(exc, Unavailable):
                raise
            return [], [], f"outbound NAT and port forwards need nftables: {exc.message}"
        except ValueError as exc:
            return [], [], f"nft listing of table ip {spec.table}: {exc}"

    def _drop_unneeded(self, spec: Any, hv: Any, existing: dict[str, Any],
                       owned: dict[str, str], pool: str, notes: list[str]) -> list[Action]:
        """Delete networks (and their NAT tables) we made on this cell that no cell of ours
        on the same libvirtd needs; kept while guests are plugged in."""
        from reconciler.drivers.networks import delete_network, delete_nft_table, network_ports

        wanted = network_name(pool) if pool else ""
        stale = [name for name in owned if name != wanted]
        if not stale:
            return []
        needed = set()
        for other in self.store.cell_names():
            cell = self.store.cell_spec(other)
            if (cell is not None and cell.pool and cell.address_pool and not cell.deleting
                    and _same_hypervisor(cell, spec)):
                needed.add(network_name(cell.address_pool))
        actions = []
        for name in stale:
            state = existing.get(name)
            if name in needed or state is None:
                owned.pop(name, None)  # gone, or kept by another cell of ours on this libvirtd
                continue
            have = parse_network_xml(state.xml)
            if have.uid != owned[name]:
                notes.append(f"{name} is no longer ours (its mark changed): left alone")
                owned.pop(name, None)
                continue
            plugged = network_ports(hv, name)
            if plugged:
                notes.append(f"{name} is not needed any more but {plugged} guest "
                             f"interface(s) are plugged in: kept")
                continue
            delete_network(hv, name)
            delete_nft_table(self.connections.link(spec).shell, "ip",
                             nat_table(have.pool or name[len(names().network_prefix):]))
            owned.pop(name, None)
            actions.append(Action(Verb.DELETE, Key("network", name), {"bridge": have.bridge},
                                  None, reason="no cell of this libvirtd uses its pool"))
        return actions

    def _drop_orphans(self, spec: Any, shell: Any) -> list[Action]:
        """Now and then: delete `nano_nat_<h>` tables whose bridge `nanobr-<h>` no longer
        exists on the cell (its network was removed behind our back, e.g. by hand or by a
        test's cleanup, so nothing of ours would ever remove the table). A table whose
        bridge exists is left alone, whoever's it is."""
        import time

        from reconciler.drivers.networks import (
            delete_nft_table,
            existing_links,
            nft_table_names,
        )

        last = self._orphans_checked.get(spec.name)
        if last is not None and time.monotonic() - last < self.orphan_seconds:
            return []
        self._orphans_checked[spec.name] = time.monotonic()
        try:
            ours = names()
            tables = [t for t in nft_table_names(shell, "ip") if t.startswith(ours.nat_prefix)]
            bridges = {t: ours.bridge_of_nat_table(t) for t in tables}
            present = existing_links(shell, sorted(bridges.values()))
            actions = []
            for table, bridge in sorted(bridges.items()):
                if bridge in present:
                    continue
                delete_nft_table(shell, "ip", table)
                actions.append(Action(Verb.DELETE, Key("nat_table", table), {"bridge": bridge},
                                      None, reason="its network's bridge is gone"))
            return actions
        except NanoError as exc:
            if isinstance(exc, Unavailable):
                raise
            log.info("cell %s: looking for orphaned NAT tables failed: %s", spec.name,
                     exc.message)
            return []

    def _guest_ports(self, spec: Any, forwards: list[dict[str, Any]], *, applied: bool,
                     error: str) -> None:
        """Each guest's forwarded ports into its status (written only when they changed)."""
        for guest, ports in ports_status(forwards, spec.address, applied=applied,
                                         error=error).items():
            desired = self.store.guest_desired(guest)
            if desired is not None and desired.observed.get("ports") != ports:
                self.store.record_guest_observed(guest, observed={"ports": ports})

    def _record(self, cell: str, observed: dict[str, Any], *, ready: tuple[bool, str, str],
                drift: list[str] | None) -> None:
        now = now_text()
        conditions = list(self.store.cell_conditions(cell))
        conditions = set_condition(conditions, NETWORK_READY, *ready, now)
        if drift is not None:
            conditions = set_condition(
                conditions, NETWORK_DRIFTED, bool(drift),
                "Corrected" if drift else "InSync",
                ("found and corrected: " + "; ".join(drift)) if drift else "", now)
            if drift:
                observed = {**observed, "last_drift": {"at": now, "changes": drift}}
                log.warning("cell %s: network drifted: %s", cell, "; ".join(drift))
                self.store.add_log(f"network of cell {cell} drifted and was corrected: "
                                   + "; ".join(drift)[:900], user="nanod",
                                   resource=f"cell/{cell}")
        previous = self.store.cell_net_status(cell, NETWORK_KEY)
        if "last_drift" in previous and "last_drift" not in observed:
            observed = {**observed, "last_drift": previous["last_drift"]}
        wanted = [c for c in conditions if c["type"] in (NETWORK_READY, NETWORK_DRIFTED)]
        self.store.record_cell_net_status(cell, NETWORK_KEY, observed, wanted)


class AddressPoolReconciler:
    """Per key `address_pool/<name>`: wakes the network of every cell using the pool and
    records the pool converged once each of them serves the pool's current generation."""

    kind = "address_pool"

    def __init__(self, store: Any, enqueue: Callable[[Key], None], *,
                 poll_seconds: float = 2.0, offline_seconds: float = 30.0) -> None:
        self.store = store
        self.enqueue = enqueue
        self.poll_seconds = poll_seconds
        self.offline_seconds = offline_seconds

    def keys(self) -> Iterable[Key]:
        return [Key(self.kind, name) for name in self.store.address_pool_names()]

    def reconcile(self, key: Key) -> Result:
        generation = self.store.address_pool_generation(key.id)
        if generation is None:
            return Result()
        cells = self.store.address_pool_cells(key.id)
        waiting: list[str] = []
        offline: list[str] = []
        served = []
        for cell in cells:
            spec = self.store.cell_spec(cell)
            if spec is None:
                continue
            if not spec.observed.get("alive"):
                offline.append(cell)
                continue
            net = self.store.cell_net_status(cell, NETWORK_KEY)
            if (net.get("address_pool") != key.id or net.get("pool_generation") != generation
                    or not net.get("active") or net.get("error")):
                waiting.append(f"{cell}: {net.get('error') or 'not rendered yet'}")
                self.enqueue(Key("network", cell))
            else:
                served.append(cell)
        ready = not waiting and not offline
        problems = waiting + [f"{c}: offline" for c in offline]
        conditions = set_condition(self.store.address_pool_conditions(key.id), READY, ready,
                                   "Converged" if ready else "Waiting",
                                   "; ".join(problems) or
                                   f"served on {len(served)} cell(s)", now_text())
        self.store.record_address_pool_status(
            key.id, generation=generation if ready else None,
            phase="ready" if ready else "pending", conditions=conditions,
            observed={"cells": served, "waiting": problems})
        if ready:
            return Result()
        return Result(requeue_after=self.offline_seconds if offline and not waiting
                      else self.poll_seconds, note="; ".join(problems))
