"""System init, login, sessions and the access rules every identity route shares.

Routes: GET/POST /system/, POST /sessions/, GET /sessions/, GET and PUT /sessions/{id}.
Semantics: COMPATIBILITY.md "Identity and access" and "What the original web portal needs".
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from state.identity import MENU_TAGS
from tests.api.identity_helpers import PASSWORD, log_contents, login_as, make_user
from tests.conftest import ADMIN, ADMIN_PASSWORD

# -- GET/POST /system/ ------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_system_status_needs_no_session_and_reports_default_limits(bare_api):
    data = await bare_api.ok("GET", "/system/", session="")
    assert data == {"ready": False, "max_cores": 24, "max_memory": 32, "max_disk": 64}


@pytest.mark.gen_test(timeout=30)
async def test_system_init_creates_role_group_and_first_user(bare_api):
    await bare_api.ok("POST", "/system/", {
        "user": "root", "password": ADMIN_PASSWORD, "menu": ["dashboard", "user", "log"],
        "group": "ops", "display": "Operators", "role": "boss",
    })
    assert (await bare_api.ok("GET", "/system/"))["ready"] is True

    login = await bare_api.ok("POST", "/sessions/", {"user": "root",
                                                     "password": ADMIN_PASSWORD, "nonce": "x"})
    assert login["group"] == "ops"
    assert login["menu"] == ["dashboard", "user", "log"]
    bare_api.session = login["session"]
    assert await bare_api.ok("GET", "/roles/") == ["boss"]
    assert await bare_api.ok("GET", "/roles/boss") == {"menu": ["dashboard", "user", "log"]}
    assert await bare_api.ok("GET", "/user_groups/") == [
        {"name": "ops", "display": "Operators", "member": 1}
    ]
    assert await bare_api.ok("GET", "/users/") == ["root"]

    again = await bare_api.call("POST", "/system/", {"user": "intruder", "password": PASSWORD},
                                session="")
    assert again.code == 403 and "already initialized" in again.message
    assert await bare_api.ok("GET", "/users/") == ["root"]


@pytest.mark.gen_test(timeout=30)
async def test_system_init_defaults_grant_every_menu_tag(bare_api):
    await bare_api.ok("POST", "/system/", {"user": ADMIN, "password": ADMIN_PASSWORD})
    await bare_api.login()
    data = await bare_api.ok("GET", f"/sessions/{bare_api.session}")
    assert data["group"] == "admin" and data["menu"] == list(MENU_TAGS)
    assert await bare_api.ok("GET", "/roles/") == ["super"]


BAD_INIT_BODIES = [
    ({"password": ADMIN_PASSWORD}, "user: is required"),
    ({"user": ADMIN}, "password: is required"),
    ({"user": 7, "password": ADMIN_PASSWORD}, "user: must be of type string"),
    ({"user": ADMIN, "password": ADMIN_PASSWORD, "menu": "user"}, "menu: must be of type array"),
    ({"user": ADMIN, "password": "short1A"}, "at least 8 characters"),
    ({"user": ADMIN, "password": "alllowercase1"}, "an upper-case letter"),
    ({"user": ADMIN, "password": "NoDigitsHere"}, "a digit"),
    ({"user": "bad name", "password": ADMIN_PASSWORD}, "invalid user name"),
    ({"user": ADMIN, "password": ADMIN_PASSWORD, "group": "a/b"}, "invalid group name"),
    ({"user": ADMIN, "password": ADMIN_PASSWORD, "role": "r" * 65}, "invalid role name"),
    ({"user": ADMIN, "password": ADMIN_PASSWORD, "menu": ["user", "root_shell"]},
     "unknown menu tag(s) root_shell"),
]


@pytest.mark.gen_test(timeout=30)
async def test_system_init_rejects_bad_bodies_and_stays_uninitialized(bare_api):
    for body, words in BAD_INIT_BODIES:
        reply = await bare_api.call("POST", "/system/", body)
        assert reply.code == 400, (body, reply.message)
        assert words in reply.message, (body, reply.message)
    assert (await bare_api.ok("GET", "/system/"))["ready"] is False


@pytest.mark.gen_test(timeout=30)
async def test_concurrent_system_inits_create_one_administrator(bare_api):
    replies = await asyncio.gather(*(
        bare_api.call("POST", "/system/", {"user": f"first{n}", "password": ADMIN_PASSWORD})
        for n in range(4)
    ))
    assert sorted(r.code for r in replies) == [0, 403, 403, 403], replies
    winner = next(f"first{n}" for n, r in enumerate(replies) if r.code == 0)
    await bare_api.login(winner)
    assert await bare_api.ok("GET", "/users/") == [winner]


# -- POST /sessions/ ----------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_login_reply_carries_what_the_portal_needs(api):
    data = await api.ok("POST", "/sessions/", {"user": ADMIN, "password": ADMIN_PASSWORD,
                                               "nonce": "abc"}, session="")
    assert set(data) == {"session", "group", "timeout", "menu", "address"}
    assert re.fullmatch(r"[0-9a-f]{32}", data["session"])  # 128 random bits
    assert data["session"] != api.session  # each login is a new session
    assert data["group"] == "admin" and data["timeout"] == 180
    assert data["menu"] == list(MENU_TAGS) and data["address"] == "127.0.0.1"
    # both sessions work side by side
    for token in (api.session, data["session"]):
        assert (await api.ok("GET", "/roles/", session=token)) == ["super"]
    # GET /sessions/{id}: what the session knows about its caller
    info = await api.ok("GET", f"/sessions/{api.session}")
    assert info == {"user": ADMIN, "group": "admin", "address": "127.0.0.1",
                    "menu": list(MENU_TAGS), "timeout": 180, "resource": []}
    # the nonce is optional, the trailing slash too
    data = await api.ok("POST", "/sessions", {"user": ADMIN, "password": ADMIN_PASSWORD},
                        session="")
    assert data["group"] == "admin"


@pytest.mark.gen_test(timeout=30)
async def test_login_rejects_malformed_bodies(api):
    cases = [
        ({"password": ADMIN_PASSWORD}, "user: is required"),
        ({"user": ADMIN}, "password: is required"),
        ({"user": ADMIN, "password": 12345678}, "password: must be of type string"),
        ({"user": ["admin"], "password": ADMIN_PASSWORD}, "user: must be of type string"),
        ([{"user": ADMIN, "password": ADMIN_PASSWORD}], "must be a JSON object"),
    ]
    for body, words in cases:
        reply = await api.call("POST", "/sessions/", body, session="")
        assert reply.code == 400 and words in reply.message, (body, reply.message)
        assert reply.data is None
    reply = await api.call("POST", "/sessions/", raw=b"user=admin", session="")
    assert reply.code == 400 and "malformed JSON" in reply.message


@pytest.mark.gen_test(timeout=30)
async def test_failed_logins_say_the_same_for_unknown_users_and_wrong_passwords(api):
    unknown = await api.call("POST", "/sessions/", {"user": "ghost", "password": "Secr3tGuess"},
                             session="")
    wrong = await api.call("POST", "/sessions/", {"user": ADMIN, "password": "Wr0ngGuess"},
                           session="")
    assert unknown.code == wrong.code == 401
    assert unknown.message == wrong.message == "invalid user name or password"
    assert unknown.data is None and wrong.data is None

    contents = await log_contents(api)
    assert "failed login for 'ghost' from 127.0.0.1: invalid user name or password" in contents
    assert "failed login for 'admin' from 127.0.0.1: invalid user name or password" in contents
    assert not any("Secr3tGuess" in c or "Wr0ngGuess" in c for c in contents)


@pytest.mark.gen_test(timeout=30)
async def test_login_of_a_user_without_group_is_refused_with_the_reason(api):
    await make_user(api, "loner", menu=None)
    reply = await api.call("POST", "/sessions/", {"user": "loner", "password": PASSWORD},
                           session="")
    assert reply.code == 403
    assert "loner belongs to no group" in reply.message
    assert "administrator must add it" in reply.message
    # a wrong password still gets the generic answer: no hint the name exists
    wrong = await api.call("POST", "/sessions/", {"user": "loner", "password": "Wr0ngGuess"},
                           session="")
    assert wrong.code == 401 and wrong.message == "invalid user name or password"

    await api.ok("POST", "/user_groups/admin/members/loner")
    data = await api.ok("POST", "/sessions/", {"user": "loner", "password": PASSWORD},
                        session="")
    assert data["group"] == "admin"


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)  # the throttle is in memory
@pytest.mark.gen_test(timeout=30)
async def test_repeated_failed_logins_are_slowed_down_per_user_and_per_address(api):
    async def attempt(user: str, password: str) -> tuple[float, int]:
        began = time.monotonic()
        reply = await api.call("POST", "/sessions/", {"user": user, "password": password},
                               session="")
        return time.monotonic() - began, reply.code

    # one user name, wrong passwords: the first three cost only the hash check, then each
    # failure doubles the wait (0.25 s, 0.5 s, 1 s, ...)
    fast = []
    for _ in range(3):
        took, code = await attempt(ADMIN, "Wr0ngGuess")
        assert code == 401
        fast.append(took)
    baseline = min(fast)
    for _ in range(2):
        assert (await attempt(ADMIN, "Wr0ngGuess"))[1] == 401
    # after five failures the next attempt waits 1 s, even with the right password
    slowed, code = await attempt(ADMIN, ADMIN_PASSWORD)
    assert code == 0
    # (the wait is exact; hashing time varies with load, so compare with the fastest)
    assert slowed >= 1.0 and slowed > baseline + 0.5, (fast, slowed)
    # the success forgave the failures: no wait any more
    again, code = await attempt(ADMIN, "Wr0ngGuess")
    assert code == 401 and again - baseline < 0.9, (fast, again)
    assert (await attempt(ADMIN, ADMIN_PASSWORD))[1] == 0

    # one address, a different unknown name each time: the address alone slows it down
    timings = []
    for n in range(6):
        took, code = await attempt(f"guess{n}", "Wr0ngGuess")
        assert code == 401
        timings.append(took)
    assert timings[5] >= 1.0 and timings[5] > min(timings[:3]) + 0.5, timings
    assert (await attempt(ADMIN, ADMIN_PASSWORD))[1] == 0

    # attempts sent all at once do not all slip through before the first has failed
    began = time.monotonic()
    burst = await asyncio.gather(*(
        api.call("POST", "/sessions/", {"user": ADMIN, "password": "Wr0ngGuess"}, session="")
        for _ in range(6)
    ))
    assert [r.code for r in burst] == [401] * 6
    assert time.monotonic() - began >= 1.0  # the sixth waited 1 s


# -- sessions: keep-alive, expiry, listing --------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_keep_alive_with_an_empty_body_writes_no_log(api):
    before = (await api.ok("GET", "/logs/"))["total"]
    reply = await api.call("PUT", f"/sessions/{api.session}", raw=b"")
    assert (reply.code, reply.message) == (0, "")
    await api.ok("PUT", f"/sessions/{api.session}/")
    assert (await api.ok("GET", "/logs/"))["total"] == before
    # an administrator keeping alive a session that does not exist: not found, and the
    # caller's own session lives on
    reply = await api.call("PUT", "/sessions/00000000000000000000000000000000")
    assert reply.code == 404 and "no such live session" in reply.message
    assert (await api.ok("GET", "/roles/")) == ["super"]


@pytest.mark.gen_test(timeout=30)
async def test_sessions_of_others_are_private_to_non_administrators(api):
    await make_user(api, "bob", menu=["dashboard"])
    bob = await login_as(api, "bob")

    mine = await api.ok("GET", f"/sessions/{bob}", session=bob)
    assert mine["user"] == "bob" and mine["group"] == "bob_group" and mine["menu"] == ["dashboard"]
    assert (await api.call("GET", f"/sessions/{api.session}", session=bob)).code == 404
    assert (await api.call("PUT", f"/sessions/{api.session}", session=bob)).code == 403
    listing = await api.call("GET", "/sessions/", session=bob)
    assert listing.code == 403 and "do not grant 'user'" in listing.message

    # an administrator sees and may keep alive any session
    theirs = await api.ok("GET", f"/sessions/{bob}")
    assert theirs["user"] == "bob"
    await api.ok("PUT", f"/sessions/{bob}")
    # GET /sessions/ is the original's list of session ids (strings); who holds each
    # one is on the extension GET /session_details/, in the same order
    ids = await api.ok("GET", "/sessions/")
    live = await api.ok("GET", "/session_details/")
    assert len(ids) == 2 and all(isinstance(i, str) and i for i in ids)
    assert [s["id"] for s in live] == ids
    assert sorted(s["user"] for s in live) == ["admin", "bob"]
    assert all(set(s) == {"id", "user", "address", "expire"} for s in live)
    assert all(s["address"] == "127.0.0.1" and len(s["expire"]) == 19 for s in live)
    # neither listing shows the bearer tokens themselves
    assert not set(ids) & {bob, api.session}
    details = await api.call("GET", "/session_details/", session=bob)
    assert details.code == 403 and "do not grant 'user'" in details.message

    # removing a user from its group ends its sessions
    await api.ok("DELETE", "/user_groups/bob_group/members/bob")
    assert (await api.call("GET", "/roles/", session=bob)).code == 401
    assert [s["user"] for s in await api.ok("GET", "/session_details/")] == [ADMIN]
    assert len(await api.ok("GET", "/sessions/")) == 1


PROTECTED = [
    ("GET", "/sessions/"),
    ("GET", "/session_details/"),
    ("GET", "/sessions/0123"),
    ("PUT", "/sessions/0123"),
    ("GET", "/roles/"),
    ("GET", "/roles/super"),
    ("POST", "/roles/x"),
    ("GET", "/user_groups/"),
    ("DELETE", "/user_groups/admin"),
    ("GET", "/user_groups/admin/members/"),
    ("POST", "/user_groups/admin/members/admin"),
    ("GET", "/users/"),
    ("GET", "/users/admin"),
    ("DELETE", "/users/admin"),
    ("PUT", "/users/admin/password/"),
    ("GET", "/user_search/"),
    ("GET", "/resource_visibilities/"),
    ("PUT", "/resource_visibilities/"),
    ("GET", "/logs/"),
    ("POST", "/logs/"),
    ("DELETE", "/logs/"),
]


@pytest.mark.gen_test(timeout=30)
async def test_every_protected_route_needs_a_live_session(api):
    for method, path in PROTECTED:
        none = await api.call(method, path, {}, session="")
        assert none.code == 401, (method, path, none.message)
        assert "no session" in none.message and "Nano-Session" in none.message
        bogus = await api.call(method, path, {}, session="f" * 32)
        assert bogus.code == 401, (method, path, bogus.message)
        assert "log in again" in bogus.message
    # nothing was changed by all of that
    assert await api.ok("GET", "/users/") == [ADMIN]
    assert await api.ok("GET", "/roles/") == ["super"]


@pytest.mark.gen_test(timeout=30)
async def test_a_session_without_the_menu_tag_may_read_but_not_change(api):
    await make_user(api, "viewer", menu=["dashboard", "instance"])
    viewer = await login_as(api, "viewer")

    assert await api.ok("GET", "/roles/", session=viewer) == ["super", "viewer_role"]
    assert await api.ok("GET", "/users/", session=viewer) == [ADMIN, "viewer"]
    assert (await api.ok("GET", "/user_groups/", session=viewer))[0]["name"] == "admin"
    assert await api.ok("GET", "/resource_visibilities/", session=viewer)

    denied = [
        ("POST", "/roles/x", {"menu": []}, "user"),
        ("PUT", "/roles/super", {"menu": []}, "user"),
        ("DELETE", "/roles/viewer_role", None, "user"),
        ("POST", "/user_groups/g", {"display": "g"}, "user"),
        ("POST", "/user_groups/admin/members/viewer", None, "user"),
        ("DELETE", "/user_groups/viewer_group/members/viewer", None, "user"),
        ("POST", "/users/mallory", {"password": PASSWORD}, "user"),
        ("PUT", "/users/admin", {"nick": "pwned"}, "user"),
        ("DELETE", "/users/admin", None, "user"),
        ("PUT", "/resource_visibilities/", {"instance_visible": True}, "visibility"),
        ("DELETE", "/logs/", {"entries": []}, "log"),
        # the audit log says who did what from where (failed logins too): not a read for all
        ("GET", "/logs/", None, "log"),
    ]
    for method, path, body, tag in denied:
        reply = await api.call(method, path, body, session=viewer)
        assert reply.code == 403, (method, path, reply.code, reply.message)
        assert f"do not grant '{tag}'" in reply.message, reply.message

    # the portal posts a log entry after most actions, for every user: allowed, and
    # recorded under the poster's name
    await api.ok("POST", "/logs/", {"content": "viewer did something"}, session=viewer)
    logs = (await api.ok("GET", "/logs/"))["logs"]
    assert any(e["content"] == "viewer did something" and e["user"] == "viewer" for e in logs)

    # nothing changed
    assert await api.ok("GET", "/roles/") == ["super", "viewer_role"]
    assert await api.ok("GET", "/roles/super") == {"menu": list(MENU_TAGS)}
    assert await api.ok("GET", "/users/") == [ADMIN, "viewer"]
    assert (await api.ok("GET", "/users/admin"))["nick"] == ""

    # the menu is read live: granting 'user' to the role takes effect on the same session
    await api.ok("PUT", "/roles/viewer_role", {"menu": ["dashboard", "user"]})
    await api.ok("POST", "/roles/x", {"menu": []}, session=viewer)
    assert "x" in await api.ok("GET", "/roles/", session=viewer)

