"""`POST /guests/{id}/plan` (extension): the guest planner's dry run over the API. The
reconciler is off here: the guest is recorded as created (running or not) the way the
reconciler records it, and the reply must classify each proposed field as the planner
would act on it: the same knowledge `nanod apply --diff` shows."""

from __future__ import annotations

import pytest

from tests.api.guest_helpers import (
    GIB,
    create_guest,
    make_image,
    make_pool,
    mark_created,
    user_session,
)


async def plan(api, guest_id, body, **kw):
    return await api.ok("POST", f"/guests/{guest_id}/plan", body, **kw)


def effects(reply):
    return {field: item["effect"] for field, item in reply["fields"].items()}


@pytest.mark.gen_test
async def test_a_stopped_guest_takes_most_changes_without_a_restart(api, server):
    await make_pool(api)
    gid = await create_guest(api, disks=[10 * GIB, 5 * GIB])
    mark_created(server, gid, max_vcpus=4, max_memory=2 * GIB)
    reply = await plan(api, gid, {"cores": 4, "memory": 4 * GIB, "disks": [10 * GIB, 8 * GIB],
                                  "qos": {"cpu_priority": "high"}, "auto_start": True})
    assert effects(reply) == {"cores": "live", "memory": "live", "disks": "live",
                              "qos": "live", "auto_start": "live"}
    assert [a["do"] for a in reply["actions"]] == ["grow_volume", "define", "set_autostart"]
    assert reply["holds"] == []


@pytest.mark.gen_test
async def test_a_running_guest_needs_a_restart_for_cores_memory_and_disks(api, server):
    await make_pool(api)
    gid = await create_guest(api, disks=[10 * GIB, 5 * GIB])
    mark_created(server, gid, running=True, max_vcpus=4, max_memory=2 * GIB)
    reply = await plan(api, gid, {"cores": 3, "memory": 3 * GIB, "disks": [10 * GIB, 6 * GIB],
                                  "qos": {"read_speed": 1 << 20}, "power": "stopped"})
    assert effects(reply) == {"cores": "needs restart", "memory": "needs restart",
                              "disks": "needs restart", "qos": "live", "power": "live"}
    assert "takes effect at the next restart" in reply["fields"]["cores"]["reason"]
    assert "grows from" in reply["fields"]["disks"]["reason"]


@pytest.mark.gen_test
async def test_replacing_and_destructive_changes(api, server):
    await make_pool(api)
    gid = await create_guest(api, disks=[10 * GIB, 5 * GIB])
    mark_created(server, gid)
    image = make_image("disk")
    await api.ok("POST", f"/instances/{gid}/snapshots/", {"name": "s1", "description": ""})
    reply = await plan(api, gid, {"template": "other", "modules": ["cloud-init"],
                                  "disks": [10 * GIB], "from_image": image, "snapshots": []})
    assert effects(reply) == {"template": "replaces", "modules": "replaces",
                              "disks": "replaces", "from_image": "destructive",
                              "snapshots": "destructive"}
    assert "fixed at creation" in reply["fields"]["template"]["reason"]
    shrink = await plan(api, gid, {"disks": [10 * GIB, 1 * GIB]})
    assert effects(shrink) == {"disks": "destructive"}
    assert "disks only grow" in shrink["fields"]["disks"]["reason"]
    more = await plan(api, gid, {"snapshots": ["s1", "s2"], "power": "running"})
    assert effects(more) == {"snapshots": "live", "power": "live"}


@pytest.mark.gen_test
async def test_plans_are_refused_for_unknown_fields_and_invisible_guests(api, server):
    await make_pool(api)
    gid = await create_guest(api)
    mark_created(server, gid)
    bad = await api.call("POST", f"/guests/{gid}/plan", {"colour": "blue"})
    assert bad.code == 400 and "colour" in bad.message
    missing = await api.call("POST", f"/guests/{gid}/plan", {"from_image": "no-such-image"})
    assert missing.code == 400 and "no-such-image" in missing.message
    other = await user_session(api, "mallory")
    hidden = await api.call("POST", f"/guests/{gid}/plan", {"cores": 2}, session=other)
    assert hidden.code == 404
    # a dry run changes nothing
    data = await api.ok("GET", f"/guests/{gid}")
    assert data["cores"] == 2


@pytest.mark.gen_test
async def test_nanod_apply_classifies_guest_changes_with_the_server(api, server):
    """The manifest Guest adapter holds no copy of the planner's knowledge: it asks."""
    import asyncio

    from nanod.client import ClientConfig, NanoClient
    from nanod.kinds import ADAPTERS, Found
    from reconciler.contract import Effect
    from tests.conftest import ADMIN, ADMIN_PASSWORD

    await make_pool(api)
    gid = await create_guest(api, disks=[10 * GIB])
    mark_created(server, gid, running=True, max_vcpus=4, max_memory=2 * GIB)
    client = NanoClient(ClientConfig(f"http://127.0.0.1:{server.port}", ADMIN, ADMIN_PASSWORD,
                                     "test"))
    template = (await api.ok("GET", "/templates/"))[0]["name"]
    found = Found(gid, {"cores": 2, "template": "", "power": "running", "media": None})
    want = {"cores": 4, "template": template, "power": "stopped", "media": None}

    def classify():
        return ADAPTERS["Guest"].classify_changes(client, found, want,
                                                  ["cores", "template", "power"])

    got = await asyncio.get_running_loop().run_in_executor(None, classify)
    assert {f: e for f, (e, _) in got.items()} == {
        "cores": Effect.RESTART, "template": Effect.REPLACE, "power": Effect.LIVE}
