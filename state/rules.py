"""Security policy rules as data: the canonical `Rule` and `validate_rule`, shared by the
store (guest and group policies), the API and the firewall renderer (reconciler/firewall.py).

Pure: no I/O. Lives in `state/` so the store never imports the reconciler.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from state.errors import Invalid

ACTIONS = ("accept", "reject")
PROTOCOLS = ("all", "tcp", "udp", "icmp")
PORT_PROTOCOLS = ("tcp", "udp")
INTERFACES = {0: "all", 1: "internal", 2: "external"}
RULE_FIELDS = ("action", "protocol", "to_port", "from_address", "interface")


def _invalid(what: str, problems: list[str]) -> Invalid:
    return Invalid(f"invalid {what}: {'; '.join(problems)}", details=problems)


@dataclass(frozen=True)
class Rule:
    """One SecurityPolicyRule in canonical form (what `validate_rule` returns and the parser
    reads back): `to_port` 0 = any port (tcp/udp only), `from_address` None = any source,
    else an IPv4 address or a CIDR without host bits (a /32 is written as the address),
    `interface` 0 all, 1 the guest's internal NIC, 2 its external NIC.

    Construction checks the canonical form, so nothing unchecked reaches an nft script.
    """

    action: str = "accept"
    protocol: str = "all"
    to_port: int = 0
    from_address: str | None = None
    interface: int = 0

    def __post_init__(self) -> None:
        problems = _rule_problems(self)
        if problems:
            raise _invalid("security policy rule", problems)

    def to_api(self) -> dict[str, Any]:
        """The rule as the API shows it (`GET /guests/{id}/security_policy/`)."""
        data: dict[str, Any] = {"action": self.action, "protocol": self.protocol}
        data["to_port"] = self.to_port
        if self.from_address is not None:
            data["from_address"] = self.from_address
        data["interface"] = self.interface
        return data

    def describe(self) -> str:
        """One line for people: 'accept tcp port 22 from 10.0.0.0/24 via internal'."""
        text = f"{self.action} {self.protocol}"
        if self.to_port:
            text += f" port {self.to_port}"
        if self.from_address:
            text += f" from {self.from_address}"
        if self.interface:
            text += f" via {INTERFACES[self.interface]}"
        return text


@functools.lru_cache(maxsize=8192)
def _canonical_source(text: str) -> str:
    """An IPv4 address or CIDR in canonical form; raises ValueError. (Cached: parsing a
    big listing meets the same few sources thousands of times.)"""
    net = ipaddress.IPv4Network(text, strict=True)
    return str(net.network_address) if net.prefixlen == 32 else str(net)


def _rule_problems(rule: Rule) -> list[str]:
    problems: list[str] = []
    if rule.action not in ACTIONS:
        problems.append(f"action: must be accept or reject, not {rule.action!r}")
    if rule.protocol not in PROTOCOLS:
        problems.append(f"protocol: must be one of all, tcp, udp, icmp, not {rule.protocol!r}")
    if type(rule.to_port) is not int or not 0 <= rule.to_port <= 65535:
        problems.append(f"to_port: must be an integer 0..65535, not {rule.to_port!r}")
    elif rule.to_port and rule.protocol not in PORT_PROTOCOLS:
        problems.append(
            f"to_port: a port ({rule.to_port}) needs protocol tcp or udp, not {rule.protocol}"
        )
    if rule.from_address is not None:
        try:
            canonical = _canonical_source(rule.from_address)
        except (ValueError, TypeError):
            problems.append(
                f"from_address: must be an IPv4 address or CIDR without host bits "
                f"(e.g. 10.0.0.0/24), not {rule.from_address!r}"
            )
        else:
            if canonical != rule.from_address:
                problems.append(f"from_address: write {canonical!r}, not {rule.from_address!r}")
    if type(rule.interface) is not int or rule.interface not in INTERFACES:
        problems.append(
            f"interface: must be 0 (all), 1 (internal) or 2 (external), not {rule.interface!r}"
        )
    return problems


def validate_rule(data: Mapping[str, Any]) -> Rule:
    """A SecurityPolicyRule from an API body (or a manifest) as a canonical `Rule`.

    Defaults as the API document gives them (action accept, protocol all, to_port 0,
    interface 0); an empty `from_address` means any source; a /32 is stored as the address.
    Raises `Invalid` listing every problem by field name; unknown fields are problems too
    (nothing is silently ignored).
    """
    if not isinstance(data, Mapping):
        raise _invalid("security policy rule", [f"must be an object, not {type(data).__name__}"])
    problems = [f"{key}: unknown field" for key in data if key not in RULE_FIELDS]
    action = data.get("action", "accept")
    protocol = data.get("protocol", "all")
    to_port = data.get("to_port", 0)
    to_port = 0 if to_port is None else to_port
    interface = data.get("interface", 0)
    interface = 0 if interface is None else interface
    source = data.get("from_address")
    if isinstance(source, str):
        source = source.strip() or None
        if source is not None:
            try:
                source = _canonical_source(source)
            except ValueError as exc:
                problems.append(
                    f"from_address: must be an IPv4 address or CIDR without host bits "
                    f"(e.g. 10.0.0.0/24), not {data.get('from_address')!r} ({exc})"
                )
                source = None
    elif source is not None:
        problems.append(f"from_address: must be a string, not {source!r}")
        source = None
    try:
        rule = Rule(action, protocol, to_port, source, interface)
    except Invalid as exc:
        problems.extend(exc.details)
    if problems:
        raise _invalid("security policy rule", problems)
    return rule
