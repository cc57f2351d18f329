"""Security policy groups (with ordered rules), their search, and guests' security policies
through the v1 API, on SQLite and PostgreSQL: every route's happy path, visibility and
ownership, rule validation, ordering limits, what a change enqueues and writes to the log."""

from __future__ import annotations

import pytest

from reconciler.contract import Key
from state.models import Guest, GuestPolicy
from tests.conftest import ADMIN, Api

PASSWORD = "Us3rPassword"
SSH = {"action": "accept", "protocol": "tcp", "to_port": 22}
WEB = {"action": "accept", "protocol": "tcp", "to_port": 80, "from_address": "10.0.0.0/8",
       "interface": 1}
PING = {"action": "reject", "protocol": "icmp"}


async def user_with_menu(api: Api, name: str, menu: list[str], *, group: str | None = None,
                         ) -> str:
    """A session of a new user; in its own new group granting `menu`, or in `group`."""
    await api.ok("POST", f"/users/{name}", {"password": PASSWORD})
    if group is None:
        group = f"{name}_group"
        await api.ok("POST", f"/roles/{name}_role", {"menu": menu})
        await api.ok("POST", f"/user_groups/{group}", {"display": name,
                                                        "role": [f"{name}_role"]})
    await api.ok("POST", f"/user_groups/{group}/members/{name}")
    data = await api.ok("POST", "/sessions/", {"user": name, "password": PASSWORD,
                                               "nonce": "n"}, session="")
    return data["session"]


async def log_contents(api: Api) -> list[str]:
    return [e["content"] for e in (await api.ok("GET", "/logs/?limit=200"))["logs"]]


def canonical(rule: dict) -> dict:
    return {"action": "accept", "protocol": "all", "to_port": 0, "interface": 0, **rule}


# -- security policy groups ---------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_policy_group_lifecycle_and_rules(api):
    created = await api.ok("POST", "/security_policy_groups/", {
        "name": "linux_1", "description": "Some Group for Linux", "user": ADMIN,
        "group": "admin", "enabled": False, "global": False, "default_action": "accept"})
    gid = created["id"]
    assert await api.ok("GET", f"/security_policy_groups/{gid}") == {
        "id": gid, "name": "linux_1", "description": "Some Group for Linux", "user": ADMIN,
        "group": "admin", "enabled": False, "global": False, "default_action": "accept"}
    await api.ok("PUT", f"/security_policy_groups/{gid}/", {
        "name": "linux_2", "description": "changed", "enabled": True, "global": True,
        "default_action": "reject"})
    group = await api.ok("GET", f"/security_policy_groups/{gid}/")
    assert (group["name"], group["description"], group["enabled"], group["global"],
            group["default_action"]) == ("linux_2", "changed", True, True, "reject")

    path = f"/security_policy_groups/{gid}/rules"
    assert await api.ok("GET", path + "/") == []
    for rule in (SSH, WEB, PING):
        await api.ok("POST", path + "/", rule)
    assert await api.ok("GET", path) == [canonical(SSH), canonical(WEB), canonical(PING)]
    await api.ok("PUT", f"{path}/1", {"action": "reject", "protocol": "udp", "to_port": 53})
    await api.ok("PUT", f"{path}/2/order", {"direction": "up"})
    await api.ok("PUT", f"{path}/0/order/", {"direction": "down"})
    dns = canonical({"action": "reject", "protocol": "udp", "to_port": 53})
    assert await api.ok("GET", path) == [canonical(PING), canonical(SSH), dns]
    await api.ok("DELETE", f"{path}/1", {})
    assert await api.ok("GET", path) == [canonical(PING), dns]

    await api.ok("DELETE", f"/security_policy_groups/{gid}", {})
    reply = await api.call("GET", f"/security_policy_groups/{gid}")
    assert reply.code == 404
    logs = await log_contents(api)
    for words in (f"created security policy group linux_1 ({gid})",
                  f"modified security policy group {gid}",
                  f"added a rule to security policy group {gid}",
                  f"moved rule 2 of security policy group {gid} up",
                  f"removed rule 1 of security policy group {gid}",
                  f"deleted security policy group linux_2 ({gid})"):
        assert any(words in entry for entry in logs), words


@pytest.mark.gen_test(timeout=60)
async def test_rule_refusals_and_order_limits(api):
    gid = (await api.ok("POST", "/security_policy_groups", {"name": "g"}))["id"]
    path = f"/security_policy_groups/{gid}/rules"
    bad = [
        ({"action": "drop"}, "action"),
        ({"protocol": "sctp"}, "protocol"),
        ({"protocol": "tcp", "to_port": 70000}, "to_port"),
        ({"protocol": "tcp", "to_port": -1}, "to_port"),
        ({"protocol": "icmp", "to_port": 8}, "needs protocol tcp or udp"),
        ({"protocol": "all", "to_port": 22}, "needs protocol tcp or udp"),
        ({"from_address": "10.0.0.1/24"}, "host bits"),
        ({"from_address": "somewhere"}, "from_address"),
        ({"interface": 3}, "interface"),
        ({"port": 22}, "port"),
    ]
    for rule, words in bad:
        reply = await api.call("POST", path, rule)
        assert reply.code == 400 and words in reply.message, (rule, reply)
    assert await api.ok("GET", path) == []

    await api.ok("POST", path, SSH)
    await api.ok("POST", path, PING)
    reply = await api.call("PUT", f"{path}/0/order", {"direction": "up"})
    assert reply.code == 400 and "rule 0 is already the first" in reply.message
    reply = await api.call("PUT", f"{path}/1/order", {"direction": "down"})
    assert reply.code == 400 and "rule 1 is already the last" in reply.message
    reply = await api.call("PUT", f"{path}/0/order", {"direction": "left"})
    assert reply.code == 400 and "direction" in reply.message
    for method, suffix, body in (("PUT", "/5", SSH), ("DELETE", "/2", None),
                                 ("PUT", "/2/order", {"direction": "up"})):
        reply = await api.call(method, path + suffix, body)
        assert reply.code == 404 and "has 2 rule(s) (0-1)" in reply.message, (method, reply)
    reply = await api.call("DELETE", f"{path}/x")
    assert reply.code == 400 and "whole number" in reply.message
    reply = await api.call("PUT", f"{path}/0", {"protocol": "icmp", "to_port": 1})
    assert reply.code == 400
    assert await api.ok("GET", path) == [canonical(SSH), canonical(PING)]
    for body, words in (({}, "name"), ({"name": "x", "default_action": "drop"},
                                        "default_action"), ({"name": "x", "owner": "y"},
                                                            "owner")):
        reply = await api.call("POST", "/security_policy_groups/", body)
        assert reply.code == 400 and words in reply.message, (body, reply)


@pytest.mark.gen_test(timeout=60)
async def test_visibility_ownership_and_search(api):
    alice = await user_with_menu(api, "alice", ["policies"])
    bob = await user_with_menu(api, "bob", ["policies"])
    bert = await user_with_menu(api, "bert", [], group="bob_group")  # bob's group

    # the body's user/group are the caller's own unless the caller is an administrator
    private = (await api.ok("POST", "/security_policy_groups/", {
        "name": "alice-private", "user": "bob", "group": "bob_group"}, session=alice))["id"]
    shared = (await api.ok("POST", "/security_policy_groups/", {
        "name": "alice-global", "global": True, "enabled": True}, session=alice))["id"]
    bobs = (await api.ok("POST", "/security_policy_groups/", {
        "name": "bob-off", "enabled": False}, session=bob))["id"]
    admins = (await api.ok("POST", "/security_policy_groups/", {
        "name": "given", "user": "bob", "group": "bob_group"}))["id"]
    mine = await api.ok("GET", f"/security_policy_groups/{private}", session=alice)
    assert (mine["user"], mine["group"]) == ("alice", "alice_group")
    given = await api.ok("GET", f"/security_policy_groups/{admins}")
    assert (given["user"], given["group"]) == ("bob", "bob_group")

    async def names(session: str, query: str = "") -> list[str]:
        found = await api.ok("GET", f"/search/security_policy_groups/{query}", session=session)
        return [g["name"] for g in found]

    assert await names(alice) == ["alice-global", "alice-private"]
    assert await names(bob) == ["alice-global", "bob-off", "given"]
    assert await names(bert) == ["alice-global", "bob-off", "given"]  # same group as bob
    assert await names(api.session) == ["alice-global", "alice-private", "bob-off", "given"]
    assert await names(bob, "?enabled_only=true") == ["alice-global", "given"]
    assert await names(bob, "?global_only=true") == ["alice-global"]
    assert await names(bob, "?owner=bob") == ["bob-off", "given"]
    assert await names(api.session, "?group=alice_group&enabled_only=1") == [
        "alice-global", "alice-private"]
    reply = await api.call("GET", "/search/security_policy_groups?enabled_only=maybe")
    assert reply.code == 400
    assert [g["name"] for g in await api.ok("GET", "/security_policy_groups/",
                                            session=bob)] == await names(bob)

    # invisible: 404; visible through global but not theirs: 403 on change
    assert (await api.call("GET", f"/security_policy_groups/{private}", session=bob)).code == 404
    reply = await api.call("POST", f"/security_policy_groups/{private}/rules", SSH, session=bob)
    assert reply.code == 404
    assert (await api.call("GET", f"/security_policy_groups/{shared}/rules",
                           session=bob)).code == 0
    for method, suffix, body in (("PUT", "", {"name": "mine now"}), ("DELETE", "", None),
                                 ("POST", "/rules", SSH)):
        reply = await api.call(method, f"/security_policy_groups/{shared}{suffix}", body,
                               session=bob)
        assert reply.code == 403 and "belongs to alice" in reply.message, (method, reply)
    # members of the owner's group may change it too; changing needs the 'policies' tag
    await api.ok("PUT", f"/security_policy_groups/{bobs}", {"enabled": True}, session=bert)
    reader = await user_with_menu(api, "reader", ["dashboard"])
    reply = await api.call("POST", "/security_policy_groups/", {"name": "r"}, session=reader)
    assert reply.code == 403 and "'policies'" in reply.message
    assert await names(reader) == ["alice-global"]
    # a non-administrator cannot hand a group to someone else; an administrator can
    await api.ok("PUT", f"/security_policy_groups/{private}", {"user": "bob"}, session=alice)
    assert (await api.ok("GET", f"/security_policy_groups/{private}",
                         session=alice))["user"] == "alice"
    await api.ok("PUT", f"/security_policy_groups/{private}", {"user": "bob"})
    moved = await api.ok("GET", f"/security_policy_groups/{private}", session=bob)
    assert (moved["user"], moved["group"]) == ("bob", "bob_group")
    reply = await api.call("PUT", f"/security_policy_groups/{private}", {"user": "nobody"})
    assert reply.code == 400 and "no user named 'nobody'" in reply.message


# -- a guest's security policy -------------------------------------------------------------------


def make_guest(guest_id: str, *, owner: str = ADMIN, group: str = "admin",
               cell: str = "cell-1") -> None:
    Guest.create(id=guest_id, name=guest_id, pool="pool-1", cell=cell, owner=owner,
                 group=group)


@pytest.mark.gen_test(timeout=60)
async def test_guest_policy_routes(api, server):
    keys: list[Key] = []
    server.ctx.enqueue = keys.append
    make_guest("g-1")
    path = "/guests/g-1/security_policy"
    assert await api.ok("GET", path + "/") == {"default_action": "accept", "rules": []}

    await api.ok("PUT", path + "/default_action", {"action": "reject"})
    await api.ok("POST", path + "/rules/", SSH)
    await api.ok("POST", path + "/rules", WEB)
    await api.ok("POST", path + "/rules", PING)
    assert keys[-2:] == [Key("firewall", "cell-1"), Key("guest", "g-1")]
    await api.ok("PUT", path + "/rules/1", {"action": "reject", "protocol": "udp",
                                            "to_port": 53})
    await api.ok("PUT", path + "/rules/2/order", {"direction": "up"})
    dns = canonical({"action": "reject", "protocol": "udp", "to_port": 53})
    assert await api.ok("GET", path) == {
        "default_action": "reject", "rules": [canonical(SSH), canonical(PING), dns]}
    await api.ok("DELETE", path + "/rules/0", {})
    assert (await api.ok("GET", path))["rules"] == [canonical(PING), dns]
    # one generation per change: default action, 3 appends, modify, move, remove
    assert GuestPolicy.get(GuestPolicy.guest == "g-1").generation == 7

    reply = await api.call("PUT", path + "/rules/0/order", {"direction": "up"})
    assert reply.code == 400 and "already the first" in reply.message
    reply = await api.call("PUT", path + "/rules/1/order", {"direction": "down"})
    assert reply.code == 400 and "already the last" in reply.message
    reply = await api.call("PUT", path + "/rules/9", SSH)
    assert reply.code == 404 and "has 2 rule(s)" in reply.message
    reply = await api.call("POST", path + "/rules", {"protocol": "icmp", "to_port": 1})
    assert reply.code == 400
    reply = await api.call("PUT", path + "/default_action", {"action": "drop"})
    assert reply.code == 400
    assert GuestPolicy.get(GuestPolicy.guest == "g-1").generation == 7  # refusals change nothing

    reply = await api.call("GET", "/guests/nope/security_policy")
    assert reply.code == 404 and "no guest with id 'nope'" in reply.message
    logs = await log_contents(api)
    for words in ("set the default action to reject in the security policy of guest g-1",
                  "appended a rule in the security policy of guest g-1",
                  "moved rule 2 up in the security policy of guest g-1",
                  "removed rule 0 in the security policy of guest g-1"):
        assert any(words in entry for entry in logs), words


@pytest.mark.gen_test(timeout=60)
async def test_guest_policy_visibility(api):
    make_guest("g-admin")
    outsider = await user_with_menu(api, "outsider", ["instance"])
    teammate = await user_with_menu(api, "teammate", [], group="admin")  # admin's group
    make_guest("g-out", owner="outsider", group="outsider_group")
    path = "/guests/g-admin/security_policy"

    for session in (outsider, teammate):  # instance_visible is off: only owners see
        assert (await api.call("GET", path, session=session)).code == 404
    reply = await api.call("POST", path + "/rules", SSH, session=outsider)
    assert reply.code == 404 and "no guest with id 'g-admin'" in reply.message
    await api.ok("GET", "/guests/g-out/security_policy", session=outsider)
    await api.ok("POST", "/guests/g-out/security_policy/rules", SSH, session=outsider)

    await api.ok("PUT", "/resource_visibilities/", {"instance_visible": True})
    teammate = (await api.ok("POST", "/sessions/", {"user": "teammate", "password": PASSWORD,
                                                    "nonce": "n"}, session=""))["session"]
    await api.ok("GET", path, session=teammate)
    assert (await api.call("GET", path, session=outsider)).code == 404
    await api.ok("PUT", path + "/default_action", {"action": "reject"}, session=teammate)
    # an owner without the 'instance' tag reads its guest's policy but cannot change it
    viewer = await user_with_menu(api, "viewer", ["dashboard"])
    make_guest("g-view", owner="viewer", group="viewer_group")
    await api.ok("GET", "/guests/g-view/security_policy", session=viewer)
    reply = await api.call("POST", "/guests/g-view/security_policy/rules", SSH, session=viewer)
    assert reply.code == 403 and "'instance'" in reply.message


@pytest.mark.gen_test(timeout=60)
async def test_copy_policy_group_to_guest(api, server):
    make_guest("g-1")
    gid = (await api.ok("POST", "/security_policy_groups/", {
        "name": "web", "default_action": "reject", "enabled": True}))["id"]
    for rule in (SSH, WEB):
        await api.ok("POST", f"/security_policy_groups/{gid}/rules", rule)
    server.store.copy_policy_to_guest(gid, "g-1")
    copied = {"default_action": "reject", "rules": [canonical(SSH), canonical(WEB)]}
    assert await api.ok("GET", "/guests/g-1/security_policy") == copied
    # a copy: later changes of the group do not reach the guest
    await api.ok("DELETE", f"/security_policy_groups/{gid}/rules/0")
    assert await api.ok("GET", "/guests/g-1/security_policy") == copied
    await api.ok("PUT", f"/security_policy_groups/{gid}", {"enabled": False})
    with pytest.raises(Exception, match="disabled"):
        server.store.copy_policy_to_guest(gid, "g-1")
