"""Session timeout: configurable (setting `session_timeout`), expiring, extended by
keep-alives (PUT /sessions/{id}). Here nanod runs with a 1-second timeout."""

from __future__ import annotations

import asyncio

import pytest

from state.models import Session
from tests.conftest import ADMIN, ADMIN_PASSWORD

TIMEOUT = 1


@pytest.fixture
def settings(settings):
    settings["session_timeout"] = TIMEOUT
    return settings


@pytest.mark.gen_test(timeout=20)
async def test_sessions_expire_after_the_configured_timeout_unless_kept_alive(api):
    login = await api.ok("POST", "/sessions/", {"user": ADMIN, "password": ADMIN_PASSWORD},
                         session="")
    assert login["timeout"] == TIMEOUT
    kept, idle = login["session"], api.session

    await asyncio.sleep(0.6 * TIMEOUT)
    await api.ok("PUT", f"/sessions/{kept}", session=kept)
    await asyncio.sleep(0.6 * TIMEOUT)
    # 1.2 timeouts after login: the idle session is gone, the kept-alive one lives
    assert (await api.ok("GET", "/roles/", session=kept)) == ["super"]
    expired = await api.call("GET", "/roles/", session=idle)
    assert expired.code == 401 and "expired" in expired.message
    assert len(await api.ok("GET", "/sessions/", session=kept)) == 1
    live = await api.ok("GET", "/session_details/", session=kept)
    assert len(live) == 1 and live[0]["user"] == ADMIN

    await asyncio.sleep(1.1 * TIMEOUT)
    for method, path in [("GET", "/users/"), ("PUT", f"/sessions/{kept}"),
                         ("POST", "/roles/late")]:
        reply = await api.call(method, path, {"menu": []}, session=kept)
        assert reply.code == 401, (method, path, reply.message)
    # logging in again works
    fresh = await api.ok("POST", "/sessions/", {"user": ADMIN, "password": ADMIN_PASSWORD},
                         session="")
    assert await api.ok("GET", "/roles/", session=fresh["session"]) == ["super"]
    # expired sessions are purged from the store, not only refused
    assert Session.select().count() == 1
