"""One cell's hypervisor through libvirt: `LibvirtHypervisor(uri)`.

The cell reconciler and the guest/pool reconcilers call it (from worker threads) to read
node info and domains, to converge storage pools, and to learn of domain lifecycle changes
as they happen. URIs: `qemu:///system` (local cell), `qemu+ssh://user@host/system?...`
(remote cell), `test:///path/cell-N.xml` (libvirt's test driver: tests, scale runs).

Ownership (ARCHITECTURE.md §3): our domains carry
`<metadata><nano:guest xmlns:nano="https://nano.cloud/xmlns/guest/1" id="GUEST_ID"/>` and
are named `nano-GUEST_ID`; our storage pools are named `nano-...` (`nano` is the names
prefix, reconciler/naming.py). We change or delete only what carries the mark and the prefix.

Every libvirt error is translated at this edge by `libvirt_errors(what)`: NotFound,
Conflict, Unavailable (unreachable cell; retried), Permanent; raw `libvirtError` never
leaves this module.

No call waits on a cell for ever: each runs in the cell's own threads and its caller
waits at most `reconciler.libvirt_timeout_seconds` (`configure`), then gets Unavailable;
until that call returns, further calls to the cell fail at once instead of queueing
behind it. A libvirtd that accepts and never answers holds a thread of its own cell, never
a reconciler worker. Long work (volume streams and copies, snapshots, live migrations) has
no limit (`timeout=None`) and runs in its caller's own thread (a long-work thread), never in
the cell's: two migrations from one cell must not take the threads its probes and status
calls need. ssh's keepalives end a remote one whose cell went away.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple, TypeVar

import libvirt

from reconciler import naming
from reconciler.threads import DaemonThreads
from state.errors import Conflict, NanoError, NotFound, Permanent, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

#: XML namespace of our ownership mark in domain `<metadata>`.
NAMESPACE = "https://nano.cloud/xmlns/guest/1"
NAMESPACE_PREFIX = "nano"

# -- error translation -----------------------------------------------------------------

_NOT_FOUND = {
    libvirt.VIR_ERR_NO_DOMAIN,
    libvirt.VIR_ERR_NO_STORAGE_POOL,
    libvirt.VIR_ERR_NO_STORAGE_VOL,
    libvirt.VIR_ERR_NO_NETWORK,
    libvirt.VIR_ERR_NO_NETWORK_PORT,
    libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT,
    libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT,
    libvirt.VIR_ERR_NO_DOMAIN_METADATA,
    libvirt.VIR_ERR_NO_INTERFACE,
    libvirt.VIR_ERR_NO_NODE_DEVICE,
    libvirt.VIR_ERR_NO_SECRET,
    libvirt.VIR_ERR_NO_NWFILTER,
}
_CONFLICT = {
    libvirt.VIR_ERR_OPERATION_INVALID,  # "domain is already running", "pool is not active"
    libvirt.VIR_ERR_DOM_EXIST,
    libvirt.VIR_ERR_NETWORK_EXIST,
    libvirt.VIR_ERR_NETWORK_PORT_EXIST,
    libvirt.VIR_ERR_STORAGE_VOL_EXIST,
}
_UNAVAILABLE = {
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_AUTH_FAILED,
    libvirt.VIR_ERR_AUTH_CANCELLED,
    libvirt.VIR_ERR_AUTH_UNAVAILABLE,
    libvirt.VIR_ERR_OPERATION_TIMEOUT,  # e.g. cannot acquire the state change lock
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
    libvirt.VIR_ERR_RESOURCE_BUSY,
}
# Errors raised by the transport itself (socket, ssh, keepalive), whatever their code:
# a daemon's own errors keep their original domain when they cross the wire.
_TRANSPORT_DOMAINS = {
    libvirt.VIR_FROM_RPC,
    libvirt.VIR_FROM_REMOTE,
    libvirt.VIR_FROM_SSH,
    libvirt.VIR_FROM_LIBSSH,
}


def translate(exc: libvirt.libvirtError, what: str) -> NanoError:
    """Our error for a libvirt error met while doing `what` (message: "what: reason").

    SYSTEM_ERROR counts as Unavailable only from the transport (connection refused,
    broken pipe, ssh failure); from a driver it is an errno failure on the cell
    (permission denied, no space) that retrying will not fix, hence Permanent."""
    code = exc.get_error_code()
    domain = exc.get_error_domain()
    message = f"{what}: {_reason(exc)}"
    if code in _NOT_FOUND:
        return NotFound(message)
    if code in _CONFLICT or "already exists" in message:
        return Conflict(message)
    if code in _UNAVAILABLE or domain in _TRANSPORT_DOMAINS:
        return Unavailable(message)
    return Permanent(message)


@contextlib.contextmanager
def libvirt_errors(what: str) -> Iterator[None]:
    """Translate any `libvirtError` raised inside into our errors (see `translate`)."""
    try:
        yield
    except libvirt.libvirtError as exc:
        raise translate(exc, what) from exc


def _reason(exc: libvirt.libvirtError) -> str:
    return str(exc.get_error_message() or exc).strip()


def _is_code(exc: libvirt.libvirtError, *codes: int) -> bool:
    return exc.get_error_code() in codes


def _quiet(_ctx: object, err: object) -> None:
    # libvirt prints every error to stderr by default; we raise them instead
    log.debug("libvirt: %s", err)


libvirt.registerErrorHandler(_quiet, None)

# -- the one event loop per process ----------------------------------------------------

_event_loop_lock = threading.Lock()
_event_loop_thread: threading.Thread | None = None


def _run_event_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except Exception:  # keep the loop alive whatever one iteration did
            log.exception("libvirt event loop iteration failed")
            time.sleep(0.1)


def ensure_event_loop() -> None:
    """Register libvirt's default event implementation and run it in one daemon thread,
    once per process. Must happen before a connection opens for that connection to deliver
    events and keepalives, so `LibvirtHypervisor` calls it before every open."""
    global _event_loop_thread
    with _event_loop_lock:
        if _event_loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()
        thread = threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True)
        thread.start()
        _event_loop_thread = thread


# -- call limits -----------------------------------------------------------------------

_call_timeout = 30.0
_in_call = threading.local()  # set on a cell thread while it runs a call
DEFAULT_LIMIT: Any = object()
"""`timeout` of a call not given one: the configured limit."""


def configure(*, call_timeout: float) -> None:
    """Set how long a caller waits for one libvirt call (reconciler.libvirt_timeout_seconds;
    nanod sets it at start)."""
    global _call_timeout
    if not call_timeout > 0:
        raise ValueError("settings: reconciler.libvirt_timeout_seconds must be above 0, "
                         f"not {call_timeout!r}")
    _call_timeout = float(call_timeout)


class _Stall(NamedTuple):
    what: str
    since: float
    future: concurrent.futures.Future[Any]


# URI -> the call to it that did not answer in time. Per URI, not per connection object:
# a cell whose link is dropped and opened again (as every failed probe does) must not
# leave one more stuck thread (and ssh process) behind each time.
_stalls: dict[str, _Stall] = {}


# -- values ----------------------------------------------------------------------------


class DomainState(StrEnum):
    """A domain's power state as the reconciler compares it."""

    RUNNING = "running"
    STOPPED = "stopped"
    PAUSED = "paused"
    CRASHED = "crashed"
    SHUTTING_DOWN = "shutting-down"
    SUSPENDED = "suspended"  # to RAM by the guest (pmsuspended)
    UNKNOWN = "unknown"


_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: DomainState.UNKNOWN,
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.RUNNING,  # running, waiting on a resource
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.SHUTTING_DOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.STOPPED,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.SUSPENDED,
}


class LifecycleEvent(StrEnum):
    """What happened to a domain, as passed to lifecycle callbacks."""

    DEFINED = "defined"
    UNDEFINED = "undefined"
    STARTED = "started"
    SUSPENDED = "suspended"
    RESUMED = "resumed"
    STOPPED = "stopped"
    SHUTDOWN = "shutdown"  # the guest began shutting down; "stopped" follows
    PMSUSPENDED = "pmsuspended"
    CRASHED = "crashed"


_EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: LifecycleEvent.DEFINED,
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: LifecycleEvent.UNDEFINED,
    libvirt.VIR_DOMAIN_EVENT_STARTED: LifecycleEvent.STARTED,
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: LifecycleEvent.SUSPENDED,
    libvirt.VIR_DOMAIN_EVENT_RESUMED: LifecycleEvent.RESUMED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED: LifecycleEvent.STOPPED,
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: LifecycleEvent.SHUTDOWN,
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: LifecycleEvent.PMSUSPENDED,
    libvirt.VIR_DOMAIN_EVENT_CRASHED: LifecycleEvent.CRASHED,
}

#: callback(domain_name, owned_id or None, event); runs on the libvirt event thread, so it
#: must return quickly (enqueue a key, `IOLoop.add_callback`), never block.
LifecycleCallback = Callable[[str, str | None, LifecycleEvent], None]


@dataclass(frozen=True)
class NodeInfo:
    cpus: int  # logical CPUs
    memory_bytes: int
    model: str  # CPU architecture/model as libvirt reports it, e.g. "x86_64"
    hostname: str


@dataclass(frozen=True)
class ObservedDomain:
    """A domain as found on the cell; `owned_id` is our guest id from the ownership mark,
    None for a domain we did not create (reported, never changed). `foreign`: it carries
    the mark but not our names prefix, so another nanod (e.g. the test suite's) owns it:
    neither ours nor reported as unowned (reconciler/naming.py)."""

    name: str
    uuid: str
    state: DomainState
    owned_id: str | None
    vcpus: int
    memory_bytes: int  # configured maximum, not the balloon's current size
    foreign: bool = False


@dataclass(frozen=True)
class PoolState:
    """A storage pool as found; `error` says why it is not active (e.g. the NFS mount
    failed), `capacity`/`available` are bytes (0 while inactive)."""

    name: str
    active: bool
    capacity: int
    available: int
    error: str | None = None
    type: str | None = None
    path: str | None = None


# -- pure rendering and parsing --------------------------------------------------------


def render_owner_metadata(guest_id: str) -> str:
    """The `<metadata>` child that marks a domain as our guest `guest_id`."""
    element = ET.Element(f"{NAMESPACE_PREFIX}:guest", {f"xmlns:{NAMESPACE_PREFIX}": NAMESPACE})
    element.set("id", guest_id)
    return ET.tostring(element, encoding="unicode")


def parse_owned_id(metadata_xml: str | None) -> str | None:
    """Our guest id from the element `dom.metadata(ELEMENT, NAMESPACE)` returns, or from
    a whole domain XML; None when the mark is absent or has no id."""
    if not metadata_xml:
        return None
    try:
        root = ET.fromstring(metadata_xml)
    except ET.ParseError:
        return None
    if root.tag == "domain":
        found = root.find(f"metadata/{{{NAMESPACE}}}guest")
        return (found.get("id") or None) if found is not None else None
    # libvirt hands the element back with its namespace declared but the prefix dropped
    return (root.get("id") or None) if root.tag.rsplit("}", 1)[-1] == "guest" else None


def render_dir_pool_xml(name: str, path: str) -> str:
    pool = ET.Element("pool", type="dir")
    ET.SubElement(pool, "name").text = name
    ET.SubElement(ET.SubElement(pool, "target"), "path").text = os.path.normpath(path)
    return ET.tostring(pool, encoding="unicode")


def render_netfs_pool_xml(
    name: str, host: str, export_path: str, mount_path: str, *, fs_format: str = "nfs"
) -> str:
    """A libvirt `netfs` pool: `host:export_path` mounted at `mount_path` on the cell."""
    pool = ET.Element("pool", type="netfs")
    ET.SubElement(pool, "name").text = name
    source = ET.SubElement(pool, "source")
    ET.SubElement(source, "host", name=host)
    ET.SubElement(source, "dir", path=export_path)
    ET.SubElement(source, "format", type=fs_format)
    ET.SubElement(ET.SubElement(pool, "target"), "path").text = os.path.normpath(mount_path)
    return ET.tostring(pool, encoding="unicode")


@dataclass(frozen=True)
class _PoolShape:
    type: str | None
    path: str | None
    host: str | None
    export: str | None


def _parse_pool_xml(xml: str) -> _PoolShape:
    root = ET.fromstring(xml)
    path = root.findtext("target/path")
    host = root.find("source/host")
    export = root.find("source/dir")
    return _PoolShape(
        type=root.get("type"),
        path=os.path.normpath(path) if path else None,
        host=host.get("name") if host is not None else None,
        export=export.get("path") if export is not None else None,
    )


def _version_string(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def _require_owned(name: str) -> None:
    naming.names().require_owned(name, "change storage pool")


# -- the driver ------------------------------------------------------------------------


class LibvirtHypervisor:
    """One libvirt connection to one cell, opened on first use, reopened once when a call
    finds it broken. Thread-safe: libvirt connections serve concurrent calls.

    Lifecycle callbacks survive reconnects (they are registered again on the new
    connection); events that happen while the connection is down are lost, which the
    reconciler's periodic resync covers."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._lock = threading.RLock()
        self._conn: libvirt.virConnect | None = None
        self._broken = False
        self._callbacks: list[LifecycleCallback] = []
        self._event_id: int | None = None
        self._owners: dict[str, str | None] = {}  # uuid -> owned id, for undefined events
        # the threads calls to this cell run in
        self._threads = DaemonThreads(4, "libvirt-cell")  # never joined at exit

    def __repr__(self) -> str:
        return f"LibvirtHypervisor({self.uri!r})"

    # -- connection --------------------------------------------------------------------

    def _connection(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is not None and not self._broken:
                return self._conn
            self._drop_locked()
            ensure_event_loop()
            with libvirt_errors(f"connect {self.uri}"):
                conn = libvirt.open(self.uri)
            self._broken = False
            with contextlib.suppress(libvirt.libvirtError):  # local drivers have neither
                conn.setKeepAlive(5, 3)
            with contextlib.suppress(libvirt.libvirtError):
                conn.registerCloseCallback(self._on_close, None)
            self._conn = conn
            if self._callbacks:
                self._register_events_locked(conn)
            return conn

    def _on_close(self, conn: libvirt.virConnect, reason: int, opaque: object) -> None:
        log.warning("libvirt connection to %s closed (reason %s)", self.uri, reason)
        self._broken = True

    def _drop_locked(self) -> None:
        conn, event_id = self._conn, self._event_id
        self._conn, self._event_id = None, None
        if conn is None:
            return
        if event_id is not None:  # a registration holds the connection open
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(event_id)
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    def _alive(self, conn: libvirt.virConnect) -> bool:
        if self._broken:
            return False
        try:
            return bool(conn.isAlive())
        except libvirt.libvirtError:
            return False

    def _call(self, what: str, fn: Callable[[libvirt.virConnect], T], *,
              timeout: float | None = DEFAULT_LIMIT) -> T:
        """`_call_now` in one of this cell's threads, waiting at most `timeout` seconds
        (default: the configured limit; None: no limit). A call made from inside a call
        runs at once (its caller's wait already bounds it)."""
        if getattr(_in_call, "active", False):
            return self._call_now(what, fn)
        stall = _stalls.get(self.uri)
        if stall is not None:
            if not stall.future.done():
                raise Unavailable(
                    f"{what}: not tried, the cell has not answered an earlier call for "
                    f"{time.monotonic() - stall.since:.0f} s ({stall.what})")
            _stalls.pop(self.uri, None)
        if timeout is None:  # long work: in the caller's thread (module docstring)
            return self._run_call(what, fn)
        limit = _call_timeout if timeout is DEFAULT_LIMIT else timeout
        future = self._threads.submit(self._run_call, what, fn)
        try:
            return future.result(timeout=limit)
        except concurrent.futures.TimeoutError:
            _stalls[self.uri] = _Stall(what, time.monotonic(), future)
            raise Unavailable(f"{what}: no answer within {limit:g} s (setting "
                              "reconciler.libvirt_timeout_seconds)") from None

    def _run_call(self, what: str, fn: Callable[[libvirt.virConnect], T]) -> T:
        _in_call.active = True
        try:
            return self._call_now(what, fn)
        finally:
            _in_call.active = False

    def _call_now(self, what: str, fn: Callable[[libvirt.virConnect], T]) -> T:
        """Run `fn(conn)` with errors translated; once more on a fresh connection when
        it failed as unavailable because the connection itself broke."""
        conn = self._connection()
        try:
            with libvirt_errors(what):
                return fn(conn)
        except Unavailable:
            if self._alive(conn):
                raise
            log.info("%s: connection broken, reconnecting", self.uri)
        with self._lock:
            if self._conn is conn:
                self._drop_locked()
        conn = self._connection()
        with libvirt_errors(what):
            return fn(conn)

    def call(self, what: str, fn: Callable[[libvirt.virConnect], T], *,
             timeout: float | None = DEFAULT_LIMIT) -> T:
        """Run `fn(conn)` on this cell's connection, errors translated, reconnecting once
        when the connection broke (for the other drivers of this cell: domains, volumes);
        the caller waits at most `timeout` (see `_call`)."""
        return self._call(what, fn, timeout=timeout)

    def close(self) -> None:
        """Drop the connection and lifecycle callbacks; a later call reconnects. Never
        waits on a call that did not answer: then the connection goes once it returns."""
        stall = _stalls.get(self.uri)
        if stall is not None and not stall.future.done():
            stall.future.add_done_callback(lambda _done: self._close_now())
            return
        self._close_now()

    def _close_now(self) -> None:
        with self._lock:
            self._callbacks.clear()
            self._drop_locked()

    # -- node --------------------------------------------------------------------------

    def node_info(self) -> NodeInfo:
        def read(conn: libvirt.virConnect) -> NodeInfo:
            model, memory_mib, cpus = conn.getInfo()[:3]
            memory = memory_mib * 1024 * 1024
            try:  # KiB precision where the driver has it (qemu); getInfo rounds to MiB
                memory = (
                    conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)["total"] * 1024
                )
            except (libvirt.libvirtError, KeyError):
                pass
            return NodeInfo(
                cpus=cpus, memory_bytes=memory, model=model, hostname=conn.getHostname()
            )

        return self._call(f"node info of {self.uri}", read)

    def libvirt_version(self) -> str:
        """The version of libvirt serving the connection (the daemon's, for a remote
        cell), e.g. "9.0.0"."""
        return self._call("libvirt version", lambda c: _version_string(c.getLibVersion()))

    # -- domains -----------------------------------------------------------------------

    def list_domains(self) -> list[ObservedDomain]:
        """Every domain on the cell, ours (`owned_id` set) and others. Costs one bulk
        stats call plus one metadata read per domain (no XML dumps)."""
        return self._call(f"list domains on {self.uri}", self._list_domains)

    def _list_domains(self, conn: libvirt.virConnect) -> list[ObservedDomain]:
        flags = (
            libvirt.VIR_DOMAIN_STATS_STATE
            | libvirt.VIR_DOMAIN_STATS_VCPU
            | libvirt.VIR_DOMAIN_STATS_BALLOON
        )
        try:
            records = conn.getAllDomainStats(flags)
        except libvirt.libvirtError as exc:
            if not _is_code(exc, libvirt.VIR_ERR_NO_SUPPORT):
                raise
            records = [(dom, {}) for dom in conn.listAllDomains()]
        found: list[ObservedDomain] = []
        owners: dict[str, str | None] = {}
        for dom, stats in records:
            try:
                observed = self._observe(dom, stats)
            except libvirt.libvirtError as exc:
                if _is_code(exc, libvirt.VIR_ERR_NO_DOMAIN):
                    continue  # undefined while we looked
                raise
            owners[observed.uuid] = observed.owned_id
            found.append(observed)
        self._owners = owners
        return found

    def _observe(self, dom: libvirt.virDomain, stats: dict[str, int]) -> ObservedDomain:
        state, vcpus, memory_kib = (
            stats.get("state.state"),
            stats.get("vcpu.current"),
            stats.get("balloon.maximum"),
        )
        if state is None or vcpus is None or memory_kib is None:
            info = dom.info()  # [state, maxMem KiB, memory KiB, vcpus, cpu time]
            state = info[0] if state is None else state
            memory_kib = info[1] if memory_kib is None else memory_kib
            vcpus = info[3] if vcpus is None else vcpus
        name = dom.name()
        marked = self._read_mark(dom)
        owned = marked if naming.names().owns_domain(name, marked) else None
        return ObservedDomain(
            name=name,
            uuid=dom.UUIDString(),
            state=_STATES.get(state, DomainState.UNKNOWN),
            owned_id=owned,
            vcpus=int(vcpus),
            memory_bytes=int(memory_kib) * 1024,
            foreign=marked is not None and owned is None,
        )

    @staticmethod
    def _read_mark(dom: libvirt.virDomain) -> str | None:
        """The guest id in the domain's nano mark, whichever nanod's it is."""
        try:
            return parse_owned_id(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE))
        except libvirt.libvirtError as exc:
            if _is_code(exc, libvirt.VIR_ERR_NO_DOMAIN_METADATA):
                return None
            raise

    @classmethod
    def _read_owned_id(cls, dom: libvirt.virDomain) -> str | None:
        """Our guest id: the mark's, when the domain also carries our names prefix."""
        marked = cls._read_mark(dom)
        return marked if naming.names().owns_domain(dom.name(), marked) else None

    # -- lifecycle events --------------------------------------------------------------

    def register_lifecycle_events(self, callback: LifecycleCallback) -> None:
        """Call `callback(domain_name, owned_id, event)` on every domain lifecycle event of
        this cell until `close()`. `owned_id` is None for domains that are not ours. The
        callback runs on the shared libvirt event thread and must not block."""
        with self._lock:
            self._callbacks.append(callback)

        def register(conn: libvirt.virConnect) -> None:
            with self._lock:  # a reconnect in `_connection` may have registered already
                if self._event_id is None and self._conn is conn:
                    self._register_events_locked(conn)

        try:
            self._call(f"register lifecycle events on {self.uri}", register)
        except NanoError:
            with self._lock:
                self._callbacks.remove(callback)
            raise

    def _register_events_locked(self, conn: libvirt.virConnect) -> None:
        with libvirt_errors(f"register lifecycle events on {self.uri}"):
            self._event_id = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
            )

    def _on_lifecycle(
        self,
        conn: libvirt.virConnect,
        dom: libvirt.virDomain,
        event: int,
        detail: int,
        opaque: object,
    ) -> None:
        try:
            kind = _EVENTS.get(event)
            if kind is None:
                return
            name, uuid = dom.name(), dom.UUIDString()
            try:
                owned_id = self._read_owned_id(dom)
                self._owners[uuid] = owned_id
            except libvirt.libvirtError:  # gone already (undefined): use what we saw
                owned_id = self._owners.get(uuid)
            if kind is LifecycleEvent.UNDEFINED:
                self._owners.pop(uuid, None)
            for callback in list(self._callbacks):
                callback(name, owned_id, kind)
        except Exception:  # an exception must never unwind into libvirt's C loop
            log.exception("lifecycle callback failed on %s", self.uri)

    # -- storage pools -----------------------------------------------------------------

    def ensure_dir_pool(self, name: str, path: str) -> PoolState:
        """Converge a `dir` pool `name` (must start with 'nano-') at `path`: define, build
        (mkdir), start and autostart it as needed. A pool of that name with another
        type or path raises Conflict; a pool that cannot start is returned with `error`."""
        _require_owned(name)
        return self._ensure_pool(name, render_dir_pool_xml(name, path))

    def ensure_netfs_pool(
        self, name: str, host: str, export_path: str, mount_path: str
    ) -> PoolState:
        """Converge a `netfs` (NFS) pool like `ensure_dir_pool`. When the mount fails
        (server down, no NFS client on the cell) the pool stays defined and autostarted,
        and the returned state carries the mount error instead of raising."""
        _require_owned(name)
        return self._ensure_pool(name, render_netfs_pool_xml(name, host, export_path, mount_path))

    def _ensure_pool(self, name: str, xml: str) -> PoolState:
        wanted = _parse_pool_xml(xml)

        def ensure(conn: libvirt.virConnect) -> PoolState:
            pool = self._find_pool(conn, name)
            if pool is None:
                with libvirt_errors(f"define pool {name}"):
                    pool = conn.storagePoolDefineXML(xml, 0)
            else:
                with libvirt_errors(f"read pool {name}"):
                    found = _parse_pool_xml(pool.XMLDesc(0))
                if found != wanted:
                    raise Conflict(
                        f"pool {name} exists as {found.type} at {found.path}"
                        f"{f' from {found.host}:{found.export}' if found.host else ''}, "
                        f"wanted {wanted.type} at {wanted.path}"
                        f"{f' from {wanted.host}:{wanted.export}' if wanted.host else ''}"
                    )
            error = None
            if not pool.isActive():
                error = self._start_pool(pool, name)
            with libvirt_errors(f"autostart pool {name}"):
                if not pool.autostart():
                    pool.setAutostart(1)
            return self._pool_state(pool, name, refresh=error is None, error=error)

        return self._call(f"ensure pool {name}", ensure)

    @staticmethod
    def _find_pool(conn: libvirt.virConnect, name: str) -> libvirt.virStoragePool | None:
        try:
            return conn.storagePoolLookupByName(name)
        except libvirt.libvirtError as exc:
            if _is_code(exc, libvirt.VIR_ERR_NO_STORAGE_POOL):
                return None
            raise

    @staticmethod
    def _start_pool(pool: libvirt.virStoragePool, name: str) -> str | None:
        """Build (mkdir the target) and start; the reason as text when either fails."""
        try:
            pool.build(0)
            pool.create(0)
        except libvirt.libvirtError as exc:
            if exc.get_error_domain() in _TRANSPORT_DOMAINS:
                raise
            return f"start pool {name}: {_reason(exc)}"
        return None

    def _pool_state(
        self, pool: libvirt.virStoragePool, name: str, *, refresh: bool, error: str | None
    ) -> PoolState:
        with libvirt_errors(f"read pool {name}"):
            if refresh and pool.isActive():
                try:  # dir pools compute free space at refresh time
                    pool.refresh(0)
                except libvirt.libvirtError as exc:
                    if exc.get_error_domain() in _TRANSPORT_DOMAINS:
                        raise
                    error = f"refresh pool {name}: {_reason(exc)}"
            state, capacity, _allocation, available = pool.info()
            shape = _parse_pool_xml(pool.XMLDesc(0))
            active = bool(pool.isActive())
        if state == libvirt.VIR_STORAGE_POOL_INACCESSIBLE and error is None:
            error = f"pool {name} is inaccessible"
        return PoolState(
            name=name,
            active=active,
            capacity=capacity if active else 0,
            available=available if active else 0,
            error=error,
            type=shape.type,
            path=shape.path,
        )

    def pool_state(self, name: str, *, refresh: bool = True) -> PoolState:
        """The pool as it is (NotFound when undefined); `refresh` rescans it first so
        capacity and free space are current."""

        def read(conn: libvirt.virConnect) -> PoolState:
            pool = conn.storagePoolLookupByName(name)
            return self._pool_state(pool, name, refresh=refresh, error=None)

        return self._call(f"pool {name}", read)

    def delete_pool(self, name: str) -> None:
        """Stop and undefine our pool `name` (only 'nano-' pools); already gone is fine.
        Files stay on disk. An active pool that still holds volumes raises Conflict:
        volumes are deleted explicitly, never as a side effect."""
        _require_owned(name)

        def delete(conn: libvirt.virConnect) -> None:
            pool = self._find_pool(conn, name)
            if pool is None:
                return
            if pool.isActive():
                with contextlib.suppress(libvirt.libvirtError):
                    pool.refresh(0)
                count = pool.numOfVolumes()
                if count:
                    raise Conflict(f"pool {name} still holds {count} volume(s)")
                with libvirt_errors(f"stop pool {name}"):
                    pool.destroy()
            try:
                pool.undefine()
            except libvirt.libvirtError as exc:
                if not _is_code(exc, libvirt.VIR_ERR_NO_STORAGE_POOL):
                    raise

        self._call(f"delete pool {name}", delete)
