"""Pure parts of address pool networks and the firewall reconciler: the libvirt network XML
(render, parse back, round trip, libvirt's own additions ignored), the DHCP hosts diff and
the network plan (the convergence triad on the model), the NAT table (render, the real
`nft -j` listing read back, hand edits found), cloud-init network-config, the cell's derived
Drifted condition, guest ports in status, and which chains a cell's firewall should hold."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from reconciler.contract import Verb
from reconciler.firewall import Family
from reconciler.firewalls import desired_policies, policy_dict, policy_from_dict
from reconciler.networking import (
    DhcpHost,
    NatSpec,
    NetworkSpec,
    PortForward,
    bridge_name,
    desired_network,
    diff_hosts,
    nat_table,
    network_name,
    parse_nat_listing,
    parse_network_xml,
    plan_nat,
    plan_network,
    ports_status,
    render_nat_script,
    render_network_xml,
)
from state.netconfig import network_config
from state.netstatus import merge_conditions

# the names, XML and listings below are a production cell's (prefix `nano`)
pytestmark = pytest.mark.usefixtures("production_names")

MAC1, MAC2, MAC3 = "00:16:3e:00:00:01", "00:16:3e:00:00:02", "00:16:3e:00:00:03"


def view(**extra):
    """What Store.address_pool_network returns for a /24 pool with two guests."""
    base = {"name": "office", "generation": 3, "gateway": "10.1.0.1",
            "netmask": "255.255.255.0", "prefix": 24, "network": "10.1.0.0/24",
            "dns": ["192.0.2.53"], "provider": "dhcp", "mode": "internal",
            "ranges": [{"start": "10.1.0.10", "end": "10.1.0.99", "netmask": "255.255.255.0",
                        "type": "internal"}],
            "hosts": [(MAC2.upper(), "10.1.0.11", "g2"), (MAC1, "10.1.0.10", "g1")],
            "external_hosts": []}
    return {**base, **extra}


SAMPLE_NAT = NatSpec("nano_nat_abcd1234", "10.1.0.0/24", (
    PortForward(20000, 80, "10.1.0.5", "g1"), PortForward(20001, 22, "10.1.0.6", "g2")))

# `nft -j list table ip nano_nat_abcd1234` (nft 1.0.6, Debian 12) after loading
# render_nat_script(SAMPLE_NAT) in a network namespace
NAT_LISTING = (
    '{"nftables":[{"metainfo":{"version":"1.0.6","release_name":"Lester Gooch #5","json_schem'
    'a_version":1}},{"table":{"family":"ip","name":"nano_nat_abcd1234","handle":2}},{"chain":'
    '{"family":"ip","table":"nano_nat_abcd1234","name":"prerouting","handle":1,"type":"nat","'
    'hook":"prerouting","prio":-100,"policy":"accept"}},{"chain":{"family":"ip","table":"nano'
    '_nat_abcd1234","name":"output","handle":2,"type":"nat","hook":"output","prio":-100,"poli'
    'cy":"accept"}},{"chain":{"family":"ip","table":"nano_nat_abcd1234","name":"postrouting",'
    '"handle":3,"type":"nat","hook":"postrouting","prio":100,"policy":"accept"}},{"rule":{"fa'
    'mily":"ip","table":"nano_nat_abcd1234","chain":"prerouting","handle":4,"comment":"nano p'
    'ort g1","expr":[{"match":{"op":"==","left":{"fib":{"result":"type","flags":["daddr"]}},"'
    'right":"local"}},{"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dport"'
    '}},"right":20000}},{"dnat":{"addr":"10.1.0.5","port":80}}]}},{"rule":{"family":"ip","tab'
    'le":"nano_nat_abcd1234","chain":"prerouting","handle":5,"comment":"nano port g1","expr":'
    '[{"match":{"op":"==","left":{"fib":{"result":"type","flags":["daddr"]}},"right":"local"}'
    '},{"match":{"op":"==","left":{"payload":{"protocol":"udp","field":"dport"}},"right":2000'
    '0}},{"dnat":{"addr":"10.1.0.5","port":80}}]}},{"rule":{"family":"ip","table":"nano_nat_a'
    'bcd1234","chain":"prerouting","handle":6,"comment":"nano port g2","expr":[{"match":{"op"'
    ':"==","left":{"fib":{"result":"type","flags":["daddr"]}},"right":"local"}},{"match":{"op'
    '":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":20001}},{"dnat":{"a'
    'ddr":"10.1.0.6","port":22}}]}},{"rule":{"family":"ip","table":"nano_nat_abcd1234","chain'
    '":"prerouting","handle":7,"comment":"nano port g2","expr":[{"match":{"op":"==","left":{"'
    'fib":{"result":"type","flags":["daddr"]}},"right":"local"}},{"match":{"op":"==","left":{'
    '"payload":{"protocol":"udp","field":"dport"}},"right":20001}},{"dnat":{"addr":"10.1.0.6"'
    ',"port":22}}]}},{"rule":{"family":"ip","table":"nano_nat_abcd1234","chain":"output","han'
    'dle":8,"comment":"nano port g1","expr":[{"match":{"op":"==","left":{"fib":{"result":"typ'
    'e","flags":["daddr"]}},"right":"local"}},{"match":{"op":"!=","left":{"payload":{"protoco'
    'l":"ip","field":"daddr"}},"right":{"prefix":{"addr":"127.0.0.0","len":8}}}},{"match":{"o'
    'p":"==","left":{"payload":{"protocol":"tcp","field":"dport"}},"right":20000}},{"dnat":{"'
    'addr":"10.1.0.5","port":80}}]}},{"rule":{"family":"ip","table":"nano_nat_abcd1234","chai'
    'n":"output","handle":9,"comment":"nano port g1","expr":[{"match":{"op":"==","left":{"fib'
    '":{"result":"type","flags":["daddr"]}},"right":"local"}},{"match":{"op":"!=","left":{"pa'
    'yload":{"protocol":"ip","field":"daddr"}},"right":{"prefix":{"addr":"127.0.0.0","len":8}'
    '}}},{"match":{"op":"==","left":{"payload":{"protocol":"udp","field":"dport"}},"right":20'
    '000}},{"dnat":{"addr":"10.1.0.5","port":80}}]}},{"rule":{"family":"ip","table":"nano_nat'
    '_abcd1234","chain":"output","handle":10,"comment":"nano port g2","expr":[{"match":{"op":'
    '"==","left":{"fib":{"result":"type","flags":["daddr"]}},"right":"local"}},{"match":{"op"'
    ':"!=","left":{"payload":{"protocol":"ip","field":"daddr"}},"right":{"prefix":{"addr":"12'
    '7.0.0.0","len":8}}}},{"match":{"op":"==","left":{"payload":{"protocol":"tcp","field":"dp'
    'ort"}},"right":20001}},{"dnat":{"addr":"10.1.0.6","port":22}}]}},{"rule":{"family":"ip",'
    '"table":"nano_nat_abcd1234","chain":"output","handle":11,"comment":"nano port g2","expr"'
    ':[{"match":{"op":"==","left":{"fib":{"result":"type","flags":["daddr"]}},"right":"local"'
    '}},{"match":{"op":"!=","left":{"payload":{"protocol":"ip","field":"daddr"}},"right":{"pr'
    'efix":{"addr":"127.0.0.0","len":8}}}},{"match":{"op":"==","left":{"payload":{"protocol":'
    '"udp","field":"dport"}},"right":20001}},{"dnat":{"addr":"10.1.0.6","port":22}}]}},{"rule'
    '":{"family":"ip","table":"nano_nat_abcd1234","chain":"postrouting","handle":12,"comment"'
    ':"nano outbound","expr":[{"match":{"op":"==","left":{"payload":{"protocol":"ip","field":'
    '"saddr"}},"right":{"prefix":{"addr":"10.1.0.0","len":24}}}},{"match":{"op":"==","left":{'
    '"payload":{"protocol":"ip","field":"daddr"}},"right":{"prefix":{"addr":"224.0.0.0","len"'
    ':24}}}},{"return":null}]}},{"rule":{"family":"ip","table":"nano_nat_abcd1234","chain":"p'
    'ostrouting","handle":13,"comment":"nano outbound","expr":[{"match":{"op":"==","left":{"p'
    'ayload":{"protocol":"ip","field":"saddr"}},"right":{"prefix":{"addr":"10.1.0.0","len":24'
    '}}}},{"match":{"op":"==","left":{"payload":{"protocol":"ip","field":"daddr"}},"right":"2'
    '55.255.255.255"}},{"return":null}]}},{"rule":{"family":"ip","table":"nano_nat_abcd1234",'
    '"chain":"postrouting","handle":14,"comment":"nano outbound","expr":[{"match":{"op":"==",'
    '"left":{"payload":{"protocol":"ip","field":"saddr"}},"right":{"prefix":{"addr":"10.1.0.0'
    '","len":24}}}},{"match":{"op":"!=","left":{"payload":{"protocol":"ip","field":"daddr"}},'
    '"right":{"prefix":{"addr":"10.1.0.0","len":24}}}},{"masquerade":null}]}}]}'
)

# What libvirt 9.0 gives back for a network we defined (uuid, bridge MAC, dhcp hosts live).
LIBVIRT_XML = """<network>
  <name>nano-net-office</name>
  <uuid>82f6e125-90d7-4e62-bb61-6485fe70f5fe</uuid>
  <metadata>
    <nano:network xmlns:nano="https://nano.cloud/xmlns/network/1" address_pool="office" uid="u1"/>
  </metadata>
  <forward mode='route'/>
  <bridge name='nanobr-0d1a2b3c' stp='off' delay='0'/>
  <mac address='52:54:00:c5:10:fd'/>
  <dns>
    <forwarder addr='192.0.2.53'/>
  </dns>
  <ip address='10.1.0.1' netmask='255.255.255.0'>
    <dhcp>
      <host mac='00:16:3E:00:00:01' ip='10.1.0.10'/>
    </dhcp>
  </ip>
</network>
"""


# -- names --------------------------------------------------------------------------------------


def test_names_fit_the_kernel_and_are_the_same_everywhere():
    for pool in ("a", "office", "x" * 64, "pool-with-dashes_and.dots"):
        bridge = bridge_name(pool)
        assert bridge.startswith("nanobr-") and len(bridge) <= 15
        assert bridge == bridge_name(pool)
        assert nat_table(pool).endswith(bridge[len("nanobr-"):])
    assert bridge_name("a") != bridge_name("b")
    assert network_name("office") == "nano-net-office"


# -- the libvirt network ---------------------------------------------------------------------


def test_desired_network_of_an_internal_pool():
    net = desired_network(view(), "u1")
    assert net.name == "nano-net-office" and net.bridge == bridge_name("office")
    assert (net.forward, net.gateway, net.netmask, net.dns) == (
        "route", "10.1.0.1", "255.255.255.0", ("192.0.2.53",))
    assert net.hosts == (DhcpHost(MAC1, "10.1.0.10"), DhcpHost(MAC2, "10.1.0.11"))
    assert net.subnet == "10.1.0.0/24"


def test_external_pool_and_pool_without_ranges_get_an_isolated_network():
    for v in (view(mode="external"), view(netmask="", prefix=0, ranges=[], hosts=[])):
        net = desired_network(v, "u1")
        assert (net.forward, net.gateway, net.hosts, net.subnet) == ("", "", (), "")
        root = ET.fromstring(render_network_xml(net))
        assert root.find("forward") is None and root.find("ip") is None


def test_render_has_no_range_one_host_per_allocation_and_our_mark():
    root = ET.fromstring(render_network_xml(desired_network(view(), "u1")))
    assert root.find("forward").get("mode") == "route"
    assert root.find("bridge").get("name") == bridge_name("office")
    ip = root.find("ip")
    assert (ip.get("address"), ip.get("netmask")) == ("10.1.0.1", "255.255.255.0")
    assert ip.find("dhcp/range") is None
    assert [(h.get("mac"), h.get("ip")) for h in ip.findall("dhcp/host")] == [
        (MAC1, "10.1.0.10"), (MAC2, "10.1.0.11")]
    assert [f.get("addr") for f in root.findall("dns/forwarder")] == ["192.0.2.53"]
    # DHCP gives guests the pool's DNS servers, not the gateway's dnsmasq
    dnsmasq = "{http://libvirt.org/schemas/network/dnsmasq/1.0}"
    assert [o.get("value") for o in root.findall(f"{dnsmasq}options/{dnsmasq}option")] == [
        "dhcp-option=option:dns-server,192.0.2.53"]
    without = ET.fromstring(render_network_xml(desired_network(view(dns=[]), "u1")))
    assert without.find(f"{dnsmasq}options") is None
    mark = root.find("metadata/{https://nano.cloud/xmlns/network/1}network")
    assert mark.get("address_pool") == "office" and mark.get("uid") == "u1"


@pytest.mark.parametrize("v", [view(), view(dns=[]), view(hosts=[]), view(mode="external")])
def test_parse_gives_back_every_rendered_field(v):
    net = desired_network(v, "u1")
    assert parse_network_xml(render_network_xml(net)) == net


def test_parse_ignores_what_libvirt_adds_and_normalises_macs():
    net = parse_network_xml(LIBVIRT_XML)
    assert net == NetworkSpec(name="nano-net-office", bridge="nanobr-0d1a2b3c", pool="office",
                              uid="u1", forward="route", gateway="10.1.0.1",
                              netmask="255.255.255.0", dns=("192.0.2.53",),
                              hosts=(DhcpHost(MAC1, "10.1.0.10"),))
    prefixed = LIBVIRT_XML.replace("netmask='255.255.255.0'", "prefix='24'")
    assert parse_network_xml(prefixed).netmask == "255.255.255.0"
    bare = LIBVIRT_XML.replace("<forward mode='route'/>", "<forward/>")
    unmarked = parse_network_xml(bare.split("<metadata>")[0] + bare.split("</metadata>")[1])
    assert (unmarked.pool, unmarked.uid, unmarked.forward) == ("", "", "nat")


def test_hosts_diff():
    a, b, c = DhcpHost(MAC1, "10.1.0.10"), DhcpHost(MAC2, "10.1.0.11"), DhcpHost(MAC3, "10.1.0.12")
    assert diff_hosts([a, b], [a, b]) == ([], [])
    assert diff_hosts([a, b, c], [a]) == ([], [b, c])
    assert diff_hosts([a], [a, b, c]) == ([b, c], [])
    moved = DhcpHost(MAC2, "10.1.0.50")  # same MAC, another address: out, then in
    assert diff_hosts([a, moved], [a, b]) == ([b], [moved])
    stolen = DhcpHost(MAC3, "10.1.0.11")  # the address now belongs to another MAC
    assert diff_hosts([stolen], [b]) == ([b], [stolen])


def _apply(desired: NetworkSpec, observed: NetworkSpec | None, actions) -> NetworkSpec:
    """What the reconciler's effects do to the model (to check plans converge)."""
    if observed is None or any(a.verb == Verb.REPLACE for a in actions):
        return desired
    hosts = set(observed.hosts)
    for action in actions:
        if action.target.kind != "dhcp_host":
            continue
        mac = action.target.id.rsplit("/", 1)[1]
        if action.verb == Verb.DELETE:
            hosts.discard(DhcpHost(mac, action.before["address"]))
        else:
            hosts.add(DhcpHost(mac, action.after["address"]))
    return NetworkSpec(**{**observed.__dict__, "hosts": tuple(sorted(hosts))})


@pytest.mark.parametrize("observed", [
    None,
    "same",
    "extra host",
    "missing host",
    "dns changed",
    "bridge changed",
])
def test_plan_network_converges(observed):
    want = desired_network(view(), "u1")
    have = {
        None: None,
        "same": want,
        "extra host": NetworkSpec(**{**want.__dict__, "hosts": want.hosts + (
            DhcpHost(MAC3, "10.1.0.12"),)}),
        "missing host": NetworkSpec(**{**want.__dict__, "hosts": want.hosts[:1]}),
        "dns changed": NetworkSpec(**{**want.__dict__, "dns": ("192.0.2.54",)}),
        "bridge changed": NetworkSpec(**{**want.__dict__, "bridge": "virbr9"}),
    }[observed]
    actions = plan_network(want, have, active=True)
    assert bool(actions) is (observed != "same")
    after = _apply(want, have, actions)
    assert after == want
    assert plan_network(want, after, active=True) == []


def test_plan_network_actions_say_what_and_why():
    want = desired_network(view(), "u1")
    assert [a.verb for a in plan_network(want, None, active=False)] == [Verb.CREATE]
    have = NetworkSpec(**{**want.__dict__, "dns": (), "hosts": (
        DhcpHost(MAC1, "10.1.0.10"), DhcpHost(MAC3, "10.1.0.12"))})
    actions = plan_network(want, have, active=False)
    assert [(a.verb, a.target.kind) for a in actions] == [
        (Verb.REPLACE, "network"), (Verb.DELETE, "dhcp_host"), (Verb.CREATE, "dhcp_host"),
        (Verb.START, "network")]
    assert actions[0].changes() == [("dns", [], ["192.0.2.53"])]
    assert actions[1].target.id == f"nano-net-office/{MAC3}"
    assert actions[1].reason == "not allocated by nano"
    assert actions[2].after == {"address": "10.1.0.11"}


def test_network_spec_dict_round_trip():
    want = desired_network(view(), "u1")
    assert NetworkSpec.from_dict(json.loads(json.dumps(want.to_dict()))) == want


# -- the NAT table ---------------------------------------------------------------------------


def test_render_nat_script_replaces_the_table_in_one_transaction():
    script = render_nat_script(SAMPLE_NAT)
    lines = [line.strip() for line in script.splitlines()]
    assert lines[:3] == ["table ip nano_nat_abcd1234", "delete table ip nano_nat_abcd1234",
                         "table ip nano_nat_abcd1234 {"]
    assert ('fib daddr type local tcp dport 20000 dnat to 10.1.0.5:80 comment "nano port g1"'
            in lines)
    assert ('fib daddr type local udp dport 20001 dnat to 10.1.0.6:22 comment "nano port g2"'
            in lines)
    assert ('ip saddr 10.1.0.0/24 ip daddr != 10.1.0.0/24 masquerade comment "nano outbound"'
            in lines)
    output = lines[lines.index("chain output {"):]
    assert ('fib daddr type local ip daddr != 127.0.0.0/8 tcp dport 20000 dnat to 10.1.0.5:80 '
            'comment "nano port g1"' in output)


@pytest.mark.parametrize("bad", [
    PortForward(20000, 80, "10.1.0.5; flush ruleset", "g1"),
    PortForward(0, 80, "10.1.0.5", "g1"),
    PortForward(20000, 70000, "10.1.0.5", "g1"),
    PortForward(20000, 80, "10.1.0.5", 'g1" accept'),
])
def test_render_nat_script_refuses_anything_unchecked(bad):
    with pytest.raises(ValueError):
        render_nat_script(NatSpec("nano_nat_x", "", (bad,)))


def test_the_real_listing_reads_back_as_the_spec():
    observed = parse_nat_listing(NAT_LISTING)
    assert observed.present
    assert set(observed.chains) == {"prerouting", "output", "postrouting"}
    assert plan_nat(SAMPLE_NAT, observed) == []


def _edited(mutate) -> str:
    doc = json.loads(NAT_LISTING)
    mutate(doc["nftables"])
    return json.dumps(doc)


def test_hand_edits_of_the_nat_table_are_found():
    def add_rule(items):
        rule = json.loads(json.dumps(items[-1]))
        rule["rule"]["expr"] = [{"accept": None}]
        rule["rule"].pop("comment")
        items.append(rule)

    def drop_forward(items):
        del items[5]

    def change_target(items):
        items[5]["rule"]["expr"][2]["dnat"]["addr"] = "10.1.0.99"

    def change_policy(items):
        items[2]["chain"]["policy"] = "drop"

    for mutate, verbs in ((add_rule, [Verb.DELETE]), (drop_forward, [Verb.CREATE]),
                          (change_target, [Verb.CREATE, Verb.DELETE]),
                          (change_policy, [Verb.REPLACE])):
        actions = plan_nat(SAMPLE_NAT, parse_nat_listing(_edited(mutate)))
        assert [a.verb for a in actions] == verbs, mutate.__name__

    swapped = _edited(lambda items: items.insert(6, items.pop(5)))
    assert [a.verb for a in plan_nat(SAMPLE_NAT, parse_nat_listing(swapped))] == [Verb.UPDATE]


def test_nat_table_lifecycle_plans():
    absent = parse_nat_listing(None)
    assert [a.verb for a in plan_nat(SAMPLE_NAT, absent)] == [Verb.CREATE]
    empty = NatSpec(SAMPLE_NAT.table)
    assert plan_nat(empty, absent) == []
    assert [a.verb for a in plan_nat(empty, parse_nat_listing(NAT_LISTING))] == [Verb.DELETE]
    with pytest.raises(ValueError):
        parse_nat_listing("not json")
    assert NatSpec.from_dict(json.loads(json.dumps(SAMPLE_NAT.to_dict()))) == SAMPLE_NAT


def test_ports_status_per_guest():
    forwards = [{"guest": "g1", "port": 20001, "guest_port": 443, "address": "10.1.0.5"},
                {"guest": "g1", "port": 20000, "guest_port": 80, "address": "10.1.0.5"},
                {"guest": "g9", "port": 20002, "guest_port": 22, "address": ""}]
    shown = ports_status(forwards, "192.0.2.2", applied=True)
    assert [p["port"] for p in shown["g1"]] == [20000, 20001]
    assert shown["g1"][0] == {"port": 20000, "guest_port": 80, "address": "192.0.2.2",
                              "protocols": ["tcp", "udp"], "forwarded": True}
    assert shown["g9"][0]["forwarded"] is False and "no address" in shown["g9"][0]["error"]
    failed = ports_status(forwards[:1], "h", applied=False, error="nft missing")
    assert failed["g1"][0]["forwarded"] is False and failed["g1"][0]["error"] == "nft missing"


# -- cloud-init network-config -------------------------------------------------------------------


def test_network_config_static_internal_address_by_mac():
    nics = [{"type": "internal", "mac": MAC1.upper(), "address": "10.1.0.10"}]
    config = network_config(nics, gateway="10.1.0.1", prefixes={"internal": 24},
                            dns=["192.0.2.53"])
    assert config == {"version": 2, "ethernets": {"internal": {
        "match": {"macaddress": MAC1}, "dhcp4": False, "addresses": ["10.1.0.10/24"],
        "routes": [{"to": "0.0.0.0/0", "via": "10.1.0.1"}],
        "nameservers": {"addresses": ["192.0.2.53"]}}}}
    no_dns = network_config(nics, gateway="10.1.0.1", prefixes={"internal": 24}, dns=[])
    assert no_dns["ethernets"]["internal"]["nameservers"] == {"addresses": ["10.1.0.1"]}


def test_network_config_external_and_both():
    internal = {"type": "internal", "mac": MAC1, "address": "10.1.0.10"}
    external = {"type": "external", "mac": MAC2, "address": "10.1.0.200"}
    only_external = network_config([{**internal, "address": ""}, external],
                                   gateway="10.1.0.254", prefixes={"external": 24}, dns=[])
    assert list(only_external["ethernets"]) == ["external"]
    assert only_external["ethernets"]["external"]["routes"][0]["via"] == "10.1.0.254"
    both = network_config([internal, external], gateway="10.1.0.1",
                          prefixes={"internal": 24, "external": 24}, dns=[])
    assert "routes" in both["ethernets"]["internal"]
    assert "routes" not in both["ethernets"]["external"]  # one default route
    assert network_config([{**internal, "address": ""}], gateway="10.1.0.1",
                          prefixes={"internal": 24}, dns=[]) is None


# -- the cell's Drifted condition ------------------------------------------------------------


def _cond(type, status, reason="", message=""):
    return {"type": type, "status": status, "reason": reason, "message": message,
            "last_transition": "2026-01-01 00:00:00"}


def test_drifted_is_derived_from_the_parts_and_keeps_other_conditions():
    stored = [_cond("Ready", True, "Converged"), _cond("CellReachable", True)]
    merged = merge_conditions(stored, [_cond("NetworkDrifted", False, "InSync")])
    assert [c["type"] for c in merged] == ["Ready", "CellReachable", "NetworkDrifted",
                                           "Drifted"]
    assert merged[-1]["status"] is False
    merged = merge_conditions(merged, [_cond("FirewallDrifted", True, "Corrected",
                                             "found and corrected: rule x")])
    drifted = next(c for c in merged if c["type"] == "Drifted")
    assert drifted["status"] is True and drifted["message"] == "found and corrected: rule x"
    assert merge_conditions(stored, []) == stored  # nothing of ours: nothing derived


# -- which chains a cell's firewall holds ------------------------------------------------------


def _guest(gid, macs, default="reject", rules=()):
    return {"id": gid, "name": gid, "default_action": default, "rules": list(rules),
            "macs": macs}


def test_every_nic_of_a_guest_gets_the_policy():
    guests = [_guest("g1", {"internal": MAC1, "external": MAC2},
                     rules=[{"action": "accept", "protocol": "tcp", "to_port": 22}])]
    policies, refused = desired_policies(guests, {}, family=Family.INET)
    assert refused == {}
    assert [p.mac for p in policies] == [MAC1, MAC2]
    assert all(p.default_action == "reject" and len(p.rules) == 1 for p in policies)
    assert policy_from_dict(json.loads(json.dumps(policy_dict(policies[0])))) == policies[0]


def test_interface_rules_need_the_bridge_family_and_a_running_guest():
    rule = {"action": "accept", "protocol": "tcp", "to_port": 22, "interface": 1}
    guests = [_guest("g1", {"internal": MAC1}, rules=[rule]), _guest("g2", {"internal": MAC2})]
    policies, refused = desired_policies(guests, {MAC1: "vnet7"}, family=Family.INET)
    assert [p.mac for p in policies] == [MAC2]
    assert "bridge family" in refused["g1"]
    policies, refused = desired_policies(guests, {}, family=Family.BRIDGE)
    assert refused == {"g1": "interface rules apply once the guest runs"}
    policies, refused = desired_policies(guests, {MAC1: "vnet7"}, family=Family.BRIDGE)
    assert refused == {} and policies[0].internal_if == "vnet7"
    _, refused = desired_policies([_guest("g3", {})], {}, family=Family.BRIDGE)
    assert refused == {"g3": "the guest has no network interface"}


# -- the cell's status: two writers -----------------------------------------------------------


def test_the_cell_reconcilers_record_keeps_network_and_firewall_status(database):
    """The cell reconciler writes observed and conditions whole from what it read when its
    probe began; what the network and firewall reconcilers recorded meanwhile survives."""
    from state.db import open_database
    from state.store import Store

    open_database(database)
    store = Store()
    store.register_cell("c1", {"libvirt_uri": "qemu:///system"})  # no reconciler here
    stale = store.cell_conditions("c1")  # what the cell reconciler read at its start
    assert store.record_cell_net_status("c1", "firewall", {"table": True}, [
        _cond("FirewallReady", True, "Converged"),
        _cond("FirewallDrifted", True, "Corrected", "found and corrected: x")])
    store.record_cell("c1", generation=1, observed={"alive": True, "firewall": "old"},
                      conditions=[*stale, _cond("Ready", True, "Converged"),
                                  _cond("FirewallReady", False, "Error")],
                      phase="online", last_error="")
    status = store.cell_record("c1")["status"]
    assert status["observed"] == {"alive": True, "firewall": {"table": True}}
    kinds = {c["type"]: c for c in status["conditions"]}
    assert set(kinds) == {"Ready", "FirewallReady", "FirewallDrifted", "Drifted"}
    assert kinds["FirewallReady"]["status"] is True and kinds["Drifted"]["status"] is True
    assert store.record_cell_net_status("c1", "firewall", None)
    assert "firewall" not in store.cell_record("c1")["status"]["observed"]
    assert not store.record_cell_net_status("gone", "firewall", {})
    with pytest.raises(ValueError):
        store.record_cell_net_status("c1", "facts", {})
