"""The web root: a directory of static files (a browser app such as the original Nano
portal) served at `/`, so the app and the API share one origin and port.

`api/app.py` adds `route(directory)` as the last, lowest-priority rule of the table when the
`web_root` setting names a directory (nanod/config.py checks it): every API route and every
root route defined by a module (the console websocket, ...) is matched before it, and paths
under /api never reach it, so an /api path without a route keeps its 404 envelope.

Tornado's StaticFileHandler does the serving and the guarding: content types, Last-Modified,
conditional GETs, ranges, HEAD, only regular files, and no path outside the directory
(`..` sent raw or encoded and absolute paths as written, symbolic links once resolved:
403). This module adds what a web root of a single-page app needs on top:
  - any path that names no file inside the directory gets index.html, as apps whose routes
    are browser-history paths (/guests/1234) need;
  - nothing is kept by a browser without asking again (`Cache-Control: no-cache`): index.html
    so that a new build of the app is picked up at the next load, and the other files
    because a build may keep a name (favicon, manifest, an unhashed script) with new
    content; they carry validators (an ETag of size and modification time, Last-Modified),
    so asking again costs a 304 without the body;
  - a path the file system cannot name (a NUL byte) is a 404, not a failure.
The directory may be a symbolic link to a build: Tornado resolves it at each request, so
pointing the link at a new build deploys it without a restart.
"""

from __future__ import annotations

import os
from typing import Any

import tornado.web

INDEX = "index.html"

# Paths under /api belong to the API whether or not a route matches them (their 404 is the
# envelope's, from the default handler); the rest of the root is the web root's.
PATTERN = r"/(?!api(?:/|$))(.*)"


def route(directory: str) -> tuple[str, type, dict[str, Any]]:
    """The catch-all rule of the web root `directory` (absolute, checked by nanod/config.py);
    it must come last in the route table."""
    return (PATTERN, WebRootHandler, {"path": directory})


class WebRootHandler(tornado.web.StaticFileHandler):
    """StaticFileHandler with a single-page app's fallback and its caching."""

    def initialize(self, path: str) -> None:
        super().initialize(path, default_filename=INDEX)

    def validate_absolute_path(self, root: str, absolute_path: str) -> str | None:
        """Tornado's checks (inside the root once resolved, a regular file, a directory's
        index.html); a path that names no file gets the root's index.html instead."""
        try:
            return super().validate_absolute_path(root, absolute_path)
        except ValueError:  # a NUL byte (os.stat refuses it): no file has such a name
            raise tornado.web.HTTPError(404) from None
        except tornado.web.HTTPError as exc:
            if exc.status_code != 404:
                raise  # outside the root, or not a regular file: refused as Tornado says
        return super().validate_absolute_path(root, os.path.join(root, INDEX))

    def compute_etag(self) -> str | None:
        """Size and modification time of the file served (stat'ed once for Last-Modified
        and the length): Tornado's own is a hash of the content, read whole and then kept
        for the life of the process, so a file replaced in place would keep its old ETag
        and browsers asking again would be told their stale copy is current."""
        info = self._stat()
        return f'"{info.st_size:x}-{info.st_mtime_ns:x}"'

    def set_extra_headers(self, path: str) -> None:
        self.set_header("X-Content-Type-Options", "nosniff")  # the type we send is the type
        self.set_header("Cache-Control", "no-cache")

    def get_cache_time(self, path: str, modified: Any, mime_type: str) -> int:
        # never Tornado's ten years for a `?v=` URL: nothing here is versioned by nanod
        return 0
