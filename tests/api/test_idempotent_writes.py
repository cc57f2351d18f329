"""Idempotent creates (`Idempotency-Key`) and conditional writes (`ETag`, `If-Match`)
against a real nanod, on SQLite and PostgreSQL (README "Retries and concurrent edits").

The timed-out client is real: another connection holds the database (SQLite's write lock,
or a PostgreSQL table lock on the guests) so the create cannot finish, the client gives up
after half a second and retries with the same key while the first request still waits.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import tornado.httpclient

from api.app import routes
from api.base import NanoHandler
from nanod.client import ClientConfig, NanoClient
from nanod.manifests import Document, Outcome, Planner, execute
from state.conditional import RESOURCES, ROUTE_SEGMENTS
from state.db import MIGRATIONS, close_database, open_database
from state.models import Cell, Guest, IdempotencyKey, SchemaVersion, Template
from state.store import Store
from tests.api.guest_helpers import guest_body, make_pool
from tests.api.test_images import create as create_image
from tests.api.test_restart import Nanod, free_port
from tests.conftest import ADMIN, ADMIN_PASSWORD, Api

POOL = {"storage": "", "network": "", "failover": False}


# POST routes that make nothing a retry could duplicate, or whose reply must not be kept
NOT_CREATING = {
    "/api/v1/system/?": "claims a fresh nanod once; public (there is no caller yet)",
    "/api/v1/sessions/?": "a login: public, and its reply is a session token, never stored",
    "/api/v1/search/guests/?": "a read",
    "/api/v1/guests/([^/]+)/plan/?": "a dry run",
    "/api/v1/instances/([^/]+)/?": "start: a desired power state, the same when repeated",
    "/api/v1/instances/([^/]+)/media/?": "insert media: desired state, the same when repeated",
    "/api/v1/media_images/([^/]+)/file/?": "an upload replaces the file of an image",
    "/api/v1/media_image_files/([^/]+)/?": "an upload replaces the file of an image",
    "/api/v1/disk_images/([^/]+)/file/?": "an upload replaces the file of an image",
    "/api/v1/disk_image_files/([^/]+)/?": "an upload replaces the file of an image",
    "/api/v1/monitor_channels/?": "its reply holds a one-time console secret, never stored; "
                                  "a retry opens another channel, which expires unused",
}


def test_every_creating_post_takes_a_key_and_every_resource_route_is_known():
    """From the route table: a new POST route must declare `creates` or say here why not;
    a declared resource is a kind the store can compare, keyed by path arguments."""
    seen = set()
    for pattern, handler, _ in routes(None):  # type: ignore[arg-type]
        if not isinstance(handler, type) or not issubclass(handler, NanoHandler):
            continue
        if handler.post is not NanoHandler.post:
            seen.add(pattern)
            assert handler.creates != (pattern in NOT_CREATING), pattern
        else:
            assert not handler.creates, f"{pattern}: creates without a POST"
        if handler.resource is not None:
            assert handler.resource.kind in RESOURCES, pattern
            groups = pattern.count("([^/]+)")
            assert all(i < groups for i in handler.resource.args), pattern
            assert handler.get is not NanoHandler.get or handler.put is not NanoHandler.put \
                or handler.delete is not NanoHandler.delete, pattern
    assert set(NOT_CREATING) <= seen
    assert set(ROUTE_SEGMENTS) == set(RESOURCES)  # where each kind's changes are audited


def key(value: str) -> dict[str, str]:
    return {"Idempotency-Key": value}


@contextmanager
def database_held(url: str) -> Iterator[None]:
    """Another client of the database that keeps nanod from creating guests until the
    block ends: SQLite's write lock (BEGIN IMMEDIATE), or on PostgreSQL a lock on the
    guest table that lets reads through and holds inserts."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.split("://", 1)[1], isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    import psycopg2

    pg = psycopg2.connect(url)
    try:
        with pg.cursor() as cur:
            cur.execute("LOCK TABLE guest IN SHARE ROW EXCLUSIVE MODE")
        yield
    finally:
        pg.rollback()
        pg.close()


async def post_with_timeout(api: Api, path: str, body: Any, headers: dict[str, str],
                            timeout: float) -> None:
    """A client that gives up after `timeout` seconds (the request stays with nanod)."""
    with pytest.raises(tornado.httpclient.HTTPClientError) as caught:
        await tornado.httpclient.AsyncHTTPClient().fetch(
            api.base + path, method="POST", body=json.dumps(body), request_timeout=timeout,
            headers={"Content-Type": "application/json", "Nano-Session": api.session,
                     **headers})
    assert caught.value.code == 599  # timed out, no answer


async def guests_named(api: Api, name: str) -> list[dict]:
    rows = await api.ok("GET", "/guest_search/?pool=pool1")
    return [row for row in rows if row["name"] == name]


@pytest.mark.gen_test(timeout=120)
async def test_a_create_retried_after_a_client_timeout_makes_one_guest(api, server, database):
    await make_pool(api)
    body = guest_body("once")
    with database_held(database):
        await post_with_timeout(api, "/guests/", body, key("create-once"), timeout=0.5)
        retry = asyncio.ensure_future(api.call("POST", "/guests/", body,
                                               headers=key("create-once")))
        await asyncio.sleep(0.5)  # let the retry reach nanod while the first still waits
        assert not retry.done()
    first = await retry
    assert first.code == 0 and first.status == 202, first.message
    again = await api.call("POST", "/guests/", body, headers=key("create-once"))
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert (again.status, again.data) == (202, first.data)
    assert [g["id"] for g in await guests_named(api, "once")] == [first.data["id"]]
    assert Guest.select().where(Guest.name == "once").count() == 1


@pytest.mark.gen_test(timeout=120)
async def test_concurrent_creates_with_one_key_make_one_guest(api, server):
    await make_pool(api)
    body = guest_body("twin")
    replies = await asyncio.gather(*(api.call("POST", "/guests/", body, headers=key("k-twin"))
                                     for _ in range(4)))
    assert {r.code for r in replies} == {0}, [r.message for r in replies]
    assert len({r.data["id"] for r in replies}) == 1
    assert len(await guests_named(api, "twin")) == 1


@pytest.mark.gen_test(timeout=60)
async def test_a_coroutine_create_claims_first_and_keeps_its_reply(api):
    """POST /users/{name} awaits its password hash between store calls: its key is claimed
    before and its reply kept after; retries sent meanwhile wait for it."""
    body = {"password": "Us3rPassword", "nick": "Bob"}
    replies = await asyncio.gather(*(api.call("POST", "/users/bob", body, headers=key("u1"))
                                     for _ in range(3)))
    assert [r.code for r in replies] == [0, 0, 0], [r.message for r in replies]
    assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in replies) == 2
    other = await api.call("POST", "/users/bob", {**body, "nick": "Robert"}, headers=key("u1"))
    assert other.code == 409 and "Idempotency-Key" in other.message
    assert await api.ok("GET", "/users/") == [ADMIN, "bob"]
    assert (await api.ok("GET", "/users/bob"))["nick"] == "Bob"
    # a failed first request frees its key here too
    weak = await api.call("POST", "/users/carol", {"password": "x"}, headers=key("u2"))
    assert weak.code == 400
    assert (await api.call("POST", "/users/carol", body, headers=key("u2"))).code == 0


@pytest.mark.gen_test(timeout=60)
async def test_same_key_other_body_is_refused_and_keys_are_per_caller_and_route(api):
    assert (await api.call("POST", "/compute_pools/p1", POOL, headers=key("k1"))).code == 0
    other = await api.call("POST", "/compute_pools/p1", {**POOL, "enabled": False},
                           headers=key("k1"))
    assert other.code == 409 and "Idempotency-Key" in other.message, other.message
    assert "another body" in other.message
    assert (await api.ok("GET", "/compute_pools/p1"))["enabled"] is True
    # the same body with its keys in another order and other spacing is the same request
    same = await api.call("POST", "/compute_pools/p1", raw=b'{"failover": false, '
                          b'"network": "",  "storage": ""}', headers=key("k1"))
    assert (same.code, same.headers.get("Idempotent-Replayed")) == (0, "true")
    # another route: the key means nothing there
    second = await api.call("POST", "/compute_pools/p2", POOL, headers=key("k1"))
    assert second.code == 0 and second.headers.get("Idempotent-Replayed") is None
    assert sorted(p["name"] for p in await api.ok("GET", "/compute_pools/")) == ["p1", "p2"]


@pytest.mark.gen_test(timeout=60)
async def test_an_error_frees_the_key_and_headers_are_refused_where_not_honoured(api):
    bad = await api.call("POST", "/compute_pools/p1", {"failover": "yes"}, headers=key("k2"))
    assert bad.code == 400
    # the failed request made nothing: the same key may carry the corrected body
    assert (await api.call("POST", "/compute_pools/p1", POOL, headers=key("k2"))).code == 0
    refused = [
        await api.call("PUT", "/compute_pools/p1", POOL, headers=key("k3")),
        await api.call("POST", "/search/guests", {}, headers=key("k4")),
        await api.call("GET", "/compute_pools/p1", headers={"If-Match": '"1"'}),
        await api.call("POST", "/templates/", {}, headers={"If-Match": '"1"'}),
        await api.call("PUT", "/compute_pools/p1", POOL, headers={"If-Match": "1"}),
        await api.call("PUT", "/compute_pools/p1", POOL, headers={"If-Match": 'W/"1"'}),
        await api.call("POST", "/compute_pools/p3", POOL, headers=key("")),
    ]
    assert [r.code for r in refused] == [400] * len(refused), [r.message for r in refused]
    assert "Idempotency-Key" in refused[0].message and "If-Match" in refused[2].message
    assert sorted(p["name"] for p in await api.ok("GET", "/compute_pools/")) == ["p1"]
    # routes without a generation carry no ETag at all (none a client could send back)
    roles = await api.call("GET", "/roles/")
    assert roles.code == 0 and "ETag" not in roles.headers


@pytest.mark.gen_test(timeout=60)
async def test_etag_follows_the_generation_and_a_stale_if_match_changes_nothing(api, server):
    await api.ok("POST", "/compute_pools/p1", POOL)
    read = await api.call("GET", "/compute_pools/p1")
    assert read.headers["ETag"] == '"1"'
    shape = read.data
    fresh = await api.call("PUT", "/compute_pools/p1", {**POOL, "enabled": False},
                           headers={"If-Match": '"1"'})
    assert fresh.code == 0 and fresh.headers["ETag"] == '"2"'
    again = await api.call("GET", "/compute_pools/p1")
    assert again.headers["ETag"] == '"2"' and set(again.data) == set(shape)

    stale = await api.call("PUT", "/compute_pools/p1", POOL, headers={"If-Match": '"1"'})
    assert (stale.status, stale.code) == (200, 409)
    assert "If-Match" in stale.message and "generation 2" in stale.message, stale.message
    assert f"by {ADMIN}" in stale.message  # who made the change it missed
    strict = await api.call("DELETE", "/compute_pools/p1",
                            headers={"If-Match": '"1"', "Prefer": "return=strict-http"})
    assert (strict.status, strict.code, strict.data) == (412, 409, None)
    after = await api.call("GET", "/compute_pools/p1")
    assert (after.data["enabled"], after.headers["ETag"]) == (False, '"2"')
    # any of several tags, or *, matches
    assert (await api.call("PUT", "/compute_pools/p1", POOL,
                           headers={"If-Match": '"7", "2"'})).code == 0
    assert (await api.call("DELETE", "/compute_pools/p1", headers={"If-Match": "*"})).code == 0
    assert await api.ok("GET", "/compute_pools/") == []

    # templates too (their generation came with these headers)
    tid = (await api.ok("GET", "/templates/"))[0]["id"]
    template = await api.call("GET", f"/templates/{tid}")
    assert template.headers["ETag"] == '"1"'
    body = {k: v for k, v in template.data.items()
            if k not in ("id", "created_time", "modified_time")}
    changed = await api.call("PUT", f"/templates/{tid}", {**body, "admin": "ops"},
                             headers={"If-Match": '"1"'})
    assert (changed.code, changed.headers["ETag"]) == (0, '"2"')
    stale = await api.call("PUT", f"/templates/{tid}", body, headers={"If-Match": '"1"'})
    assert stale.code == 409 and "generation 2" in stale.message
    assert (await api.ok("GET", f"/templates/{tid}"))["admin"] == "ops"


@pytest.mark.gen_test(timeout=60)
async def test_guests_cells_and_images_refuse_a_stale_if_match(api, server):
    await make_pool(api)
    gid = (await api.call("POST", "/guests/", guest_body("g1"))).data["id"]
    read = await api.call("GET", f"/guests/{gid}")
    tag = read.headers["ETag"]
    assert tag == f'"{Guest.get_by_id(gid).generation}"'
    await api.ok("PUT", f"/guests/{gid}/cores", {"cores": 4}, headers={"If-Match": tag})
    newer = (await api.call("GET", f"/guests/{gid}")).headers["ETag"]
    assert newer != tag
    stale = await api.call("PUT", f"/guests/{gid}/memory", {"memory": 4 << 30},
                           headers={"If-Match": tag})
    assert stale.code == 409 and "If-Match" in stale.message
    assert Guest.get_by_id(gid).spec["memory"] == 2 << 30
    assert (await api.call("GET", f"/guests/{gid}")).headers["ETag"] == newer
    assert (await api.call("DELETE", f"/guests/{gid}", {}, headers={"If-Match": tag})).code \
        == 409
    assert Guest.get_by_id(gid).deleting is False

    # a coroutine route (the cell delete waits for the reconciler) compares the same way
    await api.ok("POST", "/cells/spare", {"libvirt_uri": "test:///nonexistent/spare.xml",
                                          "address": "10.0.0.9"})
    cell_tag = (await api.call("GET", "/cells/spare")).headers["ETag"]
    await api.ok("PUT", "/cells/spare", {"address": "10.0.0.10"})
    assert (await api.call("DELETE", "/cells/spare",
                           headers={"If-Match": cell_tag})).code == 409
    assert Cell.get(Cell.name == "spare").deleting is False

    image_id = await create_image(api, "media", "cd")
    image = await api.call("GET", f"/media_images/{image_id}")
    assert image.headers["ETag"].startswith('"')
    gone = await api.call("DELETE", f"/media_images/{image_id}", headers={"If-Match": '"99"'})
    assert gone.code == 409
    assert (await api.call("GET", f"/media_images/{image_id}")).code == 0
    assert (await api.call("DELETE", f"/media_images/{image_id}",
                           headers={"If-Match": image.headers["ETag"]})).code == 0


NET = {"gateway": "172.16.3.254", "dns": ["8.8.8.8"]}


def _apply_stale(url: str) -> tuple[Outcome, str]:
    """`nanod apply`'s own planner and executor: plan (reads the address pool and its
    ETag), then another operator changes the pool, then the apply carries out its plan."""
    client = NanoClient(ClientConfig(url, ADMIN, ADMIN_PASSWORD))
    doc = Document("AddressPool", "net", "present", {**NET, "dns": ["1.1.1.1"]},
                   "test.yaml#1", Path("."))
    planner = Planner(client, [doc])
    planned = planner.plan(doc)
    assert planned.found is not None and planned.found.etag == '"1"'
    assert [a.after for a in planned.actions] == [{"dns": ["1.1.1.1"]}]
    other = NanoClient(ClientConfig(url, ADMIN, ADMIN_PASSWORD))
    other.ok("PUT", "/address_pools/net", {**NET, "dns": ["9.9.9.9"]})
    return execute(client, planner, planned)


@pytest.mark.gen_test(timeout=60)
async def test_apply_refuses_to_overwrite_a_change_made_since_it_read(api, server):
    await api.ok("POST", "/address_pools/net", NET)
    loop = asyncio.get_running_loop()
    outcome, what = await loop.run_in_executor(
        None, _apply_stale, f"http://127.0.0.1:{server.port}")
    assert outcome is Outcome.FAILED
    assert "If-Match" in what and "generation 2" in what and f"by {ADMIN}" in what, what
    # the other operator's change stands
    assert (await api.ok("GET", "/address_pools/net"))["dns"] == ["9.9.9.9"]


def test_an_older_store_gets_keys_and_template_generations(database):
    """Schema migration 2 on a store made before it: the idempotency table appears and
    the templates already there start at generation 1."""
    handle = open_database(database)
    Store().ensure_default_templates()
    handle.execute_sql('ALTER TABLE "template" DROP COLUMN "generation"')
    handle.drop_tables([IdempotencyKey])
    SchemaVersion.delete().where(SchemaVersion.version >= 2).execute()
    close_database()
    handle = open_database(database)
    assert [r.version for r in SchemaVersion.select()][-1] == len(MIGRATIONS)
    assert {t.generation for t in Template.select()} == {1}
    assert IdempotencyKey.select().count() == 0


def _apply_stale_guest(url: str) -> tuple[Outcome, str]:
    client = NanoClient(ClientConfig(url, ADMIN, ADMIN_PASSWORD))
    doc = Document("Guest", "g1", "present", {"pool": "pool1", "cores": 4},
                   "test.yaml#1", Path("."))
    planner = Planner(client, [doc])
    planned = planner.plan(doc)
    assert planned.found is not None and planned.found.etag, planned.error
    assert [a.after for a in planned.actions] == [{"cores": 4}]
    other = NanoClient(ClientConfig(url, ADMIN, ADMIN_PASSWORD))
    other.ok("PUT", f"/guests/{planned.found.id}/memory", {"memory": 4 << 30})
    return execute(client, planner, planned)


@pytest.mark.gen_test(timeout=60)
async def test_apply_refuses_a_guest_update_after_another_change(api, server):
    await make_pool(api)
    gid = (await api.ok("POST", "/guests/", guest_body("g1")))["id"]
    loop = asyncio.get_running_loop()
    outcome, what = await loop.run_in_executor(
        None, _apply_stale_guest, f"http://127.0.0.1:{server.port}")
    assert outcome is Outcome.FAILED
    assert "If-Match" in what and f"by {ADMIN}" in what and "memory" in what, what
    spec = Guest.get_by_id(gid).spec
    assert (spec["cores"], spec["memory"]) == (2, 4 << 30)


@pytest.fixture
def nanod(tmp_path, database):
    pg = database if database.startswith("postgres") else None
    daemon = Nanod(tmp_path / "data", free_port(), pg)
    yield daemon
    daemon.kill()


@pytest.mark.gen_test(timeout=120)
async def test_keys_hold_across_a_restart(nanod):
    await nanod.start()
    api = Api(nanod.url)
    await api.ok("POST", "/system/", {"user": ADMIN, "password": ADMIN_PASSWORD}, session="")
    await api.login()
    first = await api.call("POST", "/roles/ops", {"menu": ["log"]}, headers=key("role-ops"))
    assert first.code == 0
    assert await nanod.stop() == 0
    await nanod.start()
    await api.login()
    again = await api.call("POST", "/roles/ops", {"menu": ["log"]}, headers=key("role-ops"))
    assert (again.code, again.headers.get("Idempotent-Replayed")) == (0, "true")
    other = await api.call("POST", "/roles/ops", {"menu": ["user"]}, headers=key("role-ops"))
    assert other.code == 409 and "Idempotency-Key" in other.message
    assert await api.ok("GET", "/roles/ops") == {"menu": ["log"]}
