"""The `web_root` setting (api/webroot.py, nanod/config.py) on a real nanod: the test app of
tests/fixtures/webapp served at / with its types and caching headers, index.html for the
app's browser-history paths, the API's paths and root routes untouched, no path out of the
directory (raw, encoded, absolute, through symbolic links), and without the setting
nothing served at all. The browser's view of the same app: tests/integration/
test_web_root_browser.py."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.web import RequestHandler
from tornado.websocket import websocket_connect

from nanod import config
from tests.conftest import sqlite_only

WEBAPP = Path(__file__).resolve().parent.parent / "fixtures" / "webapp"
SECRET = "TOP-SECRET-OUTSIDE-THE-WEB-ROOT"

database = pytest.fixture(name="database")(sqlite_only)  # files, not backends


@pytest.fixture
def www(tmp_path: Path) -> Path:
    """The test app, plus what a path could try to reach: a secret beside the directory,
    a sibling directory whose name starts like it, links pointing out and one pointing in."""
    root = tmp_path / "www"
    shutil.copytree(WEBAPP, root)
    (root / "sub").mkdir()
    (root / "sub" / "index.html").write_text("<p>the sub directory's own index</p>\n")
    (root / "emptydir").mkdir()
    (tmp_path / "secret.txt").write_text(SECRET)
    (tmp_path / "www-evil").mkdir()
    (tmp_path / "www-evil" / "secret.txt").write_text(SECRET)
    (root / "out-link.txt").symlink_to(tmp_path / "secret.txt")
    (root / "out-dir").symlink_to(tmp_path)
    (root / "sub" / "out-index").mkdir()
    (root / "sub" / "out-index" / "index.html").symlink_to(tmp_path / "secret.txt")
    (root / "in-link.css").symlink_to(root / "style.css")
    return root


@pytest.fixture
def settings(settings, www):
    settings["web_root"] = config.check_web_root(str(www))
    return settings


async def get(server, path: str, **kw) -> HTTPResponse:
    return await AsyncHTTPClient().fetch(f"http://127.0.0.1:{server.port}{path}",
                                         raise_error=False, follow_redirects=False, **kw)


async def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """GET `target` sent exactly as written (an HTTP client would normalise `..`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                 "Connection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def envelope(response: HTTPResponse) -> dict:
    doc = json.loads(response.body)
    assert set(doc) == {"error_code", "message", "data"}, doc
    return doc


@pytest.mark.gen_test(timeout=60)
async def test_the_app_is_served_with_types_and_caching(server, www):
    index = (WEBAPP / "index.html").read_bytes()
    page = await get(server, "/")
    assert page.code == 200 and page.body == index
    assert page.headers["Content-Type"] == "text/html"
    assert page.headers["Cache-Control"] == "no-cache"
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["ETag"] and page.headers["Last-Modified"]
    assert (await get(server, "/index.html")).body == index

    script = await get(server, "/app.js")
    assert script.code == 200 and script.body == (WEBAPP / "app.js").read_bytes()
    assert script.headers["Content-Type"] in ("application/javascript", "text/javascript")
    style = await get(server, "/style.css")
    assert style.headers["Content-Type"] == "text/css"
    assert (await get(server, "/in-link.css")).body == style.body  # a link inside: served

    # browser-history paths of the app, and a directory without an index, get index.html
    for path in ("/guests/1234", "/guests/1234/", "/a/b/c?tab=disks", "/emptydir/",
                 "/missing.js"):
        reply = await get(server, path)
        assert reply.code == 200 and reply.body == index, path
        assert reply.headers["Cache-Control"] == "no-cache", path
    # a directory with an index of its own: the slash first, as relative links need
    moved = await get(server, "/sub")
    assert moved.code == 301 and moved.headers["Location"] == "/sub/"
    assert b"own index" in (await get(server, "/sub/")).body

    head = await get(server, "/app.js", method="HEAD")
    assert head.code == 200 and head.body == b""
    assert int(head.headers["Content-Length"]) == len(script.body)

    # the validators: asking again costs a 304 until the file changes
    etag = script.headers["ETag"]
    again = await get(server, "/app.js", headers={"If-None-Match": etag})
    assert again.code == 304 and again.body == b""
    since = await get(server, "/app.js",
                      headers={"If-Modified-Since": script.headers["Last-Modified"]})
    assert since.code == 304
    (www / "app.js").write_text("// a new build\n")
    stat = os.stat(www / "app.js")
    os.utime(www / "app.js", ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    changed = await get(server, "/app.js", headers={"If-None-Match": etag})
    assert changed.code == 200 and changed.body == b"// a new build\n"
    assert changed.headers["ETag"] != etag


@pytest.mark.gen_test(timeout=60)
async def test_api_paths_and_root_routes_are_not_the_web_roots(server):
    for path in ("/api", "/api/", "/api/v1/no-such-route", "/api/v2/guests/",
                 "/api/v1/guests/x/no-such"):
        reply = await get(server, path)
        doc = envelope(reply)
        assert reply.code == 200 and doc["error_code"] == 404, (path, doc)
    system = envelope(await get(server, "/api/v1/system/"))
    assert system["error_code"] == 0 and system["data"]["ready"] is False

    # a root route of a module (the console's websocket) keeps its path: a channel that
    # does not exist is closed with its code, not answered with index.html
    socket = await websocket_connect(f"ws://127.0.0.1:{server.port}/monitor_channels/nope")
    assert await socket.read_message() is None
    assert socket.close_code == 4404
    plain = await get(server, "/monitor_channels/nope")
    assert plain.code == 400 and b"<html" not in plain.body

    # a root route added to the app later (as a metrics endpoint might be) matches first too
    class Later(RequestHandler):
        def get(self) -> None:
            self.write("later route")

    server.app.add_handlers(".*", [("/later", Later)])
    assert (await get(server, "/later")).body == b"later route"

    # only reads: a write to a page of the app is no API call in disguise
    assert (await get(server, "/guests/1", method="POST", body=b"{}")).code == 405


OUTSIDE = [
    "/../secret.txt",
    "/%2e%2e/secret.txt",
    "/%2E%2E%2Fsecret.txt",
    "/..%2fsecret.txt",
    "/sub/../../secret.txt",
    "/sub/%2e%2e/%2e%2e/secret.txt",
    "/../www-evil/secret.txt",  # a sibling whose name begins like the root's
    "/%2e%2e/www-evil/secret.txt",
    "/out-link.txt",  # links whose targets lie outside
    "/out-dir/secret.txt",
    "/out-dir",
    "/out-dir/",
    "/sub/out-index/",  # a directory whose index.html is such a link
]


@pytest.mark.gen_test(timeout=60)
async def test_no_path_leaves_the_web_root(server, www):
    absolute = str(www.parent / "secret.txt")
    for target in [*OUTSIDE, "/./../secret.txt", "//" + absolute.lstrip("/"),
                   "/%2F" + absolute.lstrip("/").replace("/", "%2F")]:
        status, body = await raw_get(server.port, target)
        assert status in (403, 404), (target, status, body[:200])
        assert SECRET.encode() not in body, target
    # a name the file system cannot hold is a 404, not a failure
    for target in ("/%00", "/a%00b.js", "/sub/%00/x"):
        status, body = await raw_get(server.port, target)
        assert status == 404, (target, status, body[:200])
    # the same links resolve inside when they point inside
    status, body = await raw_get(server.port, "/in-link.css")
    assert status == 200 and body == (www / "style.css").read_bytes()


@pytest.mark.gen_test(timeout=60)
async def test_without_a_web_root_nothing_is_served(tmp_path, io_loop):
    from nanod.server import Server

    settings = config.load(None, {"data_dir": str(tmp_path / "bare"),
                                  "database": "sqlite:///" + str(tmp_path / "bare.db"),
                                  "reconciler": {"enabled": False},
                                  "names": {"prefix": "nanotest"}})
    assert settings["web_root"] == ""
    server = Server(settings)
    server.listen("127.0.0.1", 0)
    try:
        for path in ("/", "/index.html", "/guests/1234", "/app.js"):
            reply = await get(server, path)
            assert reply.code == 200 and envelope(reply)["error_code"] == 404, path
    finally:
        await server.shutdown()


def test_web_root_setting_is_checked(tmp_path, www):
    assert config.check_web_root("") == ""
    assert config.check_web_root(str(www)) == str(www)
    assert config.check_web_root(os.path.relpath(www)) == str(www)  # made absolute

    cases = {
        str(tmp_path / "nowhere"): "is not a directory",
        str(www / "app.js"): "is not a directory",
        str(www / "emptydir"): "has no readable index.html",
    }
    for value, words in cases.items():
        with pytest.raises(SystemExit) as exc:
            config.check_web_root(value)
        assert "web_root" in str(exc.value) and words in str(exc.value), exc.value
    with pytest.raises(SystemExit, match="web_root must be the path of a directory"):
        config.check_web_root(["/srv/www"])

    # from a config file, as `nanod serve --config` reads it
    path = tmp_path / "nanod.yaml"
    path.write_text(f"web_root: {tmp_path / 'nowhere'}\n")
    with pytest.raises(SystemExit, match="web_root .* is not a directory"):
        config.load(str(path), {"data_dir": str(tmp_path / "data")})
    path.write_text(f"web_root: {www}\n")
    assert config.load(str(path), {"data_dir": str(tmp_path / "data")})["web_root"] == str(www)


def test_a_link_to_the_build_deploys_a_new_one_without_a_restart(tmp_path, io_loop):
    """web_root a symbolic link to a build: pointing it at another build changes what is
    served at once (the link is resolved at each request, not at start)."""
    from nanod.server import Server

    builds = []
    for n in (1, 2):
        build = tmp_path / f"build-{n}"
        build.mkdir()
        (build / "index.html").write_text(f"<p>build {n}</p>\n")
        builds.append(build)
    current = tmp_path / "current"
    current.symlink_to(builds[0])
    settings = config.load(None, {"data_dir": str(tmp_path / "data"),
                                  "database": "sqlite:///" + str(tmp_path / "nano.db"),
                                  "reconciler": {"enabled": False},
                                  "names": {"prefix": "nanotest"}, "web_root": str(current)})
    server = Server(settings)
    server.listen("127.0.0.1", 0)

    async def pages() -> list[bytes]:
        return [(await get(server, path)).body for path in ("/", "/admin/dashboard")]

    try:
        assert io_loop.run_sync(pages) == [b"<p>build 1</p>\n"] * 2
        swapped = tmp_path / "swapped"
        swapped.symlink_to(builds[1])
        swapped.replace(current)  # atomically, as a deployment would
        assert io_loop.run_sync(pages) == [b"<p>build 2</p>\n"] * 2
    finally:
        io_loop.run_sync(server.shutdown)


def test_an_unreadable_web_root_is_refused(tmp_path):
    """A directory this nanod may not read: as root (who reads everything) the check runs
    in a child as user nobody (setpriv, util-linux), on a root-owned directory of mode
    0700 in a place nobody can reach."""
    if os.geteuid() != 0:
        www = tmp_path / "www"
        www.mkdir()
        (www / "index.html").write_text("<p>x</p>")
        www.chmod(0o000)
        try:
            with pytest.raises(SystemExit, match="is not readable by this nanod"):
                config.check_web_root(str(www))
        finally:
            www.chmod(0o755)
        return
    base = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        base.chmod(0o755)
        www = base / "www"
        www.mkdir(mode=0o700)
        (www / "index.html").write_text("<p>x</p>")
        child = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
             sys.executable, "-c", f"from nanod import config; config.check_web_root({str(www)!r})"],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(Path(config.__file__).resolve().parents[1])})
        assert child.returncode != 0
        assert f"nanod: web_root {str(www)!r} is not readable by this nanod" in child.stderr, \
            child.stderr
    finally:
        shutil.rmtree(base)
