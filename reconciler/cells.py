"""The cell reconciler: probes a KVM host (libvirt + host facts over SSH or locally),
converges its storage pools, and records liveness, facts, statistics and the domains it
does not own.

Registered by `reconciler/kinds.py`; runs in the controller's worker threads. A cell is
alive while its probes succeed; after `offline_after` failures in a row it is offline
(its guests are then reported lost by the guest reconciler), and one success clears it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import os
import shlex
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from reconciler.contract import (
    READY,
    Action,
    Key,
    Result,
    Verb,
    format_time,
    get_condition,
    set_condition,
)
from reconciler.failover import Failover, Fencing
from reconciler.naming import names
from state.cell_transport import CellTransport, HostKeyPin, fingerprint
from state.compute import CellSpec
from state.errors import Conflict, NanoError, Unavailable

log = logging.getLogger("nano.reconciler.cells")

#: condition reasons of a cell nanod will not talk to (CellRefused.reason)
TRANSPORT_REFUSED = "TransportRefused"
HOST_KEY_MISMATCH = "HostKeyMismatch"
HOST_KEY_UNKNOWN = "HostKeyUnknown"

def local_pool_name(cell: str) -> str:
    """The libvirt dir pool for a cell's local storage path (per cell: two cells may share
    one libvirtd in tests and demos)."""
    return names().local_pool(cell)


def shared_pool_name(storage_pool: str) -> str:
    return names().shared_pool(storage_pool)


def shared_mount(storage_pool: str) -> str:
    return names().shared_mount(storage_pool)


@dataclass(frozen=True)
class PoolWant:
    """A libvirt storage pool the cell should have."""

    name: str
    kind: str  # dir | netfs
    path: str
    host: str = ""
    source: str = ""
    shared: bool = False


def desired_pools(spec: CellSpec) -> list[PoolWant]:
    """Pools a cell needs: its local path as a `dir` pool, and every storage pool of its
    compute pool: NFS as a `netfs` pool mounted under /var/lib/nano/mnt, a shared
    directory as a `dir` pool on that directory."""
    pools = [PoolWant(local_pool_name(spec.name), "dir", spec.storage_path)]
    for sp in spec.shared_storage:
        if sp["type"] == "dir":  # a directory the cells already share
            pools.append(PoolWant(shared_pool_name(sp["name"]), "dir", sp["target"],
                                  shared=True))
            continue
        pools.append(PoolWant(shared_pool_name(sp["name"]), "netfs", shared_mount(sp["name"]),
                              host=sp["host"], source=sp["target"], shared=True))
    return pools


def plan_cell(spec: CellSpec, observed_pools: dict[str, dict[str, Any]]) -> list[Action]:
    """Pure: the storage pool actions that make the cell match its spec.

    `observed_pools` maps pool name -> {active, path, error}. A pool that exists with the
    wrong path is replaced; a missing or inactive one is created (started)."""
    actions: list[Action] = []
    for want in desired_pools(spec):
        key = Key("storage_pool", f"{spec.name}/{want.name}")
        have = observed_pools.get(want.name)
        after = {"type": want.kind, "path": want.path, "active": True}
        if want.kind == "netfs":
            after.update(host=want.host, source=want.source)
        if have is None:
            actions.append(Action(Verb.CREATE, key, None, after, reason="pool missing"))
        elif have.get("path") and have["path"].rstrip("/") != want.path.rstrip("/"):
            actions.append(Action(Verb.REPLACE, key, {"path": have["path"]}, after,
                                  reason="storage path changed"))
        elif not have.get("active") and not have.get("error"):
            actions.append(Action(Verb.START, key, {"active": False}, {"active": True},
                                  reason="pool inactive"))
    return actions


def capabilities(facts: Any, *, simulated: bool) -> dict[str, Any]:
    """What guests may need of the cell, from its facts: libvirt volume streams (images and
    cloud-init seeds; libvirt's test driver has none) and the sfq qdisc libvirt needs to
    limit a NIC's bandwidth (None: not known)."""
    bandwidth = True if simulated else facts.sfq
    return {"volume_streams": not simulated, "bandwidth": bandwidth,
            "bandwidth_missing": "" if bandwidth is not False else facts.sfq_detail}


def cell_ready(observed: dict[str, Any], conditions: list[dict[str, Any]]
               ) -> tuple[bool, str, str]:
    """The cell's Ready condition (status, reason, message) from its last probe and the
    network conditions the network reconciler recorded: a cell whose guests' network cannot
    start is not ready, whatever else answers. A shared pool that is not attached is the
    storage pool's business (its own status says so), not the cell's."""
    errors = [p["error"] for p in observed["storage_pools"]
              if p.get("error") and not p.get("shared")]
    if errors:
        return False, "StorageFailed", "; ".join(errors)
    nets = [f"network {n['name']}: {n['error']}" for n in observed.get("networks") or []
            if n.get("error") and not n.get("active")]
    network = get_condition(conditions, "NetworkReady")
    if network is not None and not network.status:
        nets.append(network.message or network.reason)
    if nets:
        return False, "NetworkNotReady", "; ".join(nets)
    return True, "Converged", ""


class CellRefused(Unavailable):
    """nanod will not talk to a cell as it is configured, or as it answers; `reason` is
    the condition reason (TransportRefused, HostKeyMismatch, HostKeyUnknown). The cell is
    unreachable at once, not after `offline_after` probes: nothing was said to it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SshOptions:
    """Settings `ssh.*` for reaching cells: nanod's paramiko shell and libvirt's ssh."""

    connect_timeout: float = 10.0  # TCP, banner, key exchange, authentication
    command_timeout: float = 60.0  # a command without a timeout of its own; a silent link
    trust_on_first_use: bool = True  # pin the key a cell presents at first contact

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> SshOptions:
        ssh = settings.get("ssh") or {}
        default = cls()
        return cls(connect_timeout=float(ssh.get("connect_timeout", default.connect_timeout)),
                   command_timeout=float(ssh.get("command_timeout", default.command_timeout)),
                   trust_on_first_use=bool(ssh.get("trust_on_first_use", True)))


def known_host_name(host: str, port: int) -> str:
    """A server's name in known_hosts files (OpenSSH's and paramiko's form)."""
    return host if port == 22 else f"[{host}]:{port}"


class KnownHosts:
    """nanod's known_hosts file (DATA_DIR/known_hosts), which libvirt's ssh reads through
    nanod's wrapper, and its only writer: every change re-reads the file under one lock and
    replaces it atomically (write a temporary file, fsync, rename), so a pin is never lost
    to another cell's write and a reader sees the old file or the new one, whole.

    One key per server (`known_host_name`); entries nanod did not write are kept as they
    are."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def _lines(self) -> list[str]:
        try:
            with open(self.path) as fh:
                return fh.read().splitlines()
        except FileNotFoundError:
            return []

    @staticmethod
    def _entry(line: str) -> tuple[str, str, str] | None:
        words = line.split()
        if len(words) < 3 or line.lstrip().startswith("#"):
            return None
        return words[0], words[1], words[2]

    def get(self, name: str) -> tuple[str, str] | None:
        """The pinned key of server `name`: (type, base64), or None."""
        for line in self._lines():
            entry = self._entry(line)
            if entry and entry[0] == name:
                return entry[1], entry[2]
        return None

    def pin(self, name: str, key_type: str, key_base64: str) -> bool:
        """Make (type, base64) the one key of `name`; False when it already was."""
        with self._lock:
            lines = self._lines()
            kept = [line for line in lines if (self._entry(line) or ("",))[0] != name]
            wanted = f"{name} {key_type} {key_base64}"
            if [line for line in lines if line not in kept] == [wanted]:
                return False
            self._write([*kept, wanted])
            return True

    def forget(self, name: str) -> bool:
        with self._lock:
            lines = self._lines()
            kept = [line for line in lines if (self._entry(line) or ("",))[0] != name]
            if kept == lines:
                return False
            self._write(kept)
            return True

    def _write(self, lines: list[str]) -> None:
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write("".join(f"{line}\n" for line in lines))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


class HostKeyGuard:
    """The `HostKeyCheck` of one cell's SSH (reconciler/drivers/shell.py): the key the cell
    presents must be its `ssh.host_key` when one is given (which is then pinned in
    KnownHosts for libvirt's ssh too: that is how a key is re-pinned), else the key pinned
    earlier; an unknown host is pinned on first contact unless trust on first use is off.
    A changed key is never accepted: `CellRefused` names both fingerprints."""

    def __init__(self, cell: str, transport: CellTransport, known: KnownHosts, *,
                 trust_on_first_use: bool) -> None:
        self.cell = cell
        self.target = f"{transport.user}@{transport.host}:{transport.ssh_port}"
        self.name = known_host_name(transport.host, transport.ssh_port)
        self.pin: HostKeyPin | None = transport.host_key
        self.known = known
        self.trust_on_first_use = trust_on_first_use
        self.accepted: dict[str, str] = {}  # {type, fingerprint, source} of the last accepted

    def expected(self) -> tuple[str, str] | None:
        if self.pin is not None and self.pin.key_type:
            return self.pin.key_type, self.pin.key_base64
        known = self.known.get(self.name)
        if known and (self.pin is None or fingerprint(known[1]) == self.pin.fingerprint):
            return known
        return None

    def check(self, key_type: str, key_base64: str) -> None:
        presented = fingerprint(key_base64)
        if self.pin is not None:
            if presented != self.pin.fingerprint:
                raise self._mismatch(key_type, presented, self.pin.fingerprint,
                                     "the cell's ssh.host_key")
            if self.known.pin(self.name, key_type, key_base64):
                log.warning("cell %s: host key %s (%s) of %s pinned from ssh.host_key",
                            self.cell, presented, key_type, self.target)
            source = "ssh.host_key"
        else:
            known = self.known.get(self.name)
            if known is None:
                if not self.trust_on_first_use:
                    raise CellRefused(HOST_KEY_UNKNOWN, (
                        f"host key of {self.target}: {presented} ({key_type}) is not pinned "
                        "and trust on first use is off (setting ssh.trust_on_first_use): "
                        "compare it with the cell's own (ssh-keygen -lf "
                        "/etc/ssh/ssh_host_*_key.pub on the cell) and give it as ssh.host_key "
                        f"with PUT /api/v1/cells/{self.cell}"))
                self.known.pin(self.name, key_type, key_base64)
                log.warning("cell %s: host key %s (%s) of %s pinned on first contact",
                            self.cell, presented, key_type, self.target)
            elif fingerprint(known[1]) != presented:
                raise self._mismatch(key_type, presented, fingerprint(known[1]),
                                     f"the key pinned for {self.name}")
            source = "pinned"
        self.accepted = {"type": key_type, "fingerprint": presented, "source": source}

    def _mismatch(self, key_type: str, presented: str, expected: str, what: str
                  ) -> CellRefused:
        return CellRefused(HOST_KEY_MISMATCH, (
            f"host key of {self.target} does not match: the cell presents {presented} "
            f"({key_type}), {what} is {expected}; nothing was sent to it. If the cell's host "
            f"keys really changed (reinstalled), pin the new one: PUT /api/v1/cells/{self.cell} "
            "with the whole ssh object and ssh.host_key set to the new public key or its "
            "SHA256 fingerprint"))


class CellLink:
    """The open connections to one cell: a hypervisor and a host shell (and, over SSH,
    the guard that checked the cell's host key)."""

    def __init__(self, spec: CellSpec, hypervisor: Any, shell: Any,
                 host_keys: HostKeyGuard | None = None) -> None:
        self.reach = _reach(spec)
        self.hypervisor = hypervisor
        self.shell = shell
        self.host_keys = host_keys
        self.events_registered = False

    def close(self) -> None:
        for part in (self.hypervisor, self.shell):
            try:
                part.close()
            except Exception:  # closing a broken connection must not mask the real error
                log.debug("closing cell connection failed", exc_info=True)


def _reach(spec: CellSpec) -> tuple:
    return (spec.libvirt_uri, tuple(sorted((spec.ssh or {}).items())), spec.address,
            spec.transport)


class CellConnections:
    """One `CellLink` per cell, reopened when the way to reach it changes. Shared by the
    cell and guest reconcilers (and the console proxy) so a cell has one connection.

    A cell whose way in is refused under this nanod's rules (state/cell_transport.py; e.g.
    registered by an older nanod, or a test cell with test cells off) gets no connection:
    `link` raises `CellRefused`. SSH cells' host keys are checked by a `HostKeyGuard`
    against `known_hosts`, the one file libvirt's ssh reads too."""

    def __init__(self, *, data_dir: str, ssh: SshOptions | None = None,
                 on_domain_event: Callable[[str, str | None, str], None] | None = None
                 ) -> None:
        self._links: dict[str, CellLink] = {}
        self._lock = threading.Lock()
        self._data_dir = data_dir
        self.ssh = ssh or SshOptions()
        self.known_hosts = KnownHosts(os.path.join(data_dir, "known_hosts"))
        self._on_domain_event = on_domain_event

    @classmethod
    def from_settings(cls, settings: dict[str, Any], *, on_domain_event: Callable[
            [str, str | None, str], None] | None = None) -> CellConnections:
        return cls(data_dir=settings["data_dir"], ssh=SshOptions.from_settings(settings),
                   on_domain_event=on_domain_event)

    def link(self, spec: CellSpec) -> CellLink:
        with self._lock:
            link = self._links.get(spec.name)
            if spec.transport is None:
                self._links.pop(spec.name, None)
                if link is not None:
                    link.close()
                raise CellRefused(TRANSPORT_REFUSED, "nanod does not connect to this cell as "
                                  f"it is registered: {spec.transport_error}")
            if link is not None and link.reach == _reach(spec):
                return link
            if link is not None:
                link.close()
            shell, guard = self._open_shell(spec, spec.transport)
            link = CellLink(spec, self._open_hypervisor(spec.transport), shell, guard)
            self._links[spec.name] = link
            return link

    def uri(self, transport: CellTransport) -> str:
        """The libvirt URI used for a cell; for SSH cells libvirt's ssh runs nanod's wrapper
        (host keys checked strictly against `known_hosts`, timeouts)."""
        wrapper = self._ssh_wrapper() if transport.kind == "ssh" else ""
        return transport.uri(ssh_command=wrapper)

    def _ssh_wrapper(self) -> str:
        path = os.path.join(self._data_dir, "ssh-known-hosts-wrapper")
        known = self.known_hosts.path
        # ConnectTimeout bounds the TCP connect and the banner exchange (a host that accepts
        # and never answers); ServerAlive* drop a link silent for about command_timeout.
        # UpdateHostKeys=no: nanod (KnownHosts) is the file's only writer.
        connect = max(1, math.ceil(self.ssh.connect_timeout))
        alive = max(1, math.ceil(self.ssh.command_timeout / 3))
        script = ("#!/bin/sh\n# written by nanod: libvirt's ssh checks host keys strictly "
                  "against nanod's known_hosts\n"
                  f"exec ssh -F /dev/null -o UserKnownHostsFile={shlex.quote(known)} "
                  "-o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes "
                  "-o UpdateHostKeys=no -o CheckHostIP=no -o BatchMode=yes "
                  f"-o ConnectTimeout={connect} -o ConnectionAttempts=1 "
                  f"-o ServerAliveInterval={alive} -o ServerAliveCountMax=3 \"$@\"\n")
        try:
            with open(path) as fh:
                current = fh.read()
        except OSError:
            current = ""
        if current != script:
            os.makedirs(self._data_dir, exist_ok=True)
            tmp = path + ".tmp"
            with open(tmp, "w") as fh:
                fh.write(script)
            os.chmod(tmp, 0o755)
            os.replace(tmp, path)
        return path

    def _open_hypervisor(self, transport: CellTransport) -> Any:
        from reconciler.drivers.libvirt_hv import LibvirtHypervisor

        return LibvirtHypervisor(self.uri(transport))

    def _open_shell(self, spec: CellSpec, transport: CellTransport
                    ) -> tuple[Any, HostKeyGuard | None]:
        from reconciler.drivers.shell import LocalShell, ParamikoShell

        if not transport.remote:
            return LocalShell(command_timeout=self.ssh.command_timeout), None
        guard = HostKeyGuard(spec.name, transport, self.known_hosts,
                             trust_on_first_use=self.ssh.trust_on_first_use)
        shell = ParamikoShell(
            transport.host, transport.ssh_port, transport.user,
            key_file=transport.key_file or None, password=spec.ssh.get("password"),
            host_key_policy=guard, connect_timeout=self.ssh.connect_timeout,
            command_timeout=self.ssh.command_timeout,
        )
        return shell, guard

    def forget_host_key(self, transport: CellTransport | None, others: Iterable[CellSpec]
                        ) -> None:
        """An unregistered cell's pin goes, unless another cell reaches the same server."""
        if transport is None or not transport.remote:
            return
        name = known_host_name(transport.host, transport.ssh_port)
        if any(o.transport is not None and o.transport.remote and
               known_host_name(o.transport.host, o.transport.ssh_port) == name
               for o in others):
            return
        if self.known_hosts.forget(name):
            log.info("forgot the host key pinned for %s", name)

    def watch_events(self, spec: CellSpec, link: CellLink) -> None:
        """Subscribe to the cell's domain lifecycle events once per connection."""
        if link.events_registered or self._on_domain_event is None:
            return
        callback = self._on_domain_event
        link.hypervisor.register_lifecycle_events(
            lambda name, owned, event: callback(spec.name, owned, event))
        link.events_registered = True

    def drop(self, name: str) -> None:
        with self._lock:
            link = self._links.pop(name, None)
        if link is not None:
            link.close()

    def close_all(self) -> None:
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()


class CellReconciler:
    """Converges and observes one cell per key `cell/<name>`."""

    kind = "cell"

    def __init__(self, store: Any, connections: CellConnections, enqueue: Callable[[Key], None],
                 *, offline_after: int = 3, probe_seconds: float = 10.0,
                 fencing: Fencing | None = None) -> None:
        self.store = store
        self.connections = connections
        self.enqueue = enqueue
        self.offline_after = offline_after
        self.probe_seconds = probe_seconds
        # fenced failover of lost cells in failover pools (reconciler/failover.py)
        self.failover = Failover(store, enqueue, fencing or Fencing())

    def keys(self) -> Iterable[Key]:
        return [Key("cell", name) for name in self.store.cell_names()]

    def reconcile(self, key: Key) -> Result:
        spec = self.store.cell_spec(key.id)
        if spec is None:  # unregistered: forget the connection
            self.connections.drop(key.id)
            return Result()
        if spec.deleting:
            return self._unregister(spec)
        prev = spec.observed
        now = time.time()
        conditions = self.store.cell_conditions(spec.name)
        actions: list[Action] = []
        try:
            link = self.connections.link(spec)
            observed, actions = self._converge(spec, link, prev, now)
            conditions = set_condition(conditions, "CellReachable", True, "ProbeSucceeded",
                                       "libvirt and host facts answered", now_text())
            errors = [p["error"] for p in observed["storage_pools"] if p.get("error")]
            conditions = set_condition(
                conditions, "StorageReady", not errors,
                "PoolsActive" if not errors else "PoolFailed",
                "; ".join(errors) or "all storage pools active", now_text())
            if link.host_keys is not None:
                key = link.host_keys.accepted
                conditions = set_condition(
                    conditions, "HostKeyVerified", True, "Matches",
                    f"{key['type']} {key['fingerprint']} ({key['source']})", now_text())
            conditions = set_condition(conditions, READY, *cell_ready(observed, conditions),
                                       now_text())
            last_error = ""
            phase = "online"
        except NanoError as exc:
            refused = exc.reason if isinstance(exc, CellRefused) else ""
            failures = int(prev.get("failures", 0)) + 1
            # a refused cell is unreachable at once: nothing was (or will be) said to it
            alive = bool(prev.get("alive")) and failures < self.offline_after and not refused
            observed = {**prev, "alive": alive, "failures": failures, "probed_at": now}
            reachable = get_condition(conditions, "CellReachable")
            if refused and (reachable is None or reachable.reason != refused):
                log.warning("cell %s refused: %s", spec.name, exc.message)
            elif not isinstance(exc, Unavailable):
                log.warning("cell %s: %s", spec.name, exc.message)
            self.connections.drop(spec.name)  # reconnect from scratch next time
            conditions = set_condition(conditions, "CellReachable", False,
                                       refused or "ProbeFailed", exc.message, now_text())
            if refused in (HOST_KEY_MISMATCH, HOST_KEY_UNKNOWN):
                conditions = set_condition(conditions, "HostKeyVerified", False, refused,
                                           exc.message, now_text())
            conditions = set_condition(conditions, READY, False, refused or "Unreachable",
                                       exc.message, now_text())
            last_error = exc.message
            phase = "online" if alive else "offline"
            if not alive:  # lost: fenced failover where the pool has it
                observed["fence"], fenced = self.failover.lost(spec, prev.get("fence"))
                if fenced is not None:
                    conditions = set_condition(conditions, "Fenced", *fenced, now_text())
        self.store.record_cell(spec.name, generation=spec.generation, observed=observed,
                               conditions=conditions, phase=phase, last_error=last_error)
        # the pools' status is derived from their cells
        if spec.pool:
            self.enqueue(Key("compute_pool", spec.pool))
        for shared in spec.shared_storage:
            self.enqueue(Key("storage_pool", shared["name"]))
        if bool(prev.get("alive")) != bool(observed.get("alive")):
            log.info("cell %s is now %s", spec.name, "online" if observed["alive"] else "offline")
            for guest in self.store.guest_ids_on_cell(spec.name):
                self.enqueue(Key("guest", guest))
        if observed.get("alive"):  # networks and firewall are checked at the probe's pace
            self.enqueue(Key("network", spec.name))
            self.enqueue(Key("firewall", spec.name))
        return Result(requeue_after=self.probe_seconds, actions=tuple(actions),
                      note="alive" if observed.get("alive") else f"unreachable: {last_error}")

    def _unregister(self, spec: CellSpec) -> Result:
        """Remove the cell's own storage pool (only when it holds no volumes: nothing of a
        guest is ever removed here), then forget the cell. An unreachable cell is forgotten
        all the same: the host is leaving nano, and its pool is reported in the log."""
        actions: list[Action] = []
        name = local_pool_name(spec.name)
        try:
            link = self.connections.link(spec)
            link.hypervisor.pool_state(name)
            link.hypervisor.delete_pool(name)
            actions.append(Action(Verb.DELETE, Key("storage_pool", f"{spec.name}/{name}"),
                                  {"path": spec.storage_path}, None, reason="cell unregistered"))
        except NanoError as exc:
            if exc.code != 404:
                log.warning("cell %s unregistered; its pool %s stays: %s", spec.name, name,
                            exc.message)
        self.connections.drop(spec.name)
        others = [o for o in (self.store.cell_spec(n) for n in self.store.cell_names()
                              if n != spec.name) if o is not None]
        self.connections.forget_host_key(spec.transport, others)
        self.store.finish_cell_delete(spec.name)
        return Result(actions=tuple(actions), note="unregistered")

    def _converge(self, spec: CellSpec, link: CellLink, prev: dict[str, Any],
                  now: float) -> tuple[dict[str, Any], list[Action]]:
        from reconciler.drivers.facts import Counters, gather_facts, speeds

        hv = link.hypervisor
        if link.host_keys is not None:
            # first: nanod's SSH checks (or pins) the host key that libvirt's ssh then
            # finds in known_hosts; within the connect and command timeouts
            link.shell.run(["true"])
        node = hv.node_info()
        self.connections.watch_events(spec, link)
        before = self._pool_states(hv, spec)
        actions = plan_cell(spec, before)
        errors = self._apply(hv, spec, actions)
        pools = self._pool_states(hv, spec) if actions else before
        for name, error in errors.items():
            if name in pools:
                pools[name]["error"] = error
        facts = gather_facts(link.shell, [spec.storage_path])  # after the pool made the path
        networks = self._networks(hv, spec)
        actions += self._drop_unused_images(hv, spec)
        domains = hv.list_domains()
        if prev.get("fence"):  # back after a fence: the guests that left are not here twice
            for name in self.failover.returned(spec, hv, domains):
                actions.append(Action(Verb.DELETE, Key("domain", f"{spec.name}/{name}"),
                                      {"domain": name}, None,
                                      reason="stale copy of a guest that failed over"))
            domains = hv.list_domains()

        counters = asdict(facts.counters)
        prev_counters = prev.get("counters")
        rates = {"disk_read": 0.0, "disk_write": 0.0, "net_rx": 0.0, "net_tx": 0.0}
        if prev_counters and prev.get("probed_at"):
            rates = asdict(speeds(Counters(**prev_counters), facts.counters,
                                  now - float(prev["probed_at"])))
        running = [d for d in domains if d.state == "running"]
        simulated = spec.libvirt_uri.startswith("test:")
        max_memory = node.memory_bytes
        if simulated:  # the test driver's node: what its domains leave free
            available_memory = max(0, max_memory - sum(d.memory_bytes for d in running))
        else:
            available_memory = facts.memory_available_bytes
        # Disk room: libvirt's view of the local pool (what guests' volumes draw from),
        # else df of the storage path.
        local = pools.get(local_pool_name(spec.name), {})
        disk = facts.disks[0] if facts.disks else None
        disk_total = local.get("capacity") or ((disk.total_bytes or 0) if disk else 0)
        disk_free = local.get("available") or ((disk.free_bytes or 0) if disk else 0)
        stats = {
            "cpu_usage": sum(d.vcpus for d in running),
            "max_cpu": node.cpus,
            "available_memory": available_memory,
            "max_memory": max_memory,
            "available_disk": disk_free,
            "max_disk": disk_total,
            "read_speed": round(rates["disk_read"]),
            "write_speed": round(rates["disk_write"]),
            "receive_speed": round(rates["net_rx"]),
            "send_speed": round(rates["net_tx"]),
        }
        observed = {
            "alive": True,
            "failures": 0,
            "probed_at": now,
            "counters": counters,
            "stats": stats,
            "node": {"cpus": node.cpus, "memory": node.memory_bytes, "model": node.model,
                     "hostname": node.hostname},
            "facts": {
                "cpus": facts.cpus,
                "memory_total": facts.memory_total_bytes,
                "memory_available": facts.memory_available_bytes,
                "disks": [asdict(d) for d in facts.disks],
                "bridges": list(facts.bridges),
                "kernel": facts.kernel,
                "libvirt": facts.libvirtd.version,
                "qemu": facts.qemu.version,
                "nft": facts.nft.version,
                "nft_missing": facts.nft.reason or "",
                "warnings": list(facts.warnings),
                "capabilities": capabilities(facts, simulated=simulated),
            },
            "storage_pools": [{"name": name, **state} for name, state in sorted(pools.items())],
            "networks": networks,
            "host_key": dict(link.host_keys.accepted) if link.host_keys is not None else {},
            "domains": len(domains),
            "unowned_domains": sorted(d.name for d in domains
                                      if d.owned_id is None and not d.foreign),
            # a count: each guest's own record holds its state, and a cell row read by
            # every status request (the dashboard polls them every 2 s) stays small
            # whatever the cell hosts (a map of 200 guests made it 10x slower)
            "owned_domains": sum(1 for d in domains if d.owned_id),
        }
        return observed, actions

    def _drop_unused_images(self, hv: Any, spec: CellSpec) -> list[Action]:
        """Cached image copies nobody needs any more (old versions, images deleted, no guest
        being created from them, media not inserted) are removed from the cell."""
        from reconciler.drivers.domains import LibvirtGuests

        drv = LibvirtGuests(hv)
        done = []
        for replica in self.store.unused_replicas(spec.name):
            pool, _, volume = replica["volume"].partition("/")
            drv.delete_volume(pool, volume)
            self.store.forget_replica(replica["image"], replica["version"], spec.name)
            done.append(Action(Verb.DELETE, Key("volume", replica["volume"]), {
                "image": replica["image"], "version": replica["version"]}, None,
                reason="cached image no longer used"))
        return done

    def _networks(self, hv: Any, spec: CellSpec) -> list[dict[str, Any]]:
        """Guests of a pool without an address pool use libvirt's `default` NAT network:
        a cell in such a pool gets it started (the one libvirt object we start without
        owning it; we never change its definition). Address pool networks are the
        network reconciler's."""
        from reconciler.drivers.networks import ensure_started, network_state

        if not spec.pool or spec.address_pool:
            return []
        if network_state(hv, "default") is None:
            return [{"name": "default", "active": False,
                     "error": "libvirt's default network is not defined on this cell"}]
        state = ensure_started(hv, "default")
        return [{"name": "default", "active": state.active, "error": state.error}]

    def _pool_states(self, hv: Any, spec: CellSpec) -> dict[str, dict[str, Any]]:
        states: dict[str, dict[str, Any]] = {}
        for want in desired_pools(spec):
            try:
                st = hv.pool_state(want.name)
            except NanoError as exc:
                if exc.code == 404:
                    continue
                raise
            states[want.name] = {"active": st.active, "path": st.path or "",
                                 "error": st.error or "", "shared": want.shared,
                                 "attached": bool(st.active),
                                 "capacity": st.capacity, "available": st.available}
        return states

    def _apply(self, hv: Any, spec: CellSpec, actions: list[Action]) -> dict[str, str]:
        """Execute the pool actions; returns why pools could not start or move, by name
        (an NFS mount failing, or a pool to move that still holds volumes, is a state to
        report, not an error of the reconcile: the cell still answers)."""
        wants = {w.name: w for w in desired_pools(spec)}
        errors: dict[str, str] = {}
        for action in actions:
            want = wants[action.target.id.split("/", 1)[1]]
            if action.verb == Verb.REPLACE:
                try:
                    hv.delete_pool(want.name)
                except Conflict as exc:
                    errors[want.name] = (
                        f"cannot move storage pool {want.name} to {want.path}: {exc.message} "
                        "at its old path (disks of guests, or images): delete those guests, "
                        "or put storage_path back")
                    continue
            if want.kind == "dir":
                state = hv.ensure_dir_pool(want.name, want.path)
            else:
                state = hv.ensure_netfs_pool(want.name, want.host, want.source, want.path)
            if state.error:
                errors[want.name] = state.error
        return errors


def now_text() -> str:
    return format_time(dt.datetime.now().replace(microsecond=0))
