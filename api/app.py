"""The one route table of the v1 API and the Tornado application built from it.

Called by `nanod serve` (nanod/server.py) and by the API tests. Each module of `api/`
exports ROUTES as (pattern, handler) pairs relative to /api/v1; here every pattern gets the
prefix and an optional trailing slash. A path without a route gets a 404 envelope; with the
`web_root` setting, a path outside /api that no route takes is the web root's
(api/webroot.py).
"""

from __future__ import annotations

from typing import Any

import tornado.web

from api import (
    batches,
    compute,
    console,
    guests,
    identity,
    images,
    migrations,
    networks,
    policies,
    status,
    templates,
    webroot,
)
from api.base import AppContext, NotFoundHandler

PREFIX = "/api/v1"
MODULES = [identity, compute, images, networks, policies, guests, templates, batches, status,
           console, migrations]


def routes(ctx: AppContext) -> list[tuple[str, type, dict[str, Any]]]:
    table = []
    for module in MODULES:
        for pattern, handler in module.ROUTES:
            table.append((PREFIX + pattern.rstrip("/") + "/?", handler, {"ctx": ctx}))
        for pattern, handler in getattr(module, "ROOT_ROUTES", []):
            table.append((pattern, handler, {"ctx": ctx}))
    return table


def make_app(ctx: AppContext, **settings: Any) -> tornado.web.Application:
    app = tornado.web.Application(
        routes(ctx),
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
