"""The route walk shared by the route-table tests (tests/api/test_envelope.py,
tests/api/test_authz_matrix.py): a `Walker` that sends requests to a running nanod, checks
each reply's envelope and records which (route, method) it reached and how, and the
scripted pass that builds fixtures through the API and reaches the success path of nearly
every route.

The route table is walked itself (`api.app.routes`, i.e. every module's ROUTES), so a
route added later is walked without anyone listing it here. The scripted pass, phase by
phase (each an async function of the walker):

- `claim`: POST /system/ and the administrator's login;
- `identity`: a role, a group, a user, members, visibility, sessions, logs;
- `compute`: a storage pool, an address pool with a range, compute pools with
  test-driver cells (`test:///` URIs of files never opened);
- `images`: media and disk images with real files (upload, download, search, sync);
- `templates_and_policies`: a template, a security policy group and its rules;
- `guests`: guests, their changes, snapshots, media, policies, batches;
- `teardown`: every fixture removed again.

Every success's `data` is checked against the schema the route method's contract names
(`@contract(data=...)`, what GET /openapi.json documents).

The reconciler is disabled (the `server` fixture): what it would record (a cell probed
and alive, a guest created, a cell's record removed) is written through the store, as in
tests/api/guest_helpers.py. No libvirt is needed.

Not walked: HEAD (no body by definition; the GET of the same route is checked) and the
websocket end of monitor channels (it answers an upgrade, not JSON).
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import tornado.httpclient
import tornado.web
import tornado.websocket

import specs
from api.app import routes
from api.base import contract_of
from api.openapi import handled_methods
from state.models import Cell
from tests.api.guest_helpers import GIB, guest_body, mark_created, set_cell
from tests.api.test_images import BOUNDARY, make_iso, make_qcow2, multipart
from tests.conftest import ADMIN, ADMIN_PASSWORD

KEYS = {"error_code", "message", "data"}
PASSWORD = "Us3rPassword"
MISSING = "walk-missing"  # fills every path parameter of the sweep: names nothing


def walked_routes(server: Any) -> list[tuple[str, type]]:
    """(pattern, handler) of the application's route table, minus websocket ends."""
    table = [(pattern, handler) for pattern, handler, _ in routes(server.ctx)]
    assert len(table) > 50, "the route table looks empty"
    return [(p, h) for p, h in table if not issubclass(h, tornado.websocket.WebSocketHandler)]


def fill(pattern: str, value: str = MISSING) -> str:
    """A request path for `pattern` (relative to /api/v1) with each group set to `value`."""
    path = re.sub(r"\([^)]*\)", value, pattern.removesuffix("/?"))
    assert re.fullmatch(pattern, path), (pattern, path)
    assert path.startswith("/api/v1/"), pattern
    return path[len("/api/v1"):]


class Walker:
    """Sends requests, checks each reply's envelope and records which (route, method)
    has been exercised, and how."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.base = f"http://127.0.0.1:{server.port}/api/v1"
        self.http = tornado.httpclient.AsyncHTTPClient()
        self.session = ""
        self.table = walked_routes(server)
        self.handlers = dict(self.table)
        self.phase = "script"  # then "sweep", then "anonymous"
        self.current = ""  # "METHOD path" of the request in flight (tests/api/test_store_lane.py)
        self.seen: dict[tuple[str, str], list[tuple[str, int]]] = {}
        self.nothing_routes: set[tuple[str, str]] = set()

    def route_of(self, path: str) -> str:
        full = "/api/v1" + path.split("?", 1)[0]
        for pattern, _ in self.table:  # first match wins, as in Tornado
            if re.fullmatch(pattern, full):
                return pattern
        raise AssertionError(f"no route for {full}")

    async def request(self, method: str, path: str, body: Any = None, *, session: str = "",
                      raw: bytes | None = None, headers: dict[str, str] | None = None
                      ) -> tuple[int, dict[str, Any] | None]:
        """One request as `session`, its envelope checked, nothing recorded; returns (HTTP
        status, envelope), envelope None for a download."""
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if session:
            hdrs["Nano-Session"] = session
        payload = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
        self.current = f"{method} {path}"
        try:
            response = await self.http.fetch(
                self.base + path, method=method, headers=hdrs, raise_error=False,
                body=payload if method in ("POST", "PUT", "PATCH", "DELETE") else None,
                allow_nonstandard_methods=True, request_timeout=60)
        finally:
            self.current = ""
        what = f"{method} {path} -> HTTP {response.code}"
        if method == "GET" and path.split("?")[0].rstrip("/") == "/openapi.json":
            # the OpenAPI document is a document of its own, not the envelope
            assert json.loads(response.body)["openapi"].startswith("3.1"), what
            return response.code, None
        doc = envelope_of(response, what)
        assert doc is None or doc["error_code"] != 500, f"{what}: internal error {doc}"
        return response.code, doc

    async def send(self, method: str, path: str, body: Any = None, *, session: str | None = None,
                   raw: bytes | None = None, headers: dict[str, str] | None = None
                   ) -> tuple[int, dict[str, Any] | None]:
        """One request of the walk (as the walker's session unless `session` is given),
        recorded under its (route, method) with the phase and the outcome."""
        token = self.session if session is None else session
        status, doc = await self.request(method, path, body, session=token, raw=raw,
                                         headers=headers)
        code = 0 if doc is None else doc["error_code"]  # None: a download, a success
        pattern = self.route_of(path)
        self.seen.setdefault((pattern, method), []).append((self.phase, code))
        if doc is not None and code == 0:
            # the reply's data is what the route's contract (and so openapi.json) says
            schema = contract_of(self.handlers[pattern], method).data
            problems = specs.validate(schema, doc["data"])
            assert not problems, (f"{method} {path}: data does not match schema {schema}",
                                  problems[:5])
        return status, doc

    async def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        """A request that must succeed; returns its data."""
        status, doc = await self.send(method, path, body, **kw)
        assert doc is not None and doc["error_code"] == 0, (method, path, status, doc)
        return doc["data"]

    async def nothing(self, method: str, path: str, body: Any = None, **kw: Any) -> None:
        """A write that must succeed with nothing to return: `data` is there, and ""."""
        data = await self.ok(method, path, body, **kw)
        assert data == "", (method, path, data)
        self.nothing_routes.add((self.route_of(path), method))

    def all_pairs(self) -> list[tuple[str, str]]:
        return [(pattern, method) for pattern, handler in self.table
                for method in handled_methods(handler)]


def envelope_of(response: tornado.httpclient.HTTPResponse, what: str) -> dict[str, Any] | None:
    """The reply's envelope, checked: exactly the three keys, with their types."""
    ctype = response.headers.get("Content-Type", "")
    if ctype.startswith("application/octet-stream"):  # a file download
        assert response.code in (200, 206), what
        return None
    assert ctype.startswith("application/json"), (what, ctype, response.body[:200])
    doc = json.loads(response.body)
    assert isinstance(doc, dict) and set(doc) == KEYS, (what, doc)
    assert isinstance(doc["error_code"], int) and isinstance(doc["message"], str), (what, doc)
    if doc["error_code"]:
        assert doc["message"] and doc["data"] is None, (what, doc)
    else:
        assert doc["message"] == "", (what, doc)
    return doc


def observed(name: str) -> None:
    """Record cell `name` probed at its current generation and alive, as the cell
    reconciler would (adding it to a pool waits for that)."""
    row = Cell.get(Cell.name == name)
    Cell.update(observed_generation=row.generation).where(Cell.name == name).execute()
    set_cell(name)


async def forget_cell_when_marked(server: Any, name: str) -> None:
    """What the cell reconciler does once a cell is marked for deletion: drop the record
    (DELETE /cells/{name} waits for it). In a thread, as the reconciler's own: it runs
    while that request is in flight, and the IOLoop touches no database then."""
    def finish_if_marked() -> bool:
        row = Cell.get_or_none(Cell.name == name)
        if row is not None and row.deleting:
            server.store.finish_cell_delete(name)
            return True
        return False

    for _ in range(500):
        if await asyncio.to_thread(finish_if_marked):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"cell {name} was never marked for deletion")


async def upload(walker: Walker, path: str, data: bytes) -> Any:
    return await walker.ok("POST", path, raw=multipart([("image", "f.bin", data)]),
                           headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})


# -- the scripted pass --------------------------------------------------------------------------


async def claim(w: Walker) -> None:
    """The first administrator, and its session for the rest of the walk."""
    await w.nothing("POST", "/system/", {"user": ADMIN, "password": ADMIN_PASSWORD})
    assert (await w.ok("GET", "/system/"))["ready"] is True
    w.session = (await w.ok("POST", "/sessions/", {"user": ADMIN, "password": ADMIN_PASSWORD,
                                                   "nonce": "n"}))["session"]


async def identity(w: Walker) -> None:
    ids = await w.ok("GET", "/sessions/")
    assert ids and all(isinstance(i, str) for i in ids)
    assert [s["id"] for s in await w.ok("GET", "/session_details/")] == ids
    assert (await w.ok("GET", f"/sessions/{w.session}"))["user"] == ADMIN
    await w.nothing("PUT", f"/sessions/{w.session}")

    await w.nothing("POST", "/roles/walk", {"menu": ["log"]})
    await w.nothing("PUT", "/roles/walk", {"menu": ["log", "dashboard"]})
    assert await w.ok("GET", "/roles/walk") == {"menu": ["log", "dashboard"]}
    assert "walk" in await w.ok("GET", "/roles/")
    await w.nothing("POST", "/user_groups/walkers", {"display": "Walkers", "role": ["walk"]})
    await w.nothing("PUT", "/user_groups/walkers", {"display": "Walkers 2"})
    await w.ok("GET", "/user_groups/walkers")
    await w.ok("GET", "/user_groups/")
    assert (await w.ok("PUT", "/user_groups/walkers/quota", {"guests": 5}))["limits"][
        "guests"] == 5
    assert (await w.ok("GET", "/user_groups/walkers/quota"))["usage"]["guests"] == 0
    await w.nothing("DELETE", "/user_groups/walkers/quota", {})
    await w.nothing("POST", "/users/walker", {"password": PASSWORD})
    await w.nothing("PUT", "/users/walker", {"nick": "W", "mail": "w@example.com"})
    assert await w.ok("GET", "/users/walker") == {"nick": "W", "mail": "w@example.com"}
    await w.nothing("PUT", "/users/walker/password", {"old": PASSWORD, "new": PASSWORD + "2"})
    await w.nothing("POST", "/user_groups/walkers/members/walker")
    assert await w.ok("GET", "/user_groups/walkers/members/") == ["walker"]
    assert "walker" in await w.ok("GET", "/users/")
    assert "walker" in await w.ok("GET", "/user_search/?group=walkers")
    await w.ok("GET", "/resource_visibilities/")
    await w.nothing("PUT", "/resource_visibilities/", {"instance_visible": True})

    await w.nothing("POST", "/logs/", {"content": "walking the routes"})
    entry = (await w.ok("GET", "/logs/?limit=1"))["logs"][0]
    assert entry["content"] == "walking the routes"
    await w.nothing("DELETE", "/logs/", {"entries": [entry["id"]]})


async def compute(w: Walker) -> None:
    await w.nothing("POST", "/storage_pools/walk-sp", {"type": "dir", "target": "/srv/walk"})
    await w.nothing("PUT", "/storage_pools/walk-sp", {"type": "dir", "target": "/srv/walk2"})
    assert (await w.ok("GET", "/storage_pools/walk-sp"))["target"] == "/srv/walk2"
    await w.ok("GET", "/storage_pools/")

    await w.nothing("POST", "/address_pools/walk-net", {"gateway": "172.16.30.254",
                                                         "dns": ["8.8.8.8"]})
    await w.nothing("PUT", "/address_pools/walk-net", {"dns": ["1.1.1.1"]})
    ranges = "/address_pools/walk-net/internal/ranges"
    await w.nothing("POST", f"{ranges}/172.16.30.1", {"end": "172.16.30.9",
                                                      "netmask": "255.255.255.0"})
    await w.ok("GET", f"{ranges}/172.16.30.1")
    assert len(await w.ok("GET", ranges)) == 1
    await w.ok("GET", "/address_pools/walk-net")
    await w.ok("GET", "/address_pools/")

    await w.nothing("POST", "/compute_pools/walk", {"storage": "", "network": "",
                                                     "failover": False})
    await w.nothing("PUT", "/compute_pools/walk", {"enabled": True})
    await w.nothing("POST", "/compute_pools/walk-2", {})
    await w.ok("GET", "/compute_pools/walk")
    await w.ok("GET", "/compute_pools/")
    for cell in ("walk-a", "walk-b"):
        await w.nothing("POST", f"/cells/{cell}", {"libvirt_uri": f"test:///none/{cell}.xml",
                                                   "virt_type": "qemu"})
        observed(cell)
    await w.nothing("PUT", "/cells/walk-a", {"storage_path": "/var/lib/nano/walk"})
    observed("walk-a")
    await w.ok("GET", "/cells/walk-a")
    assert len(await w.ok("GET", "/cells/")) == 2
    assert len(await w.ok("GET", "/compute_pool_cells/")) == 2
    await w.nothing("POST", "/compute_pool_cells/walk/walk-a", {})
    await w.nothing("POST", "/compute_pool_cells/walk-2/walk-b", {})
    await w.nothing("PUT", "/compute_pool_cells/walk/walk-a", {"enable": True})
    await w.ok("GET", "/compute_pool_cells/walk/walk-a")
    assert [c["name"] for c in await w.ok("GET", "/compute_pool_cells/walk")] == ["walk-a"]
    await w.ok("GET", "/compute_cell_status/walk/walk-a/storages")
    await w.nothing("PUT", "/compute_cell_status/walk-2/walk-b/storages",
                    {"default": "/var/lib/nano/walk-b"})
    await w.ok("GET", "/compute_zone_status/")
    await w.ok("GET", "/compute_pool_status/")
    await w.ok("GET", "/compute_pool_status/walk")
    await w.ok("GET", "/compute_cell_status/walk")
    await w.ok("GET", "/compute_cell_status/walk/walk-a")


async def images(w: Walker, tmp_path: Any) -> dict[str, str]:
    made = {}
    for kind, data in (("media", make_iso()), ("disk", make_qcow2(tmp_path))):
        image_id = (await w.ok("POST", f"/{kind}_images/", {"name": f"walk-{kind}",
                                                            "tags": ["walk"]}))["id"]
        assert (await w.ok("GET", f"/{kind}_images/{image_id}"))["created"] is False
        await w.nothing("PUT", f"/{kind}_images/{image_id}", {"description": "walked"})
        assert (await upload(w, f"/{kind}_images/{image_id}/file/", data))["size"] == len(data)
        assert (await w.ok("GET", f"/{kind}_images/{image_id}"))["created"] is True
        assert (await w.send("GET", f"/{kind}_images/{image_id}/file/"))[1] is None
        assert (await w.send("GET", f"/{kind}_image_files/{image_id}"))[1] is None
        await upload(w, f"/{kind}_image_files/{image_id}", data)
        assert len(await w.ok("GET", f"/{kind}_image_search/?tags=walk")) == 1
        assert len(await w.ok("GET", f"/{kind}_images/")) == 1
        assert (await w.ok("PATCH", f"/{kind}_images/", {}))["imported"] == []
        made[kind] = image_id
    spare = (await w.ok("POST", "/media_images/", {"name": "walk-spare"}))["id"]
    await w.nothing("DELETE", f"/media_images/{spare}", {})
    return made


async def templates_and_policies(w: Walker) -> None:
    template = {"name": "walk-t", "admin": "root", "operating_system": "linux",
                "disk": "scsi", "network": "virtio", "display": "vga", "control": "vnc",
                "usb": "", "tablet": ""}
    tid = (await w.ok("POST", "/templates/", template))["id"]
    await w.nothing("PUT", f"/templates/{tid}", {**template, "name": "walk-t2"})
    assert (await w.ok("GET", f"/templates/{tid}"))["name"] == "walk-t2"
    assert tid in [t["id"] for t in await w.ok("GET", "/templates/")]
    await w.nothing("DELETE", f"/templates/{tid}", {})

    gid = (await w.ok("POST", "/security_policy_groups/", {"name": "walk-pg"}))["id"]
    await w.nothing("PUT", f"/security_policy_groups/{gid}", {"description": "walked"})
    await w.ok("GET", f"/security_policy_groups/{gid}")
    await w.ok("GET", "/security_policy_groups/")
    await w.ok("GET", "/search/security_policy_groups/?enabled_only=false")
    rules = f"/security_policy_groups/{gid}/rules"
    await w.nothing("POST", rules, {"action": "accept", "protocol": "tcp", "to_port": 22})
    await w.nothing("POST", rules, {"action": "accept", "protocol": "icmp"})
    await w.nothing("PUT", f"{rules}/1", {"action": "reject", "protocol": "udp", "to_port": 53})
    await w.nothing("PUT", f"{rules}/1/order", {"direction": "up"})
    assert len(await w.ok("GET", rules)) == 2
    await w.nothing("DELETE", f"{rules}/0", {})
    await w.nothing("DELETE", f"/security_policy_groups/{gid}", {})


async def guests(w: Walker, made: dict[str, str]) -> None:
    gid = (await w.ok("POST", "/guests/", guest_body("walk-g", pool="walk")))["id"]
    spare = (await w.ok("POST", "/guests/", guest_body("walk-spare", pool="walk")))["id"]
    mark_created(w.server, gid)
    mark_created(w.server, spare)
    status, doc = await w.send("POST", "/monitor_channels/", {"guest": gid})
    assert doc is not None and doc["error_code"] == 409 and "not running" in doc["message"]
    await w.ok("GET", f"/guests/{gid}")
    await w.ok("GET", f"/instances/{gid}")
    assert (await w.ok("POST", f"/guests/{gid}/plan", {"cores": 4}))
    await w.nothing("PUT", f"/guests/{gid}/auto_start", {"enable": True})
    await w.nothing("PUT", f"/guests/{gid}/cores", {"cores": 1})
    await w.nothing("PUT", f"/guests/{gid}/memory", {"memory": GIB})
    await w.nothing("PUT", f"/guests/{gid}/disks/resize/0", {"size": 20 * GIB})
    await w.nothing("PUT", f"/guests/{gid}/system", {"from_image": made["disk"]})
    await w.nothing("PUT", f"/guests/{gid}/name", {"name": "walk-g2"})
    await w.nothing("PUT", f"/guests/{gid}/qos/cpu", {"priority": "high"})
    await w.nothing("PUT", f"/guests/{gid}/qos/disk", {"read_speed": 1 << 20})
    await w.nothing("PUT", f"/guests/{gid}/qos/network", {"receive_speed": 1 << 20})
    await w.nothing("PUT", f"/guests/{gid}/monitor/secret")
    await w.ok("GET", f"/guests/{gid}/auth")
    assert (await w.ok("PUT", f"/guests/{gid}/auth", {}))["password"]
    await w.nothing("PUT", f"/guests/{gid}/disks/shrink/0", {})
    await w.nothing("POST", f"/instances/{gid}", {})
    w.server.store.record_guest_observed(gid, phase="running", observed={"running": True})
    await w.nothing("DELETE", f"/instances/{gid}", {})
    await w.ok("GET", "/guest_search/?pool=walk")
    assert (await w.ok("POST", "/search/guests/", {}))["total"] == 2
    assert len(await w.ok("GET", "/instance_status/walk")) == 2
    assert len(await w.ok("GET", "/instance_status/walk/walk-a")) == 2

    snapshots = f"/instances/{spare}/snapshots/"
    await w.nothing("POST", snapshots, {"name": "s1"})
    assert list(await w.ok("GET", snapshots)) == ["s1"]
    await w.ok("GET", snapshots + "s1")
    await w.nothing("PUT", snapshots, {"target": "s1"})
    await w.nothing("DELETE", snapshots + "s1", {})
    w.server.store.record_guest_observed(spare, phase="running", observed={"running": True})
    await w.nothing("POST", f"/instances/{spare}/media", {"source": made["media"]})
    await w.nothing("DELETE", f"/instances/{spare}/media", {})

    policy = f"/guests/{gid}/security_policy"
    await w.ok("GET", policy)
    await w.nothing("PUT", f"{policy}/default_action", {"action": "reject"})
    await w.nothing("POST", f"{policy}/rules", {"action": "accept", "protocol": "tcp",
                                                "to_port": 22})
    await w.nothing("POST", f"{policy}/rules", {"action": "accept", "protocol": "icmp"})
    await w.nothing("PUT", f"{policy}/rules/0", {"action": "accept", "protocol": "tcp",
                                                 "to_port": 2222})
    await w.nothing("PUT", f"{policy}/rules/0/order", {"direction": "down"})
    await w.nothing("DELETE", f"{policy}/rules/1", {})

    task = (await w.ok("POST", "/batch/stop_guest/", {"guest": [spare]}))["id"]
    await w.ok("GET", f"/batch/stop_guest/{task}")
    task = (await w.ok("POST", "/batch/create_guest/", {
        "name_rule": "order", "name_prefix": "walk-b", "count": 1, "pool": "walk",
        "cores": 1, "memory": GIB, "disks": [GIB]}))["id"]
    await w.ok("GET", f"/batch/create_guest/{task}")
    task = (await w.ok("POST", "/batch/delete_guest/", {"guest": [spare], "force": True}))["id"]
    await w.ok("GET", f"/batch/delete_guest/{task}")
    await w.nothing("DELETE", f"/guests/{gid}", {"force": True})
    await w.ok("GET", "/resource_status/")


async def teardown(w: Walker, made: dict[str, str]) -> None:
    for kind, image_id in made.items():
        await w.nothing("DELETE", f"/{kind}_images/{image_id}", {})
    await w.nothing("DELETE", "/address_pools/walk-net/internal/ranges/172.16.30.1", {})
    await w.nothing("DELETE", "/address_pools/walk-net", {})
    await w.nothing("DELETE", "/storage_pools/walk-sp")
    await w.nothing("DELETE", "/compute_pool_cells/walk-2/walk-b", {})
    await asyncio.gather(w.nothing("DELETE", "/cells/walk-b"),
                         forget_cell_when_marked(w.server, "walk-b"))
    await w.nothing("DELETE", "/compute_pools/walk-2")
    await w.nothing("DELETE", "/user_groups/walkers/members/walker")
    await w.nothing("DELETE", "/users/walker")
    await w.nothing("DELETE", "/user_groups/walkers")
    await w.nothing("DELETE", "/roles/walk")


async def scripted_pass(w: Walker, tmp_path: Any) -> None:
    """Every phase of the scripted pass, in order, from the claim to the teardown."""
    await claim(w)
    await identity(w)
    await compute(w)
    made = await images(w, tmp_path)
    await templates_and_policies(w)
    await guests(w, made)
    await teardown(w, made)
