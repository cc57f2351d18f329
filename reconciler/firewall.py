"""Guest security policies as one nftables table per cell: model, renderer, parser, planner.

Pure (no I/O). `reconciler/drivers/nft.py` runs the scripts rendered here on a cell and
hands back `nft -j` listings parsed here; the guest reconciler validates API input with
`validate_rule` / `validate_policy`, plans with `plan_firewall` and reports drift from it.

What a cell's table looks like (`render_ruleset`), for the `bridge` family:

    table bridge nano {
        chain g_00163e112233 {                      # one chain per guest, named by MAC
            ct state established,related accept
            icmpv6 type { nd-router-advert, ... } accept comment "nano guest 00:16:3e:11:22:33 ..."
            udp sport 67 udp dport 68 accept
            tcp dport 22 accept                     # the user's rules, in the user's order
            ip saddr 10.0.0.0/24 udp dport 53 reject
            meta l4proto tcp reject with tcp reset comment "nano default"
            reject comment "nano default"           # the default action, last
        }
        map guests { type ether_addr : verdict; elements = { 00:16:3e:11:22:33 : jump ... } }
        chain forward { type filter hook forward priority 0; policy accept;
            meta protocol { ip, ip6 } ether daddr vmap @guests }
        chain output  { type filter hook output priority 0; policy accept;   # bridge only
            meta protocol { ip, ip6 } ether daddr vmap @guests }
    }

Policies govern traffic *to* a guest: frames whose destination MAC is the guest's. Only
IPv4/IPv6 frames are dispatched (ARP always passes; a `reject` would drop it). The three
fixed rules before the user's keep the guest's own traffic working under a default reject:
replies to its connections (conntrack), IPv6 neighbour discovery and DHCP answers.

Families (`Family`): `bridge` is the design: the bridge's forward hook sees frames
switched between ports and its output hook the frames the cell itself sends into the
bridge (routed, NATed, the cell's own), and `oifname` is the guest's tap, so
`interface` 1/2 match exactly. It needs the kernel's bridge conntrack and bridge reject
(`nf_conntrack_bridge`, `nft_reject_bridge`). `inet` is the fallback for kernels without
them but with `br_netfilter` (`net.bridge.bridge-nf-call-iptables=1`): bridged IP frames
then pass the inet forward hook, where conntrack and reject work; but frames the cell routes
into the bridge are not seen with the guest's MAC, and the output device is the bridge, so
rules with `interface` 1/2 cannot be rendered there (`Invalid`). The driver picks the family
a cell supports.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from reconciler.contract import Action, Key, Verb
from reconciler.naming import names
from state.errors import Invalid
from state.rules import (  # noqa: F401  (re-exported: the firewall model)
    ACTIONS,
    INTERFACES,
    PORT_PROTOCOLS,
    PROTOCOLS,
    RULE_FIELDS,
    Rule,
    _canonical_source,
    _invalid,
    validate_rule,
)


def _table() -> str:
    """Our table's name (the names prefix, `nano` by default) in whichever family:
    everything in it is ours, nothing else is."""
    return names().firewall_table


MAP = "guests"
"""The verdict map from a guest's MAC to a jump to its chain."""

CHAIN_PREFIX = "g_"
DEFAULT_COMMENT = "nano default"
GUEST_COMMENT = "nano guest"
TABLE_KIND = "firewall_table"
CHAIN_KIND = "firewall_chain"
"""`Key.kind`s of planned actions' targets: `firewall_table/nano` for the table (and
`firewall_table/<family>:nano` for a stale one), `firewall_chain/<mac>` for a guest chain.
(Targets name what changes; the reconcile key of a cell's firewall is the reconciler's.)"""

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_LOOSE_MAC = re.compile(r"^[0-9A-Fa-f]{2}([:-]?[0-9A-Fa-f]{2}){5}$")
# Linux interface names: at most 15 bytes, no '/', ':' or whitespace. We allow the subset
# libvirt and iproute2 generate, which also cannot break out of a quoted nft string.
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_GUEST_COMMENT = re.compile(
    rf"^{GUEST_COMMENT} (?P<mac>\S+) internal=(?P<internal>\S+) external=(?P<external>\S+)$"
)
_ND_TYPES = ("nd-router-advert", "nd-neighbor-solicit", "nd-neighbor-advert")
_ICMP_PROTOS = ("icmp", "ipv6-icmp")


class Family(StrEnum):
    """The nftables family our table lives in (see the module docstring)."""

    BRIDGE = "bridge"
    INET = "inet"

    @property
    def hooks(self) -> tuple[str, ...]:
        """Base chains (named after their hooks) that dispatch to guest chains."""
        return ("forward", "output") if self is Family.BRIDGE else ("forward",)


# -- model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestPolicy:
    """A guest's security policy on one cell, keyed by the guest's MAC (canonical: lower
    case, colons). `internal_if`/`external_if`: the host-side interfaces (taps) of the
    guest's internal and external NICs, known while it runs; rules with `interface` 1/2
    need the matching one. The renderer writes them into the table, so the parser gives
    them back and a tap renamed by a guest restart shows as a change."""

    mac: str
    default_action: str = "accept"
    rules: tuple[Rule, ...] = ()
    internal_if: str | None = None
    external_if: str | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not isinstance(self.mac, str) or not _MAC.match(self.mac):
            problems.append(f"mac: must look like 00:16:3e:12:34:56, not {self.mac!r}")
        if self.default_action not in ACTIONS:
            problems.append(
                f"default_action: must be accept or reject, not {self.default_action!r}"
            )
        if not isinstance(self.rules, tuple) or not all(isinstance(r, Rule) for r in self.rules):
            problems.append("rules: must be a tuple of Rule")
        for name in ("internal_if", "external_if"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not _IFNAME.match(value)):
                problems.append(f"{name}: not an interface name: {value!r}")
        if problems:
            raise _invalid("guest security policy", problems)

    @property
    def chain(self) -> str:
        return chain_name(self.mac)

    def fields(self) -> dict[str, Any]:
        """What the planner compares, as plain values (an `Action`'s before/after)."""
        return {
            "default_action": self.default_action,
            "rules": [rule.describe() for rule in self.rules],
            "internal_if": self.internal_if,
            "external_if": self.external_if,
        }


def normalize_mac(text: str) -> str:
    """'00-16-3E-11-22-33', '00163e112233', ... -> '00:16:3e:11:22:33'; raises Invalid."""
    if not isinstance(text, str) or not _LOOSE_MAC.match(text):
        raise Invalid(f"invalid MAC address: {text!r}", details=[f"mac: {text!r}"])
    digits = re.sub(r"[:-]", "", text).lower()
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def chain_name(mac: str) -> str:
    """The guest chain for a MAC: 'g_' + its 12 hex digits ('g_00163e112233')."""
    return CHAIN_PREFIX + normalize_mac(mac).replace(":", "")


def validate_policy(
    mac: str,
    default_action: str,
    rules: Iterable[Mapping[str, Any] | Rule],
    *,
    internal_if: str | None = None,
    external_if: str | None = None,
) -> GuestPolicy:
    """A `GuestPolicy` from loose input: any MAC spelling, rules as API dicts or `Rule`s.
    Raises `Invalid` whose details name the rule index and field ('rules[2].to_port: ...')."""
    problems: list[str] = []
    try:
        mac = normalize_mac(mac)
    except Invalid:
        problems.append(f"mac: must look like 00:16:3e:12:34:56, not {mac!r}")
    checked: list[Rule] = []
    for index, item in enumerate(rules):
        if isinstance(item, Rule):
            checked.append(item)
            continue
        try:
            checked.append(validate_rule(item))
        except Invalid as exc:
            problems.extend(f"rules[{index}].{detail}" for detail in exc.details)
    if problems:
        raise _invalid("guest security policy", problems)
    return GuestPolicy(mac, default_action, tuple(checked), internal_if, external_if)


# -- rendering --------------------------------------------------------------------------


def _check_renderable(policies: Sequence[GuestPolicy], family: Family) -> None:
    problems: list[str] = []
    seen: set[str] = set()
    for policy in policies:
        if policy.mac in seen:
            problems.append(f"guest {policy.mac}: two policies for one MAC")
        seen.add(policy.mac)
        for index, rule in enumerate(policy.rules):
            if not rule.interface:
                continue
            if family is not Family.BRIDGE:
                problems.append(
                    f"guest {policy.mac} rule {index}: interface {rule.interface} needs the "
                    f"bridge family (nf_conntrack_bridge and nft_reject_bridge on the cell); "
                    f"the {family} family sees the bridge, not the guest's tap"
                )
                continue
            ifname = policy.internal_if if rule.interface == 1 else policy.external_if
            if ifname is None:
                problems.append(
                    f"guest {policy.mac} rule {index}: interface {rule.interface} "
                    f"({INTERFACES[rule.interface]}) but the guest has no such interface"
                )
    if problems:
        raise _invalid("firewall", problems)


def _guest_comment(policy: GuestPolicy) -> str:
    return (
        f"{GUEST_COMMENT} {policy.mac} internal={policy.internal_if or '-'} "
        f"external={policy.external_if or '-'}"
    )


def _render_rule(rule: Rule, policy: GuestPolicy) -> str:
    words: list[str] = []
    if rule.interface:
        ifname = policy.internal_if if rule.interface == 1 else policy.external_if
        words.append(f'oifname "{ifname}"')
    if rule.from_address:
        words.append(f"ip saddr {rule.from_address}")
    if rule.protocol in PORT_PROTOCOLS:
        words.append(
            f"{rule.protocol} dport {rule.to_port}"
            if rule.to_port
            else f"meta l4proto {rule.protocol}"
        )
    elif rule.protocol == "icmp":
        words.append("meta l4proto { icmp, ipv6-icmp }")
    if rule.action == "accept":
        words.append("accept")
    elif rule.protocol == "tcp":
        words.append("reject with tcp reset")
    else:
        words.append("reject")
    return " ".join(words)


def render_guest_rules(policy: GuestPolicy) -> list[str]:
    """The statements of a guest chain, in order (fixed preamble, user rules, default)."""
    lines = [
        "ct state established,related accept",
        "icmpv6 type { " + ", ".join(_ND_TYPES) + f' }} accept comment "{_guest_comment(policy)}"',
        "udp sport 67 udp dport 68 accept",
    ]
    lines.extend(_render_rule(rule, policy) for rule in policy.rules)
    if policy.default_action == "accept":
        lines.append(f'accept comment "{DEFAULT_COMMENT}"')
    else:
        lines.append(f'meta l4proto tcp reject with tcp reset comment "{DEFAULT_COMMENT}"')
        lines.append(f'reject comment "{DEFAULT_COMMENT}"')
    return lines


def _guest_chain_block(policy: GuestPolicy) -> list[str]:
    return (
        [f"\tchain {policy.chain} {{"]
        + [f"\t\t{line}" for line in render_guest_rules(policy)]
        + ["\t}"]
    )


def _dispatch_rule() -> str:
    return f"meta protocol {{ ip, ip6 }} ether daddr vmap @{MAP}"


def _element(policy: GuestPolicy) -> str:
    return f"{policy.mac} : jump {policy.chain}"


def render_ruleset(
    policies: Iterable[GuestPolicy],
    *,
    family: Family = Family.BRIDGE,
    purge: Iterable[Family] = (),
) -> str:
    """The whole table as one `nft -f` script that replaces whatever table `nano` the
    family holds (`table X nano` then `delete table X nano` then the new table: one
    transaction, so packets see the old table or the new one, never a mix). `purge`: other
    families whose `nano` table the same transaction deletes (a cell that changed family).
    Guests are written in MAC order, so equal input gives equal text.
    Raises `Invalid` for duplicate MACs and interface rules that cannot be rendered."""
    ordered = sorted(policies, key=lambda p: p.mac)
    _check_renderable(ordered, family)
    table = _table()
    out: list[str] = []
    for other in purge:
        if other is not family:
            out += [f"table {other} {table}", f"delete table {other} {table}"]
    out += [
        f"table {family} {table}",
        f"delete table {family} {table}",
        f"table {family} {table} {{",
    ]
    for policy in ordered:
        out += _guest_chain_block(policy)
    out += [f"\tmap {MAP} {{", "\t\ttype ether_addr : verdict"]
    if ordered:
        out.append("\t\telements = { " + ", ".join(_element(p) for p in ordered) + " }")
    out.append("\t}")
    for hook in family.hooks:
        out += [
            f"\tchain {hook} {{",
            f"\t\ttype filter hook {hook} priority 0; policy accept;",
            f"\t\t{_dispatch_rule()}",
            "\t}",
        ]
    out.append("}")
    return "\n".join(out) + "\n"


def render_changes(
    desired: Iterable[GuestPolicy], observed: ObservedFirewall, *, family: Family
) -> str:
    """An `nft -f` script that turns `observed` into `desired` by touching only the guest
    chains that differ (one transaction: a changed chain is flushed and refilled, a new one
    added with its map element, a gone one deleted with its element). Falls back to the
    whole table (`render_ruleset`) when the table is missing, in another family or has
    problems. Returns "" when nothing differs."""
    wanted = sorted(desired, key=lambda p: p.mac)
    _check_renderable(wanted, family)
    if not observed.clean or observed.family is not family:
        return render_ruleset(wanted, family=family, purge=observed.stale)
    have = {p.mac: p for p in observed.policies}
    want = {p.mac: p for p in wanted}
    table = _table()
    out: list[str] = []
    for mac in sorted(set(have) - set(want)):
        out.append(f"delete element {family} {table} {MAP} {{ {mac} }}")
        out.append(f"delete chain {family} {table} {chain_name(mac)}")
    added: list[GuestPolicy] = []
    for policy in wanted:
        before = have.get(policy.mac)
        if before == policy:
            continue
        if before is None:
            out.append(f"add chain {family} {table} {policy.chain}")
            added.append(policy)
        else:
            out.append(f"flush chain {family} {table} {policy.chain}")
        out += [
            f"add rule {family} {table} {policy.chain} {line}"
            for line in render_guest_rules(policy)
        ]
    if added:
        elements = ", ".join(_element(p) for p in added)
        out.append(f"add element {family} {table} {MAP} {{ {elements} }}")
    return "\n".join(out) + "\n" if out else ""


# -- parsing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ObservedFirewall:
    """What a cell's `nano` table holds, as far as our model can say it.

    `present`: the table exists in `family`. `policies`: the guest chains read back into
    the model (a chain that does not parse cleanly still yields its recognisable parts).
    `problems`: everything the renderer would not have written (a hand-added rule, a
    missing stateful rule, a wrong base chain, a guest without a map element, ...): the
    model cannot hold these, so they are listed for drift reports and mean "re-declare".
    `stale`: other families that also hold a `nano` table (filled in by the driver).
    """

    family: Family | None = None
    present: bool = False
    policies: tuple[GuestPolicy, ...] = ()
    problems: tuple[str, ...] = ()
    stale: tuple[Family, ...] = field(default=())

    @property
    def clean(self) -> bool:
        return self.present and not self.problems and not self.stale


# Listings are json.loads output: plain dicts and lists (isinstance on `dict`, not on the
# `Mapping` ABC, which costs a third of the parse of a big table).


def _compact(expr: Any) -> str:
    text = json.dumps(expr, separators=(",", ":"), sort_keys=True)
    return text if len(text) <= 200 else text[:197] + "..."


def _match(expr: Mapping[str, Any]) -> tuple[str, Any] | None:
    """('oifname', 'vnet0'), ('saddr', ...), ('l4proto', ...), ('tcp.dport', 22), ... for
    the `==` matches we write; None for anything else."""
    match = expr.get("match")
    if not isinstance(match, dict) or match.get("op") not in ("==", "in"):
        return None
    left, right = match.get("left"), match.get("right")
    if not isinstance(left, dict):
        return None
    if "meta" in left:
        return f"meta.{left['meta'].get('key')}", right
    if "ct" in left:
        return f"ct.{left['ct'].get('key')}", right
    if "payload" in left:
        payload = left["payload"]
        return f"{payload.get('protocol')}.{payload.get('field')}", right
    return None


def _set_of(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, dict) and isinstance(value.get("set"), list):
        items = value["set"]
    elif isinstance(value, list):
        items = value
    else:
        return None
    if not all(isinstance(item, str) for item in items):
        return None
    return tuple(sorted(items))


def _source(value: Any) -> str | None:
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict) and isinstance(value.get("prefix"), Mapping):
        text = f"{value['prefix'].get('addr')}/{value['prefix'].get('len')}"
    else:
        return None
    try:
        return _canonical_source(text)
    except ValueError:
        return None


def _verdict(exprs: Sequence[Any]) -> tuple[str | None, str | None]:
    """('accept'|'reject'|None, reject type) from a rule's last statement."""
    if not exprs or not isinstance(exprs[-1], dict):
        return None, None
    last = exprs[-1]
    if "accept" in last:
        return "accept", None
    if "reject" in last:
        spec = last["reject"]
        if spec is None:
            return "reject", "icmpx"
        if isinstance(spec, dict):
            kind = spec.get("type")
            if kind == "tcp reset":
                return "reject", "tcp reset"
            if kind in ("icmp", "icmpx", "icmpv6") and spec.get("expr") in (
                None,
                "port-unreachable",
            ):
                return "reject", "icmpx"
    return None, None


_NO = object()


def _value(expr: Any, key: str) -> Any:
    """The right side of `expr` when it is a match on `key`, else `_NO`."""
    found = _match(expr) if isinstance(expr, dict) else None
    return found[1] if found is not None and found[0] == key else _NO


def _is_ct_rule(exprs: Sequence[Any]) -> bool:
    return (
        len(exprs) == 2
        and _set_of(_value(exprs[0], "ct.state")) == ("established", "related")
        and _verdict(exprs) == ("accept", None)
    )


def _is_nd_rule(exprs: Sequence[Any]) -> bool:
    return (
        len(exprs) == 2
        and _set_of(_value(exprs[0], "icmpv6.type")) == tuple(sorted(_ND_TYPES))
        and _verdict(exprs) == ("accept", None)
    )


def _is_dhcp_rule(exprs: Sequence[Any]) -> bool:
    return (
        len(exprs) == 3
        and _value(exprs[0], "udp.sport") == 67
        and _value(exprs[1], "udp.dport") == 68
        and _verdict(exprs) == ("accept", None)
    )


def _is_dispatch_rule(exprs: Sequence[Any]) -> bool:
    return (
        len(exprs) == 2
        and _set_of(_value(exprs[0], "meta.protocol")) == ("ip", "ip6")
        and exprs[1]
        == {
            "vmap": {"key": {"payload": {"protocol": "ether", "field": "daddr"}}, "data": f"@{MAP}"}
        }
    )


def _parse_rule(exprs: Sequence[Any], ifnames: Mapping[str, int]) -> Rule | None:
    """The `Rule` a user rule's statements say, or None when they are not ours."""
    action, reject_type = _verdict(exprs)
    if action is None:
        return None
    protocol, port, source, interface = "all", 0, None, 0
    seen: set[str] = set()
    for expr in exprs[:-1]:
        m = _match(expr)
        if m is None:
            return None
        key, value = m
        kind = {
            "meta.oifname": "if",
            "ip.saddr": "src",
            "meta.l4proto": "proto",
            "tcp.dport": "proto",
            "udp.dport": "proto",
        }.get(key)
        if kind is None or kind in seen:
            return None
        seen.add(kind)
        if kind == "if":
            if not isinstance(value, str) or value not in ifnames:
                return None
            interface = ifnames[value]
        elif kind == "src":
            source = _source(value)
            if source is None:
                return None
        elif key == "meta.l4proto":
            if value in PORT_PROTOCOLS:
                protocol = value
            elif _set_of(value) == _ICMP_PROTOS:
                protocol = "icmp"
            else:
                return None
        else:
            if type(value) is not int or not 0 < value <= 65535:
                return None
            protocol, port = key.split(".")[0], value
    expected = "tcp reset" if action == "reject" and protocol == "tcp" else None
    if action == "reject" and expected is None:
        expected = "icmpx"
    if reject_type != expected:
        return None
    try:
        return Rule(action, protocol, port, source, interface)
    except Invalid:
        return None


def _parse_default(rules: list[dict[str, Any]]) -> tuple[str, int] | None:
    """(default action, how many trailing rules it takes) or None when they are wrong."""
    tail = [r for r in rules[-2:] if r.get("comment") == DEFAULT_COMMENT]
    if len(tail) == 1 and rules[-1] is tail[0]:
        exprs = tail[0]["expr"]
        if len(exprs) == 1 and _verdict(exprs) == ("accept", None):
            return "accept", 1
    if len(tail) == 2:
        first, last = tail[0]["expr"], tail[1]["expr"]
        if (
            len(first) == 2
            and _match(first[0]) == ("meta.l4proto", "tcp")
            and _verdict(first) == ("reject", "tcp reset")
            and len(last) == 1
            and _verdict(last) == ("reject", "icmpx")
        ):
            return "reject", 2
    return None


def _parse_guest_chain(
    name: str, rules: list[dict[str, Any]], problems: list[str]
) -> GuestPolicy | None:
    where = f"chain {name}"
    mac = internal = external = None
    # The guest's MAC and taps ride in a comment (the JSON listing drops chain comments).
    for rule in rules:
        comment = _GUEST_COMMENT.match(rule.get("comment") or "")
        if comment:
            mac = comment["mac"]
            internal = None if comment["internal"] == "-" else comment["internal"]
            external = None if comment["external"] == "-" else comment["external"]
            break
    else:
        problems.append(f"{where}: no rule carries its guest comment")
    if mac is None or chain_name(mac) != name:
        digits = name[len(CHAIN_PREFIX) :]
        if not re.fullmatch(r"[0-9a-f]{12}", digits):
            problems.append(f"{where}: not a guest chain name")
            return None
        if mac is not None:
            problems.append(f"{where}: its comment names guest {mac}")
        mac = normalize_mac(digits)
    body = list(rules)
    for label, check in (
        ("stateful (ct state established,related accept)", _is_ct_rule),
        ("neighbour discovery", _is_nd_rule),
        ("DHCP answer", _is_dhcp_rule),
    ):
        if body and check(body[0]["expr"]):
            body = body[1:]
        else:
            problems.append(f"{where}: lacks the {label} rule")
    default = _parse_default(body)
    if default is None:
        problems.append(f"{where}: does not end with its default action")
        # What the kernel does when a guest chain runs out: back to the base chain, accept.
        default_action = "accept"
    else:
        default_action, taken = default
        body = body[:-taken]
    ifnames = {n: i for i, n in ((1, internal), (2, external)) if n is not None}
    parsed: list[Rule] = []
    for rule in body:
        found = _parse_rule(rule["expr"], ifnames)
        if rule.get("comment") == DEFAULT_COMMENT:
            problems.append(f"{where}: a default action rule is not last")
        elif found is None or rule.get("comment"):
            problems.append(f"{where}: rule not written by nano: {_compact(rule['expr'])}")
        else:
            parsed.append(found)
    try:
        return GuestPolicy(mac, default_action, tuple(parsed), internal, external)
    except Invalid as exc:
        problems.append(f"{where}: {exc.message}")
        return GuestPolicy(mac, default_action, tuple(parsed))


def _check_base_chain(
    name: str, chain: Mapping[str, Any], rules: list[dict[str, Any]], problems: list[str]
) -> None:
    want = {"type": "filter", "hook": name, "prio": 0, "policy": "accept"}
    have = {key: chain.get(key) for key in want}
    if have != want:
        problems.append(f"base chain {name}: is {have}, want {want}")
    dispatch_ok = len(rules) == 1 and _is_dispatch_rule(rules[0]["expr"])
    if not dispatch_ok:
        problems.append(
            f"base chain {name}: holds {[_compact(r['expr']) for r in rules]}, "
            f"want only '{_dispatch_rule()}'"
        )


def parse_observed(json_text: str) -> ObservedFirewall:
    """Read `nft -j list table <family> nano` into the model, listing what it cannot hold.

    Raises ValueError when the text is not an nft JSON listing (the driver turns that into
    `Permanent`)."""
    try:
        doc = json.loads(json_text)
        items = doc["nftables"]
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"not an nft JSON listing: {exc}") from exc
    family: Family | None = None
    chains: dict[str, Mapping[str, Any]] = {}
    rules: dict[str, list[dict[str, Any]]] = {}
    elements: dict[str, Any] = {}
    problems: list[str] = []
    have_map = False
    for item in items:
        if not isinstance(item, dict) or len(item) != 1:
            continue
        ((kind, body),) = item.items()
        if not isinstance(body, dict):
            continue
        if kind == "table" and body.get("name") == _table():
            try:
                family = Family(str(body.get("family")))
            except ValueError as exc:
                raise ValueError(
                    f"table {_table()} in unexpected family {body.get('family')!r}"
                ) from exc
        elif kind == "chain":
            chains[body["name"]] = body
            rules.setdefault(body["name"], [])
        elif kind == "rule":
            rules.setdefault(body["chain"], []).append(
                {"expr": list(body.get("expr") or []), "comment": body.get("comment")}
            )
        elif kind == "map" and body.get("name") == MAP:
            have_map = True
            if body.get("type") != "ether_addr" or body.get("map") != "verdict":
                problems.append(f"map {MAP}: not ether_addr : verdict")
            for entry in body.get("elem") or []:
                key, value = _element_pair(entry)
                elements[key] = value
        elif kind in ("set", "map", "flowtable", "counter", "quota", "ct helper", "limit"):
            problems.append(f"{kind} {body.get('name')}: not written by nano")
    if family is None:
        return ObservedFirewall()
    if not have_map:
        problems.append(f"map {MAP}: missing")
    for hook in family.hooks:
        if hook not in chains:
            problems.append(f"base chain {hook}: missing")
    policies: list[GuestPolicy] = []
    for name, chain in chains.items():
        if name in family.hooks:
            _check_base_chain(name, chain, rules[name], problems)
        elif name.startswith(CHAIN_PREFIX) and "hook" not in chain:
            policy = _parse_guest_chain(name, rules[name], problems)
            if policy is None:
                continue
            policies.append(policy)
            target = elements.pop(policy.mac, None)
            if target != {"jump": {"target": name}}:
                problems.append(
                    f"guest {policy.mac}: map {MAP} does not jump to {name} "
                    f"(has {_compact(target)})"
                )
        else:
            problems.append(f"chain {name}: not written by nano")
    for mac, target in sorted(elements.items()):
        problems.append(f"map {MAP}: element {mac} -> {_compact(target)} has no guest chain")
    policies.sort(key=lambda p: p.mac)
    return ObservedFirewall(family, True, tuple(policies), tuple(problems))


def _element_pair(entry: Any) -> tuple[str, Any]:
    if isinstance(entry, list) and len(entry) == 2:
        key, value = entry
        if isinstance(key, dict) and "elem" in key:  # an element with a timeout/comment
            key = key["elem"].get("val")
        return str(key).lower(), value
    return _compact(entry), None


def parse_ruleset(json_text: str) -> list[GuestPolicy]:
    """The guest policies an `nft -j list table` listing holds (see `parse_observed` for
    the problems our model cannot hold)."""
    return list(parse_observed(json_text).policies)


# -- planning ---------------------------------------------------------------------------


def _rule_diff(before: GuestPolicy, after: GuestPolicy) -> str:
    notes: list[str] = []
    if before.default_action != after.default_action:
        notes.append(f"default {before.default_action} -> {after.default_action}")
    old = [r.describe() for r in before.rules]
    new = [r.describe() for r in after.rules]
    matcher = difflib.SequenceMatcher(a=old, b=new, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            continue
        if op in ("delete", "replace"):
            notes += [f"rule {i + 1} '{old[i]}' to remove" for i in range(i1, i2)]
        if op in ("insert", "replace"):
            notes += [f"rule {j + 1} '{new[j]}' to add" for j in range(j1, j2)]
    for name in ("internal_if", "external_if"):
        if getattr(before, name) != getattr(after, name):
            notes.append(f"{name} {getattr(before, name)} -> {getattr(after, name)}")
    return "; ".join(notes)


def plan_firewall(
    desired: Iterable[GuestPolicy],
    observed: ObservedFirewall | Sequence[GuestPolicy],
    *,
    family: Family | None = None,
) -> list[Action]:
    """What must change for the cell's table to hold exactly `desired` (empty: converged).

    Table-level problems (missing table, other family, hand edits the model cannot hold)
    are `REPLACE firewall_table/nano` actions, one per problem, with the problem as reason;
    guest chains are `CREATE`/`UPDATE`/`DELETE firewall_chain/<mac>` with
    `GuestPolicy.fields()` as before/after and the differing rules in the reason. `observed` may be a bare list of
    policies (then only guest chains are compared). `family`: the family the table should
    be in (default: whatever `observed` is in).
    """
    wanted = sorted(desired, key=lambda p: p.mac)
    actions: list[Action] = []
    table = Key(TABLE_KIND, _table())
    if isinstance(observed, ObservedFirewall):
        if not observed.present:
            where = f"{family} " if family else ""
            actions.append(
                Action(
                    Verb.CREATE,
                    table,
                    None,
                    {"guests": len(wanted)},
                    reason=f"table {where}{_table()} missing",
                )
            )
        elif family is not None and observed.family is not family:
            actions.append(
                Action(
                    Verb.REPLACE,
                    table,
                    {"family": str(observed.family)},
                    {"family": str(family)},
                    reason="table in another family",
                )
            )
        for problem in observed.problems:
            actions.append(Action(Verb.REPLACE, table, None, None, reason=problem))
        for stale in observed.stale:
            actions.append(
                Action(
                    Verb.DELETE,
                    Key(TABLE_KIND, f"{stale}:{_table()}"),
                    None,
                    None,
                    reason=f"stale table {stale} {_table()}",
                )
            )
        have_list: Sequence[GuestPolicy] = observed.policies
    else:
        have_list = observed
    have = {p.mac: p for p in have_list}
    want = {p.mac: p for p in wanted}
    for mac in sorted(set(have) | set(want)):
        before, after = have.get(mac), want.get(mac)
        key = Key(CHAIN_KIND, mac)
        if before is None and after is not None:
            actions.append(Action(Verb.CREATE, key, None, after.fields(), reason="no chain"))
        elif after is None and before is not None:
            actions.append(
                Action(
                    Verb.DELETE,
                    key,
                    before.fields(),
                    None,
                    reason="chain of a guest not on this cell",
                )
            )
        elif before is not None and after is not None and before != after:
            actions.append(
                Action(
                    Verb.UPDATE,
                    key,
                    before.fields(),
                    after.fields(),
                    reason=_rule_diff(before, after),
                )
            )
    return actions


def drift(actions: Iterable[Action]) -> list[str]:
    """Human-readable lines for a plan (drift reports, `--diff`)."""
    return [action.describe() for action in actions]
