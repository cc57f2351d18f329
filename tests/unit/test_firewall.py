"""Pure tests of reconciler/firewall.py: validation, rendering, parsing real nft listings
(tests/fixtures/nft, captured by capture.py there) and planning.

The same policies and listings are exercised against a live kernel in
tests/integration/test_firewall_netns.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from reconciler.contract import Key, Verb
from reconciler.firewall import (
    Family,
    GuestPolicy,
    ObservedFirewall,
    Rule,
    chain_name,
    drift,
    normalize_mac,
    parse_observed,
    parse_ruleset,
    plan_firewall,
    render_changes,
    render_guest_rules,
    render_ruleset,
    validate_policy,
    validate_rule,
)
from state.errors import Invalid
from tests.helpers.nft_samples import load_sample

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nft"
# the fixtures were captured from (and the golden scripts written for) table `nano`
pytestmark = pytest.mark.usefixtures("production_names")
MAC = "00:16:3e:11:22:33"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def invalid_details(data: Any) -> list[str]:
    with pytest.raises(Invalid) as caught:
        validate_rule(data)
    return caught.value.details


# -- validation -------------------------------------------------------------------------


def test_validate_rule_applies_the_documented_defaults() -> None:
    assert validate_rule({}) == Rule("accept", "all", 0, None, 0)
    assert validate_rule({"action": "reject", "protocol": "tcp", "to_port": 22}) == Rule(
        "reject", "tcp", 22
    )


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("10.0.0.5", "10.0.0.5"),
        ("10.0.0.5/32", "10.0.0.5"),
        ("10.0.0.0/24", "10.0.0.0/24"),
        (" 10.1.0.0/16 ", "10.1.0.0/16"),
        ("", None),
        (None, None),
    ],
)
def test_from_address_is_stored_canonically(given: str | None, stored: str | None) -> None:
    assert validate_rule({"from_address": given}).from_address == stored


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"action": "drop"}, "action"),
        ({"protocol": "sctp"}, "protocol"),
        ({"protocol": "tcp", "to_port": 65536}, "to_port"),
        ({"protocol": "tcp", "to_port": -1}, "to_port"),
        ({"protocol": "tcp", "to_port": "22"}, "to_port"),
        ({"protocol": "tcp", "to_port": True}, "to_port"),
        ({"protocol": "icmp", "to_port": 8}, "to_port"),
        ({"protocol": "all", "to_port": 80}, "to_port"),
        ({"from_address": "10.0.0.5/24"}, "from_address"),
        ({"from_address": "not-an-address"}, "from_address"),
        ({"from_address": "fe80::1"}, "from_address"),
        ({"from_address": 167772161}, "from_address"),
        ({"interface": 3}, "interface"),
        ({"interface": "1"}, "interface"),
        ({"port": 22}, "port"),
    ],
)
def test_validate_rule_names_the_bad_field(data: dict[str, Any], field: str) -> None:
    details = invalid_details(data)
    assert len(details) == 1
    assert details[0].startswith(f"{field}:"), details


def test_validate_rule_lists_every_problem() -> None:
    details = invalid_details({"action": "drop", "protocol": "icmp", "to_port": 1, "x": 1})
    assert sorted(d.split(":")[0] for d in details) == ["action", "to_port", "x"]


def test_host_bits_error_says_what_to_write() -> None:
    (detail,) = invalid_details({"from_address": "10.0.0.5/24"})
    assert "10.0.0.5/24" in detail and "without host bits" in detail


def test_validate_policy_prefixes_rule_index_and_normalizes_mac() -> None:
    policy = validate_policy("00-16-3E-11-22-33", "reject", [{"protocol": "tcp", "to_port": 22}])
    assert policy.mac == MAC and policy.chain == "g_00163e112233"
    with pytest.raises(Invalid) as caught:
        validate_policy("zz", "reject", [{}, {"action": "drop"}])
    assert caught.value.details == [
        "mac: must look like 00:16:3e:12:34:56, not 'zz'",
        "rules[1].action: must be accept or reject, not 'drop'",
    ]


@pytest.mark.parametrize("ifname", ['vnet0"', "a b", "x" * 16, "", "eth0;drop"])
def test_interface_names_cannot_break_out_of_the_script(ifname: str) -> None:
    with pytest.raises(Invalid):
        GuestPolicy(MAC, internal_if=ifname)


def test_rules_checked_even_when_built_directly() -> None:
    with pytest.raises(Invalid):
        Rule("accept", "tcp", 0, "10.0.0.1/32")  # not canonical: the parser would differ
    with pytest.raises(Invalid):
        GuestPolicy("00:16:3E:11:22:33")


def test_mac_helpers() -> None:
    assert normalize_mac("00163E112233") == MAC
    assert chain_name("00:16:3E:11:22:33") == "g_00163e112233"
    with pytest.raises(Invalid):
        normalize_mac("00:16:3e:11:22")


# -- rendering --------------------------------------------------------------------------


def test_render_matches_the_golden_script() -> None:
    script = render_ruleset(load_sample("common"), family=Family.INET)
    assert script == fixture("inet-sample.nft")


def test_render_is_deterministic_whatever_the_input_order() -> None:
    policies = load_sample("common")
    assert render_ruleset(policies) == render_ruleset(list(reversed(policies)))


def test_guest_chain_is_stateful_first_then_user_order_then_default() -> None:
    policy = validate_policy(
        MAC,
        "reject",
        [
            {"action": "accept", "protocol": "tcp", "to_port": 22, "interface": 1},
            {"action": "reject", "protocol": "udp", "from_address": "10.0.0.0/8"},
            {"action": "accept", "protocol": "icmp"},
        ],
        internal_if="vnet3",
    )
    assert render_guest_rules(policy) == [
        "ct state established,related accept",
        "icmpv6 type { nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert } accept"
        ' comment "nano guest 00:16:3e:11:22:33 internal=vnet3 external=-"',
        "udp sport 67 udp dport 68 accept",
        'oifname "vnet3" tcp dport 22 accept',
        "ip saddr 10.0.0.0/8 meta l4proto udp reject",
        "meta l4proto { icmp, ipv6-icmp } accept",
        'meta l4proto tcp reject with tcp reset comment "nano default"',
        'reject comment "nano default"',
    ]
    accepting = GuestPolicy(MAC, "accept", (Rule("reject", "tcp", 23),))
    assert render_guest_rules(accepting)[-2:] == [
        "tcp dport 23 reject with tcp reset",
        'accept comment "nano default"',
    ]


def test_bridge_family_dispatches_forward_and_output_ip_only() -> None:
    script = render_ruleset([GuestPolicy(MAC)], family=Family.BRIDGE)
    assert script.startswith("table bridge nano\ndelete table bridge nano\ntable bridge nano {")
    dispatch = "meta protocol { ip, ip6 } ether daddr vmap @guests"
    assert script.count(dispatch) == 2
    assert "type filter hook forward priority 0; policy accept;" in script
    assert "type filter hook output priority 0; policy accept;" in script
    assert f"elements = {{ {MAC} : jump g_00163e112233 }}" in script


def test_inet_family_has_only_forward_and_can_purge_a_stale_table() -> None:
    script = render_ruleset([], family=Family.INET, purge=[Family.BRIDGE])
    assert script.splitlines()[:4] == [
        "table bridge nano",
        "delete table bridge nano",
        "table inet nano",
        "delete table inet nano",
    ]
    assert "hook output" not in script and "elements" not in script


def test_interface_rules_need_the_bridge_family_and_the_tap() -> None:
    rule = (Rule("accept", "tcp", 22, interface=2),)
    with pytest.raises(Invalid, match="needs the bridge family"):
        render_ruleset([GuestPolicy(MAC, rules=rule, external_if="vnet1")], family=Family.INET)
    with pytest.raises(Invalid, match="no such interface"):
        render_ruleset([GuestPolicy(MAC, rules=rule, internal_if="vnet0")])


def test_two_policies_for_one_mac_are_refused() -> None:
    with pytest.raises(Invalid, match="two policies"):
        render_ruleset([GuestPolicy(MAC), GuestPolicy(MAC, "reject")])


# -- parsing real listings --------------------------------------------------------------


def test_parse_gives_back_what_was_rendered() -> None:
    observed = parse_observed(fixture("inet-sample.json"))
    assert observed.family is Family.INET and observed.present
    assert observed.problems == ()
    assert list(observed.policies) == sorted(load_sample("common"), key=lambda p: p.mac)
    assert parse_ruleset(fixture("inet-sample.json")) == list(observed.policies)


def test_parse_bridge_listing_reads_interfaces_and_both_hooks() -> None:
    """The bridge fixture was loaded without its ct/reject statements (capture.py says
    why), so exactly those are reported; everything else parses."""
    observed = parse_observed(fixture("bridge-stateless.json"))
    assert observed.family is Family.BRIDGE
    assert all(
        "lacks the stateful" in p or "does not end with its default action" in p
        for p in observed.problems
    ), observed.problems
    (guest,) = [p for p in observed.policies if p.mac == "00:16:3e:00:00:0d"]
    assert [r.interface for r in guest.rules] == [1, 2, 0]
    assert (guest.internal_if, guest.external_if) == ("vnet6", "vnet7")


def test_hand_edits_are_problems_or_differences() -> None:
    observed = parse_observed(fixture("inet-drifted.json"))
    text = "\n".join(observed.problems)
    assert "g_00163e00000b: rule not written by nano" in text and "8080" in text
    assert "g_00163e00000c: lacks the stateful" in text
    (a,) = [p for p in observed.policies if p.mac == "00:16:3e:00:00:0a"]
    assert a.rules[0] == Rule("accept", "tcp", 80, "10.231.0.0/24")  # tcp 22 was deleted

    plan = plan_firewall(load_sample("common"), observed, family=Family.INET)
    lines = drift(plan)
    assert any("rule 1 'accept tcp port 22' to add" in line for line in lines), lines
    assert any(a.verb is Verb.REPLACE and "8080" in a.reason for a in plan)
    assert {a.target for a in plan if a.verb is Verb.UPDATE} == {
        Key("firewall_chain", "00:16:3e:00:00:0a"),
        Key("firewall_chain", "00:16:3e:00:00:0c"),
    }


def test_no_table_and_garbage() -> None:
    empty = parse_observed('{"nftables": [{"metainfo": {"json_schema_version": 1}}]}')
    assert empty == ObservedFirewall()
    with pytest.raises(ValueError):
        parse_observed("Error: No such file or directory")


def test_a_dispatch_rule_pointing_elsewhere_is_a_problem() -> None:
    doc = json.loads(fixture("inet-sample.json"))
    for item in doc["nftables"]:
        if "map" in item:
            item["map"]["elem"][0][1] = {"jump": {"target": "g_00163e00000b"}}
        if "chain" in item and item["chain"]["name"] == "forward":
            item["chain"]["policy"] = "drop"
    problems = parse_observed(json.dumps(doc)).problems
    assert any("does not jump to g_00163e00000a" in p for p in problems), problems
    assert any(p.startswith("base chain forward: is") for p in problems), problems


# -- planning ---------------------------------------------------------------------------


def test_convergence_triad_on_the_model() -> None:
    desired = load_sample("common")
    missing = plan_firewall(desired, ObservedFirewall(), family=Family.INET)
    assert missing[0].verb is Verb.CREATE and missing[0].target == Key("firewall_table", "nano")
    assert len([a for a in missing if a.verb is Verb.CREATE]) == 1 + len(desired)
    observed = parse_observed(fixture("inet-sample.json"))
    assert plan_firewall(desired, observed, family=Family.INET) == []
    assert plan_firewall(desired, list(observed.policies)) == []


def test_plan_names_each_difference() -> None:
    observed = parse_observed(fixture("inet-sample.json"))
    desired = load_sample("common")
    changed = [
        GuestPolicy(p.mac, "accept", p.rules[1:], p.internal_if, p.external_if)
        if p.mac.endswith("0a")
        else p
        for p in desired
        if not p.mac.endswith("0b")
    ]
    changed.append(GuestPolicy("00:16:3e:00:00:0e"))
    plan = {a.target.id: a for a in plan_firewall(changed, observed, family=Family.INET)}
    assert plan["00:16:3e:00:00:0a"].verb is Verb.UPDATE
    assert (
        plan["00:16:3e:00:00:0a"].reason
        == "default reject -> accept; rule 1 'accept tcp port 22' to remove"
    )
    assert plan["00:16:3e:00:00:0b"].verb is Verb.DELETE
    assert plan["00:16:3e:00:00:0e"].verb is Verb.CREATE
    wrong_family = plan_firewall(desired, observed, family=Family.BRIDGE)
    assert wrong_family[0].verb is Verb.REPLACE and wrong_family[0].reason


def test_rule_order_is_a_difference() -> None:
    first, second = Rule("reject", "tcp"), Rule("accept", "tcp", 22)
    have = [GuestPolicy(MAC, rules=(first, second))]
    want = [GuestPolicy(MAC, rules=(second, first))]
    (action,) = plan_firewall(want, have)
    assert action.verb is Verb.UPDATE and "to remove" in action.reason


def test_render_changes_touches_only_changed_guests() -> None:
    observed = parse_observed(fixture("inet-sample.json"))
    desired = load_sample("common")
    assert render_changes(desired, observed, family=Family.INET) == ""
    a, b, c = desired
    new_a = GuestPolicy(a.mac, a.default_action, a.rules[:-1], a.internal_if)
    new = GuestPolicy("00:16:3e:00:00:0e", "reject")
    script = render_changes([new_a, c, new], observed, family=Family.INET)
    lines = script.splitlines()
    assert "flush chain inet nano g_00163e00000a" in lines
    assert "delete element inet nano guests { 00:16:3e:00:00:0b }" in lines
    assert "delete chain inet nano g_00163e00000b" in lines
    assert "add chain inet nano g_00163e00000e" in lines
    assert lines[-1] == "add element inet nano guests { 00:16:3e:00:00:0e : jump g_00163e00000e }"
    assert not any("g_00163e00000c" in line for line in lines)
    # a table with problems is re-declared whole
    drifted = parse_observed(fixture("inet-drifted.json"))
    assert render_changes(desired, drifted, family=Family.INET) == render_ruleset(
        desired, family=Family.INET
    )
