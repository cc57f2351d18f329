"""Roles, user groups and group members (the seed's "FrontEnd Management" group).

Routes: GET /roles/, GET/POST/PUT/DELETE /roles/{name}; GET /user_groups/,
GET/POST/PUT/DELETE /user_groups/{name}; GET /user_groups/{name}/members/,
POST/DELETE /user_groups/{name}/members/{user}.
"""

from __future__ import annotations

import pytest

from state.identity import MENU_TAGS
from tests.api.identity_helpers import PASSWORD, login_as
from tests.conftest import ADMIN

# -- roles ----------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_role_lifecycle(api):
    assert await api.ok("GET", "/roles/") == ["super"]  # an array of names
    assert await api.ok("GET", "/roles/super") == {"menu": list(MENU_TAGS)}

    reply = await api.call("POST", "/roles/auditor", {"menu": ["log", "dashboard"]})
    assert (reply.code, reply.message, reply.data) == (0, "", "")  # data "": nothing to return
    await api.ok("POST", "/roles/maintainer/", {"menu": []})  # trailing slash, empty menu
    assert await api.ok("GET", "/roles/") == ["auditor", "maintainer", "super"]
    assert await api.ok("GET", "/roles/auditor") == {"menu": ["log", "dashboard"]}
    assert await api.ok("GET", "/roles/maintainer") == {"menu": []}

    await api.ok("PUT", "/roles/auditor", {"menu": ["log", "log", "visibility"]})
    assert await api.ok("GET", "/roles/auditor") == {"menu": ["log", "visibility"]}

    await api.ok("DELETE", "/roles/auditor")
    assert await api.ok("GET", "/roles/") == ["maintainer", "super"]
    gone = await api.call("GET", "/roles/auditor")
    assert gone.code == 404 and "no role named 'auditor'" in gone.message

    # a role bound to a group cannot be removed, and says why
    await api.ok("POST", "/roles/auditor", {"menu": ["log"]})
    await api.ok("POST", "/user_groups/audit", {"display": "Audit", "role": ["auditor"]})
    await api.ok("POST", "/user_groups/ops", {"display": "Ops", "role": ["auditor", "super"]})

    busy = await api.call("DELETE", "/roles/auditor")
    assert busy.code == 409
    assert "bound to group(s) audit, ops" in busy.message and "remove it from them" in busy.message
    assert (await api.call("DELETE", "/roles/super")).code == 409
    assert "auditor" in await api.ok("GET", "/roles/")

    await api.ok("PUT", "/user_groups/audit", {"role": []})
    await api.ok("PUT", "/user_groups/ops", {"role": ["super"]})
    await api.ok("DELETE", "/roles/auditor")
    assert await api.ok("GET", "/roles/") == ["maintainer", "super"]


@pytest.mark.gen_test(timeout=30)
async def test_role_bad_requests(api):
    await api.ok("POST", "/roles/auditor", {"menu": ["log"]})
    cases = [
        ("POST", "/roles/r1", {}, 400, "menu: is required"),
        ("POST", "/roles/r1", None, 400, "menu: is required"),
        ("POST", "/roles/r1", {"menu": "log"}, 400, "menu: must be of type array"),
        ("POST", "/roles/r1", {"menu": [1]}, 400, "menu.0: must be of type string"),
        ("POST", "/roles/r1", {"menu": ["log", "sudo"]}, 400, "unknown menu tag(s) sudo"),
        ("POST", "/roles/bad%20name", {"menu": []}, 400, "invalid role name 'bad name'"),
        ("POST", "/roles/" + "r" * 65, {"menu": []}, 400, "invalid role name"),
        ("POST", "/roles/auditor", {"menu": []}, 409, "role 'auditor' already exists"),
        ("PUT", "/roles/auditor", {"menu": {"log": True}}, 400, "must be of type array"),
        ("PUT", "/roles/auditor", {"menu": ["sudo"]}, 400, "unknown menu tag(s) sudo"),
        ("PUT", "/roles/nobody", {"menu": []}, 404, "no role named 'nobody'"),
        ("DELETE", "/roles/nobody", None, 404, "no role named 'nobody'"),
        ("GET", "/roles/nobody", None, 404, "no role named 'nobody'"),
    ]
    for method, path, body, code, words in cases:
        reply = await api.call(method, path, body)
        assert reply.code == code, (method, path, body, reply.code, reply.message)
        assert words in reply.message, (method, path, reply.message)
    # the failed calls changed nothing
    assert await api.ok("GET", "/roles/") == ["auditor", "super"]
    assert await api.ok("GET", "/roles/auditor") == {"menu": ["log"]}


# -- user groups -----------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_user_group_lifecycle(api):
    listing = await api.ok("GET", "/user_groups/")
    assert listing == [{"name": "admin", "display": "admin", "member": 1}]

    await api.ok("POST", "/roles/auditor", {"menu": ["log"]})
    reply = await api.call("POST", "/user_groups/audit", {"display": "Group of Auditors",
                                                          "role": ["auditor", "auditor"]})
    assert (reply.code, reply.message, reply.data) == (0, "", "")  # data "": nothing to return
    await api.ok("POST", "/user_groups/empty/", {"display": ""})  # roles are optional

    assert await api.ok("GET", "/user_groups/audit") == {
        "name": "audit", "display": "Group of Auditors", "role": ["auditor"], "member": [],
    }
    assert await api.ok("GET", "/user_groups/empty") == {
        "name": "empty", "display": "", "role": [], "member": [],
    }
    listing = await api.ok("GET", "/user_groups/")
    assert listing == [
        {"name": "admin", "display": "admin", "member": 1},
        {"name": "audit", "display": "Group of Auditors", "member": 0},
        {"name": "empty", "display": "", "member": 0},
    ]
    assert all(isinstance(g["member"], int) for g in listing)

    # the portal sends only what changed: each field is kept unless given
    await api.ok("PUT", "/user_groups/audit", {"display": "Auditors"})
    assert (await api.ok("GET", "/user_groups/audit"))["role"] == ["auditor"]
    await api.ok("PUT", "/user_groups/audit", {"role": ["auditor", "super"]})
    data = await api.ok("GET", "/user_groups/audit")
    assert data["display"] == "Auditors" and data["role"] == ["auditor", "super"]
    await api.ok("PUT", "/user_groups/audit", {})
    assert await api.ok("GET", "/user_groups/audit") == data

    await api.ok("DELETE", "/user_groups/empty")
    assert [g["name"] for g in await api.ok("GET", "/user_groups/")] == ["admin", "audit"]
    assert (await api.call("GET", "/user_groups/empty")).code == 404


@pytest.mark.gen_test(timeout=30)
async def test_user_group_bad_requests(api):
    await api.ok("POST", "/user_groups/ops", {"display": "Ops"})
    cases = [
        ("POST", "/user_groups/g1", {}, 400, "display: is required"),
        ("POST", "/user_groups/g1", {"display": 5}, 400, "display: must be of type string"),
        ("POST", "/user_groups/g1", {"display": "G", "role": "super"}, 400,
         "role: must be of type array"),
        ("POST", "/user_groups/g1", {"display": "G", "role": ["super", "ghost"]}, 404,
         "no role named ghost"),
        ("POST", "/user_groups/g%3F1", {"display": "G"}, 400, "invalid group name 'g?1'"),
        ("POST", "/user_groups/ops", {"display": "again"}, 409,
         "user group 'ops' already exists"),
        ("PUT", "/user_groups/ops", {"role": ["ghost"]}, 404, "no role named ghost"),
        ("PUT", "/user_groups/ops", {"display": ["x"]}, 400, "display: must be of type string"),
        ("PUT", "/user_groups/nope", {"display": "x"}, 404, "no user group named 'nope'"),
        ("GET", "/user_groups/nope", None, 404, "no user group named 'nope'"),
        ("DELETE", "/user_groups/nope", None, 404, "no user group named 'nope'"),
    ]
    for method, path, body, code, words in cases:
        reply = await api.call(method, path, body)
        assert reply.code == code, (method, path, body, reply.code, reply.message)
        assert words in reply.message, (method, path, reply.message)
    assert [g["name"] for g in await api.ok("GET", "/user_groups/")] == ["admin", "ops"]
    assert await api.ok("GET", "/user_groups/ops") == {
        "name": "ops", "display": "Ops", "role": [], "member": [],
    }


# -- members ---------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_group_members_and_removal_of_a_group_in_use(api):
    await api.ok("POST", "/roles/operator", {"menu": ["dashboard", "instance"]})
    await api.ok("POST", "/user_groups/ops", {"display": "Ops", "role": ["operator"]})
    await api.ok("POST", "/users/bob", {"password": PASSWORD})
    assert await api.ok("GET", "/user_groups/ops/members/") == []

    reply = await api.call("POST", "/user_groups/ops/members/bob", raw=b"")
    assert (reply.code, reply.message) == (0, "")
    assert await api.ok("GET", "/user_groups/ops/members") == ["bob"]
    assert (await api.ok("GET", "/user_groups/ops"))["member"] == ["bob"]
    counts = {g["name"]: g["member"] for g in await api.ok("GET", "/user_groups/")}
    assert counts == {"admin": 1, "ops": 1}
    # the member logs in with the group's menu
    login = await api.ok("POST", "/sessions/", {"user": "bob", "password": PASSWORD},
                         session="")
    assert login["group"] == "ops" and login["menu"] == ["dashboard", "instance"]

    # a group with members cannot be removed, and says why
    busy = await api.call("DELETE", "/user_groups/ops")
    assert busy.code == 409
    assert "still has member(s) bob" in busy.message and "remove them first" in busy.message
    assert "ops" in [g["name"] for g in await api.ok("GET", "/user_groups/")]

    await api.ok("DELETE", "/user_groups/ops/members/bob")
    assert await api.ok("GET", "/user_groups/ops/members/") == []
    assert (await api.ok("GET", "/user_groups/ops"))["member"] == []
    await api.ok("DELETE", "/user_groups/ops")
    assert [g["name"] for g in await api.ok("GET", "/user_groups/")] == ["admin"]


@pytest.mark.gen_test(timeout=30)
async def test_member_bad_requests_and_one_group_per_user(api):
    await api.ok("POST", "/user_groups/ops", {"display": "Ops"})
    await api.ok("POST", "/users/bob", {"password": PASSWORD})
    await api.ok("POST", "/user_groups/ops/members/bob")
    cases = [
        ("POST", "/user_groups/ops/members/bob", 409, "bob' is already a member of 'ops'"),
        ("POST", "/user_groups/admin/members/bob", 409,
         "already belongs to group 'ops': a user has one group"),
        ("POST", "/user_groups/ops/members/ghost", 404, "no user named 'ghost'"),
        ("POST", "/user_groups/nope/members/bob", 404, "no user group named 'nope'"),
        ("GET", "/user_groups/nope/members/", 404, "no user group named 'nope'"),
        ("DELETE", "/user_groups/admin/members/bob", 404, "'bob' is not a member of 'admin'"),
        ("DELETE", "/user_groups/ops/members/ghost", 404, "no user named 'ghost'"),
        ("DELETE", "/user_groups/nope/members/bob", 404, "no user group named 'nope'"),
    ]
    for method, path, code, words in cases:
        reply = await api.call(method, path)
        assert reply.code == code, (method, path, reply.code, reply.message)
        assert words in reply.message, (method, path, reply.message)
    assert await api.ok("GET", "/user_groups/ops/members/") == ["bob"]
    assert await api.ok("GET", "/user_groups/admin/members/") == [ADMIN]

    # moving a user: out of one group, into the other
    await api.ok("DELETE", "/user_groups/ops/members/bob")
    await api.ok("POST", "/user_groups/admin/members/bob")
    assert await api.ok("GET", "/user_groups/admin/members/") == [ADMIN, "bob"]
    bob = await login_as(api, "bob")
    assert (await api.ok("GET", f"/sessions/{bob}", session=bob))["group"] == "admin"
