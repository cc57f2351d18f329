"""The event stream fed by the running reconcilers: a guest on a test-driver cell
(libvirt's test driver) is created and started, and a websocket client sees its status
transitions and libvirt's lifecycle event (reconciler/kinds.py) as they happen."""

from __future__ import annotations

import json

import pytest
import tornado.httpclient
import tornado.websocket

from tests.api.test_guests_testdriver import sim_pool, small
from tests.conftest import reconciling


@pytest.fixture
def settings(settings):
    return reconciling(settings, resync_seconds=2, probe_seconds=0.5, offline_after=2,
                       guest_poll_seconds=0.5)


@pytest.mark.gen_test(timeout=120)
async def test_reconciler_transitions_and_lifecycle_events(api, server, tmp_path):
    await sim_pool(api, tmp_path)
    request = tornado.httpclient.HTTPRequest(
        f"ws://127.0.0.1:{server.port}/api/v1/events?kind=Guest",
        headers={"Nano-Session": api.session})
    conn = await tornado.websocket.websocket_connect(request)
    gid = (await api.ok("POST", "/guests/", small("sim-ev")))["id"]
    seen = []

    async def until(predicate):
        while True:
            frame = await conn.read_message()
            assert frame is not None, f"the stream closed; seen: {seen}"
            event = json.loads(frame)
            seen.append(event)
            if event["resource"] == gid and predicate(event):
                return event

    stopped = await until(lambda e: e["type"] == "status"
                          and e["payload"]["phase"] == "stopped")
    assert stopped["actor"] == "nanod"
    await api.ok("POST", f"/instances/{gid}", {})
    # libvirt's events arrive on their own thread: "defined" may come after "stopped"
    started = await until(lambda e: e["type"] == "lifecycle"
                          and e["payload"]["event"] == "started")
    assert started["payload"]["cell"] == "sim-1" and started["name"] == "sim-ev"
    await until(lambda e: e["type"] == "status" and e["payload"]["phase"] == "running")
    conn.close()
    types = [e["type"] for e in seen if e["resource"] == gid]
    assert types[0] == "created" and types.count("lifecycle") >= 1
