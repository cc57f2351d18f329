"""The store side of the contract with the guest reconciler (state/guests.py): what
`guest_desired` hands over, how `record_guest_observed` merges, what `finish_guest_delete`
removes and releases; and the calls into the address, port and policy stores made in the
create transaction (skipped where those stores are not part of this build)."""

from __future__ import annotations

import pytest

from state.errors import Conflict
from state.models import AddressAllocation, Guest, GuestInterface, GuestPolicy, Snapshot
from tests.api.guest_helpers import GIB, create_guest, guest_body, make_pool, mark_created

MASK = "255.255.255.0"


@pytest.mark.gen_test
async def test_desired_record_and_finish_delete(api, server):
    await make_pool(api)
    guest_id = await create_guest(api, "g1", disks=[10 * GIB, 5 * GIB])
    store = server.store
    desired = store.guest_desired(guest_id)
    assert (desired.id, desired.name, desired.pool, desired.cell) == (guest_id, "g1", "pool1",
                                                                       "cell-a")
    assert desired.spec["disks"] == [10 * GIB, 5 * GIB] and desired.phase == "creating"
    assert desired.storage_pool == "" and desired.address_pool == ""
    assert desired.interfaces == ({"type": "internal", "mac": desired.spec["ethernet_address"],
                                   "address": ""},)
    desired.spec["cores"] = 99  # a copy: changes nothing stored
    assert Guest.get_by_id(guest_id).spec["cores"] == 2
    assert guest_id in store.guest_ids() and store.guest_ids(cell="cell-b") == []

    store.record_guest_observed(guest_id, progress=40, observed={"host": "h"})
    assert (await api.call("GET", f"/guests/{guest_id}")).data["progress"] == 40
    store.record_guest_observed(guest_id, phase="failed", last_error="no space left on device")
    failed = await api.call("GET", f"/guests/{guest_id}")
    assert (failed.status, failed.code) == (201, 0)
    assert failed.data == {"name": "g1", "created": False, "progress": 40,
                           "error": "no space left on device"}
    mark_created(server, guest_id)
    row = Guest.get_by_id(guest_id)
    assert row.observed["host"] == "h" and row.observed["created"] is True  # merged
    assert row.observed_generation == row.generation and row.progress == 100
    assert store.record_guest_observed("no-such-guest", phase="x") is False

    with pytest.raises(Conflict):
        store.finish_guest_delete(guest_id)  # not marked deleting
    await api.ok("POST", f"/instances/{guest_id}/snapshots/", {"name": "s1"})
    await api.ok("DELETE", f"/guests/{guest_id}", {})
    assert store.guest_desired(guest_id).deleting is True
    assert store.finish_guest_delete(guest_id) is True
    assert store.guest_desired(guest_id) is None
    assert GuestInterface.select().count() == 0 and Snapshot.select().count() == 0
    assert store.finish_guest_delete(guest_id) is False
    gone = await api.call("GET", f"/guests/{guest_id}")
    assert gone.code == 404


@pytest.mark.gen_test
async def test_guests_in_a_pool_with_an_address_pool(api, server):
    await api.ok("POST", "/address_pools/net", {"gateway": "172.16.3.254", "dns": [],
                                                "mode": "both"})
    await api.ok("POST", "/address_pools/net/internal/ranges/172.16.3.1",
                 {"end": "172.16.3.9", "netmask": MASK})
    await api.ok("POST", "/address_pools/net/external/ranges/172.16.3.100",
                 {"end": "172.16.3.109", "netmask": MASK})
    await make_pool(api)
    await api.ok("PUT", "/compute_pools/pool1", {"storage": "", "network": "net",
                                                 "failover": False})
    asked = await create_guest(api, "asked", network_address="172.16.3.5")
    nics = {n.type: n for n in GuestInterface.select().where(GuestInterface.guest == asked)}
    assert nics["internal"].address == "172.16.3.5"
    assert nics["external"].address == "172.16.3.100"
    assert nics["external"].mac != nics["internal"].mac
    mark_created(server, asked)
    data = await api.ok("GET", f"/guests/{asked}")
    assert data["internal"]["allocated_address"] == "172.16.3.5"
    assert data["internal"]["network_address"] == "172.16.3.5"
    assert data["external"]["allocated_address"] == "172.16.3.100"
    found = await api.ok("POST", "/search/guests/", {"limit": 5, "keyword": "172.16.3.5"})
    assert [g["name"] for g in found["result"]] == ["asked"]
    taken = await api.call("POST", "/guests/", guest_body("again", network_address="172.16.3.5"))
    assert taken.code == 409 and Guest.select().count() == 1  # rolled back whole
    outside = await api.call("POST", "/guests/", guest_body("far", network_address="10.9.9.9"))
    assert outside.code == 400
    assert AddressAllocation.select().count() == 2

    await api.ok("DELETE", f"/guests/{asked}", {})
    server.store.finish_guest_delete(asked)
    assert AddressAllocation.select().count() == 0


@pytest.mark.gen_test
async def test_security_policy_group_is_copied_at_create(api):
    await make_pool(api)
    group = await api.ok("POST", "/security_policy_groups/", {
        "name": "web", "description": "", "user": "admin", "group": "admin", "enabled": True,
        "global": False, "default_action": "reject"})
    await api.ok("POST", f"/security_policy_groups/{group['id']}/rules/",
                 {"action": "accept", "protocol": "tcp", "to_port": 22})
    guest_id = await create_guest(api, "web", security_policy_group=group["id"])
    policy = GuestPolicy.get(GuestPolicy.guest == guest_id)
    assert policy.default_action == "reject" and policy.rules[0]["to_port"] == 22
    assert Guest.get_by_id(guest_id).spec["security_policy_group"] == group["id"]
    unknown = await api.call("POST", "/guests/", guest_body("x", security_policy_group="nope"))
    assert unknown.code == 404 and Guest.select().count() == 1


@pytest.mark.gen_test
async def test_ports_are_forwarded_from_the_cell(api, server):
    await make_pool(api)
    guest_id = await create_guest(api, "ported", ports=[22, 80])
    forwards = server.store.guest_ports(guest_id)
    assert [f["guest_port"] for f in forwards] == [22, 80]
    assert all(f["cell"] == "cell-a" for f in forwards)
    await api.ok("DELETE", f"/guests/{guest_id}", {})
    server.store.finish_guest_delete(guest_id)
    assert server.store.guest_ports(guest_id) == []
