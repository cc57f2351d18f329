"""The event stream: rows written where things change (state/events.py) and
`GET /api/v1/events` (api/events.py) as a page, as Server-Sent Events and as a websocket,
against the in-process nanod, on SQLite and PostgreSQL (the `database` fixture).

The reconciler is disabled here: what it records is written through the store functions
it uses (`record_guest_observed`, `record_cell`), as in tests/api/guest_helpers.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlencode

import pytest
import tornado.httpclient
import tornado.websocket

from api.events import event_settings, hub
from state.models import Guest
from tests.api.guest_helpers import (
    create_guest,
    guest_body,
    make_pool,
    mark_created,
    user_session,
)
from tests.conftest import ADMIN, Api


async def page(api: Api, session: str | None = None, **query: Any) -> dict[str, Any]:
    suffix = "?" + urlencode(query, doseq=True) if query else ""
    return await api.ok("GET", "/events/" + suffix, session=session)


def brief(events: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(e["kind"], e["name"], e["type"]) for e in events]


class SSE:
    """A Server-Sent Events client over a plain socket (HTTP/1.0: no chunking), as curl
    would read the stream."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.status = ""

    async def open(self, query: str = "", headers: dict[str, str] | None = None) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        lines = [f"GET /api/v1/events{query} HTTP/1.0", "Host: 127.0.0.1",
                 "Accept: text/event-stream",
                 *(f"{k}: {v}" for k, v in (headers or {}).items()), "", ""]
        self.writer.write("\r\n".join(lines).encode())
        self.status = (await self.reader.readline()).decode()
        while (await self.reader.readline()).strip():  # the rest of the head
            pass

    async def next(self) -> tuple[int, dict[str, Any]]:
        """The next event: (its `id:` line, its data)."""
        assert self.reader is not None
        ident = None
        while True:
            line = (await self.reader.readline()).decode()
            assert line, "the stream ended"
            if line.startswith("id: "):
                ident = int(line[4:])
            elif line.startswith("data: "):
                assert ident is not None
                return ident, json.loads(line[6:])

    async def until(self, predicate: Any) -> list[dict[str, Any]]:
        seen = []
        while True:
            _, event = await self.next()
            seen.append(event)
            if predicate(event):
                return seen

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@pytest.mark.gen_test(timeout=30)
async def test_store_rows_say_who_what_and_generation(api, server):
    start = (await page(api))["cursor"]
    await make_pool(api)
    guest_id = await create_guest(api, "web")
    await api.ok("PUT", f"/guests/{guest_id}/cores", {"cores": 3})
    mark_created(server, guest_id)
    mark_created(server, guest_id)  # the same status again: no second event
    server.store.record_guest_observed(guest_id, observed={"stats": {"cpu": 1}})  # facts only
    events = (await page(api, since=start))["events"]
    mine = [e for e in events if e["kind"] == "Guest"]
    assert brief(mine) == [("Guest", "web", "created"), ("Guest", "web", "changed"),
                           ("Guest", "web", "status")]
    created, changed, status = mine
    assert created["actor"] == ADMIN and changed["actor"] == ADMIN
    assert changed["payload"]["generation"] == 2 and changed["resource"] == guest_id
    assert status["actor"] == "nanod"
    assert status["payload"]["observed_generation"] == 2
    assert status["payload"]["phase"] == "stopped"
    assert ("ComputePool", "pool1", "created") in brief(events)
    assert ("Cell", "cell-a", "created") in brief(events)
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    # a cell going offline and back: its own event types
    for phase in ("offline", "offline", "online"):
        server.store.record_cell("cell-a", generation=1, observed={"alive": phase == "online"},
                                 conditions=[], phase=phase, last_error="")
    cells = (await page(api, since=start, kind="Cell"))["events"]
    assert [e["type"] for e in cells][-2:] == ["offline", "online"]

    # deleting and the removal the reconciler finishes
    await api.ok("DELETE", f"/guests/{guest_id}", {})
    server.store.finish_guest_delete(guest_id)
    tail = brief((await page(api, since=start, name="web"))["events"])
    assert tail[-2:] == [("Guest", "web", "deleting"), ("Guest", "web", "removed")]


@pytest.mark.gen_test(timeout=30)
async def test_filters_since_and_bad_queries(api, server):
    await make_pool(api)
    first = await create_guest(api, "alpha")
    second = await create_guest(api, "beta")
    everything = await page(api)
    assert everything["oldest"] == everything["events"][0]["id"]
    by_name = await page(api, name="beta")
    assert brief(by_name["events"]) == [("Guest", "beta", "created")]
    by_id = await page(api, name=first)
    assert brief(by_id["events"]) == [("Guest", "alpha", "created")]
    by_kind = await page(api, kind="ComputePool,Cell")
    assert {e["kind"] for e in by_kind["events"]} == {"ComputePool", "Cell"}
    cursor = by_name["events"][0]["id"]
    await api.ok("PUT", f"/guests/{second}/cores", {"cores": 1})
    after = await page(api, since=cursor, kind="Guest")
    assert brief(after["events"]) == [("Guest", "beta", "changed")]
    assert after["cursor"] >= after["events"][-1]["id"]
    limited = await page(api, limit=1)
    assert len(limited["events"]) == 1 and limited["cursor"] == limited["events"][0]["id"]

    for query, field in (({"kind": "Gust"}, "kind"), ({"since": "x"}, "since"),
                         ({"limit": "0"}, "limit")):
        reply = await api.call("GET", "/events/?" + urlencode(query))
        assert reply.code == 400 and field in reply.message, reply.message
    anonymous = await api.call("GET", "/events/", session="")
    assert anonymous.code == 401


@pytest.mark.gen_test(timeout=60)
async def test_another_groups_guest_events_are_not_shown(api, server):
    await make_pool(api)
    alice = await user_session(api, "alice")
    bob = await user_session(api, "bob")
    carol = await user_session(api, "carol", group="alice_group")
    start = (await page(api))["cursor"]
    reply = await api.call("POST", "/guests/", guest_body("alices", owner="", group=""), session=alice)
    assert reply.code == 0, reply.message
    guest_id = reply.data["id"]
    mark_created(server, guest_id)

    def guests(events: list[dict[str, Any]]) -> list[str]:
        return [e["name"] for e in events if e["kind"] == "Guest"]

    assert guests((await page(api, alice, since=start))["events"]) == ["alices", "alices"]
    assert guests((await page(api, bob, since=start))["events"]) == []
    assert guests((await page(api, carol, since=start))["events"]) == []  # flag off
    assert guests((await page(api, api.session, since=start))["events"]) == []  # admin too
    # infrastructure is every session's
    assert (await page(api, bob, kind="ComputePool"))["events"]

    sse = SSE(server.port)
    await sse.open(f"?since={start}", {"Nano-Session": bob})
    await api.ok("PUT", f"/guests/{guest_id}/cores", {"cores": 1}, session=alice)
    await api.ok("POST", "/compute_pools/marker", {"storage": "", "network": "",
                                                   "failover": False})
    seen = await sse.until(lambda e: e["name"] == "marker")
    sse.close()
    assert "alices" not in [e["name"] for e in seen]

    await api.ok("PUT", "/resource_visibilities/", {"instance_visible": True}, session=alice)
    assert guests((await page(api, carol, since=start))["events"]) == ["alices"] * 3


@pytest.mark.gen_test(timeout=30)
async def test_server_sent_events_resume_and_expire(api, server):
    await make_pool(api)
    sse = SSE(server.port)
    await sse.open("", {"Nano-Session": api.session})
    assert " 200 " in sse.status
    guest_id = await create_guest(api, "streamed")
    ident, event = await sse.next()
    assert event["id"] == ident and brief([event]) == [("Guest", "streamed", "created")]
    sse.close()

    # missed while away: resumed from Last-Event-ID, in order, nothing twice
    await api.ok("PUT", f"/guests/{guest_id}/cores", {"cores": 1})
    mark_created(server, guest_id)
    again = SSE(server.port)
    await again.open("?kind=Guest", {"Nano-Session": api.session, "Last-Event-ID": str(ident)})
    got = [await again.next(), await again.next()]
    again.close()
    assert [e["type"] for _, e in got] == ["changed", "status"]
    assert got[0][0] > ident and got[1][0] > got[0][0]

    # the session as a query parameter (EventSource cannot send headers)
    by_query = SSE(server.port)
    await by_query.open(f"?since={ident}&session={api.session}")
    assert (await by_query.next())[1]["type"] == "changed"
    by_query.close()

    # a cursor older than what is retained is told so, then gets what is left
    server.store.trim_events(max_age=86400, max_count=2)
    oldest = (await page(api))["oldest"]
    old = SSE(server.port)
    await old.open("?since=0", {"Nano-Session": api.session})
    ident, event = await old.next()
    assert event["type"] == "expired" and event["payload"]["oldest"] == oldest
    assert ident == oldest - 1
    assert (await old.next())[0] == oldest
    old.close()

    refused = SSE(server.port)
    await refused.open("", {"Nano-Session": "nonsense"})
    assert refused.reader is not None
    body = (await refused.reader.read()).decode()
    refused.close()
    assert json.loads(body)["error_code"] == 401


@pytest.mark.gen_test(timeout=30)
async def test_websocket_frames(api, server):
    await make_pool(api)
    url = f"ws://127.0.0.1:{server.port}/api/v1/events?kind=Guest"
    request = tornado.httpclient.HTTPRequest(url, headers={"Nano-Session": api.session})
    conn = await tornado.websocket.websocket_connect(request)
    guest_id = await create_guest(api, "framed")
    await api.ok("PUT", f"/guests/{guest_id}/cores", {"cores": 1})
    frames = [json.loads(await conn.read_message()) for _ in range(2)]
    conn.close()
    assert brief(frames) == [("Guest", "framed", "created"), ("Guest", "framed", "changed")]
    assert frames[0]["id"] < frames[1]["id"]

    since = frames[0]["id"]
    resumed = await tornado.websocket.websocket_connect(
        f"ws://127.0.0.1:{server.port}/api/v1/events?since={since}&session={api.session}")
    assert json.loads(await resumed.read_message())["id"] == frames[1]["id"]
    resumed.close()

    refused = await tornado.websocket.websocket_connect(
        f"ws://127.0.0.1:{server.port}/api/v1/events")
    assert await refused.read_message() is None
    assert refused.close_code == 4401



@pytest.mark.gen_test(timeout=30)
async def test_retention_trims_by_count_and_keeps_the_newest(api, server):
    await make_pool(api)
    await create_guest(api, "kept")
    newest = (await page(api, since=0))["events"][-1]["id"]
    events = hub(server.ctx)
    assert (events.max_count, events.max_age) == (100000, 86400)  # the defaults
    events.max_count = 2
    await events.trim()
    left = await page(api, since=0)
    assert left["oldest"] == newest - 1
    assert left["events"][0]["type"] == "expired"
    assert [e["id"] for e in left["events"][1:]] == [newest - 1, newest]
    events.max_age, events.max_count = 0.0, 100000  # everything old: the newest stays
    await events.trim()
    assert (await page(api, since=0))["oldest"] == newest


def test_event_settings_are_checked():
    good = {"max_age_seconds": 60, "max_count": 10, "poll_seconds": 0.5}
    assert event_settings({"events": good}) == good
    for field, bad in (("max_count", 0), ("poll_seconds", "fast"), ("max_age_seconds", None)):
        with pytest.raises(ValueError, match=f"events.{field}"):
            event_settings({"events": {**good, field: bad}})


@pytest.mark.gen_test(timeout=30)
async def test_migration_steps_are_events(api, server):
    from tests.api.test_migrations import body, two_cells

    g1, _ = await two_cells(api, server)
    start = (await page(api))["cursor"]
    mid = (await api.ok("POST", "/migrations/", body()))["id"]
    move = server.store.guest_move(g1)
    server.store.record_move(g1, move, phase="migrating", percent=50, mode="live")
    server.store.record_move(g1, move, phase="migrating", percent=50, mode="live")  # again
    server.store.record_move(g1, move, phase="done", percent=100, mode="live", done=True)
    events = (await page(api, since=start, kind="Migration"))["events"]
    assert (events[0]["type"], events[0]["name"], events[0]["actor"]) == ("created", mid, ADMIN)
    steps = [(e["payload"]["guest"], e["payload"]["phase"], e["payload"]["percent"])
             for e in events if e["type"] == "progress"]
    assert steps == [(g1, "migrating", 50), (g1, "done", 100)]
    # the guest's move shows in its own stream too: it counts as migrating meanwhile
    guest = (await page(api, since=start, name=g1))["events"]
    assert "migrating" in [e["payload"].get("phase") for e in guest if e["type"] == "status"]


@pytest.mark.gen_test(timeout=30)
async def test_batch_progress_is_the_tasks_event(api, server):
    from tests.api.test_batches import batch_body

    await make_pool(api)
    start = (await page(api))["cursor"]
    task = (await api.ok("POST", "/batch/create_guest/", batch_body(count=2)))["id"]
    guests = {g.id: g.name for g in Guest.select().where(Guest.batch == task)}
    for guest_id in guests:
        mark_created(server, guest_id)
    events = (await page(api, since=start, kind="BatchTask"))["events"]
    assert (events[0]["type"], events[0]["name"]) == ("created", task)
    steps = {e["payload"]["guest"]: e["payload"]["phase"] for e in events
             if e["type"] == "progress"}
    assert steps == dict.fromkeys(guests, "stopped")
    # the guests' own status events say which batch they belong to
    statuses = (await page(api, since=start, kind="Guest"))["events"]
    assert {e["payload"].get("batch") for e in statuses if e["type"] == "status"} == {task}
    bob = await user_session(api, "bob")
    assert (await page(api, bob, since=start, kind="BatchTask"))["events"] == []
