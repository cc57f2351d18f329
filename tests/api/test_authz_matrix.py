"""The authorization matrix, generated from the route table: every (route, method) is sent,
at a moment it would succeed for the administrator, by callers who must be refused, and
each refusal is checked to have changed nothing.

The walk is tests/api/route_walk.py's (the one tests/api/test_envelope.py uses): its
scripted pass builds real fixtures and sends each route's request with real ids and a
valid body; then a sweep sends every (route, method) the script did not reach. Before each
of those requests the same request (path, body, headers) is sent as:

- nobody (no session header): 401;
- an expired session (of a user holding every tag): 401;
- a session holding every menu tag but the one the route declares for this method
  (`tag_for`): 403;
- when the request names a guest, image or batch task of the administrator (path or
  body), a user of another group holding every tag, its group's visibility flags on (a
  group's flags never reach another group's items), and a user of the administrator's own
  group holding every tag, with the group's visibility flags off: 404 (or 403).

After each refusal the store (every table) and the files of the data directory are
compared with a snapshot taken before: a refusal that wrote anything fails. Reads by the
two outsiders that are not refused must not show an id of the administrator's guests,
images or tasks (the audit log aside: it records everyone's changes, for 'log' holders).

The test also pins, from the route table, what needs no session at all (exactly GET and
POST /system/, POST /sessions/, GET /openapi.json (the API's description, nothing of its
content) and the monitor channel websocket, whose one-time channel
id is its credential) and which changes need no menu tag; a route that becomes public or
tagless by mistake fails here. It prints how many (route, method, case) triples it tried.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import tornado.websocket

from api.app import routes
from state.identity import MENU_TAGS
from state.models import ALL_MODELS, BatchTask, ControlReplica, Guest, Image, Lease, Session
from tests.api.route_walk import (
    Walker,
    claim,
    compute,
    fill,
    guests,
    identity,
    images,
    teardown,
    templates_and_policies,
)
from tests.conftest import ADMIN

PASSWORD = "Matr1xPassword"
PUBLIC = {("/api/v1/system/?", "GET"), ("/api/v1/system/?", "POST"),
          ("/api/v1/sessions/?", "POST"), ("/api/v1/openapi.json/?", "GET")}
WEBSOCKETS = {"/api/v1/monitor_channels/([^/]+)/?", "/monitor_channels/([^/]+)/?"}
# Changes any session may make: its own keep-alive and password (the handlers refuse
# other users' without 'user'), a log entry of its own, a search and a dry run (reads).
TAGLESS_CHANGES = {
    ("/api/v1/sessions/([^/]+)/?", "PUT"),
    ("/api/v1/users/([^/]+)/password/?", "PUT"),
    ("/api/v1/logs/?", "POST"),
    ("/api/v1/search/guests/?", "POST"),
    ("/api/v1/guests/([^/]+)/plan/?", "POST"),
}
# Routes of one owned item (guest, image, batch task) or naming some in their body: the
# outsiders' cases must have been tried on each of these (method, route) pairs.
OWNED_PREFIXES = ("/api/v1/guests/(", "/api/v1/instances/(", "/api/v1/media_images/(",
                  "/api/v1/disk_images/(", "/api/v1/media_image_files/(",
                  "/api/v1/disk_image_files/(", "/api/v1/batch/create_guest/(",
                  "/api/v1/batch/delete_guest", "/api/v1/batch/stop_guest",
                  "/api/v1/monitor_channels/?")
AUDIT_LOG = "/api/v1/logs/?"
READS = {"GET"}
SEARCHES = {("/api/v1/search/guests/?", "POST")}

ANONYMOUS, EXPIRED = "no session", "expired session"
OTHER_GROUP, SAME_GROUP = "other group, flags on", "same group, flags off"


# nanod's own liveness rows (state/leases.py): a heartbeat lands every few seconds whatever
# the requests do; they hold nothing a request could change
LIVENESS = (ControlReplica, Lease)


def snapshot(server: Any) -> dict[str, Any]:
    """Every row of every table, and every file of the data directory with its size (the
    audit entries of the requests answered so far written first: api/audit.py)."""
    server.ctx.audit.flush()
    tables = {model.__name__: sorted(map(repr, model.select().tuples()))
              for model in ALL_MODELS if model not in LIVENESS}
    data = Path(server.settings["data_dir"])
    files = sorted((str(p.relative_to(data)), p.stat().st_size)
                   for p in data.rglob("*") if p.is_file())
    return {"tables": tables, "files": files}


def changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    diff = {name: (sorted(set(rows) - set(after["tables"][name])),
                   sorted(set(after["tables"][name]) - set(rows)))
            for name, rows in before["tables"].items() if rows != after["tables"][name]}
    if before["files"] != after["files"]:
        diff["files"] = (before["files"], after["files"])
    return diff


def owned_ids() -> set[str]:
    """Ids of the guests, images and batch tasks there are (all the administrator's)."""
    owners = {row.owner for model in (Guest, Image, BatchTask) for row in model.select()}
    assert owners <= {ADMIN}, owners
    return {row.id for model in (Guest, Image, BatchTask) for row in model.select(model.id)}


class MatrixWalker(Walker):
    """The walk, with the refusal cases tried before each request it sends."""

    def __init__(self, server: Any) -> None:
        super().__init__(server)
        self.handlers = dict(self.table)
        self.armed = False
        self.sessions: dict[str, str] = {}  # case -> session token
        self.tried: Counter[tuple[str, str, str]] = Counter()
        self.requests = 0

    async def send(self, method: str, path: str, body: Any = None, *, session: str | None = None,
                   raw: bytes | None = None, headers: dict[str, str] | None = None
                   ) -> tuple[int, dict[str, Any] | None]:
        if self.armed:
            await self.refusals(method, path, body, raw, headers)
        return await super().send(method, path, body, session=session, raw=raw,
                                   headers=headers)

    def cases(self, pattern: str, method: str, named: bool) -> list[tuple[str, set[int]]]:
        handler = self.handlers[pattern]
        if handler.is_public(method):
            return []  # the public routes are checked on their own
        found = [(ANONYMOUS, {401}), (EXPIRED, {401})]
        tag = handler.tag_for(method)
        if tag:
            found.append((f"without {tag}", {403}))
        if named:
            found += [(OTHER_GROUP, {403, 404}), (SAME_GROUP, {403, 404})]
        return found

    async def refusals(self, method: str, path: str, body: Any, raw: bytes | None,
                       headers: dict[str, str] | None) -> None:
        pattern = self.route_of(path)
        owned = owned_ids()
        text = path + json.dumps(body) + (raw or b"").decode("latin-1")
        named = any(item in text for item in owned)
        before = snapshot(self.server)
        for case, codes in self.cases(pattern, method, named):
            status, doc = await self.request(method, path, body, session=self.sessions[case],
                                             raw=raw, headers=headers)
            self.requests += 1
            what = f"{method} {path} as {case} -> HTTP {status}"
            assert doc is not None, f"{what}: a download, not a refusal"
            assert doc["error_code"] in codes, f"{what}: {doc['error_code']} {doc['message']}"
            after = snapshot(self.server)
            assert after == before, f"{what}: refused but changed {changes(before, after)}"
            self.tried[(pattern, method, case)] += 1
        read = method in READS or (pattern, method) in SEARCHES
        if named or not read or pattern == AUDIT_LOG or self.handlers[pattern].is_public(method):
            return
        for case in (OTHER_GROUP, SAME_GROUP):  # what outsiders read shows nothing of ours
            status, doc = await self.request(method, path, body, session=self.sessions[case],
                                             raw=raw, headers=headers)
            self.requests += 1
            shown = json.dumps(doc["data"]) if doc is not None else ""
            leaked = sorted(item for item in owned if item in shown)
            assert not leaked, f"{method} {path} as {case} shows {leaked}"
            assert snapshot(self.server) == before, f"{method} {path} as {case} changed"
            self.tried[(pattern, method, f"{case}, read")] += 1


async def case_users(w: MatrixWalker) -> None:
    """The callers of the cases, made by the administrator (requests not walked)."""

    async def ok(method: str, path: str, body: Any = None, session: str | None = None) -> Any:
        status, doc = await w.request(method, path, body,
                                      session=w.session if session is None else session)
        assert doc is not None and doc["error_code"] == 0, (method, path, status, doc)
        return doc["data"]

    members = {"matrix-outsider": "matrix-outsiders", "matrix-expired": "matrix-expired",
               "matrix-peer": "admin"}
    await ok("POST", "/roles/matrix-all", {"menu": list(MENU_TAGS)})
    for group in ("matrix-outsiders", "matrix-expired"):
        await ok("POST", f"/user_groups/{group}", {"display": group, "role": ["matrix-all"]})
    for tag in MENU_TAGS:
        name = f"matrix-no-{tag}"
        await ok("POST", f"/roles/{name}", {"menu": [t for t in MENU_TAGS if t != tag]})
        await ok("POST", f"/user_groups/{name}", {"display": name, "role": [name]})
        members[name] = name
    await asyncio.gather(*(ok("POST", f"/users/{user}", {"password": PASSWORD})
                           for user in members))
    for user, group in members.items():
        await ok("POST", f"/user_groups/{group}/members/{user}")

    async def login(user: str) -> str:
        data = await ok("POST", "/sessions/", {"user": user, "password": PASSWORD}, session="")
        return data["session"]

    tokens = dict(zip(members, await asyncio.gather(*(login(u) for u in members)),
                      strict=True))
    w.sessions = {ANONYMOUS: "", EXPIRED: tokens["matrix-expired"],
                  OTHER_GROUP: tokens["matrix-outsider"], SAME_GROUP: tokens["matrix-peer"]}
    for tag in MENU_TAGS:
        w.sessions[f"without {tag}"] = tokens[f"matrix-no-{tag}"]
    # the outsiders' group shows its members each other's items: not the administrator's
    await ok("PUT", "/resource_visibilities/", {"instance_visible": True,
             "media_image_visible": True, "disk_image_visible": True},
             session=tokens["matrix-outsider"])

    # the expired session: its time is up, as if 180 s had passed
    Session.update(expires=time.time() - 60).where(Session.user == "matrix-expired").execute()
    w.server.store.forget_cached_sessions()
    status, doc = await w.request("GET", "/roles/", session=w.sessions[EXPIRED])
    assert doc is not None and doc["error_code"] == 401 and "expired" in doc["message"]


async def closed_after_claim(w: MatrixWalker) -> None:
    """POST /system/ is public only while no user exists: after, it is refused for all,
    with every tag or none, and changes nothing."""
    before = snapshot(w.server)
    body = {"user": "late", "password": PASSWORD, "menu": list(MENU_TAGS)}
    for case, token in [*w.sessions.items(), ("administrator", w.session)]:
        status, doc = await w.request("POST", "/system/", body, session=token)
        assert doc is not None and doc["error_code"] == 403, (case, doc)
        assert "already initialized" in doc["message"]
        assert snapshot(w.server) == before, case
        w.tried[("/api/v1/system/?", "POST", case)] += 1
        w.requests += 1


async def channel_refused(w: MatrixWalker) -> None:
    """The websocket end needs no session: an id that names no channel is closed."""
    for base in (w.base, w.base.removesuffix("/api/v1")):
        url = base.replace("http://", "ws://") + "/monitor_channels/not-a-channel"
        conn = await tornado.websocket.websocket_connect(url)
        assert await conn.read_message() is None
        assert conn.close_code == 4404, (url, conn.close_code, conn.close_reason)
        w.requests += 1


@pytest.mark.gen_test(timeout=300)
async def test_every_route_refuses_every_caller_it_must(server, tmp_path, figure):
    table = routes(server.ctx)
    sockets = {pattern for pattern, handler, _ in table
               if issubclass(handler, tornado.websocket.WebSocketHandler)}
    assert sockets == WEBSOCKETS
    w = MatrixWalker(server)
    public = {(p, m) for p, m in w.all_pairs() if w.handlers[p].is_public(m)}
    assert public == PUBLIC, "public routes changed: " + repr(public ^ PUBLIC)
    tagless = {(p, m) for p, m in w.all_pairs()
               if m not in READS and (p, m) not in PUBLIC and not w.handlers[p].tag_for(m)}
    assert tagless == TAGLESS_CHANGES, "changes needing no tag: " + repr(tagless ^ TAGLESS_CHANGES)

    await claim(w)
    await case_users(w)
    await closed_after_claim(w)
    await channel_refused(w)
    w.armed = True
    await identity(w)
    await w.ok("PUT", "/resource_visibilities/", {})  # the peer's case: flags off
    await compute(w)
    made = await images(w, tmp_path)
    await templates_and_policies(w)
    await guests(w, made)
    await teardown(w, made)
    w.phase = "sweep"
    for pattern, method in w.all_pairs():
        if (pattern, method) not in w.seen:
            await w.send(method, fill(pattern), {})

    # every (route, method) was tried by every caller who must be refused there
    missing = []
    for pattern, method in w.all_pairs():
        handler = w.handlers[pattern]
        if handler.is_public(method):
            continue
        wanted = [ANONYMOUS, EXPIRED]
        if handler.tag_for(method):
            wanted.append(f"without {handler.tag_for(method)}")
        if pattern.startswith(OWNED_PREFIXES):
            wanted += [OTHER_GROUP, SAME_GROUP]
        missing += [(pattern, method, case) for case in wanted
                    if not w.tried[(pattern, method, case)]]
    assert not missing, missing
    # the expired session was refused as expired, not purged as unknown
    assert Session.select().where(Session.user == "matrix-expired").exists()

    database = server.settings["database"].split(":", 1)[0]
    figure(f"authorization matrix ({database}): {len(w.tried)} (route, method, case) "
           f"triples over {len(w.all_pairs())} (route, method) pairs, {w.requests} refused "
           "or filtered requests, each compared with a snapshot of the store")
