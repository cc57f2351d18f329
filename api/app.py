"""The one route table of the v1 API and the Tornado application built from it.

Called by `nanod serve` (nanod/server.py) and by the API tests. Each module of `api/`
exports ROUTES as (pattern, handler) pairs relative to /api/v1; here every pattern gets the
prefix and an optional trailing slash. A path without a route gets a 404 envelope.
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
    quotas,
    status,
    templates,
)
from api.base import AppContext, NotFoundHandler

PREFIX = "/api/v1"
MODULES = [identity, compute, images, networks, policies, guests, templates, batches, status,
           console, migrations, quotas]


def routes(ctx: AppContext) -> list[tuple[str, type, dict[str, Any]]]:
    table = []
    for module in MODULES:
        for pattern, handler in module.ROUTES:
            table.append((PREFIX + pattern.rstrip("/") + "/?", handler, {"ctx": ctx}))
        for pattern, handler in getattr(module, "ROOT_ROUTES", []):
            table.append((pattern, handler, {"ctx": ctx}))
    return table


def make_app(ctx: AppContext, **settings: Any) -> tornado.web.Application:
    return tornado.web.Application(
        routes(ctx),
        default_handler_class=NotFoundHandler,
        default_handler_args={"ctx": ctx},
        compress_response=False,
        **settings,
    )
