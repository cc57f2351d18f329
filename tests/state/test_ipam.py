"""IPAM and port forwards in the store, on SQLite and PostgreSQL (the `database` fixture):
range checks, lowest-free allocation, requested addresses, allocation under real
concurrency (threads with their own connections), refusals that protect allocations,
persistence across a reopen, and the network view the network reconciler renders."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address

import pytest

from state.db import close_database, db, open_database
from state.errors import Conflict, Invalid, NotFound
from state.models import ComputePool, Guest, GuestInterface
from state.networks import check_range
from state.store import Store

MASK = "255.255.255.0"


@pytest.fixture
def store(database: str) -> Store:
    open_database(database)
    return Store()


def make_pool(store: Store, name: str = "net", *, gateway: str = "10.0.0.1",
              ranges: tuple[tuple[str, str], ...] = (("10.0.0.10", "10.0.0.49"),),
              mode: str = "internal", external: tuple[tuple[str, str], ...] = ()) -> str:
    store.create_address_pool(name, {"gateway": gateway, "dns": ["8.8.8.8"], "mode": mode})
    for start, end in ranges:
        store.add_address_range(name, "internal", start, {"end": end, "netmask": MASK})
    for start, end in external:
        store.add_address_range(name, "external", start, {"end": end, "netmask": MASK})
    return name


# -- pure range checks ------------------------------------------------------------------------


@pytest.mark.parametrize("start,end,netmask,others,error,words", [
    ("10.0.1.5", "10.0.1.9", MASK, [], Invalid, "outside the subnet 10.0.0.0/24"),
    ("10.0.0.5", "10.0.1.9", MASK, [], Invalid, "end: 10.0.1.9 is outside"),
    ("10.0.0.9", "10.0.0.5", MASK, [], Invalid, "start 10.0.0.9 is after end 10.0.0.5"),
    ("10.0.0.0", "10.0.0.5", MASK, [], Invalid, "network or broadcast"),
    ("10.0.0.200", "10.0.0.255", MASK, [], Invalid, "network or broadcast"),
    ("10.0.0.1", "10.0.0.9", MASK, [], Invalid, "gateway 10.0.0.1 lies inside"),
    ("10.0.0.20", "10.0.0.30", MASK, [("10.0.0.25", "10.0.0.40", MASK)], Conflict, "overlaps"),
    ("10.0.0.20", "10.0.0.30", MASK, [("10.0.0.10", "10.0.0.20", MASK)], Conflict, "overlaps"),
    ("10.0.0.20", "10.0.0.30", MASK, [("10.0.0.40", "10.0.0.50", "255.255.0.0")], Invalid,
     "differs"),
    ("10.0.0.20", "10.0.0.30", "0.0.0.255", [], Invalid, "is not a netmask"),
    ("10.0.0.20", "10.0.0.30", "24", [], Invalid, "is not a netmask"),
    ("10.0.0.20", "10.0.0.30", "255.255.255.255", [], Invalid, "between /8"),
    ("10.0.0.300", "10.0.0.30", MASK, [], Invalid, "not an IPv4 address"),
])
def test_check_range_refuses(start, end, netmask, others, error, words):
    with pytest.raises(error) as caught:
        check_range("10.0.0.1", start, end, netmask, others)
    assert words in caught.value.message


def test_check_range_accepts_adjacent_ranges_and_a_gateway_between_them():
    check_range("10.0.0.100", "10.0.0.101", "10.0.0.200", MASK,
                [("10.0.0.2", "10.0.0.99", MASK), ("10.0.0.201", "10.0.0.254", MASK)])


# -- allocation ----------------------------------------------------------------------------


def test_lowest_free_address_first_and_idempotent_per_guest(store):
    make_pool(store)
    assert store.allocate_guest_addresses("g1", "net") == {"internal": "10.0.0.10"}
    assert store.allocate_guest_addresses("g2", "net") == {"internal": "10.0.0.11"}
    # the same guest again (a retried create, a restart) keeps what it holds
    assert store.allocate_guest_addresses("g1", "net") == {"internal": "10.0.0.10"}
    store.release_guest_addresses("g1")
    assert store.guest_addresses("g1") == {}
    assert store.allocate_guest_addresses("g3", "net") == {"internal": "10.0.0.10"}
    assert store.allocate_guest_addresses("g4", "") == {}


def test_requested_address_taken_out_of_range_or_malformed(store):
    make_pool(store)
    assert store.allocate_guest_addresses("g1", "net", requested="10.0.0.33") == {
        "internal": "10.0.0.33"}
    with pytest.raises(Conflict) as taken:
        store.allocate_guest_addresses("g2", "net", requested="10.0.0.33")
    assert "10.0.0.33" in taken.value.message and "already allocated by guest g1" in \
        taken.value.message
    with pytest.raises(Invalid) as outside:
        store.allocate_guest_addresses("g2", "net", requested="10.0.0.50")
    assert "outside every internal range" in outside.value.message
    assert "10.0.0.10-10.0.0.49" in outside.value.message
    with pytest.raises(Invalid, match="not an IPv4 address"):
        store.allocate_guest_addresses("g2", "net", requested="ten")
    with pytest.raises(Conflict, match="already holds internal address 10.0.0.33"):
        store.allocate_guest_addresses("g1", "net", requested="10.0.0.34")
    assert store.guest_addresses("g2") == {}


def test_mode_both_gives_one_internal_and_one_external(store):
    make_pool(store, mode="both", external=(("10.0.0.200", "10.0.0.201"),))
    assert store.allocate_guest_addresses("g1", "net") == {
        "internal": "10.0.0.10", "external": "10.0.0.200"}
    assert store.guest_addresses("g1") == {"internal": "10.0.0.10", "external": "10.0.0.200"}


def test_external_modes_need_external_ranges(store):
    make_pool(store, mode="external")
    with pytest.raises(Conflict, match="has no external address range"):
        store.allocate_guest_addresses("g1", "net")
    with pytest.raises(NotFound, match="no address pool named 'nope'"):
        store.allocate_guest_addresses("g1", "nope")


def test_full_pool_says_so(store):
    make_pool(store, ranges=(("10.0.0.10", "10.0.0.11"),))
    store.allocate_guest_addresses("g1", "net")
    store.allocate_guest_addresses("g2", "net")
    with pytest.raises(Conflict) as full:
        store.allocate_guest_addresses("g3", "net")
    assert full.value.message == "no free address in address pool net (2 addresses, all allocated)"


def test_allocation_inside_a_callers_transaction(store):
    make_pool(store)
    store.allocate_guest_addresses("g1", "net", requested="10.0.0.10")
    with db.atomic():
        # a refused request rolls back only its savepoint: the transaction stays usable
        with pytest.raises(Conflict):
            store.allocate_guest_addresses("g2", "net", requested="10.0.0.10")
        assert store.allocate_guest_addresses("g2", "net") == {"internal": "10.0.0.11"}
    assert store.guest_addresses("g2") == {"internal": "10.0.0.11"}
    # the caller's failure undoes the allocation with the rest of its work
    with pytest.raises(RuntimeError), db.atomic():
        store.allocate_guest_addresses("g3", "net")
        raise RuntimeError("guest creation failed later")
    assert store.guest_addresses("g3") == {}


def test_fifty_parallel_allocations_against_forty_addresses(store):
    make_pool(store)  # 10.0.0.10 - 10.0.0.49: 40 addresses
    start = threading.Barrier(50)

    def allocate(n: int) -> tuple[str, str]:
        try:
            start.wait()
            return "ok", store.allocate_guest_addresses(f"guest-{n}", "net")["internal"]
        except Conflict as exc:
            return "full", exc.message
        finally:
            db.close()  # each thread opened its own connection

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(allocate, range(50)))
    got = [value for kind, value in results if kind == "ok"]
    refused = [value for kind, value in results if kind == "full"]
    assert len(got) == 40 and len(set(got)) == 40
    assert sorted(got, key=IPv4Address) == [f"10.0.0.{n}" for n in range(10, 50)]
    assert refused == ["no free address in address pool net (40 addresses, all allocated)"] * 10
    assert store.list_address_pools()[0]["allocated"] == 40
    for n in range(50):
        store.release_guest_addresses(f"guest-{n}")
    assert store.list_address_pools()[0]["allocated"] == 0


def test_addresses_survive_a_reopen(store, database):
    make_pool(store)
    store.allocate_guest_addresses("g1", "net", requested="10.0.0.42")
    close_database()
    open_database(database)
    assert Store().guest_addresses("g1") == {"internal": "10.0.0.42"}
    assert Store().allocate_guest_addresses("g1", "net") == {"internal": "10.0.0.42"}


# -- refusals that protect allocations -------------------------------------------------------


def test_range_with_allocations_cannot_be_removed(store):
    make_pool(store, ranges=(("10.0.0.10", "10.0.0.19"), ("10.0.0.20", "10.0.0.29")))
    store.allocate_guest_addresses("g1", "net", requested="10.0.0.15")
    with pytest.raises(Conflict, match="1 allocated address"):
        store.remove_address_range("net", "internal", "10.0.0.10")
    store.remove_address_range("net", "internal", "10.0.0.20")
    store.release_guest_addresses("g1")
    store.remove_address_range("net", "internal", "10.0.0.10")
    assert store.address_pool("net")["ranges"] == []


def test_pool_in_use_or_with_allocations_cannot_be_deleted(store):
    make_pool(store)
    ComputePool.create(name="cp", network="net")
    with pytest.raises(Conflict, match="used by compute pool"):
        store.delete_address_pool("net")
    ComputePool.update(network="").execute()
    store.allocate_guest_addresses("g1", "net")
    with pytest.raises(Conflict, match="1 allocated address"):
        store.delete_address_pool("net")
    store.release_guest_addresses("g1")
    store.delete_address_pool("net")
    assert store.list_address_pools() == []


def test_gateway_fixed_while_allocated_other_fields_free(store):
    make_pool(store)
    store.allocate_guest_addresses("g1", "net")
    with pytest.raises(Conflict, match="gateway can change only"):
        store.modify_address_pool("net", {"gateway": "10.0.0.254"})
    store.modify_address_pool("net", {"gateway": "10.0.0.1", "provider": "cloudinit",
                                      "mode": "both", "dns": ["1.1.1.1"]})
    status = store.address_pool("net")
    assert (status["provider"], status["mode"], status["dns"]) == ("cloudinit", "both",
                                                                   ["1.1.1.1"])
    store.release_guest_addresses("g1")
    with pytest.raises(Invalid, match="outside the subnet 10.1.0.0/24"):
        store.modify_address_pool("net", {"gateway": "10.1.0.1"})  # ranges would not fit
    with pytest.raises(Invalid, match="lies inside"):
        store.modify_address_pool("net", {"gateway": "10.0.0.20"})
    store.modify_address_pool("net", {"gateway": "10.0.0.254"})
    assert store.address_pool("net")["gateway"] == "10.0.0.254"


def test_pool_fields_are_checked(store):
    with pytest.raises(Invalid, match="gateway: is required"):
        store.create_address_pool("a", {})
    with pytest.raises(Invalid, match="dns.1"):
        store.create_address_pool("a", {"gateway": "10.0.0.1", "dns": ["8.8.8.8", "x"]})
    with pytest.raises(Invalid, match="provider"):
        store.create_address_pool("a", {"gateway": "10.0.0.1", "provider": "static"})
    with pytest.raises(Invalid, match="mode"):
        store.create_address_pool("a", {"gateway": "10.0.0.1", "mode": "bridge"})
    with pytest.raises(Invalid, match="invalid address pool name"):
        store.create_address_pool("a b", {"gateway": "10.0.0.1"})
    make_pool(store, "a")
    with pytest.raises(Conflict, match="already exists"):
        store.create_address_pool("a", {"gateway": "10.0.0.1"})


# -- the network view --------------------------------------------------------------------------


def test_network_view_joins_interfaces_of_allocated_guests(store):
    make_pool(store, mode="both", external=(("10.0.0.200", "10.0.0.209"),))
    for gid, mac in (("g1", "00:16:3e:00:00:01"), ("g2", "00:16:3e:00:00:02")):
        Guest.create(id=gid, name=gid, pool="cp")
        GuestInterface.create(guest=gid, type="internal", mac=mac)
    GuestInterface.create(guest="g1", type="external", mac="00:16:3e:00:01:01")
    store.allocate_guest_addresses("g2", "net")
    store.allocate_guest_addresses("g1", "net")
    store.allocate_guest_addresses("g9", "net")  # no interface row (yet): no host entry
    view = store.address_pool_network("net")
    assert (view["gateway"], view["netmask"], view["prefix"], view["network"]) == (
        "10.0.0.1", MASK, 24, "10.0.0.0/24")
    assert view["hosts"] == [("00:16:3e:00:00:02", "10.0.0.10", "g2"),
                             ("00:16:3e:00:00:01", "10.0.0.11", "g1")]
    assert view["external_hosts"] == [("00:16:3e:00:01:01", "10.0.0.201", "g1")]
    assert [r["type"] for r in view["ranges"]] == ["internal", "external"]


# -- cell ports --------------------------------------------------------------------------------


def test_ports_lowest_free_idempotent_and_released(store):
    assert store.allocate_guest_ports("g1", "c1", [22, 80]) == [
        {"port": 20000, "guest_port": 22}, {"port": 20001, "guest_port": 80}]
    assert store.allocate_guest_ports("g2", "c1", [22]) == [{"port": 20002, "guest_port": 22}]
    assert store.allocate_guest_ports("g2", "c2", [22]) == [{"port": 20000, "guest_port": 22}]
    assert store.allocate_guest_ports("g1", "c1", [80, 443]) == [
        {"port": 20001, "guest_port": 80}, {"port": 20003, "guest_port": 443}]
    store.release_guest_ports("g1")
    assert store.guest_ports("g1") == []
    assert store.allocate_guest_ports("g3", "c1", [8080]) == [
        {"port": 20000, "guest_port": 8080}]
    with pytest.raises(Invalid, match="listed twice"):
        store.allocate_guest_ports("g4", "c1", [22, 22])
    with pytest.raises(Invalid, match="not a port number"):
        store.allocate_guest_ports("g4", "c1", [0])


def test_ports_unique_under_concurrency(store):
    start = threading.Barrier(20)

    def forward(n: int) -> list[int]:
        try:
            start.wait()
            return [p["port"] for p in store.allocate_guest_ports(f"g{n}", "c1", [22, 80, 443])]
        finally:
            db.close()

    with ThreadPoolExecutor(max_workers=20) as pool:
        granted = [port for ports in pool.map(forward, range(20)) for port in ports]
    assert sorted(granted) == list(range(20000, 20060))


def test_port_range_exhaustion_keeps_nothing(store):
    store.limits = {"guest_ports": (30000, 30004)}
    store.allocate_guest_ports("g1", "c1", [22, 80, 443])
    with pytest.raises(Conflict) as full:
        store.allocate_guest_ports("g2", "c1", [22, 80, 443])
    assert full.value.message == "no free port on cell 'c1' (5 ports 30000-30004, all forwarded)"
    assert store.guest_ports("g2") == []  # the two it got first were rolled back
    assert store.allocate_guest_ports("g3", "c1", [1, 2]) == [
        {"port": 30003, "guest_port": 1}, {"port": 30004, "guest_port": 2}]
