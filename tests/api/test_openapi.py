"""GET /api/v1/openapi.json: the OpenAPI 3.1 document generated from the route table and
the schemas of specs/api (api/openapi.py), and the one declaration it is made from: every
route method's `@contract` (api/base.py), which `NanoHandler.body()` validates with.

Fails when a route method has no contract, when a method that takes a body (POST, PUT,
PATCH, DELETE) declares no request schema, when one has no reply schema, when the code
reads a body its contract does not declare (or declares one it never reads), and when the
served document leaves out a route, a method, the session scheme or the extension marks.
That every success's `data` matches its declared schema is checked on every route by
tests/api/route_walk.py (tests/api/test_envelope.py).
"""

from __future__ import annotations

import inspect
import json
import re

import pytest
import tornado.httpclient
import tornado.websocket

import specs
from api.app import routes
from api.base import DOCUMENT, DOWNLOAD, UPLOAD, contract_of
from api.openapi import build_document, handled_methods, openapi_path

BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def table() -> list[tuple[str, type, str]]:
    return [(p, h, m) for p, h, _ in routes(None)
            if not issubclass(h, tornado.websocket.WebSocketHandler)
            for m in handled_methods(h)]


def test_every_route_method_declares_its_body_and_reply():
    rows = table()
    assert len(rows) > 150
    missing = []
    for pattern, handler, method in rows:
        try:
            declared = contract_of(handler, method)
        except KeyError as exc:
            missing.append(str(exc))
            continue
        where = f"{method} {pattern} ({handler.__name__})"
        if declared.data not in (DOWNLOAD, DOCUMENT):
            specs.schema(declared.data)  # a KeyError names a reply schema not in specs/api
        if method in BODY_METHODS:
            assert declared.body is not None, f"{where}: no request body schema"
        if declared.body not in (None, UPLOAD):
            specs.schema(declared.body)
        # the code reads the body its contract declares, and only then
        source = inspect.getsource(inspect.unwrap(getattr(handler, method.lower())))
        reads = "self.body()" in source
        if declared.body is None or declared.body == UPLOAD:
            assert not reads, f"{where}: reads a JSON body its contract does not declare"
        else:
            assert reads, f"{where}: declares body {declared.body} but never reads it"
    assert not missing, missing


def test_the_document_covers_the_route_table():
    doc = build_document(routes(None))
    assert doc["openapi"] == "3.1.0"
    assert doc["components"]["securitySchemes"]["NanoSession"] == {
        "type": "apiKey", "in": "header", "name": "Nano-Session",
        "description": "the session id from POST /sessions/"}
    count = 0
    for pattern, handler, method in table():
        names = list(inspect.signature(getattr(handler, method.lower())).parameters)[1:]
        path = openapi_path(pattern, names[:re.compile(pattern).groups])
        op = doc["paths"][path][method.lower()]
        count += 1
        declared = contract_of(handler, method)
        assert (op.get("security") == []) == handler.is_public(method), path
        if declared.body not in (None, UPLOAD):
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            name = ref.rsplit("/", 1)[1]
            assert name == declared.body
            # the documented schema is the one body() validates with
            assert json.dumps(doc["components"]["schemas"][name]).replace(
                "#/components/schemas/", "urn:nano:api:") == json.dumps(specs.schema(name))
    assert count == sum(len(ops) for ops in doc["paths"].values())
    # extension marks: ours, not the seed's
    paths = doc["paths"]
    assert paths["/guests/{guest_id}/plan"]["post"]["x-nano-extension"] is True
    assert paths["/media_images/{image_id}/file"]["get"]["x-nano-extension"] is True
    assert "x-nano-extension" not in paths["/media_image_files/{image_id}"]["get"]
    assert "x-nano-extension" not in paths["/guests"]["post"]
    assert "x-nano-extension" not in paths["/disk_image_files/{image_id}"]["post"]
    assert paths["/disk_image_files/{image_id}"]["get"]["x-nano-extension"] is True
    assert paths["/cells/{name}"]["delete"]["x-nano-extension"] is True
    # every reply is the envelope with the route's data schema, or an error envelope
    reply = paths["/guests/{guest_id}"]["get"]["responses"]["2XX"]["content"][
        "application/json"]["schema"]["oneOf"]
    assert reply[0]["properties"]["data"] == {"$ref": "#/components/schemas/guest_status"}
    assert reply[1] == {"$ref": "#/components/schemas/error_envelope"}


@pytest.mark.gen_test
async def test_the_document_is_served_without_a_session(server):
    client = tornado.httpclient.AsyncHTTPClient()
    response = await client.fetch(f"http://127.0.0.1:{server.port}/api/v1/openapi.json")
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    doc = json.loads(response.body)
    assert set(doc) >= {"openapi", "info", "paths", "components"}  # the document, no envelope
    assert doc == build_document(routes(server.ctx))
