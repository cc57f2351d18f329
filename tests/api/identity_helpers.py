"""Helpers shared by the identity API tests: make a user with a given menu and log it in.

Every helper goes through the public API (as an administrator would from the portal), so
the tests that use it also exercise the routes it calls. The identity tests run with
`gen_test(timeout=30)`: every login or password change costs an argon2 hash (~0.1 s, several
times that on a busy machine).
"""

from __future__ import annotations

from tests.conftest import Api

PASSWORD = "Us3rPassword"


async def make_user(api: Api, name: str, *, menu: list[str] | None = None,
                    group: str | None = None, password: str = PASSWORD) -> None:
    """Create user `name` in its own group (default `<name>_group`) whose one role
    (`<name>_role`) grants `menu`; `menu=None` leaves the user without a group."""
    await api.ok("POST", f"/users/{name}", {"password": password})
    if menu is None:
        return
    group = group or f"{name}_group"
    await api.ok("POST", f"/roles/{name}_role", {"menu": menu})
    await api.ok("POST", f"/user_groups/{group}", {"display": group, "role": [f"{name}_role"]})
    await api.ok("POST", f"/user_groups/{group}/members/{name}")


async def login_as(api: Api, name: str, password: str = PASSWORD) -> str:
    """A session token for `name` (the client's own session is left as it was)."""
    data = await api.ok("POST", "/sessions/", {"user": name, "password": password,
                                               "nonce": "n"}, session="")
    return data["session"]


async def logs(api: Api, **query: object) -> dict:
    """GET /logs/ with `query` as parameters, as the administrator."""
    from urllib.parse import urlencode

    suffix = "?" + urlencode(query) if query else ""
    return await api.ok("GET", "/logs/" + suffix)


async def log_contents(api: Api) -> list[str]:
    """Contents of the newest 200 entries of the last day, newest first."""
    return [entry["content"] for entry in (await logs(api, limit=200))["logs"]]
