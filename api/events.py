"""Extension route `GET /api/v1/events`: the event stream (state/events.py) to clients.

Three answers on one path, chosen by the request:
  - a websocket upgrade: one JSON text frame per event (`EventsSocket`);
  - `Accept: text/event-stream`: Server-Sent Events, each with `id:` = the event's cursor,
    so an EventSource (or curl) that reconnects with `Last-Event-ID` resumes;
  - anything else: one page of events in the envelope, {events, cursor, oldest}.
Query parameters: `kind` and `name` (repeatable or comma-separated; a name matches an
event's name or resource id), `since` (a cursor: events after it; the streams start at
"now" without one; the page at the oldest retained). A cursor older than the oldest
retained event gets an `expired` event first (type "expired", payload since/oldest): the
client missed what was trimmed and should re-read the state it cares about.

The session is the `Nano-Session` header. A browser's EventSource and WebSocket cannot set
headers, so this route alone also takes it as the `session` query parameter (the access
log redacts it, nanod/server.py); send the header wherever the client can.

Visibility is that of the lists (state/events.py `sees`). Delivery: one `EventHub` per
nanod tails the table: every `events.poll_seconds` it runs one query in the store lane
(`events_after` its cursor), shared by every subscriber, and hands each the rows it may
see; so a nanod sees the events any replica writes to the same database. Callers: any
client; `nanod apply --wait` and `nanod get -w` (nanod/watch.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import tornado.iostream
import tornado.websocket
from tornado.ioloop import IOLoop, PeriodicCallback

from api.base import SESSION_HEADER, AppContext, NanoHandler, contract
from state.errors import Invalid, Unauthorized
from state.events import public, sees
from state.identity import SessionInfo

log = logging.getLogger("nano.api.events")

KINDS = ("ComputePool", "Cell", "StoragePool", "AddressPool", "Guest", "Snapshot",
         "DiskImage", "MediaImage", "SecurityPolicyGroup", "Migration", "BatchTask")
PAGE = 500
GAP_GRACE = 2.0  # s a missing id may take to commit (PostgreSQL) before it is passed over
KEEPALIVE = 15.0  # s between SSE comments, so proxies keep an idle stream open
BACKLOG = 10_000  # events queued for one slow client before it is cut off (it resumes)
TRIM_EVERY = 60.0


def event_settings(settings: dict[str, Any]) -> dict[str, float]:
    """`events` settings (nanod/config.py has the defaults), checked."""
    conf = settings.get("events") or {}
    out: dict[str, float] = {}
    for name, minimum in (("max_age_seconds", 1), ("max_count", 1), ("poll_seconds", 0.05)):
        value = conf.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            raise ValueError(f"settings: events.{name} must be a number of at least "
                             f"{minimum}, not {value!r}")
        out[name] = value
    return out


class Subscriber:
    """One client's view of the stream: its filters, its cursor and where its events go.
    Runs on the IOLoop only."""

    def __init__(self, viewer: SessionInfo, kinds: set[str], names: set[str],
                 send: Callable[[dict[str, Any]], None]) -> None:
        self.viewer, self.kinds, self.names, self.send = viewer, kinds, names, send
        self.cursor = 0
        self.catching_up = True
        self.pending: list[dict[str, Any]] = []

    def offer(self, event: dict[str, Any]) -> None:
        if self.catching_up:  # live events wait until the backlog before them is sent
            self.pending.append(event)
            return
        self.deliver(event)

    def deliver(self, event: dict[str, Any]) -> None:
        if event["id"] <= self.cursor:
            return
        self.cursor = event["id"]
        if self.kinds and event["kind"] not in self.kinds:
            return
        if self.names and event["name"] not in self.names and \
                event["resource"] not in self.names:
            return
        if sees(event, self.viewer):
            self.send(public(event))

    def caught_up(self) -> None:
        self.catching_up = False
        pending, self.pending = self.pending, []
        for event in pending:
            self.deliver(event)


class EventHub:
    """The tail of the event table shared by every subscriber of this nanod."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        conf = event_settings(ctx.settings)
        self.poll = float(conf["poll_seconds"])
        self.max_age, self.max_count = float(conf["max_age_seconds"]), int(conf["max_count"])
        self.subscribers: set[Subscriber] = set()
        self.cursor: int | None = None
        self._timer: PeriodicCallback | None = None
        self._busy = False
        self._gap_since: float | None = None
        self._trimmer: PeriodicCallback | None = None
        self.closing = asyncio.Event()

    async def lane(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await IOLoop.current().run_in_executor(self.ctx.store_lane, fn, *args)

    async def join(self, sub: Subscriber) -> int:
        """Add `sub` (its events wait while it catches up); returns the newest event id.
        A hub nobody followed starts again at the newest event: the rows written while
        idle are nobody's backlog (a client with a cursor reads its own)."""
        if self._timer is None and not self.subscribers:
            self.cursor = None
        self.subscribers.add(sub)
        if self._timer is None:
            self._timer = PeriodicCallback(self.tick, self.poll * 1000)
            self._timer.start()
        _, newest = await self.lane(self.ctx.store.event_bounds)
        if self.cursor is None:  # ticks wait for this
            self.cursor = newest
        return newest

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        if not self.subscribers and self._timer is not None:
            self._timer.stop()
            self._timer = None

    async def tick(self) -> None:
        """One query for all subscribers; the rows go out in id order. An id missing
        between two rows is held for GAP_GRACE (a transaction may still commit it on
        PostgreSQL), then passed over (it was rolled back)."""
        if self._busy or self.cursor is None:
            return
        self._busy = True
        try:
            rows = await self.lane(self.ctx.store.events_after, self.cursor, PAGE)
            now = time.monotonic()
            for event in rows:
                if event["id"] != self.cursor + 1:
                    if self._gap_since is None:
                        self._gap_since = now
                    if now - self._gap_since < GAP_GRACE:
                        break
                self._gap_since = None
                self.cursor = event["id"]
                for sub in list(self.subscribers):
                    sub.offer(event)
        except Exception:  # a failed tick is retried by the next one
            log.exception("reading the event stream failed")
        finally:
            self._busy = False

    def keep_trimmed(self) -> None:
        """Trim the table to the retention settings now and every TRIM_EVERY seconds
        (started by nanod/server.py once it listens)."""
        if self._trimmer is None:
            self._trimmer = PeriodicCallback(self.trim, TRIM_EVERY * 1000)
            self._trimmer.start()
            IOLoop.current().spawn_callback(self.trim)

    async def trim(self) -> None:
        try:
            await self.lane(lambda: self.ctx.store.trim_events(
                max_age=self.max_age, max_count=self.max_count))
        except Exception:  # the next round tries again
            log.exception("trimming the event stream failed")

    def close(self) -> None:
        """nanod stops: every stream ends (clients resume from their cursor)."""
        self.closing.set()
        for timer in (self._timer, self._trimmer):
            if timer is not None:
                timer.stop()
        self._timer = self._trimmer = None


def hub(ctx: AppContext) -> EventHub:
    if "events" not in ctx.extras:
        ctx.extras["events"] = EventHub(ctx)
    return ctx.extras["events"]


def _listed(values: list[str], field: str) -> set[str]:
    out = {v.strip() for raw in values for v in raw.split(",") if v.strip()}
    if field == "kind":
        unknown = sorted(out - set(KINDS))
        if unknown:
            raise Invalid(f"query parameter kind: unknown {', '.join(unknown)}; known: "
                          f"{', '.join(KINDS)}")
    return out


def _cursor(raw: str | None, field: str) -> int | None:
    if raw in (None, ""):
        return None
    if not raw.isdigit():
        raise Invalid(f"{field}: {raw!r} is not an event id (a whole number >= 0)")
    return int(raw)


async def open_stream(ctx: AppContext, sub: Subscriber, since: int | None) -> None:
    """Subscribe `sub` and send what it missed after `since` (None: from now), then live."""
    events = hub(ctx)
    newest = await events.join(sub)
    if since is None:
        sub.cursor = newest  # what the tail delivers up to it was written before
        sub.caught_up()
        return
    sub.cursor = since
    oldest, _ = await events.lane(ctx.store.event_bounds)
    if oldest and since + 1 < oldest:
        sub.send(expired(since, oldest))
        sub.cursor = max(since, oldest - 1)
    while events.cursor is not None and sub.cursor < events.cursor:
        rows = await events.lane(ctx.store.events_after, sub.cursor, PAGE)
        rows = [r for r in rows if r["id"] <= (events.cursor or 0)]
        if not rows:
            break
        for event in rows:
            sub.deliver(event)
    sub.caught_up()


def expired(since: int, oldest: int) -> dict[str, Any]:
    return {"id": oldest - 1, "time": "", "kind": "", "name": "", "resource": "",
            "type": "expired", "actor": NANOD_ACTOR,
            "payload": {"since": since, "oldest": oldest,
                        "message": f"events after {since} up to {oldest - 1} are no longer "
                                   "retained: re-read the state you follow"}}


NANOD_ACTOR = "nanod"


class EventsHandler(NanoHandler):
    """`GET /events`: Server-Sent Events, or one page in the envelope."""

    async def prepare(self) -> None:
        # EventSource cannot send headers: the query parameter stands in (see module doc)
        token = self.get_query_argument("session", "")
        if token and not self.request.headers.get(SESSION_HEADER):
            self.request.headers[SESSION_HEADER] = token
        await super().prepare()

    @contract(data="event_page", query=("kind", "name", "since", "limit", "session"),
              extension=True)
    async def get(self) -> None:
        kinds = _listed(self.get_query_arguments("kind"), "kind")
        names = _listed(self.get_query_arguments("name"), "name")
        since = _cursor(self.get_query_argument("since", None), "query parameter since")
        assert self.session is not None
        if "text/event-stream" in self.request.headers.get("Accept", ""):
            if since is None:
                since = _cursor(self.request.headers.get("Last-Event-ID"), "Last-Event-ID")
            await self._stream(kinds, names, since)
            return
        await self._page(kinds, names, since or 0)

    async def _page(self, kinds: set[str], names: set[str], since: int) -> None:
        limit = self.get_query_argument("limit", str(PAGE))
        if not limit.isdigit() or not 1 <= int(limit) <= PAGE:
            raise Invalid(f"query parameter limit: a whole number from 1 to {PAGE}")
        out: list[dict[str, Any]] = []
        sub = Subscriber(self.session, kinds, names, out.append)  # type: ignore[arg-type]
        sub.catching_up = False
        sub.cursor = since
        oldest, newest = await self.stored(self.store.event_bounds)
        if oldest and since + 1 < oldest:
            out.append(expired(since, oldest))
            sub.cursor = oldest - 1
        while len(out) < int(limit) and sub.cursor < newest:
            rows = await self.stored(self.store.events_after, sub.cursor, PAGE)
            if not rows:
                break
            for event in rows:
                if len(out) >= int(limit):
                    break
                sub.deliver(event)
        self.reply({"events": out, "cursor": sub.cursor, "oldest": oldest})

    async def _stream(self, kinds: set[str], names: set[str], since: int | None) -> None:
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        def send(event: dict[str, Any]) -> None:
            queue.put_nowait(event if queue.qsize() < BACKLOG else None)

        sub = Subscriber(self.session, kinds, names, send)  # type: ignore[arg-type]
        self.set_header("Content-Type", "text/event-stream; charset=UTF-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        self._closed = asyncio.Event()
        events = hub(self.ctx)
        try:
            # subscribed before the head goes out: a client that reads state once the
            # stream answers misses no event written after that read
            await open_stream(self.ctx, sub, since)
            self.write("retry: 2000\n\n")
            await self.flush()
            while not self._closed.is_set() and not events.closing.is_set():
                getter = asyncio.ensure_future(queue.get())
                closed = asyncio.ensure_future(self._closed.wait())
                stopping = asyncio.ensure_future(events.closing.wait())
                done, _ = await asyncio.wait({getter, closed, stopping}, timeout=KEEPALIVE,
                                             return_when=asyncio.FIRST_COMPLETED)
                for waiter in (closed, stopping):
                    waiter.cancel()
                if getter not in done:
                    getter.cancel()
                    self.write(": keepalive\n\n")
                else:
                    event = getter.result()
                    if event is None:  # too slow: it resumes from its Last-Event-ID
                        break
                    self.write(f"id: {event['id']}\ndata: {json.dumps(event)}\n\n")
                    while not queue.empty():
                        event = queue.get_nowait()
                        if event is None:
                            break
                        self.write(f"id: {event['id']}\ndata: {json.dumps(event)}\n\n")
                await self.flush()
        except tornado.iostream.StreamClosedError:
            pass
        finally:
            events.unsubscribe(sub)
        if not self._finished:
            self.finish()

    def on_connection_close(self) -> None:
        closed = getattr(self, "_closed", None)
        if closed is not None:
            closed.set()
        super().on_connection_close()


class EventsSocket(tornado.websocket.WebSocketHandler):
    """`GET /events` with a websocket upgrade: one JSON text frame per event. The session
    is the header or, from a browser (which cannot set one), the `session` parameter;
    a refused session closes with 4401, a bad parameter with 4400."""

    def initialize(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.sub: Subscriber | None = None
        self._early: list[dict[str, Any]] | None = []  # events before the handshake ends
        self._refusal: tuple[int, str] | None = None

    def check_origin(self, origin: str) -> bool:
        # no cookie is a credential here: the session token must be sent explicitly, so
        # another site's page cannot ride on a logged-in browser
        return True

    async def get(self, *args: Any, **kwargs: Any) -> None:
        """Subscribe before the handshake is answered, so a client that reads the state
        once connected misses no event written after that read; then upgrade."""
        token = (self.request.headers.get(SESSION_HEADER)
                 or self.get_query_argument("session", ""))
        session = self.ctx.store.cached_session(token) if token else None
        if session is None and token:
            session = await IOLoop.current().run_in_executor(
                self.ctx.store_lane, self.ctx.store.session, token)
        try:
            if session is None:
                raise Unauthorized("no session or session expired: log in and send the "
                                   f"'{SESSION_HEADER}' header (or ?session=)")
            kinds = _listed(self.get_query_arguments("kind"), "kind")
            names = _listed(self.get_query_arguments("name"), "name")
            since = _cursor(self.get_query_argument("since", None), "query parameter since")
        except (Invalid, Unauthorized) as exc:
            self._refusal = (4000 + exc.code, exc.message[:120])  # said once it is open
        else:
            self.sub = Subscriber(session, kinds, names, self._send)
            await open_stream(self.ctx, self.sub, since)
        await super().get(*args, **kwargs)
        if self.ws_connection is None and self.sub is not None:  # the upgrade failed
            hub(self.ctx).unsubscribe(self.sub)

    def open(self, *args: Any, **kwargs: Any) -> None:
        if self._refusal is not None:
            self.close(*self._refusal)
            return
        early, self._early = self._early or [], None
        for event in early:
            self.write_message(json.dumps(event))
        IOLoop.current().spawn_callback(self._until_stopping)

    async def _until_stopping(self) -> None:
        await hub(self.ctx).closing.wait()
        if self.ws_connection is not None and not self.ws_connection.is_closing():
            self.close(1001, "nanod is stopping: reconnect with since=<last id>")

    def _send(self, event: dict[str, Any]) -> None:
        if self._early is not None:
            self._early.append(event)
            return
        if self.ws_connection is None or self.ws_connection.is_closing():
            return
        self.write_message(json.dumps(event))

    def on_message(self, message: str | bytes) -> None:
        pass  # the stream is one way

    def on_close(self) -> None:
        if self.sub is not None:
            hub(self.ctx).unsubscribe(self.sub)


ROUTES = [(r"/events", EventsHandler)]
# answered before ROUTES for a request that asks to upgrade (api/app.py)
UPGRADE_ROUTES = [(r"/events", EventsSocket)]
