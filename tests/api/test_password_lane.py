"""Password hashing has its own lane (api/base.py `AppContext.hasher`): a burst of logins,
each an argon2 verification of a few hundred milliseconds, does not hold up an image
download, and downloads that hold the pool they read files in do not hold up a login.
Asserted on the order in which things finish, never on timings; the login throttle keeps
memory within `api.login_throttle_entries` under logins from many addresses.

The logins come from distinct loopback addresses (127.0.0.x) and user names, as a spread
out attack would, so the throttle (per address and per user) delays none of them."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest
import tornado.httpclient

from nanod import config
from tests.api.test_images import create, download, file_path, make_iso, upload

LOGINS = 12  # with 2 hashing threads: six rounds of argon2, over a second here
PASSWORD_WORKERS = 2


@pytest.fixture
def settings(settings: dict[str, Any]) -> dict[str, Any]:
    settings["api"] = {**settings["api"], "password_workers": PASSWORD_WORKERS,
                       "login_throttle_entries": 16}
    # the default cost (the suite's TEST_SETTINGS use OWASP's least): what users get
    settings["password_hash"] = dict(config.DEFAULTS["password_hash"])
    return settings


def client() -> tornado.httpclient.AsyncHTTPClient:
    """A client of its own with room for every request of the test at once (the shared
    one runs ten at a time and would queue the download behind the logins itself)."""
    return tornado.httpclient.AsyncHTTPClient(force_instance=True, max_clients=64)


async def login(http: tornado.httpclient.AsyncHTTPClient, server: Any, user: str,
                password: str, source: str) -> dict[str, Any]:
    response = await http.fetch(
        f"http://127.0.0.1:{server.port}/api/v1/sessions/", method="POST",
        body=json.dumps({"user": user, "password": password, "nonce": "n"}),
        headers={"Content-Type": "application/json"}, network_interface=source,
        request_timeout=60)
    return json.loads(response.body)


async def until(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.01)


@pytest.mark.gen_test(timeout=120)
async def test_a_burst_of_logins_does_not_hold_up_a_download(api, server):
    image_id = await create(api, "media", "payload")
    iso = make_iso(payload=b"\x42" * (16 << 20))
    assert (await upload(api, "media", image_id, iso)).code == 0
    http = client()
    done: list[str] = []

    async def one_login(n: int) -> None:
        doc = await login(http, server, f"nobody{n}", "Wr0ngGuess", f"127.0.0.{10 + n}")
        assert doc["error_code"] == 401
        done.append("login")

    server.ctx.throttle._failures.clear()
    logins = [asyncio.ensure_future(one_login(n)) for n in range(LOGINS)]
    # every login has arrived (each counts a failure for its user and its address before
    # it hashes), so they are all queued for hashing when the download starts
    await until(lambda: len(server.ctx.throttle) >= min(16, 2 * LOGINS), "the logins arrive")
    got = await download(api, file_path("media", image_id))
    done.append("download")
    assert got.code == 200 and got.body == iso
    await asyncio.gather(*logins)
    position = done.index("download")
    print(f"the download finished after {position} of {LOGINS} logins")
    # with one pool for both (before the lanes), the download's reads queued behind the
    # logins: it finished after 11 of 12 here
    assert position <= LOGINS // 2, "the download waited for the logins to be hashed"
    http.close()


@pytest.mark.gen_test(timeout=120)
async def test_a_busy_file_pool_does_not_hold_up_a_login(api, server):
    """Downloads read files in the API pool; on a slow disk they hold all of its threads.
    Here its threads are held on purpose: a login still completes, and before they are
    let go."""
    release = threading.Event()
    held = [server.ctx.executor.submit(release.wait, 60) for _ in range(16)]
    try:
        doc = await asyncio.wait_for(login(client(), server, "admin", "Adm1nPassword",
                                           "127.0.0.5"), 30)
        assert doc["error_code"] == 0 and doc["data"]["session"]
        assert not any(job.done() for job in held)  # the pool was still held throughout
    finally:
        release.set()
    # and the API pool works again for what needs it
    assert (await api.call("GET", "/roles/")).code == 0


@pytest.mark.gen_test(timeout=120)
async def test_the_throttle_stays_within_its_setting_under_many_addresses(api, server):
    """16 entries at most (the setting here): 40 failed logins from 40 addresses for 40
    names would make 80 keys."""
    http = client()
    sizes = []
    for wave in range(4):
        docs = await asyncio.gather(*(
            login(http, server, f"spray{wave}-{n}", "Wr0ngGuess", f"127.0.1.{wave * 10 + n}")
            for n in range(10)))
        assert all(doc["error_code"] == 401 for doc in docs)
        sizes.append(len(server.ctx.throttle))
    assert max(sizes) == 16, sizes
    # the administrator, from an address of its own, is not held up by any of it
    doc = await login(http, server, "admin", "Adm1nPassword", "127.0.2.1")
    assert doc["error_code"] == 0
    http.close()
