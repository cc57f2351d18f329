"""The firewall with real packets: `NftFirewall` manages the ruleset of a network namespace
standing in for a cell (tests/helpers/netns.py), guests and clients in their own
namespaces exchange real TCP, UDP and ICMP through the cell's bridge.

Each test runs once per family (`bridge`, `inet`); a family the running kernel cannot
host is skipped with the probe's reason (a kernel without nf_conntrack_bridge and
nft_reject_bridge skips `bridge`). Needs root and `ip netns`; skipped, saying why,
without them. Outcomes: "open" (connected / echoed), "refused" (TCP reset or ICMP
unreachable: our reject answering), "timeout" (dropped).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

import pytest

from reconciler.drivers.nft import NftFirewall
from reconciler.drivers.shell import LocalShell
from reconciler.firewall import (
    Family,
    GuestPolicy,
    Rule,
    chain_name,
    parse_observed,
    plan_firewall,
    validate_policy,
)
from state.errors import Permanent
from tests.conftest import TEST_NAMES_PREFIX as TABLE  # our nft table is named by the prefix
from tests.helpers.netns import Host, Lab, netns_unusable
from tests.unit.test_firewall import load_sample

pytestmark = pytest.mark.integration

NET = "10.231.0"
G1_MAC, G2_MAC = "00:16:3e:31:00:0b", "00:16:3e:31:00:0c"
OPEN, REFUSED = "open", "refused"


@pytest.fixture(scope="module")
def netns_ok() -> None:
    reason = netns_unusable()
    if reason:
        print(f"skipping firewall namespace tests: {reason}")
        pytest.skip(reason)


@pytest.fixture(params=[Family.BRIDGE, Family.INET], ids=str)
def family(request: pytest.FixtureRequest, netns_ok: None) -> Family:
    return Family(request.param)


@pytest.fixture
def lab(family: Family) -> Iterator[Lab]:
    with Lab() as made:
        made.add_bridge("br0", f"{NET}.1/24")
        firewall = NftFirewall(made.shell(), family=family)
        ok, reason = firewall.available()
        if not ok:
            print(f"skipping {family} family: {reason}")
            pytest.skip(reason)
        yield made


@pytest.fixture
def firewall(lab: Lab, family: Family) -> NftFirewall:
    return NftFirewall(lab.shell(), family=family)


def guest(lab: Lab, name: str, mac: str, last: int) -> Host:
    host = lab.add_host(name, mac, {"br0": f"{NET}.{last}/24"})
    lab.serve(host, tcp=[22, 80, 81], udp=[53, 54])
    return host


def client(lab: Lab, name: str, last: int) -> Host:
    return lab.add_host(name, f"02:00:00:00:00:{last:02x}", {"br0": f"{NET}.{last}/24"})


def policy(host: Host, default: str, *rules: Mapping[str, object]) -> GuestPolicy:
    return validate_policy(host.mac, default, rules, internal_if=host.taps["br0"])


def converged(firewall: NftFirewall, desired: list[GuestPolicy]) -> bool:
    return plan_firewall(desired, firewall.inspect(), family=firewall.family()) == []


def test_accept_reject_and_default_action(lab: Lab, firewall: NftFirewall) -> None:
    g1, g2 = guest(lab, "g1", G1_MAC, 11), guest(lab, "g2", G2_MAC, 12)
    c = client(lab, "c1", 100)
    checks = [
        ("tcp", g1.address, 22),
        ("tcp", g1.address, 80),
        ("udp", g1.address, 53),
        ("udp", g1.address, 54),
        ("icmp", g1.address, 0),
        ("tcp", g2.address, 22),
        ("tcp", g2.address, 80),
        ("udp", g2.address, 53),
        ("icmp", g2.address, 0),
    ]
    assert lab.probe(c, checks) == [OPEN] * len(checks)  # nothing filters yet
    desired = [
        policy(
            g1,
            "reject",
            {"action": "accept", "protocol": "tcp", "to_port": 22},
            {"action": "accept", "protocol": "udp", "to_port": 53},
            {"action": "accept", "protocol": "icmp"},
        ),
        policy(
            g2,
            "accept",
            {"action": "reject", "protocol": "tcp", "to_port": 22},
            {"action": "reject", "protocol": "udp"},
        ),
    ]
    firewall.apply(desired)
    assert lab.probe(c, checks) == [
        OPEN, REFUSED, OPEN, REFUSED, OPEN,  # g1: accepted, default reject answers
        REFUSED, OPEN, REFUSED, OPEN,  # g2: rejected by rules, default accept
    ]  # fmt: skip
    assert converged(firewall, desired)
    # a default change on the running guests takes effect at once (it is only nft)
    desired[0] = GuestPolicy(g1.mac, "accept", desired[0].rules, g1.taps["br0"])
    firewall.apply(desired, observed=firewall.inspect())
    assert lab.probe(c, checks[:5]) == [OPEN] * 5


def test_rule_order_decides(lab: Lab, firewall: NftFirewall) -> None:
    g1, c = guest(lab, "g1", G1_MAC, 11), client(lab, "c1", 100)
    reject_client = {"action": "reject", "protocol": "tcp", "from_address": c.address}
    accept_ssh = {"action": "accept", "protocol": "tcp", "to_port": 22}
    firewall.apply([policy(g1, "accept", reject_client, accept_ssh)])
    assert lab.probe(c, [("tcp", g1.address, 22), ("tcp", g1.address, 80)]) == [REFUSED] * 2
    moved = [policy(g1, "accept", accept_ssh, reject_client)]
    firewall.apply(moved, observed=firewall.inspect())  # only g1's chain is replaced
    assert lab.probe(c, [("tcp", g1.address, 22), ("tcp", g1.address, 80)]) == [OPEN, REFUSED]
    assert converged(firewall, moved)


def test_guests_come_and_go_one_chain_at_a_time(
    lab: Lab, firewall: NftFirewall, family: Family, caplog: pytest.LogCaptureFixture
) -> None:
    g1, g2 = guest(lab, "g1", G1_MAC, 11), guest(lab, "g2", G2_MAC, 12)
    c = client(lab, "c1", 100)
    checks = [("tcp", g1.address, 22), ("tcp", g2.address, 22)]
    firewall.apply([policy(g1, "reject")])
    assert lab.probe(c, checks) == [REFUSED, OPEN]
    swapped = [policy(g2, "reject")]
    with caplog.at_level("WARNING", logger="nano.drivers.nft"):
        firewall.apply(swapped, observed=firewall.inspect())  # delete g1's chain, add g2's
    assert caplog.records == []  # no fallback to re-declaring the table
    assert converged(firewall, swapped)
    assert lab.probe(c, checks) == [OPEN, REFUSED]

    # the observation is stale by the time it is used: the update fails as a whole and
    # the table is re-declared instead
    observed = firewall.inspect()
    chain = chain_name(g2.mac)
    lab.run(
        lab.cell, ["nft", "delete", "element", str(family), TABLE, "guests", f"{{ {G2_MAC} }}"]
    )
    lab.run(lab.cell, ["nft", "delete", "chain", str(family), TABLE, chain])
    changed = [policy(g2, "reject", {"action": "accept", "protocol": "tcp", "to_port": 22})]
    with caplog.at_level("WARNING", logger="nano.drivers.nft"):
        firewall.apply(changed, observed=observed)
    assert "re-declaring" in caplog.text
    assert converged(firewall, changed)
    assert lab.probe(c, checks) == [OPEN, OPEN]


def test_replies_to_the_guests_own_connections_pass(lab: Lab, firewall: NftFirewall) -> None:
    g1, c = guest(lab, "g1", G1_MAC, 11), client(lab, "c1", 100)
    lab.serve(c, tcp=[9000], udp=[9001])
    firewall.apply([policy(g1, "reject")])
    # new connections to the guest are refused...
    inbound = [("tcp", g1.address, 22), ("udp", g1.address, 53), ("icmp", g1.address, 0)]
    assert lab.probe(c, inbound) == [REFUSED] * 3
    # ...while the guest's own TCP, UDP and ICMP get their answers back (conntrack)
    outbound = [("tcp", c.address, 9000), ("udp", c.address, 9001), ("icmp", c.address, 0)]
    assert lab.probe(g1, outbound) == [OPEN] * 3


def test_from_address_and_cidr(lab: Lab, firewall: NftFirewall) -> None:
    g1 = guest(lab, "g1", G1_MAC, 11)
    near, far = client(lab, "c1", 100), client(lab, "c2", 200)
    only_near = {"action": "accept", "protocol": "tcp", "to_port": 80, "from_address": near.address}
    near_cidr = {
        "action": "accept",
        "protocol": "tcp",
        "to_port": 81,
        "from_address": f"{NET}.96/28",
    }
    far_cidr = {"action": "accept", "protocol": "udp", "from_address": f"{NET}.192/26"}
    firewall.apply([policy(g1, "reject", only_near, near_cidr, far_cidr)])
    checks = [("tcp", g1.address, 80), ("tcp", g1.address, 81), ("udp", g1.address, 53)]
    assert lab.probe(near, checks) == [OPEN, OPEN, REFUSED]  # .100: itself, in .96/28
    assert lab.probe(far, checks) == [REFUSED, REFUSED, OPEN]  # .200: only in .192/26


# Interface rules need the bridge family (inet sees the bridge, not the tap): this test is
# only collected for it, rather than skipped for inet.
@pytest.mark.parametrize("family", [Family.BRIDGE], indirect=True, ids=str)
def test_interface_rules_match_the_guests_tap(
    lab: Lab, firewall: NftFirewall, family: Family
) -> None:
    lab.add_bridge("br1", "10.231.1.1/24")
    g1 = lab.add_host("g1", G1_MAC, {"br0": f"{NET}.11/24", "br1": "10.231.1.11/24"})
    lab.serve(g1, tcp=[22, 80])
    inside = client(lab, "c1", 100)
    outside = lab.add_host("c2", "02:00:00:00:01:64", {"br1": "10.231.1.100/24"})
    desired = [
        validate_policy(
            g1.mac,
            "reject",
            [
                {"action": "accept", "protocol": "tcp", "to_port": 22, "interface": 1},
                {"action": "accept", "protocol": "tcp", "to_port": 80, "interface": 2},
            ],
            internal_if=g1.taps["br0"],
            external_if=g1.taps["br1"],
        )
    ]
    firewall.apply(desired)
    internal, external = g1.addresses["br0"], g1.addresses["br1"]
    assert lab.probe(inside, [("tcp", internal, 22), ("tcp", internal, 80)]) == [OPEN, REFUSED]
    assert lab.probe(outside, [("tcp", external, 22), ("tcp", external, 80)]) == [REFUSED, OPEN]
    assert converged(firewall, desired)


def _handle(lab: Lab, family: Family, chain: str, port: int) -> int:
    listing = lab.run(lab.cell, ["nft", "-a", "-j", "list", "chain", str(family), TABLE, chain])
    for item in json.loads(listing.stdout)["nftables"]:
        rule = item.get("rule")
        if rule and any(e.get("match", {}).get("right") == port for e in rule["expr"]):
            return int(rule["handle"])
    raise LookupError(f"no rule for port {port} in {chain}")


def test_hand_edits_are_drift_and_the_next_apply_corrects_them(
    lab: Lab, firewall: NftFirewall, family: Family
) -> None:
    g1, c = guest(lab, "g1", G1_MAC, 11), client(lab, "c1", 100)
    desired = [policy(g1, "reject", {"action": "accept", "protocol": "tcp", "to_port": 22})]
    firewall.apply(desired)
    assert lab.probe(c, [("tcp", g1.address, 22)]) == [OPEN]
    chain = chain_name(g1.mac)

    handle = _handle(lab, family, chain, 22)
    lab.run(lab.cell, ["nft", "delete", "rule", str(family), TABLE, chain, "handle", str(handle)])
    assert lab.probe(c, [("tcp", g1.address, 22)]) == [REFUSED]
    observed = firewall.inspect()
    plan = plan_firewall(desired, observed, family=family)
    assert [a.reason for a in plan] == ["rule 1 'accept tcp port 22' to add"]
    firewall.apply(desired, observed=observed)
    assert converged(firewall, desired)
    assert lab.probe(c, [("tcp", g1.address, 22)]) == [OPEN]

    # a rule nano never writes is reported, and removed by re-declaring the table
    lab.run(lab.cell, ["nft", "insert", "rule", str(family), TABLE, chain, "tcp", "dport", "80",
                       "counter", "accept"])  # fmt: skip
    assert lab.probe(c, [("tcp", g1.address, 80)]) == [OPEN]
    observed = firewall.inspect()
    assert not observed.clean
    assert any("not written by nano" in a.reason for a in plan_firewall(desired, observed))
    firewall.apply(desired, observed=observed)
    assert converged(firewall, desired)
    assert lab.probe(c, [("tcp", g1.address, 80)]) == [REFUSED]


def test_round_trip_through_the_kernel(lab: Lab, firewall: NftFirewall, family: Family) -> None:
    groups = ("common", "bridge_only") if family is Family.BRIDGE else ("common",)
    desired = load_sample(*groups)
    firewall.apply(desired)
    observed = firewall.inspect()
    assert observed.clean, observed.problems
    assert list(observed.policies) == sorted(desired, key=lambda p: p.mac)
    assert firewall.observe() == list(observed.policies)
    listing = lab.run(lab.cell, ["nft", "-j", "list", "table", str(family), TABLE]).stdout
    assert parse_observed(listing).policies == observed.policies
    firewall.apply(desired, observed=observed)  # converged: nothing to send
    assert converged(firewall, desired)


def test_stale_table_of_the_other_family_is_reported_and_purged(
    lab: Lab, firewall: NftFirewall, family: Family
) -> None:
    other = Family.INET if family is Family.BRIDGE else Family.BRIDGE
    lab.run(lab.cell, ["nft", "add", "table", str(other), TABLE])
    desired = [GuestPolicy(G1_MAC, "reject", (Rule("accept", "tcp", 22),))]
    firewall.apply(desired)
    observed = firewall.inspect()
    assert observed.stale == ()
    lab.run(lab.cell, ["nft", "add", "table", str(other), TABLE])
    observed = firewall.inspect()
    assert observed.stale == (other,)
    assert any(a.reason == f"stale table {other} {TABLE}"
               for a in plan_firewall(desired, observed))
    firewall.apply(desired, observed=observed)
    assert converged(firewall, desired)


def test_remove_deletes_only_our_table(lab: Lab, firewall: NftFirewall, family: Family) -> None:
    g1, c = guest(lab, "g1", G1_MAC, 11), client(lab, "c1", 100)
    lab.run(lab.cell, ["nft", "add", "table", "inet", "someone_else"])
    firewall.apply([policy(g1, "reject")])
    assert lab.probe(c, [("tcp", g1.address, 22)]) == [REFUSED]
    firewall.remove()
    firewall.remove()  # idempotent
    assert lab.probe(c, [("tcp", g1.address, 22)]) == [OPEN]
    assert firewall.observe() == []
    tables = lab.run(lab.cell, ["nft", "list", "tables"]).stdout
    assert tables.strip() == "table inet someone_else"


def test_a_cell_without_nft_is_reported() -> None:
    firewall = NftFirewall(LocalShell(), nft="/nonexistent/nano-test/nft", cell="cell-7")
    assert firewall.available() == (False, "nft is not installed on cell-7: install nftables")
    with pytest.raises(Permanent, match="nft is not installed on cell-7: install nftables"):
        firewall.apply([])
    with pytest.raises(Permanent, match="install nftables"):
        firewall.observe()
