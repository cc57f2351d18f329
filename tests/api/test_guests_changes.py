"""Every guest and instance change route stores the right desired state (state/guests.py),
bumps the generation, enqueues the guest and refuses by observed state where the contract
says so. The reconciler is disabled: observed state is recorded with
`record_guest_observed`, as the guest reconciler does."""

from __future__ import annotations

from typing import Any

import pytest

from reconciler.contract import Key
from state.models import Guest
from tests.api.guest_helpers import GIB, create_guest, make_image, make_pool, mark_created


@pytest.fixture
def enqueued(server: Any) -> list[Key]:
    keys: list[Key] = []
    server.ctx.enqueue = keys.append
    return keys


async def created_guest(api: Any, server: Any, *, running: bool = False, **extra: Any) -> str:
    await make_pool(api)
    guest_id = await create_guest(api, "g1", **extra)
    mark_created(server, guest_id, running=running)
    return guest_id


def spec_of(guest_id: str) -> dict[str, Any]:
    return Guest.get_by_id(guest_id).spec


@pytest.mark.gen_test
async def test_settings_changes(api, server, enqueued):
    guest_id = await created_guest(api, server, disks=[10 * GIB, 20 * GIB])
    generation = Guest.get_by_id(guest_id).generation
    enqueued.clear()

    await api.ok("PUT", f"/guests/{guest_id}/auto_start", {"enable": True})
    await api.ok("PUT", f"/guests/{guest_id}/cores", {"cores": 4, "immediate": True})
    await api.ok("PUT", f"/guests/{guest_id}/memory", {"memory": 4 * GIB})
    await api.ok("PUT", f"/guests/{guest_id}/disks/resize/1", {"size": 30 * GIB,
                                                                "immediate": True})
    await api.ok("PUT", f"/guests/{guest_id}/disks/resize/0", {"size": 10 * GIB})  # same: ok
    spec = spec_of(guest_id)
    assert spec["auto_start"] is True and spec["cores"] == 4 and spec["memory"] == 4 * GIB
    assert spec["disks"] == [10 * GIB, 30 * GIB]
    assert spec["immediate"] == {"cores": True, "memory": False,
                                 "disks": {"1": True, "0": False}}
    assert Guest.get_by_id(guest_id).generation == generation + 5
    assert enqueued == [Key("guest", guest_id)] * 5
    data = await api.ok("GET", f"/guests/{guest_id}")
    assert data["disks"] == [10 * GIB, 30 * GIB] and data["total_disk"] == 40 * GIB
    assert data["cores"] == 4 and data["auto_start"] is True

    smaller = await api.call("PUT", f"/guests/{guest_id}/disks/resize/1", {"size": 5 * GIB})
    assert smaller.code == 400 and f"/guests/{guest_id}/disks/shrink/1" in smaller.message
    missing = await api.call("PUT", f"/guests/{guest_id}/disks/resize/2", {"size": 50 * GIB})
    assert missing.code == 404 and "2 disk(s)" in missing.message
    word = await api.call("PUT", f"/guests/{guest_id}/disks/resize/x", {"size": 50 * GIB})
    assert word.code == 400
    zero = await api.call("PUT", f"/guests/{guest_id}/cores", {"cores": 0})
    assert zero.code == 400 and "cores:" in zero.message
    assert Guest.get_by_id(guest_id).generation == generation + 5  # refusals change nothing


@pytest.mark.gen_test
async def test_name_qos_and_monitor_secret(api, server):
    guest_id = await created_guest(api, server)
    other = await create_guest(api, "other")
    taken = await api.call("PUT", f"/guests/{guest_id}/name/", {"name": "other"})
    assert taken.code == 409
    bad = await api.call("PUT", f"/guests/{guest_id}/name/", {"name": "no spaces"})
    assert bad.code == 400
    await api.ok("PUT", f"/guests/{guest_id}/name/", {"name": "renamed"})
    await api.ok("PUT", f"/guests/{guest_id}/name/", {"name": "renamed"})  # same name: fine
    assert Guest.get_by_id(guest_id).name == "renamed"
    assert (await api.ok("GET", f"/guests/{guest_id}"))["name"] == "renamed"
    assert Guest.get_by_id(other).name == "other"

    await api.ok("PUT", f"/guests/{guest_id}/qos/cpu/", {"priority": "high"})
    # the portal sends only the IOPS: the speeds keep their values; read stays read
    await api.ok("PUT", f"/guests/{guest_id}/qos/disk/", {"write_speed": 1000,
                                                           "read_speed": 2000})
    await api.ok("PUT", f"/guests/{guest_id}/qos/disk/", {"write_iops": 10, "read_iops": 20})
    await api.ok("PUT", f"/guests/{guest_id}/qos/network/", {"receive_speed": 3000,
                                                              "send_speed": 4000})
    assert spec_of(guest_id)["qos"] == {"cpu_priority": "high", "write_speed": 1000,
                                        "read_speed": 2000, "write_iops": 10, "read_iops": 20,
                                        "receive_speed": 3000, "send_speed": 4000}
    wrong = await api.call("PUT", f"/guests/{guest_id}/qos/cpu/", {"priority": "urgent"})
    assert wrong.code == 400
    empty = await api.call("PUT", f"/guests/{guest_id}/qos/network/", {})
    assert empty.code == 400

    secret = spec_of(guest_id)["monitor_secret"]
    await api.ok("PUT", f"/guests/{guest_id}/monitor/secret")
    assert spec_of(guest_id)["monitor_secret"] != secret
    assert len(spec_of(guest_id)["monitor_secret"]) == 8


@pytest.mark.gen_test
async def test_admin_password(api, server):
    guest_id = await created_guest(api, server, modules=["qemu", "cloud-init"],
                                   cloud_init={"admin_name": "nano", "admin_secret": "Init1al"})
    assert await api.ok("GET", f"/guests/{guest_id}/auth") == {"user": "nano",
                                                               "password": "Init1al"}
    generated = await api.ok("PUT", f"/guests/{guest_id}/auth", {})
    assert generated["user"] == "nano" and len(generated["password"]) == 12
    assert await api.ok("GET", f"/guests/{guest_id}/auth") == generated
    given = await api.ok("PUT", f"/guests/{guest_id}/auth", {"user": "root",
                                                            "password": "Chosen123"})
    assert given == {"user": "root", "password": "Chosen123"}
    spec = spec_of(guest_id)
    assert (spec["admin"]["user"], spec["admin"]["generation"]) == ("root", 2)
    # stored sealed (state/secrets.py; tests/api/test_secrets_at_rest.py), given back opened
    assert spec["admin"]["password"].startswith("sealed:v1:") and "Chosen123" not in str(spec)
    assert spec["cloud_init"]["admin_secret"] == spec["admin"]["password"]
    assert server.store.guest_desired(guest_id).admin_password == "Chosen123"
    plain = await create_guest(api, "plain", template="")
    assert await api.ok("GET", f"/guests/{plain}/auth") == {"user": "root", "password": ""}


@pytest.mark.gen_test
async def test_start_and_stop_by_observed_state(api, server):
    guest_id = await created_guest(api, server)
    for reboot, force in ((False, False), (False, True), (True, False), (True, True)):
        refused = await api.call("DELETE", f"/instances/{guest_id}",
                                 {"reboot": reboot, "force": force})
        assert refused.code == 409 and "is not running" in refused.message

    await api.ok("POST", f"/instances/{guest_id}", {})
    spec = spec_of(guest_id)
    assert (spec["power"], spec["power_request"], spec["boot_once"]) == ("running", 1, None)
    await api.ok("POST", f"/instances/{guest_id}")  # not observed running yet: asked again
    assert spec_of(guest_id)["power_request"] == 2

    server.store.record_guest_observed(guest_id, phase="running", observed={"running": True})
    again = await api.call("POST", f"/instances/{guest_id}", {})
    assert again.code == 409 and "already running" in again.message

    await api.ok("DELETE", f"/instances/{guest_id}", {"reboot": True, "force": False})
    assert spec_of(guest_id)["restart"] == {"counter": 1, "mode": "reboot"}
    await api.ok("DELETE", f"/instances/{guest_id}", {"reboot": True, "force": True})
    assert spec_of(guest_id)["restart"] == {"counter": 2, "mode": "reset"}
    assert spec_of(guest_id)["power"] == "running"
    await api.ok("DELETE", f"/instances/{guest_id}")  # empty body: shutdown
    spec = spec_of(guest_id)
    assert (spec["power"], spec["stop_mode"], spec["power_request"]) == ("stopped",
                                                                         "shutdown", 3)
    await api.ok("DELETE", f"/instances/{guest_id}", {"reboot": False, "force": True})
    spec = spec_of(guest_id)
    assert (spec["power"], spec["stop_mode"], spec["power_request"]) == ("stopped",
                                                                         "destroy", 4)


@pytest.mark.gen_test
async def test_start_from_media_or_network(api, server):
    guest_id = await created_guest(api, server)
    iso = make_image("media")
    missing = await api.call("POST", f"/instances/{guest_id}", {"from_media": True})
    assert missing.code == 400 and "source" in missing.message
    unknown = await api.call("POST", f"/instances/{guest_id}", {"from_media": True,
                                                                "source": "nope"})
    assert unknown.code == 404
    both = await api.call("POST", f"/instances/{guest_id}", {"from_media": True,
                                                             "from_network": True,
                                                             "source": iso})
    assert both.code == 400
    await api.ok("POST", f"/instances/{guest_id}", {"from_media": True, "source": iso})
    boot = spec_of(guest_id)["boot_once"]
    assert boot["source"] == iso and boot["request"]
    await api.ok("POST", f"/instances/{guest_id}", {"from_network": True})
    boot_net = spec_of(guest_id)["boot_once"]
    assert boot_net["network"] is True and boot_net["request"] != boot["request"]
    uncreated = await create_guest(api, "new")
    refused = await api.call("POST", f"/instances/{uncreated}", {})
    assert refused.code == 409 and "not created yet" in refused.message


@pytest.mark.gen_test
async def test_media_needs_a_running_instance(api, server):
    guest_id = await created_guest(api, server)
    iso = make_image("media")
    stopped = await api.call("POST", f"/instances/{guest_id}/media", {"source": iso, "type": 0})
    assert stopped.code == 409 and "not running" in stopped.message
    server.store.record_guest_observed(guest_id, observed={"running": True})
    disk = make_image("disk")
    wrong_kind = await api.call("POST", f"/instances/{guest_id}/media", {"source": disk})
    assert wrong_kind.code == 404
    await api.ok("POST", f"/instances/{guest_id}/media", {"source": iso, "type": 0})
    assert spec_of(guest_id)["media"] == iso
    await api.ok("DELETE", f"/instances/{guest_id}/media")
    assert spec_of(guest_id)["media"] == ""
    nothing = await api.call("DELETE", f"/instances/{guest_id}/media")
    assert nothing.code == 409 and "no media" in nothing.message
    server.store.record_guest_observed(guest_id, observed={"media_attached": True,
                                                           "media_source": iso})
    status = await api.ok("GET", f"/instances/{guest_id}")
    assert status["media_attached"] is True and status["media_source"] == iso
    await api.ok("DELETE", f"/instances/{guest_id}/media")  # attached as observed: eject


@pytest.mark.gen_test
async def test_shrink_and_system_reset_need_a_stopped_guest(api, server):
    guest_id = await created_guest(api, server, running=True, disks=[10 * GIB, 20 * GIB])
    image = make_image("disk")
    running = await api.call("PUT", f"/guests/{guest_id}/disks/shrink/1")
    assert running.code == 409 and "stop it" in running.message
    reset = await api.call("PUT", f"/guests/{guest_id}/system/", {"from_image": image})
    assert reset.code == 409 and "stop it" in reset.message
    server.store.record_guest_observed(guest_id, phase="stopped", observed={"running": False})
    await api.ok("PUT", f"/guests/{guest_id}/disks/shrink/1")  # the portal's body
    await api.ok("PUT", f"/guests/{guest_id}/disks/shrink/1", {"immediate": False})
    assert spec_of(guest_id)["disk_shrink"] == {"1": 2}
    instance_id = spec_of(guest_id)["instance_id"]
    await api.ok("PUT", f"/guests/{guest_id}/system/", {"from_image": image})
    spec = spec_of(guest_id)
    assert spec["system_reset"] == {"from_image": image, "generation": 1}
    assert spec["from_image"] == image and spec["instance_id"] != instance_id
    unknown = await api.call("PUT", f"/guests/{guest_id}/system/", {"from_image": "nope"})
    assert unknown.code == 404 and "from_image" in unknown.message
