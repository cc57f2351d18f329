"""No road from the `user` menu tag to more: a session grants (in a role it creates or
edits, a group it creates or changes, a user it puts into a group) only the menu tags it
holds itself, and takes away (from a role, a group, a member, a user it deletes) only tags
it holds. Each road is tried by a user-manager holding `user` and `dashboard`; each is
refused with 403 naming the tags, and the identity state an administrator reads is what it
was. `POST /system/` is closed once the first administrator exists.
"""

from __future__ import annotations

from typing import Any

import pytest

from state.identity import MENU_TAGS
from tests.api.identity_helpers import PASSWORD, login_as, make_user
from tests.conftest import ADMIN, ADMIN_PASSWORD, Api

MANAGER_MENU = ["dashboard", "user"]
LACKING = [tag for tag in MENU_TAGS if tag not in MANAGER_MENU]  # what super has beyond


async def identity_state(api: Api) -> dict[str, Any]:
    """Roles with their menus, groups with roles and members, users with their groups, as
    the administrator reads them through the API."""
    roles = {name: (await api.ok("GET", f"/roles/{name}"))["menu"]
             for name in await api.ok("GET", "/roles/")}
    groups = {g["name"]: await api.ok("GET", f"/user_groups/{g['name']}")
              for g in await api.ok("GET", "/user_groups/")}
    return {"roles": roles, "groups": groups, "users": await api.ok("GET", "/users/")}


async def refused(api: Api, session: str, method: str, path: str, body: Any,
                  tags: list[str]) -> str:
    """`method path` as `session` is refused with 403 naming exactly `tags`."""
    reply = await api.call(method, path, body, session=session)
    assert reply.code == 403, (method, path, reply.code, reply.message)
    named = f"menu tag(s) {', '.join(tags)} that your roles do not hold"
    assert named in reply.message, (method, path, reply.message)
    return reply.message


@pytest.mark.gen_test(timeout=60)
async def test_a_user_manager_cannot_grant_itself_or_others_more_than_it_holds(api):
    await make_user(api, "manager", menu=MANAGER_MENU)
    await make_user(api, "plain")  # a user without a group
    await api.ok("POST", "/roles/auditor", {"menu": ["log"]})
    await api.ok("POST", "/user_groups/audit", {"display": "Audit", "role": ["auditor"]})
    manager = await login_as(api, "manager")
    before = await identity_state(api)

    roads = [
        # a new role with tags the manager lacks (and one it holds)
        ("POST", "/roles/climb", {"menu": ["user", "compute_pool", "instance"]},
         ["compute_pool", "instance"]),
        ("POST", "/roles/climb", {"menu": list(MENU_TAGS)}, LACKING),
        # its own role, and a role of another group, given more
        ("PUT", "/roles/manager_role", {"menu": [*MANAGER_MENU, "log"]}, ["log"]),
        ("PUT", "/roles/auditor", {"menu": ["log", "policies"]}, ["policies"]),
        # a group created with a stronger role, or its own group given one
        ("POST", "/user_groups/climbers", {"display": "C", "role": ["super"]}, LACKING),
        ("POST", "/user_groups/climbers", {"display": "C", "role": ["auditor"]}, ["log"]),
        ("PUT", "/user_groups/manager_group", {"role": ["manager_role", "super"]}, LACKING),
        ("PUT", "/user_groups/manager_group", {"role": ["manager_role", "auditor"]}, ["log"]),
        # itself or another user put into a group whose roles hold more
        ("POST", "/user_groups/admin/members/manager", None, LACKING),
        ("POST", "/user_groups/admin/members/plain", None, LACKING),
        ("POST", "/user_groups/audit/members/plain", None, ["log"]),
    ]
    for method, path, body, tags in roads:
        await refused(api, manager, method, path, body, tags)
    # the first-run route is closed, with a session or without
    for session in (manager, ""):
        late = await api.call("POST", "/system/", {"user": "late", "password": PASSWORD,
                                                   "menu": list(MENU_TAGS)}, session=session)
        assert late.code == 403 and "already initialized" in late.message, late.message

    assert await identity_state(api) == before
    # the manager's live session and a fresh login hold what they held
    assert (await api.ok("GET", f"/sessions/{manager}", session=manager))["menu"] == MANAGER_MENU
    again = await api.ok("POST", "/sessions/", {"user": "manager", "password": PASSWORD},
                         session="")
    assert again["menu"] == MANAGER_MENU
    assert (await api.call("GET", "/logs/", session=again["session"])).code == 403


@pytest.mark.gen_test(timeout=60)
async def test_a_user_manager_cannot_take_away_more_than_it_holds(api):
    await make_user(api, "manager", menu=MANAGER_MENU)
    await make_user(api, "auditor", menu=["log", "dashboard"])
    manager = await login_as(api, "manager")
    before = await identity_state(api)

    roads = [
        ("PUT", "/roles/super", {"menu": MANAGER_MENU}, LACKING),
        ("PUT", "/roles/auditor_role", {"menu": ["dashboard"]}, ["log"]),
        ("PUT", "/user_groups/admin", {"role": []}, LACKING),
        ("DELETE", "/user_groups/admin/members/admin", None, LACKING),
        ("DELETE", "/user_groups/auditor_group/members/auditor", None, ["log"]),
        ("DELETE", "/users/admin", None, LACKING),
        ("DELETE", "/users/auditor", None, ["log"]),
    ]
    for method, path, body, tags in roads:
        await refused(api, manager, method, path, body, tags)
    assert await identity_state(api) == before
    # the administrator it tried to remove still logs in with every tag
    admin = await api.ok("POST", "/sessions/", {"user": ADMIN, "password": ADMIN_PASSWORD},
                         session="")
    assert admin["menu"] == list(MENU_TAGS)


@pytest.mark.gen_test(timeout=60)
async def test_a_user_manager_grants_and_takes_away_what_it_holds(api):
    """The rule refuses only what the caller lacks: within its own tags a user-manager
    does its job, including tags other roles of a group already give."""
    await make_user(api, "manager", menu=MANAGER_MENU)
    await make_user(api, "helper")
    manager = await login_as(api, "manager")

    await api.ok("POST", "/roles/helpdesk", {"menu": ["user"]}, session=manager)
    await api.ok("POST", "/user_groups/helpers", {"display": "Helpers", "role": ["helpdesk"]},
                 session=manager)
    await api.ok("POST", "/user_groups/helpers/members/helper", session=manager)
    helper = await login_as(api, "helper")
    assert (await api.ok("GET", f"/sessions/{helper}", session=helper))["menu"] == ["user"]
    await api.ok("PUT", "/roles/helpdesk", {"menu": ["user", "dashboard"]}, session=manager)
    assert (await api.ok("GET", "/roles/helpdesk")) == {"menu": ["user", "dashboard"]}

    # a group that already has 'log' from another role may be reorganized without it
    # being granted anew (the group gains nothing the manager lacks)
    await api.ok("POST", "/roles/auditor", {"menu": ["log"]})
    await api.ok("POST", "/roles/auditor2", {"menu": ["log"]})
    await api.ok("POST", "/user_groups/audit", {"display": "Audit", "role": ["auditor"]})
    await api.ok("PUT", "/user_groups/audit", {"role": ["auditor2", "helpdesk"]}, session=manager)
    assert (await api.ok("GET", "/user_groups/audit"))["role"] == ["auditor2", "helpdesk"]
    await api.ok("PUT", "/user_groups/audit", {"display": "Auditors"}, session=manager)

    await api.ok("DELETE", "/user_groups/helpers/members/helper", session=manager)
    await api.ok("DELETE", "/users/helper", session=manager)
    assert "helper" not in await api.ok("GET", "/users/")
