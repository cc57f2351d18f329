"""Creating, reading, finding and deleting guests through the API, with the reconciler
disabled: what the API stores and answers (the desired state of state/guests.py), the
placement over cells whose liveness and stats are recorded directly, and visibility
between users of two groups."""

from __future__ import annotations

import pytest

from state.models import Cell, Guest, GuestInterface
from tests.api.guest_helpers import (
    GIB,
    create_guest,
    guest_body,
    make_image,
    make_pool,
    mark_created,
    set_cell,
    set_running,
    user_session,
)


@pytest.mark.gen_test
async def test_create_answers_202_then_201_while_creating_then_200(api, server):
    await make_pool(api)
    guest_id = await create_guest(api, "web-1")
    reply = await api.call("GET", f"/guests/{guest_id}")
    assert (reply.status, reply.code) == (201, 0)
    assert reply.data == {"name": "web-1", "created": False, "progress": 0}
    reply = await api.call("GET", f"/instances/{guest_id}")
    assert reply.status == 201 and reply.data["created"] is False

    row = Guest.get_by_id(guest_id)
    assert (row.phase, row.pool, row.cell, row.owner, row.group) == (
        "creating", "pool1", "cell-a", "admin", "admin")
    spec = row.spec
    assert spec["template_spec"] == {"admin": "root", "operating_system": "linux",
                                     "disk": "scsi", "network": "virtio", "display": "vga",
                                     "control": "vnc", "usb": "", "tablet": "usb"}
    assert spec["system"] == "linux" and spec["template"] == ""
    assert spec["power"] == "stopped" and spec["power_request"] == 0
    assert spec["ethernet_address"].startswith("00:16:3e:")
    assert len(spec["monitor_secret"]) == 8 and spec["instance_id"]
    assert spec["admin"] == {"user": "root", "password": "", "generation": 0}
    assert spec["qos"]["cpu_priority"] == "medium"
    nic = GuestInterface.get(GuestInterface.guest == guest_id)
    assert (nic.type, nic.mac, nic.address) == ("internal", spec["ethernet_address"], "")

    mark_created(server, guest_id, host="10.0.0.6")
    reply = await api.call("GET", f"/guests/{guest_id}")
    assert (reply.status, reply.code) == (200, 0)
    data = reply.data
    assert data["created"] is True and data["running"] is False and data["progress"] == 100
    assert data["disks"] == [10 * GIB] and data["total_disk"] == 10 * GIB
    assert (data["name"], data["cell"], data["pool"], data["cores"]) == ("web-1", "cell-a",
                                                                          "pool1", 2)
    assert data["display_protocol"] == "vnc" and data["monitor_secret"] == spec["monitor_secret"]
    assert data["create_time"] == "2026-01-02 03:04:05" and data["host"] == "10.0.0.6"
    assert data["internal"] == {"network_address": "", "display_address": "",
                                "allocated_address": ""}
    status = await api.call("GET", f"/instances/{guest_id}")
    assert status.status == 200
    for key in ("cpu_usage", "memory_available", "disk_available", "bytes_read",
                "bytes_written", "bytes_received", "bytes_sent", "media_attached"):
        assert key in status.data


@pytest.mark.gen_test
async def test_create_refuses_every_invalid_field_at_once(api):
    await make_pool(api)
    body = guest_body("bad name", cores=0, disks=[], modules=["qemu", "teleport"],
                      ethernet_address="00:16:3e:zz:00:01", memory=10)
    reply = await api.call("POST", "/guests/", body)
    assert reply.code == 400
    for field in ("name:", "cores:", "disks:", "modules.1:", "ethernet_address:", "memory:"):
        assert field in reply.message, (field, reply.message)
    assert "'teleport' is not one of 'qemu', 'cloud-init'" in reply.message
    missing = await api.call("POST", "/guests/", {"name": "x"})
    assert missing.code == 400
    for field in ("pool: is required", "cores: is required", "memory: is required",
                  "disks: is required"):
        assert field in missing.message
    assert Guest.select().count() == 0


@pytest.mark.gen_test
async def test_create_refusals_against_the_store(api, server):
    await make_pool(api)
    unknown = await api.call("POST", "/guests/", guest_body(template="no-such-template"))
    assert unknown.code == 404 and "no system template" in unknown.message
    pool = await api.call("POST", "/guests/", guest_body(pool="nowhere"))
    assert pool.code == 404 and "nowhere" in pool.message
    multicast = await api.call("POST", "/guests/",
                               guest_body(ethernet_address="01:16:3e:00:00:01"))
    assert multicast.code == 400 and "multicast" in multicast.message
    limits = await api.call("POST", "/guests/", guest_body(cores=25, disks=[10 * GIB, 65 * GIB]))
    assert limits.code == 400
    assert "cores: 25 is more than the limit of 24" in limits.message
    assert "disks.1:" in limits.message
    ci = await api.call("POST", "/guests/", guest_body(cloud_init={"admin_name": "nano"}))
    assert ci.code == 400 and "add 'cloud-init' to modules" in ci.message
    address = await api.call("POST", "/guests/", guest_body(network_address="10.1.1.1"))
    assert address.code == 400 and "network_address" in address.message
    missing_image = await api.call("POST", "/guests/", guest_body(from_image="nope"))
    assert missing_image.code == 404 and "from_image" in missing_image.message
    empty = make_image("disk", uploaded=False)
    not_uploaded = await api.call("POST", "/guests/", guest_body(from_image=empty))
    assert not_uploaded.code == 409 and "has no file yet" in not_uploaded.message
    assert Guest.select().count() == 0


@pytest.mark.gen_test
async def test_create_with_template_modules_cloud_init_image_and_mac(api, server):
    await make_pool(api)
    templates = await api.ok("GET", "/templates/")
    windows = next(t["id"] for t in templates if t["name"] == "Windows Server 2012")
    image = make_image("disk")
    guest_id = await create_guest(
        api, "win", template=windows, modules=["qemu", "cloud-init", "qemu"],
        cloud_init={"admin_name": "nano", "data_path": "/data"}, from_image=image,
        ethernet_address="00:16:3E:AA:BB:CC", ports=[22, 80], auto_start=True,
        qos={"cpu_priority": "high", "write_iops": 100})
    spec = Guest.get_by_id(guest_id).spec
    assert spec["system"] == "windows" and spec["template"] == windows
    assert spec["template_spec"]["disk"] == "sata" and spec["template_spec"]["admin"] == (
        "Administrator")
    assert spec["modules"] == ["qemu", "cloud-init"]
    assert spec["ethernet_address"] == "00:16:3e:aa:bb:cc"
    assert spec["from_image"] == image and spec["auto_start"] is True
    assert spec["ports"] == [22, 80]
    assert spec["qos"] == {"cpu_priority": "high", "write_speed": 0, "write_iops": 100,
                           "read_speed": 0, "read_iops": 0, "receive_speed": 0,
                           "send_speed": 0}
    password = spec["admin"]["password"]  # generated, stored sealed (state/secrets.py)
    assert len(server.store.guest_desired(guest_id).admin_password) == 12
    assert password.startswith("sealed:v1:") and spec["admin"]["user"] == "nano"
    assert spec["cloud_init"] == {"root_enabled": True, "admin_name": "nano",
                                  "admin_secret": password, "data_path": "/data"}
    taken = await api.call("POST", "/guests/",
                           guest_body("other", ethernet_address="00:16:3e:aa:bb:cc"))
    assert taken.code == 409 and "already used" in taken.message
    mark_created(server, guest_id)
    data = await api.ok("GET", f"/guests/{guest_id}")
    assert data["cloud_init"] == {"root_enabled": True, "admin_name": "nano",
                                  "data_path": "/data"}  # no secret in listings
    assert data["system"] == "windows" and data["modules"] == ["qemu", "cloud-init"]


@pytest.mark.gen_test
async def test_names_are_unique_per_pool(api):
    await make_pool(api, "pool1", {"cell-a": {}})
    await make_pool(api, "pool2", {"cell-b": {}})
    await create_guest(api, "same")
    again = await api.call("POST", "/guests/", guest_body("same"))
    assert again.code == 409 and "already exists in compute pool 'pool1'" in again.message
    await create_guest(api, "same", pool="pool2")


@pytest.mark.gen_test
async def test_placement_picks_the_roomiest_cell_and_counts_every_guest(api, server):
    await make_pool(api, "pool1", {"cell-a": {"max_memory": 8 * GIB},
                                   "cell-b": {"max_memory": 12 * GIB}})
    first = await create_guest(api, "one", memory=4 * GIB)
    assert Guest.get_by_id(first).cell == "cell-b"  # 12 GiB free beats 8
    second = await create_guest(api, "two", memory=4 * GIB)
    assert Guest.get_by_id(second).cell == "cell-a"  # cell-b has 8 left, pending counted: tie
    third = await create_guest(api, "three", memory=4 * GIB)
    assert Guest.get_by_id(third).cell == "cell-b"  # 8 GiB (b) vs 4 GiB (a)
    # once created, a guest is promised what it was while creating: 4 GiB left on each
    for guest_id in (first, second, third):
        mark_created(server, guest_id)
    fourth = await create_guest(api, "four", memory=4 * GIB)
    assert Guest.get_by_id(fourth).cell == "cell-a"


@pytest.mark.gen_test
async def test_placement_refusals_name_what_is_short(api):
    await make_pool(api, "pool1", {"cell-a": {"max_cpu": 4}, "cell-b": {"max_cpu": 2}})
    # cores are shared 4 to 1 (setting overcommit.cpu): cell-a offers 16 vCPUs, cell-b 8
    cores = await api.call("POST", "/guests/", guest_body(cores=20))
    assert cores.code == 409
    assert cores.message.startswith(
        "no cell in compute pool 'pool1' has 20 cores free (best: cell-a with 16 cores free, "
        "0 of 16 cores promised: 4 host cores x overcommit.cpu 4): raise the cell's ratio "
        "(PUT /cells/cell-a")
    set_cell("cell-a", max_cpu=4, max_disk=50 * GIB)
    set_cell("cell-b", max_cpu=2, max_disk=40 * GIB)
    disk = await api.call("POST", "/guests/", guest_body(disks=[30 * GIB, 30 * GIB]))
    assert disk.code == 409
    assert disk.message.startswith(
        "no cell in compute pool 'pool1' has 60.0 GiB disk free (best: cell-a with 50.0 GiB "
        "disk free, 0.0 of 50.0 GiB disk promised: 50.0 GiB host disk x overcommit.disk 1)")
    set_cell("cell-a", max_cpu=4, max_memory=GIB)
    both = await api.call("POST", "/guests/", guest_body(cores=9, memory=2 * GIB))
    assert both.code == 409 and "at once" in both.message
    assert "cell-a: 1.0 GiB memory free of 2.0 GiB memory needed" in both.message
    assert "cell-b: 8 cores free of 9 cores needed" in both.message


@pytest.mark.gen_test
async def test_placement_pinning_offline_and_disabled_cells(api):
    await make_pool(api, "pool1", {"cell-a": {}, "cell-b": {"max_memory": GIB}})
    pinned = await create_guest(api, "pinned", cell="cell-b", memory=GIB)
    assert Guest.get_by_id(pinned).cell == "cell-b"
    full = await api.call("POST", "/guests/", guest_body("x", cell="cell-b", memory=GIB))
    assert full.code == 409 and "cell 'cell-b' has no room" in full.message
    elsewhere = await api.call("POST", "/guests/", guest_body("x", cell="cell-z"))
    assert elsewhere.code == 404 and "not a cell of compute pool 'pool1'" in elsewhere.message
    await api.ok("PUT", "/compute_pool_cells/pool1/cell-a", {"enable": False})
    disabled = await api.call("POST", "/guests/", guest_body("x", cell="cell-a"))
    assert disabled.code == 409 and "disabled" in disabled.message
    set_cell("cell-b", alive=False)
    nothing = await api.call("POST", "/guests/", guest_body("x"))
    assert nothing.code == 409 and "disabled" in nothing.message
    set_cell("cell-a", alive=False)
    offline = await api.call("POST", "/guests/", guest_body("x"))
    assert offline.code == 503 and "no cell of compute pool 'pool1' is alive" in offline.message
    pinned_off = await api.call("POST", "/guests/", guest_body("x", cell="cell-b"))
    assert pinned_off.code == 503 and "offline" in pinned_off.message
    await api.ok("POST", "/compute_pools/empty", {})
    empty = await api.call("POST", "/guests/", guest_body("x", pool="empty"))
    assert empty.code == 409 and "has no cells" in empty.message
    assert Cell.select().count() == 2


# three users made and logged in (argon2id each time): 3-6 s on a loaded machine, past the
# default 5 s
@pytest.mark.gen_test(timeout=30)
async def test_visibility_between_users_and_groups(api, server):
    await make_pool(api)
    alice = await user_session(api, "alice")
    bob = await user_session(api, "bob")
    carol = await user_session(api, "carol", group="alice_group")
    reply = await api.call("POST", "/guests/", guest_body("alices", owner="", group=""),
                           session=alice)
    assert reply.status == 202
    guest_id = reply.data["id"]
    row = Guest.get_by_id(guest_id)
    assert (row.owner, row.group) == ("alice", "alice_group")
    mark_created(server, guest_id)
    for other in (bob, carol, api.session):  # bob: other group; carol: flag off; admin too
        for method, path, body in (("GET", f"/guests/{guest_id}", None),
                                   ("PUT", f"/guests/{guest_id}/cores", {"cores": 1}),
                                   ("DELETE", f"/guests/{guest_id}", {}),
                                   ("POST", f"/instances/{guest_id}", {})):
            denied = await api.call(method, path, body, session=other)
            assert denied.code == 404 and "no guest" in denied.message, (method, path)
        found = await api.ok("POST", "/search/guests/", {"limit": 10}, session=other)
        assert found == {"result": [], "total": 0, "limit": 10, "offset": 0}
        assert await api.ok("GET", "/guest_search/?pool=pool1", session=other) == []
    assert await api.ok("GET", "/instance_status/pool1", session=alice) != []
    assert await api.ok("GET", "/instance_status/pool1") == []
    await api.ok("PUT", "/resource_visibilities/", {"instance_visible": True}, session=alice)
    assert (await api.ok("GET", f"/guests/{guest_id}", session=carol))["name"] == "alices"
    assert [g["name"] for g in await api.ok("GET", "/guest_search/?pool=pool1",
                                             session=carol)] == ["alices"]
    await api.ok("PUT", f"/guests/{guest_id}/cores", {"cores": 3}, session=carol)
    assert (await api.call("GET", f"/guests/{guest_id}", session=bob)).code == 404
    foreign = await api.call("POST", "/guests/", guest_body("x", owner="bob", group=""),
                             session=alice)
    assert foreign.code == 400 and "you may not create guests for 'bob'" in foreign.message
    for_bob = await api.call("POST", "/guests/", guest_body("for-bob", owner="bob", group=""))
    assert for_bob.status == 202
    assert Guest.get_by_id(for_bob.data["id"]).group == "bob_group"
    assert (await api.ok("GET", f"/guests/{for_bob.data['id']}", session=bob))["name"] == (
        "for-bob")


@pytest.mark.gen_test
async def test_searches(api, server):
    await make_pool(api, "pool1", {"cell-a": {"max_memory": 2 * GIB},
                                   "cell-b": {"max_memory": 5 * GIB // 2}})
    ids = {}
    for name in ("alpha", "beta", "gamma"):
        ids[name] = await create_guest(api, name, memory=GIB // 2)
    mark_created(server, ids["alpha"], running=True,
                 internal={"network_address": "192.168.122.15", "display_address": "x:5901"})
    mark_created(server, ids["beta"])
    page = await api.ok("POST", "/search/guests/", {"limit": 2, "offset": 1})
    assert page["total"] == 3 and page["limit"] == 2 and page["offset"] == 1
    assert [g["name"] for g in page["result"]] == ["beta", "gamma"]
    assert all(isinstance(g["disks"], list) for g in page["result"])
    by_ip = await api.ok("POST", "/search/guests/", {"limit": 10, "keyword": "122.15"})
    assert [g["name"] for g in by_ip["result"]] == ["alpha"]
    by_cell = await api.ok("POST", "/search/guests/", {"limit": 10, "keyword": "CELL-B"})
    assert [g["name"] for g in by_cell["result"]] == ["alpha", "gamma"]  # placed on cell-b
    by_cell_address = await api.ok("POST", "/search/guests/",
                                   {"limit": 10, "keyword": "10.0.0.6", "cell": "cell-a"})
    assert {g["cell"] for g in by_cell_address["result"]} == {"cell-a"}
    running = await api.ok("GET", "/guest_search/?pool=pool1&status=1")
    assert [g["name"] for g in running] == ["alpha"]
    created = await api.ok("GET", "/guest_search/?pool=pool1&created=false")
    assert [g["name"] for g in created] == ["gamma"]
    bad = await api.call("GET", "/guest_search/?pool=pool1&status=9")
    assert bad.code == 400
    assert [g["name"] for g in await api.ok("GET", "/instance_status/pool1/cell-a")] == [
        g["name"] for g in await api.ok("GET", "/guest_search/?pool=pool1&cell=cell-a")]


@pytest.mark.gen_test
async def test_delete_refuses_a_running_guest_without_force(api, server):
    await make_pool(api)
    guest_id = await create_guest(api)
    mark_created(server, guest_id, running=True)
    refused = await api.call("DELETE", f"/guests/{guest_id}", {"force": False})
    assert refused.code == 409 and "force" in refused.message
    assert Guest.get_by_id(guest_id).deleting is False
    generation = Guest.get_by_id(guest_id).generation
    await api.ok("DELETE", f"/guests/{guest_id}", {"force": True})
    row = Guest.get_by_id(guest_id)
    assert row.deleting is True and row.generation == generation + 1
    assert (row.spec["power"], row.spec["stop_mode"]) == ("stopped", "destroy")
    again = await api.call("DELETE", f"/guests/{guest_id}", {"force": True})
    assert again.code == 0  # idempotent
    changes = await api.call("PUT", f"/guests/{guest_id}/cores", {"cores": 1})
    assert changes.code == 409 and "being deleted" in changes.message
    assert (await api.ok("GET", f"/guests/{guest_id}"))["deleting"] is True

    stopped = await create_guest(api, "stopped-one")
    mark_created(server, stopped)
    set_running(server, stopped, False)
    await api.ok("DELETE", f"/guests/{stopped}")  # empty body, not running: fine
    assert Guest.get_by_id(stopped).deleting is True


@pytest.mark.gen_test
async def test_changes_write_audit_lines_without_secrets(api, server):
    await make_pool(api)
    guest_id = await create_guest(api, "audited", modules=["cloud-init"],
                                  cloud_init={"admin_secret": "S3cretPassw0rd"})
    await api.ok("PUT", f"/guests/{guest_id}/auth", {"password": "An0therSecret"})
    entries = await api.ok("GET", "/logs/?limit=50")
    contents = [e["content"] for e in entries["logs"]]
    assert any(f"created guest audited ({guest_id}) on cell cell-a" in c for c in contents)
    assert any("reset the password of nano" in c or "reset the password of root" in c
               for c in contents)
    assert not any("S3cret" in c or "An0ther" in c for c in contents)


@pytest.mark.gen_test
async def test_search_refuses_fractional_and_huge_paging(api):
    """Found by tests/api/test_fuzz.py: `limit: 282.0` passed JSON Schema's "integer" and
    failed in the database (error_code 500); a huge offset overflowed SQLite's integer."""
    for body, field in (({"limit": 282.0}, "limit"), ({"offset": 2.5}, "offset"),
                        ({"offset": 10 ** 15}, "offset"), ({"limit": True}, "limit")):
        reply = await api.call("POST", "/search/guests/", body)
        assert reply.code == 400, (body, reply.message)
        assert reply.message.startswith("invalid request: " + field), reply.message
    assert (await api.ok("POST", "/search/guests/", {"limit": 5, "offset": 0}))["total"] == 0
