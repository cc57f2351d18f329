"""A browser needs nothing but nanod: headless Chromium (Debian's, driven by Playwright)
loads the test app of tests/fixtures/webapp from nanod's `web_root` at a browser-history
path, logs in through the API, reads the guest the path names and opens that guest's
console websocket, every request on the page's own origin; the console is a real guest's
VNC display on the local libvirtd (QEMU under TCG), whose greeting must reach the page.

Skipped, saying why, only when Playwright or Chromium cannot start here."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nanod import config
from tests.api.test_compute import until
from tests.conftest import ADMIN, ADMIN_PASSWORD, reconciling, sqlite_only
from tests.conftest import TEST_NAMES_PREFIX as PREFIX
from tests.integration.conftest import remove_cell_leftovers
from tests.integration.test_guests_real import created, guest_body, instance

pytestmark = pytest.mark.integration
WEBAPP = Path(__file__).resolve().parent.parent / "fixtures" / "webapp"
CHROMIUM = "/usr/bin/chromium"
# no network but loopback, nothing of the profile kept, no GPU or sandbox in a container
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
CELL = "local-w"

database = pytest.fixture(name="database")(sqlite_only)  # the browser's view, not backends


@pytest.fixture
def settings(settings):
    settings["web_root"] = config.check_web_root(str(WEBAPP))
    return reconciling(settings)


@pytest.fixture
def browser(io_loop, tmp_path) -> Iterator[Any]:
    """A Playwright context of Debian's Chromium with a fresh profile, started on the test's
    IOLoop (the nanod under test answers on the same loop); skipped, with the reason, when
    the package or the browser cannot start. Playwright's own browsers are never fetched."""
    try:
        from playwright.async_api import async_playwright
    except ImportError as exc:
        pytest.skip(f"playwright cannot start: the Python package is missing ({exc}); it is "
                    "in the `test` extra of setup.cfg")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"chromium cannot start: {CHROMIUM} is missing (scripts/install-deps "
                    "installs Debian's chromium)")
    driver: list[Any] = []

    async def start() -> Any:
        driver.append(await async_playwright().start())
        return await driver[0].chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS,
            headless=True)

    try:
        context = io_loop.run_sync(start, timeout=60)
    except Exception as exc:  # noqa: BLE001 - any failure to start is the reason printed
        if driver:
            io_loop.run_sync(driver[0].stop)
        pytest.skip(f"chromium cannot start under playwright: {exc}")
    yield context

    async def stop() -> None:
        await context.close()
        await driver[0].stop()

    io_loop.run_sync(stop, timeout=30)


@pytest.fixture
def cell(api, io_loop, server, system, qemu_dir):
    """The local libvirtd as cell `local-w` in compute pool `wp`; afterwards everything it
    made on libvirt is removed (once the reconciler stopped)."""
    remove_cell_leftovers(system, f"{PREFIX}-{CELL}")  # of a run that failed before

    async def alive():
        return (await api.ok("GET", f"/cells/{CELL}"))["alive"]

    async def setup():
        await api.ok("POST", f"/cells/{CELL}", {"libvirt_uri": "qemu:///system",
                                                "virt_type": "qemu",
                                                "storage_path": str(qemu_dir / "pool")})
        await until(alive, timeout=30, what="cell alive")
        await api.ok("POST", "/compute_pools/wp", {})
        await api.ok("POST", f"/compute_pool_cells/wp/{CELL}", {})

    io_loop.run_sync(setup)
    yield CELL
    if server.controller:
        server.controller.stop(10.0)
    remove_cell_leftovers(system, f"{PREFIX}-{CELL}")


@pytest.mark.gen_test(timeout=120)
async def test_the_web_roots_app_logs_in_and_opens_a_guests_console(browser, api, cell,
                                                                      server):
    # a running guest with a VNC display (no OS: QEMU's VNC server greets all the same)
    body = guest_body("web1", pool="wp", modules=[])
    del body["cloud_init"]
    gid = (await api.ok("POST", "/guests/", body))["id"]
    await created(api, gid)
    await api.ok("POST", f"/instances/{gid}", {})
    await instance(api, gid, True)

    async def displayed():  # the display's port is known once the reconciler observed it
        return (await api.call("POST", "/monitor_channels/", {"guest": gid})).code == 0

    await until(displayed, timeout=30, what="the guest's display")

    origin = f"127.0.0.1:{server.port}"
    page = await browser.new_page()
    requests: list[str] = []
    sockets: list[Any] = []
    frames: list[bytes] = []
    problems: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: problems.append(str(error)))

    def websocket(socket: Any) -> None:
        sockets.append(socket)
        socket.on("framereceived", lambda payload: frames.append(
            payload if isinstance(payload, bytes) else payload.encode()))

    page.on("websocket", websocket)

    # a browser-history path of the app: nanod answers it with the app's index.html
    loaded = await page.goto(f"http://{origin}/guests/{gid}")
    assert loaded is not None and loaded.status == 200
    assert await page.title() == "Nano web root test app"
    await page.fill("#user", ADMIN)
    await page.fill("#password", ADMIN_PASSWORD)
    await page.click("button[type=submit]")
    await page.wait_for_function(
        "document.getElementById('console').dataset.greeting !== undefined"
        " || document.getElementById('error').textContent !== ''", timeout=30_000)

    assert await page.text_content("#error") == "", problems
    assert problems == []
    assert await page.text_content("#status") == "logged in, group admin"
    assert await page.text_content("#guest") == "web1"
    console = await page.query_selector("#console")
    assert console is not None
    assert await console.get_attribute("data-state") == "open"
    assert (await console.get_attribute("data-greeting")).startswith("RFB 003.00")
    # the websocket went to the page's own origin, and the first bytes were VNC's
    assert [s.url.rsplit("/", 1)[0] for s in sockets] == \
        [f"ws://{origin}/api/v1/monitor_channels"]
    assert frames and frames[0].startswith(b"RFB 003.00")
    # and nothing else was needed: every request of the page went to nanod
    assert requests and all(url.startswith(f"http://{origin}/") for url in requests), requests
    assert {url.split(origin, 1)[1] for url in requests} >= {
        f"/guests/{gid}", "/app.js", "/style.css", "/api/v1/sessions/", f"/api/v1/guests/{gid}",
        "/api/v1/monitor_channels/"}
    await page.close()

    await api.ok("DELETE", f"/guests/{gid}", {"force": True})
