"""The envelope, trailing slashes, unknown routes and the first-run flow."""

import pytest

from tests.conftest import ADMIN, ADMIN_PASSWORD


@pytest.mark.gen_test
async def test_fresh_system_is_not_ready_until_init(bare_api):
    reply = await bare_api.call("GET", "/system")
    assert reply.code == 0 and reply.data["ready"] is False
    await bare_api.ok("POST", "/system/", {"user": ADMIN, "password": ADMIN_PASSWORD})
    assert (await bare_api.ok("GET", "/system/"))["ready"] is True
    again = await bare_api.call("POST", "/system/", {"user": "x2", "password": ADMIN_PASSWORD})
    assert again.code == 403 and "already initialized" in again.message


@pytest.mark.gen_test
async def test_unknown_route_is_a_404_envelope(api):
    reply = await api.call("GET", "/no_such_thing/1")
    assert reply.status == 200 and reply.code == 404 and reply.data is None


@pytest.mark.gen_test
async def test_login_reply_shape(api):
    data = await api.ok("POST", "/sessions", {"user": ADMIN, "password": ADMIN_PASSWORD,
                                              "nonce": "1"}, session="")
    assert set(data) == {"session", "group", "timeout", "menu", "address"}
    assert data["timeout"] == 180 and data["group"] == "admin"
    assert "user" in data["menu"] and data["address"] == "127.0.0.1"
    assert len(data["session"]) == 32
