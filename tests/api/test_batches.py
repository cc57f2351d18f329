"""Batch create, delete and stop through the API: names by rule, all-or-nothing creates,
HTTP 202 while an entry is unfinished and 200 once all are, entry statuses derived from the
guests (recorded as the reconciler would), ownership of tasks and the purge after an hour."""

from __future__ import annotations

import datetime as dt

import pytest

from state.models import BatchTask, Guest
from tests.api.guest_helpers import (
    GIB,
    create_guest,
    guest_body,
    make_pool,
    mark_created,
    set_running,
    user_session,
)

MASK = "255.255.255.0"


def batch_body(rule: str = "order", count: int = 3, **extra) -> dict:
    body = guest_body("unused", name_rule=rule, name_prefix="test", count=count, **extra)
    del body["name"]
    return body


@pytest.mark.gen_test
async def test_batch_create_by_order(api, server):
    await make_pool(api)
    reply = await api.call("POST", "/batch/create_guest/", batch_body())
    assert (reply.status, reply.code) == (202, 0)
    task = reply.data["id"]
    guests = list(Guest.select().order_by(Guest.name))
    assert [g.name for g in guests] == ["test_0", "test_1", "test_2"]
    assert {g.batch for g in guests} == {task}
    assert len({g.spec["ethernet_address"] for g in guests}) == 3

    status = await api.call("GET", f"/batch/create_guest/{task}")
    assert status.status == 202
    assert [(e["name"], e["status"], e["progress"]) for e in status.data] == [
        ("test_0", "creating", 0), ("test_1", "creating", 0), ("test_2", "creating", 0)]
    ids = [e["id"] for e in status.data]
    mark_created(server, ids[0])
    server.store.record_guest_observed(ids[1], phase="failed", last_error="not enough space")
    server.store.record_guest_observed(ids[2], progress=45)
    status = await api.call("GET", f"/batch/create_guest/{task}")
    assert status.status == 202
    assert status.data == [
        {"id": ids[0], "name": "test_0", "status": "created"},
        {"id": ids[1], "name": "test_1", "status": "fail", "error": "not enough space"},
        {"id": ids[2], "name": "test_2", "status": "creating", "progress": 45}]
    mark_created(server, ids[2])
    done = await api.call("GET", f"/batch/create_guest/{task}")
    assert done.status == 200 and [e["status"] for e in done.data] == ["created", "fail",
                                                                       "created"]
    assert BatchTask.get_by_id(task).finished_at is not None

    again = await api.call("POST", "/batch/create_guest/", batch_body(count=1))
    assert again.code == 409 and "test_0" in again.message  # names taken
    no_prefix = await api.call("POST", "/batch/create_guest/", {**batch_body(), "name_prefix": ""})
    assert no_prefix.code == 400 and "name_prefix" in no_prefix.message


@pytest.mark.gen_test
async def test_batch_create_is_all_or_nothing(api):
    await make_pool(api, "pool1", {"cell-a": {"max_memory": 5 * GIB}})
    full = await api.call("POST", "/batch/create_guest/", batch_body(count=3, memory=2 * GIB))
    assert full.code == 409 and "memory free" in full.message
    assert Guest.select().count() == 0 and BatchTask.select().count() == 0
    bad = await api.call("POST", "/batch/create_guest/", batch_body(count=0, cores=0))
    assert bad.code == 400 and "count:" in bad.message and "cores:" in bad.message
    pinned = await api.call("POST", "/batch/create_guest/",
                            batch_body(ethernet_address="00:16:3e:00:00:01"))
    assert pinned.code == 400 and "ethernet_address" in pinned.message


@pytest.mark.gen_test
async def test_batch_create_by_mac_and_address(api):
    await make_pool(api)
    reply = await api.ok("POST", "/batch/create_guest/", {**batch_body("MAC", count=2),
                                                          "name_prefix": ""})
    for guest in Guest.select():
        assert guest.name == guest.spec["ethernet_address"].replace(":", "-")
        assert guest.batch == reply["id"]
    prefixed = await api.ok("POST", "/batch/create_guest/", batch_body("MAC", count=1))
    row = Guest.get(Guest.batch == prefixed["id"])
    assert row.name == "test_" + row.spec["ethernet_address"].replace(":", "-")
    address = await api.call("POST", "/batch/create_guest/", batch_body("address"))
    assert address.code == 400
    assert address.message.startswith(
        "name_rule address needs a compute pool with an address pool")


@pytest.mark.gen_test
async def test_batch_create_by_address(api):
    await api.ok("POST", "/address_pools/net", {"gateway": "172.16.3.254", "dns": []})
    await api.ok("POST", "/address_pools/net/internal/ranges/172.16.3.1",
                 {"end": "172.16.3.9", "netmask": MASK})
    await make_pool(api)
    await api.ok("PUT", "/compute_pools/pool1", {"storage": "", "network": "net",
                                                 "failover": False})
    await api.ok("POST", "/batch/create_guest/", batch_body("address", count=2))
    assert sorted(g.name for g in Guest.select()) == ["test_172-16-3-1", "test_172-16-3-2"]


@pytest.mark.gen_test
async def test_batch_delete(api, server):
    await make_pool(api)
    running = await create_guest(api, "running")
    mark_created(server, running, running=True)
    stopped = await create_guest(api, "stopped")
    mark_created(server, stopped)
    reply = await api.call("POST", "/batch/delete_guest/",
                           {"guest": [running, stopped, "no-such-guest"]})
    assert (reply.status, reply.code) == (202, 0)
    task = reply.data["id"]
    status = await api.call("GET", f"/batch/delete_guest/{task}")
    assert status.status == 202
    assert status.data[1] == {"id": stopped, "name": "stopped", "status": "deleting"}
    assert status.data[0]["status"] == "fail" and "force" in status.data[0]["error"]
    assert status.data[2]["status"] == "fail" and "no guest" in status.data[2]["error"]
    assert Guest.get_by_id(running).deleting is False
    server.store.finish_guest_delete(stopped)
    done = await api.call("GET", f"/batch/delete_guest/{task}")
    assert done.status == 200 and done.data[1]["status"] == "deleted"

    forced = await api.ok("POST", "/batch/delete_guest/", {"guest": [running], "force": True})
    assert Guest.get_by_id(running).deleting is True
    assert (await api.call("GET", f"/batch/delete_guest/{forced['id']}")).status == 202


@pytest.mark.gen_test
async def test_batch_stop(api, server):
    await make_pool(api)
    first = await create_guest(api, "first")
    mark_created(server, first, running=True)
    second = await create_guest(api, "second")
    mark_created(server, second)
    reply = await api.call("POST", "/batch/stop_guest/", {"guests": [first, second]})
    assert reply.status == 202
    task = reply.data["id"]
    spec = Guest.get_by_id(first).spec
    assert (spec["power"], spec["stop_mode"]) == ("stopped", "shutdown")
    status = await api.call("GET", f"/batch/stop_guest/{task}")
    assert status.status == 202
    assert status.data == [
        {"id": first, "name": "first", "status": "stopping"},
        {"id": second, "name": "second", "status": "fail", "error": "the guest is not running"}]
    set_running(server, first, False)
    done = await api.call("GET", f"/batch/stop_guest/{task}")
    assert done.status == 200 and done.data[0]["status"] == "stopped"
    portal = await api.call("POST", "/batch/stop_guest/", {"guest": [first]})
    assert portal.status == 202  # the portal sends "guest"
    empty = await api.call("POST", "/batch/stop_guest/", {})
    assert empty.code == 400 and "guest" in empty.message


@pytest.mark.gen_test
async def test_tasks_belong_to_their_user_and_are_purged(api, server):
    await make_pool(api)
    task = (await api.ok("POST", "/batch/create_guest/", batch_body(count=1)))["id"]
    other = await user_session(api, "olga")
    assert (await api.call("GET", f"/batch/create_guest/{task}", session=other)).code == 404
    assert (await api.call("GET", f"/batch/delete_guest/{task}")).code == 404  # wrong kind
    mark_created(server, Guest.get(Guest.batch == task).id)
    assert (await api.call("GET", f"/batch/create_guest/{task}")).status == 200
    BatchTask.update(finished_at=dt.datetime.now() - dt.timedelta(minutes=59)).execute()
    assert (await api.call("GET", f"/batch/create_guest/{task}")).status == 200
    BatchTask.update(finished_at=dt.datetime.now() - dt.timedelta(minutes=61)).execute()
    gone = await api.call("GET", f"/batch/create_guest/{task}")
    assert gone.code == 404
