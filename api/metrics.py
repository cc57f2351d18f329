"""Prometheus metrics of one nanod: what `GET /metrics` (at the server root, not under
/api/v1) shows, in the text format `prometheus_client` writes.

nanod/server.py (the composition root) makes one `Metrics` per process and hands it to the
API (`AppContext.metrics`: requests in `NanoHandler.on_finish`, login failures, image bytes
in api/images.py) and to the reconciler (`reconciler.kinds.build(meter=...)`: each
reconcile's duration and result, cell probes, image bytes sent to and read from cells; the
reconciler knows only the `Meter` protocol of reconciler/contract.py). The registry is the
process's own, never prometheus_client's global one, so tests that run several nanods in
one process do not mix their counts.

What is read from the store (guests by phase per pool, cells up) is computed at the scrape
by `StoreCollector`, with the whole exposition written in the store lane: a scrape never
reads the database on the IOLoop.

Access: when the setting `metrics_token` is set, a scrape must send
`Authorization: Bearer <token>` (compared in constant time) or gets HTTP 401; when it is
empty, anyone who reaches the listen address reads the metrics (README says how to keep
them to the monitoring host).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator
from typing import Any

import tornado.web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from tornado.ioloop import IOLoop

DIRECTIONS = ("upload", "download", "to_cell", "from_cell")
"""Image transfer directions: a client's upload to nanod, a client's download from it, an
image sent to a cell (a guest's disk or media), a volume read back from a cell (an image
made from a guest's disk)."""

QueueStats = Callable[[], tuple[int, float]]
"""(keys ready to reconcile, seconds the oldest of them has waited)."""


class StoreCollector(Collector):
    """Guests by phase per pool and each cell's up/down, read from the store at every
    scrape (`Store.metrics_counts`, one GROUP BY and the cells' phases)."""

    def __init__(self, counts: Callable[[], dict[str, Any]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        counts = self._counts()
        guests = GaugeMetricFamily("nano_guests", "Guests by pool and phase (the reconciler's "
                                   "last observed phase)", labels=["pool", "phase"])
        for pool, phase, number in counts["guests"]:
            guests.add_metric([pool, phase], number)
        yield guests
        up = GaugeMetricFamily("nano_cell_up", "1 while the cell's probes succeed (phase "
                               "online), else 0", labels=["cell"])
        for name, phase in counts["cells"]:
            up.add_metric([name], 1.0 if phase == "online" else 0.0)
        yield up


class ReplicaCollector(Collector):
    """This nanod as a replica (reconciler/leases.py): the leases it holds, the takeovers
    it made, and the store's replicas with their heartbeat ages, read at every scrape."""

    def __init__(self, membership: Any, replicas: Callable[[], list[dict[str, Any]]]) -> None:
        self._membership = membership
        self._replicas = replicas

    def collect(self) -> Iterator[Metric]:
        held = self._membership.held()
        mine = GaugeMetricFamily("nano_replica_leases", "Leases this replica holds (global "
                                 "counts as one)", labels=["replica"])
        mine.add_metric([self._membership.replica], len(held))
        yield mine
        took = GaugeMetricFamily("nano_replica_takeovers", "Leases this replica took over "
                                 "from another holder since it started", labels=["replica"])
        took.add_metric([self._membership.replica], self._membership.takeovers)
        yield took
        ages = GaugeMetricFamily("nano_replica_heartbeat_age_seconds", "Seconds since each "
                                 "replica of the store last renewed", labels=["replica"])
        cells = GaugeMetricFamily("nano_replica_cells", "Cells each replica reconciles",
                                  labels=["replica"])
        for replica in self._replicas():
            ages.add_metric([replica["id"]], replica["heartbeat_age"])
            cells.add_metric([replica["id"]], len(replica["cells"]))
        yield ages
        yield cells


class QueueCollector(Collector):
    """The reconciler's work queue, read at every scrape."""

    def __init__(self, stats: QueueStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        depth, oldest = self._stats()
        yield GaugeMetricFamily("nano_workqueue_depth",
                                "Keys waiting for a reconcile worker", value=depth)
        yield GaugeMetricFamily("nano_workqueue_oldest_item_age_seconds",
                                "How long the oldest waiting key has waited (0: none waits)",
                                value=oldest)


class Metrics:
    """The metrics of one nanod process and the registry they live in. Thread-safe (the
    prometheus_client types are): observed from the IOLoop, the store lane and the
    reconciler's threads."""

    def __init__(self) -> None:
        # no auto_describe: it would run the collectors (a store read) when they register
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "nano_api_requests", "API requests answered, by route template, method and the "
            "envelope's error_code (0 = success)", ["route", "method", "error_code"],
            registry=r)
        self.request_seconds = Histogram(
            "nano_api_request_duration_seconds", "Time from a request's arrival to its reply",
            ["route", "method"], registry=r)
        self.reconcile_seconds = Histogram(
            "nano_reconcile_duration_seconds", "Time one reconcile took, by kind and result "
            "(ok, error); its _count is the number of reconciles",
            ["kind", "result"], buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30,
                                         60, 300), registry=r)
        self.probe_seconds = Histogram(
            "nano_cell_probe_duration_seconds", "Time one probe of a cell took (its reconcile)",
            ["cell"], registry=r)
        self.image_bytes = Counter(
            "nano_image_transfer_bytes", "Bytes of image files moved, by direction: upload, "
            "download (clients), to_cell, from_cell", ["direction"], registry=r)
        for direction in DIRECTIONS:  # every series from the start: a rate() needs a 0
            self.image_bytes.labels(direction)
        self.domains_created = Counter(
            "nano_guest_domains_created", "Guest domains this nanod defined on a cell for the "
            "first time (summed over replicas: one per guest)", ["cell"], registry=r)
        self.login_failures = Counter(
            "nano_login_failures", "Logins refused for a wrong user name or password",
            registry=r)
        self._store_collector: StoreCollector | None = None
        self._queue_collector: QueueCollector | None = None

    # -- wiring (the composition root) ---------------------------------------------------

    def watch_store(self, counts: Callable[[], dict[str, Any]]) -> None:
        """Read guests and cells at each scrape through `counts` (Store.metrics_counts)."""
        self._store_collector = StoreCollector(counts)
        self.registry.register(self._store_collector)

    def watch_replicas(self, membership: Any, replicas: Callable[[], list[dict[str, Any]]]
                       ) -> None:
        """Read this replica's leases and the store's replicas at each scrape."""
        self.registry.register(ReplicaCollector(membership, replicas))

    def watch_queue(self, stats: QueueStats) -> None:
        """Read the reconciler's work queue at each scrape."""
        self._queue_collector = QueueCollector(stats)
        self.registry.register(self._queue_collector)

    # -- observations ----------------------------------------------------------------------

    def request(self, route: str, method: str, error_code: int, seconds: float) -> None:
        self.requests.labels(route, method, str(error_code)).inc()
        self.request_seconds.labels(route, method).observe(seconds)

    def login_failed(self) -> None:
        self.login_failures.inc()

    def transferred(self, direction: str, nbytes: int) -> None:
        """`nbytes` of an image moved in `direction` (one of DIRECTIONS)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown image transfer direction {direction!r}")
        if nbytes > 0:
            self.image_bytes.labels(direction).inc(nbytes)

    def domain_created(self, cell: str) -> None:
        """A guest's domain was defined on `cell` for the first time."""
        self.domains_created.labels(cell).inc()

    def reconciled(self, kind: str, key_id: str, ok: bool, seconds: float) -> None:
        """One reconcile of `kind`/`key_id` ended (`ok`: without raising)."""
        self.reconcile_seconds.labels(kind, "ok" if ok else "error").observe(seconds)
        if kind == "cell":  # a cell's reconcile is its probe
            self.probe_seconds.labels(key_id).observe(seconds)

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The body a scrape gets and its Content-Type: the format its `Accept` header
        asks for (OpenMetrics, or Prometheus text 0.0.4 by default). Reads the store: call
        it in the store lane."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


class MetricsHandler(tornado.web.RequestHandler):
    """GET /metrics: Prometheus text, not the Nano envelope (a scraper reads it, not an API
    client). Guarded by the `metrics_token` setting when it is set."""

    def initialize(self, ctx: Any) -> None:
        self.ctx = ctx

    async def get(self) -> None:
        token = str(self.ctx.settings.get("metrics_token") or "")
        if token:
            given = self.request.headers.get("Authorization", "")
            expected = f"Bearer {token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                self.set_status(401)
                self.set_header("WWW-Authenticate", 'Bearer realm="nano metrics"')
                self.set_header("Content-Type", "text/plain; charset=utf-8")
                self.finish("metrics need 'Authorization: Bearer <metrics_token>'\n")
                return
        body, content_type = await IOLoop.current().run_in_executor(
            self.ctx.store_lane, self.ctx.metrics.exposition,
            self.request.headers.get("Accept", ""))
        self.set_header("Content-Type", content_type)
        self.finish(body)
