"""The OpenAPI 3.1 document of the v1 API, generated at start-up from the route table and
the schemas in specs/api, and the route that serves it (GET /api/v1/openapi.json).

Nothing in it is written by hand: each route of `api.app.routes` (every module's ROUTES)
gives its path, its methods and their path parameters (named after the handler method's
own arguments), and each route method's `Contract` (`@contract` in api/base.py, the same
object `NanoHandler.body()` validates with) gives its request body schema, its query
parameters, the schema of its reply's `data` and whether it extends the seed API
(`x-nano-extension: true`). Every JSON reply is documented as the Nano envelope
{error_code, message, data}: a success (error_code 0, message "", data of the route's
schema) or an error (error_code 400..503, a message, data null), both HTTP 200 as the
original answers; a refused oversized body is HTTP 400 with the envelope.

Called by `api.app.make_app` (once per application) and by tests/api/test_openapi.py and
tests/api/test_fuzz.py.
"""

from __future__ import annotations

import inspect
import json
import re
from typing import Any

import tornado.web
import tornado.websocket

import nanod
import specs
from api.base import (
    DOCUMENT,
    DOWNLOAD,
    ROUTE_METHODS,
    SESSION_HEADER,
    UPLOAD,
    NanoHandler,
    contract,
    contract_of,
)

ERROR_CODES = [400, 401, 403, 404, 409, 422, 500, 503]
SECURITY = "NanoSession"
DOCUMENTED = tuple(m.upper() for m in ROUTE_METHODS if m != "head")
"""HEAD is left out: it is the GET of the same route without the body."""


def handled_methods(handler: type) -> list[str]:
    """The HTTP methods `handler` implements (RequestHandler's own answer 405)."""
    base = tornado.web.RequestHandler
    return [m for m in DOCUMENTED if getattr(handler, m.lower()) is not getattr(base, m.lower())]


def _refs(node: Any) -> Any:
    """`node` with specs' urn:nano:api:<name> references pointed at the components."""
    if isinstance(node, dict):
        out = {k: _refs(v) for k, v in node.items()}
        ref = out.get("$ref")
        if isinstance(ref, str) and ref.startswith(specs.KIND_REF_PREFIX):
            name, _, pointer = ref[len(specs.KIND_REF_PREFIX):].partition("#")
            out["$ref"] = f"#/components/schemas/{name}" + pointer
        return out
    if isinstance(node, list):
        return [_refs(v) for v in node]
    return node


def _schema_ref(name: str, used: set[str]) -> dict[str, Any]:
    """A reference to schema `name` of specs/api, noting it and what it refers to."""
    if name not in used:
        used.add(name)
        for inner in specs.api_refs(specs.schema(name)):
            _schema_ref(inner, used)
    return {"$ref": f"#/components/schemas/{name}"}


def openapi_path(pattern: str, names: list[str]) -> str:
    """'/api/v1/guests/([^/]+)/?' -> '/guests/{guest_id}' (relative to the server URL)."""
    path = pattern.removesuffix("/?").removeprefix("/api/v1")
    groups = iter(names)
    return re.sub(r"\([^)]*\)", lambda _: "{" + next(groups) + "}", path)


def _parameter_names(handler: type, method: str, count: int) -> list[str]:
    fn = getattr(handler, method.lower())
    params = list(inspect.signature(fn).parameters)[1:]  # after self; follows __wrapped__
    if len(params) < count:
        raise ValueError(f"{handler.__name__}.{method.lower()} takes {len(params)} path "
                         f"arguments, its route has {count}")
    return params[:count]


def _envelope(data: dict[str, Any]) -> dict[str, Any]:
    return {"oneOf": [
        {"type": "object", "required": ["error_code", "message", "data"],
         "additionalProperties": False,
         "properties": {"error_code": {"const": 0}, "message": {"const": ""}, "data": data}},
        {"$ref": "#/components/schemas/error_envelope"},
    ]}


ERROR_ENVELOPE = {
    "type": "object", "required": ["error_code", "message", "data"],
    "additionalProperties": False,
    "description": "an error: HTTP 200 (400 for a refused oversized body), a message naming "
                   "the field and the fix, data null",
    "properties": {"error_code": {"enum": ERROR_CODES},
                   "message": {"type": "string", "minLength": 1},
                   "data": {"type": "null"}},
}


def _operation(pattern: str, handler: type, method: str, used: set[str]) -> tuple[str, dict]:
    declared = contract_of(handler, method)
    count = re.compile(pattern).groups
    names = _parameter_names(handler, method, count)
    path = openapi_path(pattern, names)
    # the method's own docstring, else its class's own (not one inherited from a base)
    doc = getattr(handler, method.lower()).__doc__ or handler.__dict__.get("__doc__") or ""
    doc = inspect.cleandoc(doc)
    op: dict[str, Any] = {
        "operationId": f"{method.lower()}{re.sub(r'[^A-Za-z0-9]+', '_', path)}".rstrip("_"),
        "summary": doc.split("\n\n")[0].replace("\n", " ") if doc else f"{method} {path}",
        "tags": [handler.__module__.rsplit(".", 1)[-1]],
    }
    params = [{"name": n, "in": "path", "required": True,
               "schema": {"type": "string", "minLength": 1}} for n in names]
    params += [{"name": q, "in": "query", "required": False, "schema": {"type": "string"}}
               for q in declared.query]
    if params:
        op["parameters"] = params
    if declared.body == UPLOAD:
        op["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["image"],
            "properties": {"image": {"type": "string", "contentMediaType":
                                     "application/octet-stream"}}}}}}
    elif declared.body is not None:
        op["requestBody"] = {"required": False, "content": {"application/json": {
            "schema": _schema_ref(declared.body, used)}}}
    relative = pattern.removeprefix("/api/v1").removesuffix("/?")
    ext = declared.extension
    if ext is True or (isinstance(ext, tuple) and relative in ext):
        op["x-nano-extension"] = True
    if handler.is_public(method):
        op["security"] = []
    error = {"description": "the Nano envelope of an error",
             "content": {"application/json": {"schema": {
                 "$ref": "#/components/schemas/error_envelope"}}}}
    if declared.data == DOCUMENT:
        ok: dict[str, Any] = {"description": "the document itself (no envelope)",
                              "content": {"application/json": {"schema": {"type": "object"}}}}
    elif declared.data == DOWNLOAD:
        ok = {"description": "the file (206 for a range); errors are the envelope",
              "content": {"application/octet-stream": {"schema": {"type": "string"}},
                          "application/json": {"schema": {
                              "$ref": "#/components/schemas/error_envelope"}}}}
    else:
        ok = {"description": "the Nano envelope: data as below on success, or an error",
              "content": {"application/json": {"schema": _envelope(
                  _schema_ref(declared.data, used))}}}
    op["responses"] = {"2XX": ok, "400": error}
    return path, op


def build_document(table: list[tuple[str, type, dict[str, Any]]]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the route `table` (as `api.app.routes` builds it)."""
    used: set[str] = set()
    paths: dict[str, dict[str, Any]] = {}
    templates: dict[str, str] = {}  # a path with {} for its parameters -> as documented
    for pattern, handler, _ in table:
        if issubclass(handler, tornado.websocket.WebSocketHandler):
            continue  # the monitor channel's websocket end answers an upgrade, not JSON
        if not pattern.startswith("/api/v1/"):
            continue
        for method in handled_methods(handler):
            path, op = _operation(pattern, handler, method, used)
            if path not in paths and re.sub(r"{[^}]*}", "{}", path) in templates:
                raise ValueError(f"{handler.__name__}.{method.lower()}: {path} names its "
                                 f"path arguments unlike {templates[re.sub(r'{[^}]*}', '{}', path)]}")
            templates[re.sub(r"{[^}]*}", "{}", path)] = path
            paths.setdefault(path, {})[method.lower()] = op
    components = {name: _refs(specs.schema(name)) for name in sorted(used)}
    components["error_envelope"] = ERROR_ENVELOPE
    return {
        "openapi": "3.1.0",
        "info": {"title": "Nano FrontEnd REST API", "version": nanod.__version__,
                 "description": "Project Nano FrontEnd REST API v1.3.1 as nanod implements "
                                "it; operations marked x-nano-extension are not in the "
                                "seed API. Generated from nanod's route table."},
        "servers": [{"url": "/api/v1"}],
        "security": [{SECURITY: []}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {SECURITY: {
                "type": "apiKey", "in": "header", "name": SESSION_HEADER,
                "description": "the session id from POST /sessions/"}},
        },
    }


class OpenAPIHandler(NanoHandler):
    """GET /api/v1/openapi.json: the OpenAPI document. Its reply is the document itself,
    not the envelope: it is a document the client asked for, like a file download (an
    error before it, e.g. a body too large, is still the envelope). Needs no session: it
    says what the API is, nothing of what is in it."""

    public = True

    @contract(data=DOCUMENT, extension=True)
    async def get(self) -> None:
        """The OpenAPI 3.1 document of this API."""
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(self.ctx.extras["openapi"])


def document_text(table: list[tuple[str, type, dict[str, Any]]]) -> str:
    """`build_document` as the JSON text GET /openapi.json sends (made once, at start)."""
    return json.dumps(build_document(table))


ROUTES = [(r"/openapi.json", OpenAPIHandler)]
