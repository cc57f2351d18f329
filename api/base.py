"""The handler every API route derives from: the Nano envelope, errors, JSON bodies checked
against specs/, sessions and authorization, audit logging; and what guards the API against
abuse: the body limit, the login throttle and the password-hashing lane.

Used by every module of `api/`; `api/app.py` builds the route table. Handlers stay thin:
validate, authorize, call the store, enqueue work for the reconciler, reply.

Request bodies: every route takes at most `api.max_json_bytes` (setting, 1 MiB) of JSON;
only the image upload routes allow more (`body_limit`, api/images.py). A body announced
larger (Content-Length) is refused before a byte of it is read, and one that grows larger
while it arrives (chunked) as soon as it passes the limit: the envelope's 400 goes out at
once with `Connection: close`, and the connection is closed once it is written, so the rest
of the body is never read.

The IOLoop never waits on the database: every route method that is not a coroutine runs
whole in the store lane (`AppContext.store_lane`, `api.store_workers` threads; the
wrapping is done once, by `NanoHandler.__init_subclass__`), and its reply is sent from
the IOLoop when it returns. Coroutine routes reach the store through `NanoHandler.stored`.
The session lookup reads the in-memory cache on the loop and the database in the lane,
and the audit entry of a change is appended by one writer thread (api/audit.py). A route
waiting for SQLite's write lock (`busy_timeout`) holds one lane thread, never the loop.

Password hashing (argon2, a few hundred ms of CPU each) runs in a small pool of its own
(`AppContext.hasher`, `NanoHandler.hashing`), apart from the pool that reads image files
and does other blocking work (`AppContext.executor`, `NanoHandler.blocking`): a flood of
logins queues behind itself and cannot hold up downloads, and downloads cannot hold up
logins.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import tornado.web
from tornado.http1connection import HTTP1Connection
from tornado.ioloop import IOLoop

import specs
from api.audit import AuditWriter
from state.errors import Forbidden, Invalid, NanoError, Unauthorized
from state.events import as_actor
from state.identity import SessionInfo
from state.store import Store

log = logging.getLogger("nano.api")

T = TypeVar("T")
Enqueue = Callable[[Any], None]
SESSION_HEADER = "Nano-Session"
UNCOUNTED = 1 << 62
"""Tornado's maximum for a chunked body: none it would reach; `data_received` counts."""


NOTHING: Any = ""
"""`data` of a success with nothing to return: the original sends `""` there."""


def envelope(code: int, message: str, data: Any) -> str:
    """The body of every JSON reply: `error_code`, `message` and `data`, always all three
    (COMPATIBILITY.md "Wire format"). All three are required arguments, so no caller can
    leave one out; `data` is None for errors and NOTHING for a success without data."""
    return json.dumps({"error_code": code, "message": message, "data": data})


class LoginThrottle:
    """Slows down repeated failed logins from one address or for one user name.

    The first few failures cost nothing extra; after that each failure doubles the wait
    (capped), and a success or 15 quiet minutes forget them. Kept in memory: a restart
    forgives, which is acceptable for a delay (not a lockout).

    Memory is bounded: at most `max_entries` keys, least recently failed first out (an
    LRU), and keys quiet for `forget_after` are dropped as they come to the front. A key
    under attack is touched by every attempt, so it stays at the young end: pushing it out
    takes `max_entries` other keys between two of its attempts, and each of those is a
    login that waits for its own password hash."""

    free_failures = 3
    cap_seconds = 8.0
    forget_after = 900.0

    def __init__(self, *, max_entries: int = 10_000) -> None:
        if max_entries < 1:
            raise ValueError(f"api.login_throttle_entries must be at least 1, not {max_entries}")
        self.max_entries = max_entries
        # key -> (failures, time of the last); oldest first
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def _count(self, key: str, now: float) -> int:
        count, last = self._failures.get(key, (0, 0.0))
        return 0 if now - last > self.forget_after else count

    def delay(self, *keys: str) -> float:
        now = time.monotonic()
        worst = max((self._count(key, now) for key in keys), default=0)
        if worst < self.free_failures:
            return 0.0
        return min(self.cap_seconds, 0.25 * 2 ** (worst - self.free_failures))

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        for key in keys:
            self._failures[key] = (self._count(key, now) + 1, now)
            self._failures.move_to_end(key)
        self._trim(now)

    def succeeded(self, *keys: str) -> None:
        for key in keys:
            self._failures.pop(key, None)

    def _trim(self, now: float) -> None:
        failures = self._failures
        while len(failures) > self.max_entries:
            failures.popitem(last=False)
        while failures:
            key, (_, last) = next(iter(failures.items()))
            if now - last <= self.forget_after:
                break
            del failures[key]


def api_settings(settings: dict[str, Any]) -> dict[str, int]:
    """The `api` settings (nanod/config.py has their defaults), checked: a bad value stops
    nanod at start with the setting's name rather than weakening a limit."""
    conf = settings.get("api")
    if not isinstance(conf, dict):
        raise ValueError("settings: api must be a mapping with max_json_bytes, "
                         "password_workers, login_throttle_entries and store_workers")
    out = {}
    for name in ("max_json_bytes", "password_workers", "login_throttle_entries",
                 "store_workers"):
        value = conf.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"settings: api.{name} must be a whole number of at least 1, "
                             f"not {value!r}")
        out[name] = value
    return out


@dataclass
class AppContext:
    """What handlers share: the store, the reconciler's enqueue, settings, the store lane
    (threads every database call of a route runs in), a thread pool for other blocking
    work (file reads, file hashing), a small one of its own for password hashing (argon2),
    the audit writer, the login throttle, and process-wide facts."""

    store: Store
    enqueue: Enqueue = lambda key: None
    settings: dict[str, Any] = field(default_factory=dict)
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=4, thread_name_prefix="api")
    )
    hasher: ThreadPoolExecutor = field(init=False)
    store_lane: ThreadPoolExecutor = field(init=False)
    audit: AuditWriter = field(init=False)
    throttle: LoginThrottle = field(init=False)
    max_json_bytes: int = field(init=False)
    started_at: float = field(default_factory=time.time)
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        conf = api_settings(self.settings)
        self.max_json_bytes = conf["max_json_bytes"]
        self.hasher = ThreadPoolExecutor(max_workers=conf["password_workers"],
                                         thread_name_prefix="api-hash")
        self.store_lane = ThreadPoolExecutor(max_workers=conf["store_workers"],
                                             thread_name_prefix="api-store")
        self.audit = AuditWriter(self.store)
        self.throttle = LoginThrottle(max_entries=conf["login_throttle_entries"])

    def close(self) -> None:
        """Wait for the work in flight, stop the pools, write the last audit entries."""
        self.executor.shutdown(wait=True)
        self.hasher.shutdown(wait=True)
        self.store_lane.shutdown(wait=True)
        self.audit.close()


ROUTE_METHODS = ("get", "head", "post", "put", "delete", "patch")


def in_store_lane(method: Callable[..., None]) -> Callable[..., Any]:
    """`method`, a route method that is not a coroutine, as a coroutine that runs it whole
    in the store lane; the reply it made there is sent from the IOLoop once it returns
    (Tornado's output is not thread-safe), and what it raised reaches Tornado as usual."""
    @functools.wraps(method)
    async def route(self: NanoHandler, *args: Any) -> None:
        await self.stored(method, self, *args)
        if self._deferred is not None:
            status, body = self._deferred
            self._finish_envelope(status, body)

    return route


@tornado.web.stream_request_body
class NanoHandler(tornado.web.RequestHandler):
    """Base of every route.

    Class attributes a route sets:
      public  -- no session needed (system init, login);
      menu    -- the menu tag a session must hold to change (non-GET) this route group;
      read_menu -- a tag needed even to read (admin-only listings).
    """

    public = False
    menu: str | None = None
    read_menu: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every route method a handler defines that is not a coroutine runs in the store
        lane (`in_store_lane`): no route reads or writes the database on the IOLoop."""
        super().__init_subclass__(**kwargs)
        for name in ROUTE_METHODS:
            method = cls.__dict__.get(name)
            if method is not None and not inspect.iscoroutinefunction(method):
                setattr(cls, name, in_store_lane(method))

    def initialize(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self._loop_thread = threading.get_ident()
        self._deferred: tuple[int, str] | None = None
        self._background: Future[Any] | None = None
        self.session: SessionInfo | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._refused_body = False
        self._audit: str | None = None
        self._error_code = 0
        self._quiet = False
        self._counted = False

    def _count(self, delta: int) -> None:
        # In-flight requests, so a shutdown can let them finish first.
        if (delta > 0) != self._counted:
            self._counted = delta > 0
            self.ctx.extras["inflight"] = self.ctx.extras.get("inflight", 0) + delta

    def on_connection_close(self) -> None:
        self._count(-1)
        # Tornado's own: a request still waiting for its body learns it will not come
        # (without it, a handler whose client went away half way would wait for ever).
        super().on_connection_close()

    # -- request body (streamed so an oversized body is refused without buffering it) ----

    def data_received(self, chunk: bytes) -> None:
        if self._refused_body:
            return
        self._size += len(chunk)
        if self._size > self.body_limit():
            # no Content-Length said so (chunked): answer now, and the connection closes
            self._chunks = []
            self.refuse_body()
            return
        self._chunks.append(chunk)

    def _admit_body(self) -> None:
        """Refuse a body announced over `body_limit()` now, before the session is looked up
        (refusing costs no database read), and tell Tornado what this request may bring.
        Tornado checks the body against its own maximum after `prepare`: the server's is
        `api.max_json_bytes` (nanod/server.py), which keeps it for handlers of no route of
        ours (the console websocket); past it Tornado writes a bare "400 Bad Request" that is
        no envelope. So here it gets this route's limit, and no limit for a chunked body,
        which `data_received` counts and answers with the envelope."""
        length = self.request.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.body_limit():
            self.refuse_body()
            raise tornado.web.Finish()  # answered: nothing else of this request runs
        chunked = "chunked" in self.request.headers.get("Transfer-Encoding", "").lower()
        self.http_connection.set_max_body_size(UNCOUNTED if chunked else self.body_limit())

    def refuse_body(self) -> None:
        """Answer a body over this route's limit at once, with the envelope's 400
        (`body_too_large`), and close the connection once the answer is written: the rest
        of the body is never read (Tornado drops what arrives until then). Called from
        `prepare` (announced by Content-Length) and from `data_received` (counted)."""
        limit = self.body_limit()
        self._refused_body = True
        length = self.request.headers.get("Content-Length", "")
        if length.isdigit():
            # Tornado checks Content-Length against its own maximum after `prepare`, and
            # would write a bare "400 Bad Request" after our answer: let it pass.
            self.http_connection.set_max_body_size(max(int(length), limit))
        error = Invalid(self.body_too_large())
        self.send_error(400, exc_info=(Invalid, error, None))

    def body_too_large(self) -> str:
        """What a refused body is told; routes with larger bodies say their own limit."""
        return (f"request body too large: this route takes at most {self.body_limit()} "
                "bytes of JSON (setting api.max_json_bytes); nothing was read or changed")

    @property
    def http_connection(self) -> HTTP1Connection:
        return cast(HTTP1Connection, self.request.connection)

    def body(self, schema: str | None = None) -> dict:
        """The JSON body as a dict ({} when empty), validated against `schema`."""
        raw = b"".join(self._chunks)
        if not raw.strip():
            data: Any = {}
        else:
            ctype = self.request.headers.get("Content-Type", "")
            if ctype.startswith("multipart/"):
                raise Invalid(f"Content-Type {ctype.split(';')[0]!r} is not supported on this "
                              "route: send a JSON object (application/json)")
            try:
                data = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise Invalid(f"malformed JSON body: {exc}") from None
        if not isinstance(data, dict):
            raise Invalid("the body must be a JSON object, e.g. {\"name\": ...}")
        if schema:
            problems = specs.validate(schema, data)
            if problems:
                raise Invalid("invalid request: " + "; ".join(problems), details=problems)
        return data

    # -- session and authorization --------------------------------------------------------

    async def prepare(self) -> None:
        self._count(+1)
        self._cors()
        self._admit_body()
        if self.request.method == "OPTIONS":
            return
        if self.is_public(self.request.method):
            return
        token = self.request.headers.get(SESSION_HEADER, "")
        if not token:
            raise Unauthorized(f"no session: log in with POST /api/v1/sessions/ and send the "
                               f"'{SESSION_HEADER}' header")
        self.session = self.store.cached_session(token)
        if self.session is None:  # not cached (or expired): the database, in the lane
            self.session = await self.stored(self.store.session, token)
        if self.session is None:
            raise Unauthorized("session expired or unknown: log in again")
        needed = self.required_menu()
        if needed and not self.session.allows(needed):
            raise Forbidden(
                f"your roles do not grant '{needed}': ask an administrator to add it to a "
                "role of your group"
            )

    @classmethod
    def is_public(cls, method: str) -> bool:
        """Whether a `method` request on this route needs no session (declared per route
        so that tests/api/test_authz_matrix.py can read the public set off the table)."""
        return cls.public

    @classmethod
    def tag_for(cls, method: str) -> str | None:
        """The menu tag a `method` request on this route needs, as declared."""
        if method in ("GET", "HEAD"):
            return cls.read_menu
        return cls.menu or cls.read_menu

    def required_menu(self) -> str | None:
        """The menu tag this request needs; routes whose rule depends on the request (a
        user's own profile) override it."""
        return self.tag_for(self.request.method)

    def body_limit(self) -> int:
        """Bytes of request body this request may send: `api.max_json_bytes`; the image
        upload routes allow their files."""
        return self.ctx.max_json_bytes

    @property
    def user(self) -> str:
        return self.session.user if self.session else ""

    @property
    def address(self) -> str:
        return self.request.remote_ip or ""

    # -- replies --------------------------------------------------------------------------

    def reply(self, data: Any = NOTHING, *, status: int = 200) -> None:
        """A success: `data` as given (a real null included), or `""` when the route has
        nothing to return (the original's answer there)."""
        self.send_envelope(0, "", data, status=status)

    def send_envelope(self, code: int, message: str, data: Any, *, status: int = 200) -> None:
        """Finish the request with the Nano envelope: every JSON reply goes through here."""
        if code:
            self._error_code = code
        if self._refused_body:
            self.set_header("Connection", "close")  # the unread body ends the connection
        body = envelope(code, message, data)
        if threading.get_ident() != self._loop_thread:
            self._deferred = (status, body)  # a route in the store lane: sent on return
            return
        self._finish_envelope(status, body)

    def _finish_envelope(self, status: int, body: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(body)

    def audit(self, text: str) -> None:
        """What this change did, for the log (never a secret)."""
        self._audit = text

    def quiet(self) -> None:
        """This change writes no audit entry (keep-alives, entries clients post)."""
        self._quiet = True

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, NanoError):
            code, message = exc.code, exc.message
        elif isinstance(exc, tornado.web.HTTPError):
            code = exc.status_code if exc.status_code in (400, 401, 403, 404) else 400
            if exc.status_code == 405:
                code = 404
                message = f"{self.request.method} is not supported on {self.request.path}"
            else:
                message = exc.log_message or exc.reason or "bad request"
        else:
            code, message = 500, "internal error: see the nanod log"
        # The original answers HTTP 200 for errors; its portal switches on error_code.
        self.send_envelope(code, message, None)

    def log_path(self) -> str:
        """The request path as logs may show it; routes whose path carries a secret (a
        session token) override this."""
        return self.request.path

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        path = self.log_path()
        if isinstance(value, NanoError):
            log.info("%s %s -> %d %s", self.request.method, path, value.code, value.message)
        elif isinstance(value, tornado.web.HTTPError):
            log.info("%s %s -> HTTP %d", self.request.method, path, value.status_code)
        else:
            log.error("%s %s failed:\n%s", self.request.method, path,
                      "".join(traceback.format_exception(typ, value, tb)))

    def on_finish(self) -> None:
        self._count(-1)
        if self.request.method in ("GET", "HEAD", "OPTIONS") or self._error_code or self._quiet:
            return
        if self.get_status() >= 300 or self.session is None and not self._audit:
            return
        who = self.user or "anonymous"
        what = self._audit or f"{self.request.method} {self.request.path}"
        self.ctx.audit.add(f"{who} {what}", user=who, address=self.address,
                           resource=self.log_path())

    # -- blocking work --------------------------------------------------------------------

    async def stored(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn`, which reads or writes the store, in the store lane: never on the
        IOLoop, so a wait for SQLite's write lock holds a lane thread, not every request."""
        # events the store writes meanwhile name the session's user (state/events.py)
        return await IOLoop.current().run_in_executor(self.ctx.store_lane,
                                                      as_actor(self.user, fn), *args)

    def in_background(self, fn: Callable[..., Any], *args: Any, quiet: bool = False) -> None:
        """Run `fn`, a store write the request does not wait for (upload progress, an
        abandoned upload's reset), in the store lane, after this request's earlier ones
        (in order: a reset never lands before the progress it resets); a failure is logged
        (at debug if `quiet`). `background_settled` waits for them all."""
        previous = self._background

        def run() -> Any:
            if previous is not None:
                with contextlib.suppress(Exception):  # logged by its own callback
                    previous.result()
            return fn(*args)

        def done(future: Any) -> None:
            exc = future.exception()
            if exc is not None:
                (log.debug if quiet else log.warning)("%s failed: %s", fn.__name__, exc)

        self._background = self.ctx.store_lane.submit(as_actor(self.user, run))
        self._background.add_done_callback(done)

    async def background_settled(self) -> None:
        """Wait until this request's writes in the background are done (before answering,
        so that a client reads what the answer implies)."""
        if self._background is not None:
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(self._background)

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` in the API thread pool, never on the IOLoop."""
        return await IOLoop.current().run_in_executor(self.ctx.executor, fn, *args)

    async def hashing(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn`, which hashes or verifies a password (argon2), in the password pool:
        never on the IOLoop, and never in the pool downloads read files in."""
        return await IOLoop.current().run_in_executor(self.ctx.hasher, fn, *args)

    # -- CORS -----------------------------------------------------------------------------

    def _cors(self) -> None:
        origins = self.ctx.settings.get("cors_origins") or []
        origin = self.request.headers.get("Origin")
        if origin and ("*" in origins or origin in origins):
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Vary", "Origin")
            self.set_header("Access-Control-Allow-Headers", f"Content-Type, {SESSION_HEADER}")
            self.set_header("Access-Control-Allow-Methods",
                            "GET, POST, PUT, DELETE, PATCH, OPTIONS")

    def options(self, *args: Any, **kwargs: Any) -> None:
        self.set_status(204)
        self.finish()


class NotFoundHandler(NanoHandler):
    """Every path without a route: a 404 envelope (never a fake success)."""

    public = True

    async def prepare(self) -> None:
        await super().prepare()
        raise tornado.web.HTTPError(404, f"no route {self.request.method} {self.request.path}")


async def sleep(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)


def query_int(handler: NanoHandler, name: str, default: int, *, minimum: int = 0) -> int:
    raw = handler.get_query_argument(name, None)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise Invalid(f"query parameter {name}: {raw!r} is not a whole number") from None
    if value < minimum:
        raise Invalid(f"query parameter {name}: must be at least {minimum}")
    return value


def query_bool(handler: NanoHandler, name: str) -> bool | None:
    raw = handler.get_query_argument(name, None)
    if raw in (None, ""):
        return None
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise Invalid(f"query parameter {name}: {raw!r} is not true or false")
