"""The cell reconciler: probes a KVM host (libvirt + host facts over SSH or locally),
converges its storage pools, and records liveness, facts, statistics and the domains it
does not own.

Registered by `reconciler/kinds.py`; runs in the controller's worker threads. A cell is
alive while its probes succeed; after `offline_after` failures in a row it is offline
(its guests are then reported lost by the guest reconciler), and one success clears it.
"""

from __future__ import annotations

import datetime as dt
import logging
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
from reconciler.naming import names
from state.compute import CellSpec, libvirt_uri_for
from state.errors import NanoError, Unavailable

log = logging.getLogger("nano.reconciler.cells")

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


class CellLink:
    """The open connections to one cell: a hypervisor and a host shell."""

    def __init__(self, spec: CellSpec, hypervisor: Any, shell: Any) -> None:
        self.reach = _reach(spec)
        self.hypervisor = hypervisor
        self.shell = shell
        self.events_registered = False

    def close(self) -> None:
        for part in (self.hypervisor, self.shell):
            try:
                part.close()
            except Exception:  # closing a broken connection must not mask the real error
                log.debug("closing cell connection failed", exc_info=True)


def _reach(spec: CellSpec) -> tuple:
    return (spec.libvirt_uri, tuple(sorted((spec.ssh or {}).items())), spec.address)


class CellConnections:
    """One `CellLink` per cell, reopened when the way to reach it changes. Shared by the
    cell and guest reconcilers (and the console proxy) so a cell has one connection."""

    def __init__(self, *, data_dir: str, on_domain_event: Callable[[str, str | None, str], None]
                 | None = None) -> None:
        self._links: dict[str, CellLink] = {}
        self._lock = threading.Lock()
        self._data_dir = data_dir
        self._on_domain_event = on_domain_event

    def link(self, spec: CellSpec) -> CellLink:
        with self._lock:
            link = self._links.get(spec.name)
            if link is not None and link.reach == _reach(spec):
                return link
            if link is not None:
                link.close()
            link = CellLink(spec, self._open_hypervisor(spec), self._open_shell(spec))
            self._links[spec.name] = link
            return link

    def uri(self, spec: CellSpec) -> str:
        """The libvirt URI used for a cell; for SSH cells libvirt's ssh runs a wrapper that
        checks the host key against the file paramiko pinned on first contact."""
        return libvirt_uri_for({"libvirt_uri": spec.libvirt_uri, "ssh": spec.ssh,
                                "address": spec.address}, ssh_command=self._ssh_wrapper())

    def _ssh_wrapper(self) -> str:
        path = os.path.join(self._data_dir, "ssh-known-hosts-wrapper")
        known = os.path.join(self._data_dir, "known_hosts")
        script = ("#!/bin/sh\n# written by nanod: libvirt's ssh checks host keys strictly "
                  "against nanod's known_hosts\n"
                  f"exec ssh -F /dev/null -o UserKnownHostsFile={shlex.quote(known)} "
                  "-o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes "
                  "-o BatchMode=yes \"$@\"\n")
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

    def _open_hypervisor(self, spec: CellSpec) -> Any:
        from reconciler.drivers.libvirt_hv import LibvirtHypervisor

        return LibvirtHypervisor(self.uri(spec))

    def _open_shell(self, spec: CellSpec) -> Any:
        from reconciler.drivers.shell import HostKeyPolicy, LocalShell, ParamikoShell

        if spec.local:
            return LocalShell()
        ssh = spec.ssh
        return ParamikoShell(
            spec.address, int(ssh.get("port", 22)), ssh.get("user", "root"),
            key_file=ssh.get("key_file"), password=ssh.get("password"),
            known_hosts=os.path.join(self._data_dir, "known_hosts"),
            host_key_policy=HostKeyPolicy.ACCEPT_NEW,
        )

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
                 *, offline_after: int = 3, probe_seconds: float = 10.0) -> None:
        self.store = store
        self.connections = connections
        self.enqueue = enqueue
        self.offline_after = offline_after
        self.probe_seconds = probe_seconds

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
            conditions = set_condition(conditions, READY, *cell_ready(observed, conditions),
                                       now_text())
            last_error = ""
            phase = "online"
        except NanoError as exc:
            failures = int(prev.get("failures", 0)) + 1
            alive = bool(prev.get("alive")) and failures < self.offline_after
            observed = {**prev, "alive": alive, "failures": failures, "probed_at": now}
            if not isinstance(exc, Unavailable):
                log.warning("cell %s: %s", spec.name, exc.message)
            self.connections.drop(spec.name)  # reconnect from scratch next time
            conditions = set_condition(conditions, "CellReachable", False, "ProbeFailed",
                                       exc.message, now_text())
            conditions = set_condition(conditions, READY, False, "Unreachable", exc.message,
                                       now_text())
            last_error = exc.message
            phase = "online" if alive else "offline"
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
        self.store.finish_cell_delete(spec.name)
        return Result(actions=tuple(actions), note="unregistered")

    def _converge(self, spec: CellSpec, link: CellLink, prev: dict[str, Any],
                  now: float) -> tuple[dict[str, Any], list[Action]]:
        from reconciler.drivers.facts import Counters, gather_facts, speeds

        hv = link.hypervisor
        if not spec.local:
            # first contact over SSH pins the host key that libvirt's ssh then checks
            link.shell.run(["true"], timeout=15)
        node = hv.node_info()
        self.connections.watch_events(spec, link)
        before = self._pool_states(hv, spec)
        actions = plan_cell(spec, before)
        errors = self._apply(hv, spec, actions)
        pools = self._pool_states(hv, spec) if actions else before
        for name, error in errors.items():
            if name in pools and not pools[name]["active"]:
                pools[name]["error"] = error
        facts = gather_facts(link.shell, [spec.storage_path])  # after the pool made the path
        networks = self._networks(hv, spec)
        actions += self._drop_unused_images(hv, spec)
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
        """Execute the pool actions; returns why pools could not start, by name (an
        NFS mount failing is a state to report, not an error of the reconcile)."""
        wants = {w.name: w for w in desired_pools(spec)}
        errors: dict[str, str] = {}
        for action in actions:
            want = wants[action.target.id.split("/", 1)[1]]
            if action.verb == Verb.REPLACE:
                hv.delete_pool(want.name)
            if want.kind == "dir":
                state = hv.ensure_dir_pool(want.name, want.path)
            else:
                state = hv.ensure_netfs_pool(want.name, want.host, want.source, want.path)
            if state.error:
                errors[want.name] = state.error
        return errors


def now_text() -> str:
    return format_time(dt.datetime.now().replace(microsecond=0))
