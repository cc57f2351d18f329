"""The comparison the setup check (tests/setup_guard.py) makes between the host before and
after the suite: created, changed and removed objects are named; what moves by itself
(a pool's sizes, nft rule handles) is not a change."""

from __future__ import annotations

from tests.setup_guard import _compare, _pool_definition, _without_handles

POOL = ("<pool type='dir'><name>nano-local</name><uuid>u1</uuid><capacity unit='bytes'>{c}"
        "</capacity><allocation unit='bytes'>{a}</allocation><available unit='bytes'>{v}"
        "</available><target><path>{p}</path></target></pool>")


def test_a_pools_sizes_are_not_a_change_but_its_path_is():
    before = _pool_definition(POOL.format(c=100, a=10, v=90, p="/var/lib/libvirt/images"))
    assert before == _pool_definition(POOL.format(c=100, a=60, v=40,
                                                  p="/var/lib/libvirt/images"))
    assert before != _pool_definition(POOL.format(c=100, a=10, v=90, p="/elsewhere"))


def test_permissions_libvirt_forgets_on_a_restart_are_not_a_change():
    built = POOL.format(c=1, a=1, v=1, p="/var/lib/libvirt/images").replace(
        "</path>", "</path><permissions><mode>0711</mode><owner>0</owner><group>0</group>"
                   "</permissions>")
    assert _pool_definition(built) == _pool_definition(
        POOL.format(c=1, a=1, v=1, p="/var/lib/libvirt/images"))


def test_nft_handles_are_not_a_change_but_rules_are():
    listing = {"nftables": [{"table": {"family": "inet", "name": "nano", "handle": 4}},
                            {"rule": {"chain": "g_1", "handle": 9, "expr": [{"accept": None}]}}]}
    renumbered = {"nftables": [{"table": {"family": "inet", "name": "nano", "handle": 7}},
                               {"rule": {"chain": "g_1", "handle": 12,
                                         "expr": [{"accept": None}]}}]}
    assert _without_handles(listing) == _without_handles(renumbered)
    edited = {"nftables": [{"table": {"family": "inet", "name": "nano", "handle": 4}},
                           {"rule": {"chain": "g_1", "handle": 9, "expr": [{"drop": None}]}}]}
    assert _without_handles(listing) != _without_handles(edited)


def test_compare_names_every_difference():
    before = {"domain nano-a": 1, "network nano-net-x": 2, "nft table inet nano": 3}
    after = {"domain nano-a": 1, "network nano-net-x": 5, "storage pool nano-b": 4}
    assert _compare(before, after) == [
        "network nano-net-x was changed: 2 -> 5", "nft table inet nano was removed",
        "storage pool nano-b was created"]
    assert _compare(before, dict(before)) == []
