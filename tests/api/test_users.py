"""Users, passwords, user search and resource visibility.

Routes: GET /users/, GET/POST/PUT/DELETE /users/{name}, PUT /users/{name}/password/,
GET /user_search/?group=, GET/PUT /resource_visibilities/.
"""

from __future__ import annotations

import pytest

from state.models import Session, User
from tests.api.identity_helpers import PASSWORD, log_contents, login_as, make_user
from tests.conftest import ADMIN, ADMIN_PASSWORD

# -- users -----------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_user_lifecycle(api):
    assert await api.ok("GET", "/users/") == [ADMIN]  # an array of names
    reply = await api.call("POST", "/users/akumas", {"nick": "AK", "mail": "a@b.com",
                                                     "password": PASSWORD})
    assert (reply.code, reply.message, reply.data) == (0, "", "")  # data "": nothing to return
    await api.ok("POST", "/users/nano.user_1-x/", {"password": PASSWORD})  # every allowed char
    assert await api.ok("GET", "/users/") == [ADMIN, "akumas", "nano.user_1-x"]
    assert await api.ok("GET", "/users/akumas") == {"nick": "AK", "mail": "a@b.com"}
    assert await api.ok("GET", "/users/nano.user_1-x") == {"nick": "", "mail": ""}

    # the portal sends only the fields it has: the others stay
    await api.ok("PUT", "/users/akumas", {"nick": "Akumas"})
    assert await api.ok("GET", "/users/akumas") == {"nick": "Akumas", "mail": "a@b.com"}
    await api.ok("PUT", "/users/akumas", {"mail": "ak@example.org"})
    assert await api.ok("GET", "/users/akumas") == {"nick": "Akumas", "mail": "ak@example.org"}
    await api.ok("PUT", "/users/akumas", {})
    assert await api.ok("GET", "/users/akumas") == {"nick": "Akumas", "mail": "ak@example.org"}

    # a new user has no group yet: it shows in no group's member list
    assert await api.ok("GET", "/user_groups/admin/members/") == [ADMIN]

    # stored secrets: an argon2id hash, never the password; sessions by SHA-256 digest only
    stored = User.get_by_id("akumas").password_hash
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    assert not Session.select().where(Session.token_hash == api.session).exists()
    assert Session.select().count() == 1

    await api.ok("DELETE", "/users/nano.user_1-x")
    assert await api.ok("GET", "/users/") == [ADMIN, "akumas"]
    gone = await api.call("GET", "/users/nano.user_1-x")
    assert gone.code == 404 and "no user named 'nano.user_1-x'" in gone.message


@pytest.mark.gen_test(timeout=30)
async def test_user_bad_requests(api):
    await api.ok("POST", "/users/bob", {"password": PASSWORD, "nick": "Bob"})
    cases = [
        ("POST", "/users/u1", {}, 400, "password: is required"),
        ("POST", "/users/u1", {"password": 12345678}, 400, "password: must be of type string"),
        ("POST", "/users/u1", {"password": PASSWORD, "nick": 1}, 400,
         "nick: must be of type string"),
        ("POST", "/users/u1", {"password": PASSWORD, "mail": None}, 400,
         "mail: must be of type string"),
        ("POST", "/users/u1", {"password": "Sh0rt"}, 400, "at least 8 characters"),
        ("POST", "/users/u1", {"password": "nouppercase1"}, 400, "an upper-case letter"),
        ("POST", "/users/u1", {"password": "NOLOWERCASE1"}, 400, "a lower-case letter"),
        ("POST", "/users/u1", {"password": "NoDigitsAtAll"}, 400, "a digit"),
        ("POST", "/users/u1", {"password": "abc"}, 400,
         "needs at least 8 characters, a digit, an upper-case letter"),
        ("POST", "/users/b%C3%B6b", {"password": PASSWORD}, 400, "invalid user name 'böb'"),
        ("POST", "/users/a%20b", {"password": PASSWORD}, 400, "invalid user name 'a b'"),
        ("POST", "/users/" + "u" * 65, {"password": PASSWORD}, 400, "use 1-64 letters"),
        ("POST", "/users/bob", {"password": PASSWORD}, 409, "user 'bob' already exists"),
        ("PUT", "/users/bob", {"nick": 7}, 400, "nick: must be of type string"),
        ("PUT", "/users/ghost", {"nick": "x"}, 404, "no user named 'ghost'"),
        ("GET", "/users/ghost", None, 404, "no user named 'ghost'"),
        ("DELETE", "/users/ghost", None, 404, "no user named 'ghost'"),
        ("DELETE", "/users/admin", None, 409, "cannot delete the user you are logged in as"),
    ]
    for method, path, body, code, words in cases:
        reply = await api.call(method, path, body)
        assert reply.code == code, (method, path, body, reply.code, reply.message)
        assert words in reply.message, (method, path, reply.message)
    assert await api.ok("GET", "/users/") == [ADMIN, "bob"]
    assert await api.ok("GET", "/users/bob") == {"nick": "Bob", "mail": ""}


@pytest.mark.gen_test(timeout=30)
async def test_users_edit_their_own_profile_only_and_deletion_ends_sessions(api):
    await make_user(api, "bob", menu=["dashboard"])
    bob = await login_as(api, "bob")
    await api.ok("PUT", "/users/bob", {"nick": "Bobby"}, session=bob)
    assert await api.ok("GET", "/users/bob", session=bob) == {"nick": "Bobby", "mail": ""}
    assert await api.ok("GET", "/users/admin", session=bob) == {"nick": "", "mail": ""}
    for method, path, body in [("PUT", "/users/admin", {"nick": "x"}),
                               ("DELETE", "/users/bob", None),
                               ("POST", "/users/eve", {"password": PASSWORD})]:
        reply = await api.call(method, path, body, session=bob)
        assert reply.code == 403, (method, path, reply.message)
    assert await api.ok("GET", "/users/") == [ADMIN, "bob"]

    # deleting a user ends its sessions and frees its group for removal
    await api.ok("DELETE", "/users/bob")
    assert (await api.call("GET", "/roles/", session=bob)).code == 401
    assert await api.ok("GET", "/user_groups/bob_group/members/") == []
    await api.ok("DELETE", "/user_groups/bob_group")


# -- passwords -------------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_password_change(api):
    await make_user(api, "bob", menu=["dashboard"])
    bob = await login_as(api, "bob")
    new = "N3wPassword"
    cases = [
        ({"old": PASSWORD}, 400, "new: is required"),
        ({"new": new}, 400, "old: is required"),
        ({"old": PASSWORD, "new": 12345678}, 400, "new: must be of type string"),
        ({"old": PASSWORD, "new": "weak"}, 400, "new password is too weak"),
        ({"old": "Wr0ngGuess", "new": new}, 403, "the old password is wrong"),
    ]
    for body, code, words in cases:
        reply = await api.call("PUT", "/users/bob/password/", body, session=bob)
        assert reply.code == code, (body, reply.code, reply.message)
        assert words in reply.message, (body, reply.message)
    # none of those changed it
    await login_as(api, "bob", PASSWORD)

    # a user without the 'user' tag may change only its own password
    other = await api.call("PUT", "/users/admin/password/", {"old": ADMIN_PASSWORD, "new": new},
                           session=bob)
    assert other.code == 403 and "only your own password" in other.message

    await api.ok("PUT", "/users/bob/password", {"old": PASSWORD, "new": new}, session=bob)
    old_login = await api.call("POST", "/sessions/", {"user": "bob", "password": PASSWORD},
                               session="")
    assert old_login.code == 401
    await login_as(api, "bob", new)

    # an administrator may change another user's password (knowing the old one)
    await api.ok("PUT", "/users/bob/password/", {"old": new, "new": PASSWORD})
    await login_as(api, "bob", PASSWORD)
    missing = await api.call("PUT", "/users/ghost/password/", {"old": new, "new": PASSWORD})
    assert missing.code == 404 and "no user named 'ghost'" in missing.message

    contents = await log_contents(api)
    assert "bob changed the password of bob" in contents
    assert "admin changed the password of bob" in contents
    assert not any(secret in c for c in contents for secret in (PASSWORD, new, bob))


# -- user search -----------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_user_search_by_group(api):
    await api.ok("POST", "/user_groups/ops", {"display": "Ops"})
    await api.ok("POST", "/user_groups/idle", {"display": "Idle"})
    for name in ("sam", "alex"):
        await api.ok("POST", f"/users/{name}", {"password": PASSWORD})
        await api.ok("POST", f"/user_groups/ops/members/{name}")
    assert await api.ok("GET", "/user_search/") == [ADMIN, "alex", "sam"]
    assert await api.ok("GET", "/user_search/?group=ops") == ["alex", "sam"]
    assert await api.ok("GET", "/user_search?group=admin") == [ADMIN]
    assert await api.ok("GET", "/user_search/?group=idle") == []  # [] never null
    assert await api.ok("GET", "/user_search/?group=") == [ADMIN, "alex", "sam"]
    missing = await api.call("GET", "/user_search/?group=ghosts")
    assert missing.code == 404 and "no user group named 'ghosts'" in missing.message


# -- resource visibility ---------------------------------------------------------------------

ALL_FALSE = {"instance_visible": False, "media_image_visible": False,
             "disk_image_visible": False}


@pytest.mark.gen_test(timeout=30)
async def test_visibility_flags_per_group_default_false_missing_means_false(api):
    assert await api.ok("GET", "/resource_visibilities/") == ALL_FALSE
    await api.ok("PUT", "/resource_visibilities/", {"instance_visible": True,
                                                    "disk_image_visible": True})
    assert await api.ok("GET", "/resource_visibilities/") == {
        **ALL_FALSE, "instance_visible": True, "disk_image_visible": True,
    }
    # the portal sends only the flags that are true
    await api.ok("PUT", "/resource_visibilities", {"media_image_visible": True})
    assert await api.ok("GET", "/resource_visibilities/") == {
        **ALL_FALSE, "media_image_visible": True,
    }
    await api.ok("PUT", "/resource_visibilities/", {})
    assert await api.ok("GET", "/resource_visibilities/") == ALL_FALSE
    await api.ok("PUT", "/resource_visibilities/", {"instance_visible": True,
                                                    "media_image_visible": False})
    assert (await api.ok("GET", "/resource_visibilities/"))["instance_visible"] is True

    for body, words in [({"instance_visible": "yes"}, "instance_visible: must be of type boolean"),
                        ({"guest_visible": True}, "unknown visibility flag(s) guest_visible"),
                        ([True], "must be a JSON object")]:
        reply = await api.call("PUT", "/resource_visibilities/", body)
        assert reply.code == 400 and words in reply.message, (body, reply.message)
    assert (await api.ok("GET", "/resource_visibilities/"))["instance_visible"] is True
    assert "admin set visibility of group admin to instance_visible" in await log_contents(api)

    # flags are per group; changing them needs the 'visibility' tag
    await make_user(api, "bob", menu=["dashboard"])
    bob = await login_as(api, "bob")
    assert await api.ok("GET", "/resource_visibilities/", session=bob) == ALL_FALSE
    denied = await api.call("PUT", "/resource_visibilities/", {"instance_visible": True},
                            session=bob)
    assert denied.code == 403 and "do not grant 'visibility'" in denied.message

    await api.ok("PUT", "/roles/bob_role", {"menu": ["dashboard", "visibility"]})
    await api.ok("PUT", "/resource_visibilities/", {"disk_image_visible": True}, session=bob)
    assert await api.ok("GET", "/resource_visibilities/", session=bob) == {
        **ALL_FALSE, "disk_image_visible": True,
    }
    assert await api.ok("GET", "/resource_visibilities/") == {
        **ALL_FALSE, "instance_visible": True,
    }
