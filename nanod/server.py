"""Composition root of `nanod serve`: opens the store, builds the reconciler and the
Tornado application, serves until SIGTERM/SIGINT, then shuts down cleanly (in-flight
requests finish, workers stop, the database closes).

Called by nanod/cli.py; tests start the same `Server` on a free port.

The process's metrics (api/metrics.py) are made here and handed to both sides: the API
through its AppContext, the reconciler as its `Meter`; the store's counts and the work
queue are read at each scrape. The reconciler's enqueue is given the current request's
X-Request-Id (api/request_ids.py) as the cause of each key an API write enqueues, and every
log line says the request it was written for (`RequestIdFilter`).
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
import re
import signal
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web

from api import events, request_ids
from api.app import make_app
from api.base import AppContext
from api.metrics import Metrics
from api.setup_token import SetupToken
from nanod.config import replica_id
from reconciler.contract import Key
from reconciler.guests import dry_run as guest_dry_run
from reconciler.loop import CAUSES
from state.cell_transport import CellRules
from state.db import close_database, database_url, open_database
from state.identity import use_password_hash
from state.notify import Broadcast, Listener, is_postgresql
from state.secrets import seal_plain_secrets
from state.store import Store

log = logging.getLogger("nano")

# Bearer tokens and channel ids appear in some paths: never write them to a log.
_SECRET_PATHS = re.compile(r"(/(?:sessions|monitor_channels)/)[^/?]+")
_SECRET_QUERY = re.compile(r"([?&]session=)[^&]*")  # GET /events from a browser


def redact(path: str) -> str:
    return _SECRET_QUERY.sub(r"\1***", _SECRET_PATHS.sub(r"\1***", path))


def access_log(handler: tornado.web.RequestHandler) -> None:
    request = handler.request
    status = handler.get_status()
    code = getattr(handler, "_error_code", 0)
    logging.getLogger("nano.access").info(
        "%d %s %s %s (%s) %.1fms request %s", status, code, request.method,
        redact(request.uri or ""), request.remote_ip, 1000.0 * request.request_time(),
        getattr(handler, "request_id", "") or "-",  # /metrics and the websocket have none
    )


class RequestIdFilter(logging.Filter):
    """Gives every record `request`: " [request ID]" while it is written for an API
    request, or for a reconcile that requests caused (reconciler/loop.py), else ""."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = request_ids.current() or ",".join(CAUSES.get())
        record.request = f" [request {ids}]" if ids else ""
        return True


def setup_logging(settings: dict[str, Any], *, to_file: bool = True) -> None:
    level = getattr(logging, str(settings.get("log_level", "info")).upper(), logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s%(request)s")
    ids = RequestIdFilter()
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    stream = logging.StreamHandler()
    stream.setFormatter(fmt)
    stream.addFilter(ids)
    root.addHandler(stream)
    if to_file:
        os.makedirs(settings["data_dir"], exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(settings["data_dir"], "nanod.log"))
        file_handler.setFormatter(fmt)
        file_handler.addFilter(ids)
        root.addHandler(file_handler)


def open_store(settings: dict[str, Any]) -> Store:
    use_password_hash(settings["password_hash"])
    os.makedirs(settings["data_dir"], exist_ok=True)
    open_database(database_url(settings.get("database"), settings["data_dir"]))
    return Store(session_timeout=int(settings["session_timeout"]), limits=settings["limits"],
                 data_dir=settings["data_dir"], overcommit=settings["overcommit"],
                 cell_rules=CellRules.from_settings(settings),
                 replica=settings["replicas"]["id"], image_dir=settings["image_dir"])


def lock_data_dir(data_dir: str) -> int:
    """Take the data directory for this process (an flock on DATA_DIR/nanod.lock, which
    also holds our pid), or exit with who has it: two nanods on one data directory would
    remove each other's uploads at start and fight over the same cells. The lock goes
    when the returned descriptor is closed, or the process ends however it ends."""
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, "nanod.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SystemExit(f"nanod: another nanod (pid {holder}) serves {data_dir}: stop it "
                         "first, or give this one its own --data-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Server:
    """API + reconciler in one process."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self._lock = lock_data_dir(settings["data_dir"])
        settings["replicas"]["id"] = replica_id(settings)  # kept in the data dir if not set
        # where the cells' private keys go (ssh.key_file must name one inside)
        os.makedirs(settings["ssh"]["key_dir"], mode=0o700, exist_ok=True)
        if settings.get("allow_test_cells"):
            log.warning("test driver cells (test:///...) are accepted: this nanod is for tests "
                        "and benchmarks (allow_test_cells)")
        self.store = open_store(settings)
        self.store.ensure_default_templates()
        if seal_plain_secrets(settings["data_dir"]):  # rows from before sealing existed
            log.info("sealed the stored passwords that were kept in clear")
        left = self.store.recover_uploads()
        if left:
            log.warning("removed %d file(s) of unfinished or replaced uploads left by the last "
                        "stop", len(left))
        self.metrics = Metrics()
        self.metrics.watch_store(self.store.metrics_counts)
        self.membership = self._membership(settings)
        self.controller = build_controller(
            self.store, settings, meter=self.metrics,
            shard=self.membership if self.membership.reconciles else None)
        controller = self.controller

        def enqueue(key: Key) -> None:  # the request whose write asks is the cause
            if controller is not None:
                controller.enqueue(key, cause=request_ids.current())

        if controller is not None:
            self.metrics.watch_queue(controller.queue.stats)
        self.metrics.watch_replicas(self.membership, self.store.replicas_view)
        self.ctx = AppContext(store=self.store, enqueue=enqueue, settings=settings,
                              reconciling=(lambda: controller.kinds) if controller is not None else None,
                              metrics=self.metrics)
        # who may claim a fresh nanod from another host (api/setup_token.py)
        self.ctx.extras["setup_token"] = SetupToken.issue(
            settings["data_dir"], ready=self.store.system_ready())
        # the guest planner's dry run (POST /guests/{id}/plan): pure, reconcilers or not
        self.ctx.extras["plan_guest"] = functools.partial(
            guest_dry_run, self.store, max_cores=int(settings["limits"]["max_cores"]),
            stop_grace_seconds=float(settings["reconciler"].get("stop_grace_seconds", 60)))
        if self.controller is not None:
            from reconciler.console import make_console_opener

            self.ctx.extras["open_console"] = make_console_opener(
                self.store, self.controller.connections)
        events.hub(self.ctx)  # checks the `events` settings now, not at the first client
        self.app = make_app(self.ctx, log_function=access_log)
        self.http: tornado.httpserver.HTTPServer | None = None
        self.port = 0
        self._stopping: asyncio.Event | None = None
        self._broadcast: Broadcast | None = None
        self._listener: Listener | None = None

    def _membership(self, settings: dict[str, Any]) -> Any:
        """This nanod as a replica of the store's control plane (reconciler/leases.py); one
        whose reconciler is disabled only heartbeats (it holds no lease)."""
        from reconciler.leases import Membership

        conf = settings["replicas"]
        return Membership(self.store, conf["id"], ttl=float(conf["lease_ttl_seconds"]),
                          renew_seconds=float(conf["renew_seconds"]),
                          address=conf["address"] or settings.get("listen", ""),
                          reconciles=bool(settings.get("reconciler", {}).get("enabled", True)))

    def listen(self, host: str, port: int) -> int:
        # every body is small unless its route says otherwise per request (api/base.py)
        self.http = tornado.httpserver.HTTPServer(
            self.app, max_body_size=self.ctx.max_json_bytes, idle_connection_timeout=120,
            chunk_size=1 << 20,  # image uploads arrive in 1 MiB pieces, not 64 KiB
        )
        sockets = tornado.netutil.bind_sockets(port, address=host)
        self.http.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        events.hub(self.ctx).keep_trimmed()  # whether or not anyone follows the stream
        if self.controller and is_postgresql():  # keys reach the replica that owns them
            replica, controller = self.settings["replicas"]["id"], self.controller
            self._broadcast = Broadcast(replica)
            controller.tell_others(self._broadcast.send)
            self._listener = Listener(
                replica, lambda kind, key_id: controller.enqueue(Key(kind, key_id), local=True),
                on_gap=controller.resync)
        if not self.settings["replicas"]["address"]:
            self.membership.address = f"{host}:{self.port}"
        self.membership.start()  # first renewal now: a lone replica holds every lease
        if self.controller:
            self.controller.start()
        return self.port

    async def serve_forever(self) -> None:
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        await self._stopping.wait()
        log.info("shutting down")
        await self.shutdown()

    async def shutdown(self, grace: float = 10.0) -> None:
        if self.http:
            self.http.stop()  # no new connections
            events.hub(self.ctx).close()  # event streams end; clients resume by cursor
            deadline = asyncio.get_running_loop().time() + grace
            while self.ctx.extras.get("inflight", 0) > 0:
                if asyncio.get_running_loop().time() > deadline:
                    log.warning("%d request(s) still running at shutdown",
                                self.ctx.extras["inflight"])
                    break
                await asyncio.sleep(0.05)
            await self.http.close_all_connections()
        if self.controller:
            await asyncio.get_running_loop().run_in_executor(None, self.controller.stop, 10.0)
        for part in (self._listener, self._broadcast):
            if part is not None:
                part.close()
        # after the workers: nothing writes under a lease any more
        await asyncio.get_running_loop().run_in_executor(None, self.membership.stop)
        self.ctx.close()
        close_database()
        if self._lock >= 0:
            os.close(self._lock)  # the lock goes with it
            self._lock = -1


def build_controller(store: Store, settings: dict[str, Any], *, meter: Any = None,
                     shard: Any = None) -> Any:
    """The reconciler for this store, or None when disabled in settings; `meter` is told
    of reconciles and image bytes (api/metrics.py's Metrics); `shard` is this replica's
    `Membership` (None: reconcile every key, as `nanod reconcile --once`)."""
    conf = settings.get("reconciler", {})
    if not conf.get("enabled", True):
        return None
    # Imported here, not at the top, so that importing the API does not load libvirt; an
    # ImportError propagates: nanod never serves without the reconcilers it was built with.
    from reconciler.kinds import build

    return build(store, settings, meter=meter, shard=shard)
