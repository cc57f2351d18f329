"""The one route table of the v1 API and the Tornado application built from it.

Called by `nanod serve` (nanod/server.py) and by the API tests. Each module of `api/`
exports ROUTES as (pattern, handler) pairs relative to /api/v1; here every pattern gets the
prefix and an optional trailing slash. A path without a route gets a 404 envelope.
`GET /metrics` (api/metrics.py) is served beside the API, not in its route table: it is no
envelope route, and it has its own access rule (the `metrics_token` setting). With the
`web_root` setting, a path outside /api that no route takes is the web root's
(api/webroot.py).
"""

from __future__ import annotations

from typing import Any

import tornado.httputil
import tornado.routing
import tornado.web

from api import (
    batches,
    compute,
    console,
    events,
    guests,
    identity,
    images,
    migrations,
    networks,
    openapi,
    policies,
    quotas,
    replicas,
    status,
    templates,
    webroot,
)
from api.base import AppContext, NanoHandler, NotFoundHandler
from api.metrics import MetricsHandler

PREFIX = "/api/v1"
MODULES = [identity, compute, images, networks, policies, guests, templates, batches, status,
           console, migrations, openapi, events, quotas, replicas]


def routes(ctx: AppContext) -> list[tuple[str, type, dict[str, Any]]]:
    table = []
    for module in MODULES:
        for pattern, handler in module.ROUTES:
            table.append((PREFIX + pattern.rstrip("/") + "/?", handler,
                          _args(ctx, handler, PREFIX + pattern)))
        for pattern, handler in getattr(module, "ROOT_ROUTES", []):
            table.append((pattern, handler, _args(ctx, handler, pattern)))
    return table


class UpgradeMatches(tornado.routing.PathMatches):
    """A path that also answers as a websocket: matched only by an upgrade request."""

    def match(self, request: tornado.httputil.HTTPServerRequest) -> dict[str, Any] | None:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return None
        return super().match(request)


def upgrade_routes(ctx: AppContext) -> list[tornado.routing.Rule]:
    """The websocket ends that share a path with a route of `routes` (UPGRADE_ROUTES):
    tried first, for upgrade requests only."""
    return [tornado.routing.Rule(UpgradeMatches(PREFIX + pattern.rstrip("/") + "/?$"),
                                 handler, {"ctx": ctx})
            for module in MODULES for pattern, handler in getattr(module, "UPGRADE_ROUTES", [])]
def template(pattern: str) -> str:
    """A route's pattern as metrics name it: every id group shown as `{}`, never a real
    id (one series per route, not per guest)."""
    return pattern.replace("([^/]+)", "{}").removesuffix("/?").rstrip("/") or "/"


def _args(ctx: AppContext, handler: type, pattern: str) -> dict[str, Any]:
    # only our handlers take the route's template (the console websocket does not)
    if issubclass(handler, NanoHandler):
        return {"ctx": ctx, "route": template(pattern)}
    return {"ctx": ctx}


def make_app(ctx: AppContext, **settings: Any) -> tornado.web.Application:
    table = routes(ctx)
    # the OpenAPI document of this very table, made once (GET /api/v1/openapi.json)
    ctx.extras["openapi"] = openapi.document_text(table)
    app = tornado.web.Application(
        [*upgrade_routes(ctx), *table, (r"/metrics", MetricsHandler, {"ctx": ctx})],
        default_handler_class=NotFoundHandler,
        default_handler_args={"ctx": ctx},
        compress_response=False,
        **settings,
    )
    if ctx.settings.get("web_root"):
        # the last rule of all: after the route table, and Tornado's `add_handlers` puts
        # what is added later before the last rule; it only takes what no route does
        app.default_router.add_rules([webroot.route(ctx.settings["web_root"])])
    return app
