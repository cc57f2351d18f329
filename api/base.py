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

Idempotent and conditional writes are handled here once for every route, by what the
route declares (`creates`, `resource`): a POST that creates takes an `Idempotency-Key`
(state/idempotency.py keeps the first reply; a retry gets it back), a resource's GET
carries its generation as `ETag`, and its PUT and DELETE take `If-Match`, compared and
written in one transaction (state/conditional.py). README "Retries and concurrent edits".

Password hashing (argon2, a few hundred ms of CPU each) runs in a small pool of its own
(`AppContext.hasher`, `NanoHandler.hashing`), apart from the pool that reads image files
and does other blocking work (`AppContext.executor`, `NanoHandler.blocking`): a flood of
logins queues behind itself and cannot hold up downloads, and downloads cannot hold up
logins.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import functools
import hashlib
import inspect
import json
import logging
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import tornado.web
from tornado.http1connection import HTTP1Connection
from tornado.ioloop import IOLoop

import specs
from api import request_ids
from api.audit import AuditWriter
from api.metrics import Metrics
from state.conditional import PreconditionFailed, etag
from state.errors import Conflict, Forbidden, Internal, Invalid, NanoError, Unauthorized
from state.events import as_actor
from state.idempotency import Claim, Claimed
from state.identity import SessionInfo
from state.store import Store

log = logging.getLogger("nano.api")

T = TypeVar("T")
Enqueue = Callable[[Any], None]
SESSION_HEADER = "Nano-Session"
IDEMPOTENCY_HEADER = "Idempotency-Key"
STRICT_HTTP = "return=strict-http"
"""The `Prefer` token that asks for HTTP 412 (not 200) when an If-Match fails."""
IDEMPOTENCY_WAIT = 30.0
"""Seconds a retry waits for the first request with its key to finish before it is
refused as "in progress" (the routes that create finish well within it)."""
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
    the audit writer, the login throttle, the process's metrics (api/metrics.py), and
    process-wide facts."""

    store: Store
    enqueue: Enqueue = lambda key: None
    # the key kinds the running controller reconciles (GET /resource_status/ `watched`);
    # None when nanod runs without reconcilers
    reconciling: Callable[[], list[str]] | None = None
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
    metrics: Metrics = field(default_factory=Metrics)
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

UPLOAD = "(upload)"
"""`Contract.body` of the image upload routes: a multipart/form-data file, not JSON."""
DOWNLOAD = "(download)"
"""`Contract.data` of a file download: the file's bytes (errors still get the envelope)."""
DOCUMENT = "(document)"
"""`Contract.data` of a reply that is a document of its own (GET /openapi.json), not the
envelope: like a download, it is what the client asked for, whole."""


@dataclass(frozen=True)
class Contract:
    """What one route method takes and answers: the one declaration that `body()`
    validates with and api/openapi.py documents, so the two cannot differ.

    body      -- name of the request body's schema in specs/api (what `body()` checks), or
                 UPLOAD, or None when the method reads no body;
    data      -- name of the schema of the reply's `data` in specs/api, or DOWNLOAD or
                 DOCUMENT;
    query     -- the query parameters it reads (all strings on the wire);
    extension -- not in the seed API (nano-frontend-api-1.3.1): True, or the route
                 patterns (as in the module's ROUTES) on which it is one, for a handler
                 serving a seed path and an extension path.
    """

    data: str
    body: str | None = None
    query: tuple[str, ...] = ()
    extension: bool | tuple[str, ...] = False


def contract(*, data: str, body: str | None = None, query: tuple[str, ...] = (),
             extension: bool | tuple[str, ...] = False) -> Callable[[T], T]:
    """Declare a route method's `Contract` (see there); every route method has one."""
    declared = Contract(data=data, body=body, query=query, extension=extension)

    def mark(method: T) -> T:
        method.__dict__["contract"] = declared  # kept by functools.wraps (in_store_lane)
        return method

    return mark


def contract_of(handler: type, method: str) -> Contract:
    """The `Contract` of `handler`'s `method` ("GET", ...): the most derived declaration,
    a method's `@contract` or an entry of a class's `contracts` (for a subclass that
    shares its base's method, e.g. disk images with media images, but takes another
    body). A KeyError names a route method that has none (tests/api/test_openapi.py
    checks that none is missing)."""
    for cls in handler.__mro__:
        overrides = cls.__dict__.get("contracts", {})
        if method in overrides:
            return cast(Contract, overrides[method])
        fn = cls.__dict__.get(method.lower())
        if fn is not None:
            declared = fn.__dict__.get("contract")
            if not isinstance(declared, Contract):
                break
            return declared
    raise KeyError(f"{handler.__name__}.{method.lower()} declares no @contract")


def route_method(method: Callable[..., Any]) -> Callable[..., Any]:
    """`method`, a route method, as the coroutine Tornado calls: one that checks the
    request's Idempotency-Key and If-Match headers and runs it (`NanoHandler._run_route`).
    A method that is not a coroutine runs whole in the store lane; the reply it made there
    is sent from the IOLoop once it returns (Tornado's output is not thread-safe), and what
    it raised reaches Tornado as usual."""
    lane = not inspect.iscoroutinefunction(method)

    @functools.wraps(method)
    async def route(self: NanoHandler, *args: Any) -> None:
        await self._run_route(method, lane, args)

    route.__nano_route__ = True  # type: ignore[attr-defined]  # wrapped once only
    return route


@dataclass(frozen=True)
class Resource:
    """What a route reads and changes that has a generation: its kind (state/conditional.py
    RESOURCES) and which path arguments, in order, are its key. A route that declares one
    answers GET with an `ETag` and honours `If-Match` on PUT and DELETE."""

    kind: str
    args: tuple[int, ...] = (0,)

    def key(self, path_args: tuple[Any, ...]) -> tuple[str, ...]:
        return tuple(str(path_args[i]) for i in self.args)


def entity_tags(header: str) -> list[str]:
    """The generations an If-Match header names ("*" for any), as strings. Refuses what is
    not a list of quoted generations, naming the header and the form it wants."""
    tags = []
    for part in (p.strip() for p in header.split(",")):
        if part == "*":
            tags.append("*")
        elif part.startswith("W/"):
            raise Invalid(f"If-Match: {part} is a weak entity tag, which never matches a "
                          'write (RFC 9110): send the ETag as given, e.g. If-Match: "3"')
        elif len(part) >= 3 and part[0] == part[-1] == '"' and part[1:-1].isdigit():
            tags.append(str(int(part[1:-1])))
        else:
            raise Invalid(f"If-Match: {part!r} is not an ETag of this API: send the quoted "
                          'generation from the ETag header of a GET, e.g. If-Match: "3", '
                          "or * for any")
    return tags


def body_digest(raw: bytes) -> str:
    """What makes two request bodies "the same" for an idempotency key: equal JSON (key
    order and spacing aside), else equal bytes."""
    try:
        canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"))
    except (ValueError, UnicodeDecodeError):
        return hashlib.sha256(raw).hexdigest()
    return hashlib.sha256(canonical.encode()).hexdigest()


@tornado.web.stream_request_body
class NanoHandler(tornado.web.RequestHandler):
    """Base of every route.

    Class attributes a route sets:
      public  -- no session needed (system init, login);
      menu    -- the menu tag a session must hold to change (non-GET) this route group;
      read_menu -- a tag needed even to read (admin-only listings);
      creates -- POST makes something: it honours an Idempotency-Key (a retry with the
                 same key and body gets the first reply and makes nothing new);
      resource -- the resource with a generation the route reads and changes: its GET
                 replies carry an ETag and its PUT and DELETE honour If-Match;
      contracts -- per HTTP method, a `Contract` replacing the one of an inherited method.
    A request with either header (Idempotency-Key, If-Match) on a route that does not
    declare it is refused (400): a header we would ignore would promise what nothing keeps.
    Every route method declares its `Contract` (`@contract`).
    """

    public = False
    menu: str | None = None
    read_menu: str | None = None
    request_id = ""  # X-Request-Id of this request, set first thing in `prepare`
    creates = False
    resource: Resource | None = None
    contracts: dict[str, Contract] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every route method a handler defines runs through `route_method`: the headers of
        idempotent and conditional writes are handled once, here, for every route; and a
        method that is not a coroutine runs in the store lane: no route reads or writes the
        database on the IOLoop."""
        super().__init_subclass__(**kwargs)
        for name in ROUTE_METHODS:
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "__nano_route__", False):
                setattr(cls, name, route_method(method))

    def initialize(self, ctx: AppContext, route: str = "unmatched") -> None:
        self.ctx = ctx
        self.route = route  # the route's template (api/app.py): what metrics are labelled by
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
        self._idempotency: str | None = None  # the claimed key's row while this request runs
        self._if_match: list[str] | None = None
        self._if_match_done = False
        self._etag: int | None = None

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

    def body(self) -> dict:
        """The JSON body as a dict ({} when empty), validated against the schema this
        method's `@contract(body=...)` names (the one the OpenAPI document shows)."""
        schema = contract_of(type(self), self.request.method or "").body
        if schema is None or schema == UPLOAD:
            raise TypeError(f"{type(self).__name__}.{(self.request.method or '').lower()} "
                            "reads a JSON body but its @contract declares none")
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
        problems = specs.validate(schema, data)
        if problems:
            raise Invalid("invalid request: " + "; ".join(problems), details=problems)
        return data

    # -- session and authorization --------------------------------------------------------

    async def prepare(self) -> None:
        self._count(+1)
        self.request_id = request_ids.adopt(self.request.headers.get(request_ids.HEADER))
        self.set_header(request_ids.HEADER, self.request_id)
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
        if threading.get_ident() != self._loop_thread or self._idempotency is not None:
            # a route in the store lane, or one whose reply is kept for retries (before it
            # is sent): sent when the route returns
            self._deferred = (status, body)
            return
        self._finish_envelope(status, body)

    def clear(self) -> None:
        # Tornado clears the headers before an error reply: the request id stays.
        super().clear()
        if self.request_id:
            self.set_header(request_ids.HEADER, self.request_id)
    def compute_etag(self) -> str | None:
        """None: an ETag of this API is a resource's generation (`resource`, set by
        `_finish_envelope`), never Tornado's hash of the body, which clients would take
        for one and send back as If-Match; and Tornado's If-None-Match check would answer
        304 for a resource whose status changed while its generation did not."""
        return None

    def _finish_envelope(self, status: int, body: str) -> None:
        if self._etag is not None and not self._error_code:
            self.set_header("ETag", etag(self._etag))
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
        # The original answers HTTP 200 for errors; its portal switches on error_code. A
        # failed If-Match is HTTP 412 for a client that asks for it (`Prefer`, STRICT_HTTP).
        status = 200
        if isinstance(exc, PreconditionFailed) and self.prefers_strict_http():
            status = 412
            self.set_header("Preference-Applied", STRICT_HTTP)
        self.send_envelope(code, message, None, status=status)

    def prefers_strict_http(self) -> bool:
        prefer = ",".join(self.request.headers.get_list("Prefer"))
        return STRICT_HTTP in (p.strip() for p in prefer.replace(";", ",").split(","))

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
        self.ctx.metrics.request(self.route, self.request.method or "", self._error_code,
                                 self.request.request_time())
        if self.request.method in ("GET", "HEAD", "OPTIONS") or self._error_code or self._quiet:
            return
        if self.get_status() >= 300 or self.session is None and not self._audit:
            return
        who = self.user or "anonymous"
        what = self._audit or f"{self.request.method} {self.request.path}"
        self.ctx.audit.add(f"{who} {what}", user=who, address=self.address,
                           resource=self.log_path(), request_id=self.request_id)

    # -- running a route: idempotent and conditional writes --------------------------------

    async def _run_route(self, method: Callable[..., Any], lane: bool,
                         args: tuple[Any, ...]) -> None:
        verb = self.request.method or ""
        key = self.request.headers.get(IDEMPOTENCY_HEADER)
        if key is not None:
            self._check_idempotency_key(key, verb)
        match = self.request.headers.get("If-Match")
        if match is not None:
            if verb not in ("PUT", "DELETE") or self.resource is None:
                raise Invalid(f"If-Match is not supported on {verb} {self.request.path}: it "
                              "guards PUT and DELETE of resources that answer GET with an "
                              "ETag; send the request without it")
            self._if_match = entity_tags(match)
        if key is not None and lane:
            claim = await self.stored(self._create_once, method, args, key)
            if claim.outcome is Claimed.NEW:
                if self._deferred is not None:
                    self._finish_envelope(*self._deferred)
                return
            self._answer(claim, key)
            return
        if key is not None and await self._replayed(key):
            return
        try:
            if lane:
                await self.stored(self._in_lane, method, args)
            else:
                await method(self, *args)
                if self._if_match is not None and not self._if_match_done:
                    raise Internal(f"{verb} {self.request.path} did not apply If-Match")
        except Exception:
            if self._idempotency is not None:
                scope, self._idempotency = self._idempotency, None
                await self.stored(self.store.release_idempotency, scope)
            raise
        if self._deferred is not None:
            status, body = self._deferred
            if self._idempotency is not None:
                scope, self._idempotency = self._idempotency, None
                if self._error_code:  # an error made nothing: the key is free again
                    await self.stored(self.store.release_idempotency, scope)
                else:
                    await self.stored(self.store.keep_idempotent_reply, scope, status, body)
            self._finish_envelope(status, body)
        elif self._idempotency is not None:  # finished without an envelope: nothing to keep
            await self.stored(self.store.release_idempotency, self._idempotency)

    def _in_lane(self, method: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """A route method in the store lane: a GET of a resource gets its ETag (read
        before the reply's data, so it is never newer than what the client got); a PUT or
        DELETE with If-Match runs in one transaction with the compare."""
        if self.resource is not None and self.request.method in ("GET", "HEAD"):
            generation = self.store.generation_of(self.resource.kind, self.resource.key(args))
            method(self, *args)
            self._etag = generation
        elif self._if_match is not None:
            self._write_if_match(method, self, *args)
        else:
            method(self, *args)

    @contextlib.contextmanager
    def _enqueues_after_commit(self) -> Iterator[None]:
        """While a route runs inside a transaction of ours, its enqueues wait for the
        commit: the reconciler could otherwise read the old state and call it converged.
        Dropped when the transaction fails (nothing changed)."""
        held: list[Any] = []
        shared = self.ctx
        self.ctx = copy.copy(shared)
        self.ctx.enqueue = held.append
        try:
            yield
        finally:
            self.ctx = shared
        for item in held:
            shared.enqueue(item)

    def _write_if_match(self, write: Callable[..., T], *args: Any) -> T:
        """`write(*args)` (in the store lane) in one transaction with the If-Match
        compare."""
        assert self.resource is not None and self._if_match is not None
        with self._enqueues_after_commit():
            result, generation = self.store.write_if_match(
                self.resource.kind, self.resource.key(self.path_args), self._if_match,
                write, *args)
        self._etag = generation
        self._if_match_done = True
        return result

    def _create_once(self, method: Callable[..., Any], args: tuple[Any, ...],
                     key: str) -> Claim:
        """A creating route in the store lane with an Idempotency-Key: claim, create and
        keep the reply in one transaction (state/idempotency.py `create_once`)."""
        def create() -> tuple[int, str] | None:
            method(self, *args)
            return None if self._deferred is None or self._error_code else self._deferred

        with self._enqueues_after_commit():
            return self.store.create_once(self.user, self._idempotent_route(), key,
                                          body_digest(b"".join(self._chunks)), create)

    def _idempotent_route(self) -> str:
        return f"POST {self.request.path.rstrip('/')}"

    async def stored_write(self, fn: Callable[..., T], *args: Any) -> T:
        """The one store write of a coroutine route declaring a `resource` (a DELETE that
        then waits for the reconciler): with If-Match, in one transaction with the
        compare; without, as `stored`."""
        if self._if_match is None:
            return await self.stored(fn, *args)
        return await self.stored(self._write_if_match, fn, *args)

    def _check_idempotency_key(self, key: str, verb: str) -> None:
        if verb != "POST" or not self.creates:
            raise Invalid(f"{IDEMPOTENCY_HEADER} is not supported on {verb} "
                          f"{self.request.path}: only POST routes that create something "
                          "take it; send the request without it")
        if not 1 <= len(key) <= 255 or not all("!" <= c <= "~" for c in key):
            raise Invalid(f"{IDEMPOTENCY_HEADER}: want 1 to 255 visible ASCII characters "
                          "(e.g. a UUID), one new key per intended create")

    async def _replayed(self, key: str) -> bool:
        """A coroutine route's claim of `key`, or the answer of the first request that
        used it (True: answered). A first request still being handled is waited for up to
        IDEMPOTENCY_WAIT seconds."""
        route = self._idempotent_route()
        digest = body_digest(b"".join(self._chunks))
        deadline = time.monotonic() + IDEMPOTENCY_WAIT
        claim: Claim | None = None
        while True:
            if claim is None:  # first, or the first request failed and freed the key
                claim = await self.stored(self.store.claim_idempotency, self.user, route,
                                          key, digest)
            if claim.outcome is not Claimed.PENDING or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)
            claim = await self.stored(self.store.idempotent_reply, claim.scope)
        if claim.outcome is Claimed.NEW:
            self._idempotency = claim.scope
            return False
        self._answer(claim, key)
        return True

    def _answer(self, claim: Claim, key: str) -> None:
        """Answer a request whose key was used before: its first reply, or why not."""
        if claim.outcome is Claimed.OTHER_BODY:
            raise Conflict(f"{IDEMPOTENCY_HEADER} {key!r} was used on POST "
                           f"{self.request.path} {claim.age:.0f} s ago with another body: a "
                           "retry must send the same body; use a new key for a new request")
        if claim.outcome is Claimed.PENDING:
            raise Conflict(f"{IDEMPOTENCY_HEADER} {key!r}: the first request with this key "
                           f"(started {claim.age:.0f} s ago) is still in progress, or its "
                           "nanod stopped while handling it; retry later with the same key "
                           "to get its reply, or check whether it took effect")
        self._quiet = True  # the first request wrote the audit entry
        self.set_header("Idempotent-Replayed", "true")
        self._finish_envelope(claim.status, claim.reply)

    # -- blocking work --------------------------------------------------------------------

    async def stored(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn`, which reads or writes the store, in the store lane: never on the
        IOLoop, so a wait for SQLite's write lock holds a lane thread, not every request.
        `fn` runs in a copy of this request's context (it knows the request id) and as the
        session's user (events the store writes meanwhile name it: state/events.py)."""
        return await IOLoop.current().run_in_executor(
            self.ctx.store_lane, contextvars.copy_context().run, as_actor(self.user, fn), *args)

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

        self._background = self.ctx.store_lane.submit(contextvars.copy_context().run,
                                                      as_actor(self.user, run))
        self._background.add_done_callback(done)

    async def background_settled(self) -> None:
        """Wait until this request's writes in the background are done (before answering,
        so that a client reads what the answer implies)."""
        if self._background is not None:
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(self._background)

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` in the API thread pool, never on the IOLoop (in a copy of this
        request's context, like `stored`)."""
        return await IOLoop.current().run_in_executor(
            self.ctx.executor, contextvars.copy_context().run, fn, *args)

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
            self.set_header("Access-Control-Allow-Headers",
                            f"Content-Type, {SESSION_HEADER}, {IDEMPOTENCY_HEADER}, If-Match, "
                            "Prefer")
            self.set_header("Access-Control-Expose-Headers",
                            "ETag, Idempotent-Replayed, Preference-Applied")
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
