"""The operation log: audit entries for every change made through the API, entries clients
post, queries with limit/start/after/before, deletion.

Routes: GET/POST/DELETE /logs/. Ids are YYYYMMDDHHMMSS + a 3-digit counter, newest first.
"""

from __future__ import annotations

import datetime as dt
import re

import pytest

from state.models import LogEntry
from tests.api.identity_helpers import PASSWORD, login_as, logs
from tests.conftest import ADMIN

TIME = "%Y-%m-%d %H:%M:%S"


def stamp(delta: dt.timedelta = dt.timedelta()) -> str:
    return (dt.datetime.now() + delta).strftime(TIME)


@pytest.mark.gen_test(timeout=30)
async def test_every_change_through_the_api_writes_an_audit_entry(api):
    first = await logs(api)
    assert [e["content"] for e in first["logs"]] == [
        "admin logged in from 127.0.0.1",
        "anonymous initialized the system with administrator admin",
    ]
    changes = [
        ("POST", "/roles/r1", {"menu": ["log"]}, "admin created role r1"),
        ("PUT", "/roles/r1", {"menu": ["log", "user"]}, "admin modified role r1"),
        ("POST", "/user_groups/g1", {"display": "G", "role": ["r1"]},
         "admin created user group g1"),
        ("PUT", "/user_groups/g1", {"display": "G1"}, "admin modified user group g1"),
        ("POST", "/users/u1", {"password": PASSWORD}, "admin created user u1"),
        ("PUT", "/users/u1", {"nick": "U"}, "admin modified user u1"),
        ("POST", "/user_groups/g1/members/u1", None, "admin added u1 to user group g1"),
        ("PUT", "/resource_visibilities/", {}, "admin set visibility of group admin to nothing"),
        ("DELETE", "/user_groups/g1/members/u1", None, "admin removed u1 from user group g1"),
        ("DELETE", "/users/u1", None, "admin deleted user u1"),
        ("DELETE", "/user_groups/g1", None, "admin removed user group g1"),
        ("DELETE", "/roles/r1", None, "admin removed role r1"),
    ]
    for method, path, body, _ in changes:
        await api.ok(method, path, body)
        # reads and refused changes write nothing
        await api.ok("GET", "/roles/")
        await api.ok("GET", "/users/")
        assert (await api.call("POST", "/roles/super", {"menu": []})).code == 409

    data = await logs(api, limit=50)
    assert data["total"] == 2 + len(changes)
    newest_first = list(reversed(changes))
    for entry, (method, path, _, content) in zip(data["logs"], newest_first, strict=False):
        assert entry["content"] == content, (method, path)
        assert entry["user"] == ADMIN and entry["address"] == "127.0.0.1"
        assert entry["resource"] == "/api/v1" + path, (method, path)

    # a login by another user is recorded under its name
    await api.ok("POST", "/users/bob", {"password": PASSWORD})
    await api.ok("POST", "/user_groups/admin/members/bob")
    await login_as(api, "bob")
    newest = (await logs(api, limit=1))["logs"][0]
    assert newest["content"] == "bob logged in from 127.0.0.1" and newest["user"] == "bob"


@pytest.mark.gen_test(timeout=30)
async def test_posted_entries_ids_order_and_paging(api):
    await api.call("DELETE", "/logs/", {"entries": [e["id"] for e in (await logs(api))["logs"]]})
    baseline = (await logs(api))["total"]  # the deletion's own audit entry
    for n in range(25):
        body = {"content": f"entry {n}"} if n % 2 else {"format": "string",
                                                        "content": f"entry {n}"}
        reply = await api.call("POST", "/logs/", body)
        assert (reply.code, reply.message) == (0, "")

    page = await logs(api)  # default limit 20, newest first
    assert page["total"] == baseline + 25
    assert len(page["logs"]) == 20
    contents = [e["content"] for e in page["logs"]]
    assert contents[:3] == ["entry 24", "entry 23", "entry 22"]  # no extra audit line
    ids = [e["id"] for e in page["logs"]]
    assert all(re.fullmatch(r"\d{17}", i) for i in ids), ids
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
    for entry in page["logs"]:
        parsed = dt.datetime.strptime(entry["time"], TIME)
        assert entry["id"][:14] == parsed.strftime("%Y%m%d%H%M%S")
        assert abs(dt.datetime.now() - parsed) < dt.timedelta(minutes=5)

    second = await logs(api, limit=10, start=10)
    assert [e["content"] for e in second["logs"]] == [f"entry {n}" for n in range(14, 4, -1)]
    assert second["total"] == page["total"]
    tail = await logs(api, limit=10, start=page["total"] - 2)
    assert len(tail["logs"]) == 2
    beyond = await logs(api, start=1000)
    assert beyond == {"logs": [], "total": page["total"]}  # [] never null

    for body, words in [({}, "content: is required"), ({"content": ""}, "content"),
                        ({"content": 5}, "content: must be of type string"),
                        ({"content": "x", "format": 1}, "format: must be of type string")]:
        reply = await api.call("POST", "/logs/", body)
        assert reply.code == 400 and words in reply.message, (body, reply.message)
    assert (await logs(api))["total"] == page["total"]


@pytest.mark.gen_test(timeout=30)
async def test_log_query_window_and_bad_parameters(api):
    await api.ok("POST", "/logs/", {"content": "inside"})
    total = (await logs(api))["total"]
    window = await logs(api, after=stamp(-dt.timedelta(minutes=1)),
                        before=stamp(dt.timedelta(minutes=1)))
    assert window["total"] == total and window["logs"][0]["content"] == "inside"
    assert await logs(api, before=stamp(-dt.timedelta(hours=1))) == {"logs": [], "total": 0}
    assert await logs(api, after=stamp(dt.timedelta(hours=1))) == {"logs": [], "total": 0}
    today = dt.date.today()
    by_day = await logs(api, after=today.isoformat(),
                        before=(today + dt.timedelta(days=1)).isoformat())
    assert by_day["total"] == total

    for query, words in [("limit=abc", "limit: 'abc' is not a whole number"),
                         ("limit=0", "limit: must be at least 1"),
                         ("start=-1", "start: must be at least 0"),
                         ("after=yesterday", "after: 'yesterday' is not a time"),
                         ("before=2026-13-40", "before: '2026-13-40' is not a time")]:
        reply = await api.call("GET", "/logs/?" + query)
        assert reply.code == 400 and words in reply.message, (query, reply.message)

    # without after/before: the last 24 hours
    old = dt.datetime.now().replace(microsecond=0) - dt.timedelta(days=2)
    LogEntry.create(id=old.strftime("%Y%m%d%H%M%S") + "000", time=old, content="old news")
    recent = await logs(api, limit=100)
    assert "old news" not in [e["content"] for e in recent["logs"]]
    wide = await logs(api, limit=100, after=(old - dt.timedelta(minutes=1)).strftime(TIME))
    assert wide["total"] == recent["total"] + 1
    assert wide["logs"][-1]["content"] == "old news"


@pytest.mark.gen_test(timeout=30)
async def test_delete_log_entries(api):
    for n in range(4):
        await api.ok("POST", "/logs/", {"content": f"entry {n}"})
    before = await logs(api)
    doomed = [e["id"] for e in before["logs"] if e["content"] in ("entry 1", "entry 2")]
    assert len(doomed) == 2

    reply = await api.call("DELETE", "/logs/", {"entries": doomed})
    assert (reply.code, reply.message) == (0, "")
    after = await logs(api)
    contents = [e["content"] for e in after["logs"]]
    assert "entry 1" not in contents and "entry 2" not in contents
    assert "entry 0" in contents and "entry 3" in contents
    assert contents[0] == "admin deleted 2 log entries"
    assert after["total"] == before["total"] - 2 + 1
    assert not set(doomed) & {e["id"] for e in after["logs"]}

    await api.ok("DELETE", "/logs", {"entries": doomed + ["20000101000000000"]})
    assert (await logs(api))["logs"][0]["content"] == "admin deleted 0 log entries"
    for body, words in [({}, "entries: is required"),
                        ({"entries": "20000101000000000"}, "entries: must be of type array"),
                        ({"entries": [1]}, "entries.0: must be of type string")]:
        reply = await api.call("DELETE", "/logs/", body)
        assert reply.code == 400 and words in reply.message, (body, reply.message)


@pytest.mark.gen_test(timeout=30)
async def test_deleted_entries_stay_gone_even_the_newest(api):
    """Ids are never reused: deleting the newest entries of a second used to hand their
    ids to the next entries (the counter restarted from the highest id left), so a
    deleted id was listed again, now carrying another entry (the deletion's own audit)."""
    for n in range(3):
        await api.ok("POST", "/logs/", {"content": f"entry {n}"})
    before = (await logs(api))["logs"]
    doomed = [e["id"] for e in before]  # every entry listed, the newest included
    reply = await api.call("DELETE", "/logs/", {"entries": doomed})
    assert (reply.code, reply.message, reply.data) == (0, "", "")
    await api.ok("POST", "/logs/", {"content": "after"})
    after = (await logs(api))["logs"]
    assert [e["content"] for e in after] == ["after", f"admin deleted {len(doomed)} log entries"]
    assert not set(doomed) & {e["id"] for e in after}, (doomed, after)
    assert all(e["id"] > max(doomed) for e in after)
