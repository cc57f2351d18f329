"""Compute pools, cells and storage pools in the store, and the statistics built from what
the reconciler observed.

Called by the API (`api/compute.py`) for the seed's resource-pool routes and the cell
extension routes, and by the reconciler (`reconciler/cells.py`) to read cell specs and
record what it observed. Refusals say why and what to do instead.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any

import peewee

from state.cell_transport import CellRules, CellTransport, cell_transport
from state.db import db
from state.errors import Conflict, Invalid, NotFound
from state.identity import check_name, format_time
from state.models import (
    AddressAllocation,
    AddressPool,
    Cell,
    ComputePool,
    Guest,
    StoragePool,
    now,
)
from state.secrets import opened_ssh, sealed_cell_spec

DEFAULT_STORAGE_PATH = "/var/lib/libvirt/images"
GUEST_STATES = ("stopped", "running", "lost", "migrating")


@dataclass(frozen=True)
class CellSpec:
    """What the reconciler needs to reach and converge one cell (a plain value)."""

    name: str
    generation: int
    pool: str
    enabled: bool
    address: str
    libvirt_uri: str  # as registered; "" = derived (see `libvirt_uri_for`)
    ssh: dict[str, Any]
    virt_type: str
    storage_path: str
    bridge: str
    shared_storage: tuple[dict[str, str], ...] = ()
    address_pool: str = ""  # the compute pool's address pool, "" = libvirt's default network
    deleting: bool = False
    observed: dict[str, Any] = field(default_factory=dict)
    # the checked way in (state/cell_transport.py); None: refused today, and why
    transport: CellTransport | None = None
    transport_error: str = ""

    @property
    def local(self) -> bool:
        """Facts are read with a local shell when no SSH is configured."""
        return not self.ssh

    @property
    def hypervisor(self) -> str:
        """The libvirt URI the cell is reached by ("" when refused): equal for two cells on
        one libvirtd reached the same way."""
        return self.transport.uri() if self.transport is not None else ""


def libvirt_uri_for(spec: dict[str, Any], rules: CellRules, *, ssh_command: str = "") -> str:
    """The libvirt URI of a cell spec, built by nanod from its checked fields (with
    `ssh_command`, nanod's ssh wrapper that checks the pinned host key, for qemu+ssh).
    Raises `Invalid` naming the field when the spec's way in is refused under `rules`."""
    return cell_transport(spec, rules).uri(ssh_command=ssh_command)


def cell_brief(row: Cell) -> dict[str, Any]:
    obs = row.observed or {}
    return {
        "name": row.name,
        "address": (row.spec or {}).get("address", ""),
        "enabled": row.enabled,
        "alive": bool(obs.get("alive", False)),
    }


class ComputeStore:
    """Mixin of `state.store.Store`: compute pools, cells, storage pools, statistics."""

    #: what cell transports this nanod accepts (settings); `Store(cell_rules=...)` sets it
    cell_rules: CellRules = CellRules()
    data_dir: str = ""  # its key file seals cells' SSH passwords (state/secrets.py)

    # -- compute pools -----------------------------------------------------------------------

    def _pool(self, name: str) -> ComputePool:
        row = ComputePool.get_or_none(ComputePool.name == name)
        if row is None:
            raise NotFound(f"no compute pool named {name!r}")
        return row

    def _check_pool_refs(self, storage: str, network: str) -> None:
        if storage and StoragePool.get_or_none(StoragePool.name == storage) is None:
            raise NotFound(f"no storage pool named {storage!r}: create it first or send "
                           "storage \"\" for local storage")
        if network and AddressPool.get_or_none(AddressPool.name == network) is None:
            raise NotFound(f"no address pool named {network!r}: create it first or send "
                           "network \"\" for the default NAT network")

    def _pool_dict(self, row: ComputePool, cells: int | None = None) -> dict[str, Any]:
        if cells is None:
            cells = Cell.select().where(Cell.pool == row.name).count()
        return {"name": row.name, "enabled": row.enabled, "cells": cells,
                "storage": row.storage, "network": row.network, "failover": row.failover}

    def list_pools(self) -> list[dict[str, Any]]:
        counts = dict(Cell.select(Cell.pool, peewee.fn.COUNT(Cell.id)).group_by(Cell.pool)
                      .tuples())
        return [self._pool_dict(p, counts.get(p.name, 0))
                for p in ComputePool.select().order_by(ComputePool.name)]

    def pool(self, name: str) -> dict[str, Any]:
        return self._pool_dict(self._pool(name))

    def create_pool(self, name: str, spec: dict[str, Any]) -> None:
        check_name("compute pool", name)
        storage, network = spec.get("storage") or "", spec.get("network") or ""
        with db.atomic():
            if ComputePool.get_or_none(ComputePool.name == name):
                raise Conflict(f"compute pool {name!r} already exists")
            self._check_pool_refs(storage, network)
            _check_failover(spec, storage)
            ComputePool.create(name=name, storage=storage, network=network,
                               failover=bool(spec.get("failover")),
                               enabled=bool(spec.get("enabled", True)))

    def modify_pool(self, name: str, spec: dict[str, Any]) -> list[str]:
        """Apply the given fields; returns the names of the cells to re-converge."""
        with db.atomic():
            row = self._pool(name)
            storage = spec.get("storage", row.storage) or ""
            network = spec.get("network", row.network) or ""
            self._check_pool_refs(storage, network)
            guests = Guest.select().where(Guest.pool == name).count()
            if storage != row.storage and guests:
                raise Conflict(f"compute pool {name!r} has {guests} guest(s): storage can "
                               "change only while the pool holds no guests")
            if network != row.network and row.network:
                held = (AddressAllocation.select().join(AddressPool)
                        .where(AddressPool.name == row.network)
                        .where(AddressAllocation.guest.in_(
                            Guest.select(Guest.id).where(Guest.pool == name)))
                        .count())
                if held:
                    raise Conflict(f"compute pool {name!r} holds {held} address(es) of "
                                   f"{row.network!r}: delete those guests before changing "
                                   "the network")
            _check_failover({"failover": spec.get("failover", row.failover)}, storage)
            row.storage, row.network = storage, network
            row.failover = bool(spec.get("failover", row.failover))
            if "enabled" in spec:
                row.enabled = bool(spec["enabled"])
            row.generation += 1
            row.modified_at = now()
            row.save()
            return [c.name for c in Cell.select(Cell.name).where(Cell.pool == name)]

    def delete_pool(self, name: str) -> None:
        with db.atomic():
            row = self._pool(name)
            cells = [c.name for c in Cell.select(Cell.name).where(Cell.pool == name)]
            if cells:
                raise Conflict(f"compute pool {name!r} still has cell(s) "
                               f"{', '.join(sorted(cells))}: remove them first")
            row.delete_instance()

    # -- cells ------------------------------------------------------------------------------

    def _cell(self, name: str) -> Cell:
        row = Cell.get_or_none(Cell.name == name)
        if row is None:
            raise NotFound(f"no cell named {name!r}: register it with POST /api/v1/cells/{name}")
        return row

    def register_cell(self, name: str, spec: dict[str, Any]) -> None:
        check_name("cell", name)
        spec = _normalize_cell_spec(spec, self.cell_rules)
        with db.atomic():
            existing = Cell.get_or_none(Cell.name == name)
            if existing is not None and existing.deleting:
                raise Conflict(f"cell {name!r} is being unregistered: try again in a moment")
            if existing is not None:
                raise Conflict(f"cell {name!r} is already registered: use PUT to change it")
            Cell.create(name=name, spec=sealed_cell_spec(self.data_dir, spec))

    def modify_cell_spec(self, name: str, changes: dict[str, Any]) -> None:
        with db.atomic():
            row = self._cell(name)
            if changes.get("ssh") and not (row.spec or {}).get("ssh") and \
                    not changes.get("address"):
                # the stored address of a local cell is a default (127.0.0.1), not the host
                # the new ssh settings are meant for
                raise Invalid(f"address: is required to give cell {name!r} ssh settings: send "
                              "the cell's host name or IP address in the same request, e.g. "
                              "\"address\": \"192.0.2.10\"")
            merged = {**(row.spec or {}), **changes}
            row.spec = sealed_cell_spec(self.data_dir,
                                        _normalize_cell_spec(merged, self.cell_rules))
            if "enabled" in changes:
                row.enabled = bool(changes["enabled"])
            row.generation += 1
            row.modified_at = now()
            row.save()

    def unregister_cell(self, name: str) -> None:
        """Deletion is a state: the cell is marked, the reconciler removes what nano made
        on it (its storage pool) and then the record (`finish_cell_delete`)."""
        with db.atomic():
            row = self._cell(name)
            if row.pool:
                raise Conflict(f"cell {name!r} is in compute pool {row.pool!r}: remove it from "
                               "the pool first")
            if not row.deleting:
                row.deleting = True
                row.generation += 1
                row.phase = "deleting"
                row.save()

    def cell_gone(self, name: str) -> bool:
        return Cell.get_or_none(Cell.name == name) is None

    def finish_cell_delete(self, name: str) -> None:
        Cell.delete().where((Cell.name == name) & (Cell.deleting == True)).execute()  # noqa: E712

    def cells(self, pool: str | None = None, *, unallocated: bool = False) -> list[dict]:
        query = Cell.select().order_by(Cell.name)
        if unallocated:
            query = query.where((Cell.pool == "") & (Cell.deleting == False))  # noqa: E712
        elif pool is not None:
            self._pool(pool)
            query = query.where(Cell.pool == pool)
        return [cell_brief(c) for c in query]

    def cell_record(self, name: str) -> dict[str, Any]:
        """A registered cell with its spec and observed status (extension routes)."""
        row = self._cell(name)
        spec = dict(row.spec or {})
        if spec.get("ssh", {}).get("password"):
            spec["ssh"] = {**spec["ssh"], "password": "********"}
        try:  # a cell stored in a form refused today has none: its status says why
            uri = libvirt_uri_for(row.spec or {}, self.cell_rules)
        except Invalid:
            uri = ""
        return {
            **cell_brief(row),
            "pool": row.pool,
            "spec": spec,
            "libvirt_uri": uri,
            "generation": row.generation,
            "status": self._status(row),
            # extension: a draining cell takes no guests; its guests' migration
            "drain": self.drain_status(spec),  # type: ignore[attr-defined]
        }

    def _status(self, row: Any) -> dict[str, Any]:
        return {
            "observed_generation": row.observed_generation,
            "phase": row.phase,
            "conditions": row.conditions or [],
            "last_error": row.last_error,
            "observed": {k: v for k, v in (row.observed or {}).items() if k != "counters"},
        }

    def add_cell_to_pool(self, pool: str, name: str) -> None:
        with db.atomic():
            self._pool(pool)
            row = self._cell(name)
            if row.pool == pool:
                raise Conflict(f"cell {name!r} is already in compute pool {pool!r}")
            if row.pool:
                raise Conflict(f"cell {name!r} is in compute pool {row.pool!r}: remove it "
                               "from there first")
            obs = row.observed or {}
            if not obs.get("alive"):
                reason = row.last_error or "it has not answered a probe yet"
                raise Conflict(f"cell {name!r} is unreachable ({reason}): check its libvirtd "
                               "and SSH settings, then try again")
            row.pool = pool
            row.generation += 1
            row.save()

    def remove_cell_from_pool(self, pool: str, name: str) -> None:
        with db.atomic():
            row = self._cell(name)
            if row.pool != pool:
                raise NotFound(f"cell {name!r} is not in compute pool {pool!r}")
            guests = Guest.select().where(Guest.cell == name).count()
            if guests:
                raise Conflict(f"cell {name!r} hosts {guests} guest(s): delete or migrate them "
                               "before removing the cell")
            row.pool = ""
            row.generation += 1
            row.save()

    def enable_cell(self, pool: str, name: str, enable: bool) -> None:
        row = self._cell(name)
        if row.pool != pool:
            raise NotFound(f"cell {name!r} is not in compute pool {pool!r}")
        Cell.update(enabled=enable, generation=Cell.generation + 1).where(
            Cell.id == row.id).execute()

    def cell_status(self, pool: str, name: str) -> dict[str, Any]:
        row = self._cell(name)
        if row.pool != pool:
            raise NotFound(f"cell {name!r} is not in compute pool {pool!r}")
        storage = (row.observed or {}).get("storage_pools", [])
        return {**cell_brief(row), "storage": [
            {k: v for k, v in s.items() if k in ("name", "attached", "error") and
             (k != "error" or v)} for s in storage if s.get("shared")
        ]}

    def cell_storages(self, pool: str, name: str) -> dict[str, Any]:
        row = self._cell(name)
        if row.pool != pool:
            raise NotFound(f"cell {name!r} is not in compute pool {pool!r}")
        pool_row = self._pool(pool)
        path = (row.spec or {}).get("storage_path", DEFAULT_STORAGE_PATH)
        if pool_row.storage:
            storage = StoragePool.get_or_none(StoragePool.name == pool_row.storage)
            mode = storage.type if storage else "nfs"
            return {"mode": mode, "system": [], "data": []}
        return {"mode": "local", "system": [path], "data": [path]}

    def set_cell_storage(self, pool: str, name: str, path: str) -> None:
        if not path.startswith("/") or "\x00" in path or "/../" in path + "/":
            raise Invalid(f"default: {path!r} must be an absolute path without '..'")
        row = self._cell(name)
        if row.pool != pool:
            raise NotFound(f"cell {name!r} is not in compute pool {pool!r}")
        if Guest.select().where(Guest.cell == name).exists():
            raise Conflict(f"cell {name!r} hosts guests: storage paths change only on an "
                           "empty cell")
        self.modify_cell_spec(name, {"storage_path": path.rstrip("/") or "/"})

    def bootstrap_local_cell(self, *, virt_type: str, pool: str = "default",
                             cell: str = "local") -> str:
        """The embedded default of a new installation: this host as cell `local`
        (qemu:///system, facts read locally) in compute pool `default`. Stored as desired
        state; the reconciler probes it once nanod serves. Idempotent."""
        with db.atomic():
            said = []
            if ComputePool.get_or_none(ComputePool.name == pool) is None:
                ComputePool.create(name=pool)
                said.append(f"created compute pool {pool!r}")
            row = Cell.get_or_none(Cell.name == cell)
            if row is None:
                Cell.create(name=cell, pool=pool, spec=_normalize_cell_spec(
                    {"libvirt_uri": "qemu:///system", "virt_type": virt_type},
                    self.cell_rules))
                said.append(f"registered this host as cell {cell!r} (qemu:///system, "
                            f"virt_type {virt_type}) in pool {pool!r}")
            elif not row.pool:
                row.pool = pool
                row.save()
                said.append(f"added cell {cell!r} to pool {pool!r}")
        return "; ".join(said) or f"cell {cell!r} already registered"

    # -- for the reconciler -----------------------------------------------------------------

    def cell_names(self) -> list[str]:
        return [c.name for c in Cell.select(Cell.name).order_by(Cell.name)]

    def cell_spec(self, name: str) -> CellSpec | None:
        row = Cell.get_or_none(Cell.name == name)
        if row is None:
            return None
        spec = row.spec or {}
        shared: list[dict[str, str]] = []
        address_pool = ""
        if row.pool:
            pool = ComputePool.get_or_none(ComputePool.name == row.pool)
            address_pool = pool.network if pool else ""
            if pool and pool.storage:
                sp = StoragePool.get_or_none(StoragePool.name == pool.storage)
                if sp:
                    shared.append({"name": sp.name, "type": sp.type, "host": sp.host,
                                   "target": sp.target})
        transport, refused = None, ""
        try:
            transport = cell_transport(spec, self.cell_rules)
        except Invalid as exc:
            refused = exc.message
        return CellSpec(
            transport=transport, transport_error=refused,
            name=row.name, generation=row.generation, pool=row.pool, enabled=row.enabled,
            address=spec.get("address", ""), libvirt_uri=spec.get("libvirt_uri", ""),
            ssh=opened_ssh(self.data_dir, spec.get("ssh")), virt_type=spec.get("virt_type", "kvm"),
            storage_path=spec.get("storage_path", DEFAULT_STORAGE_PATH),
            bridge=spec.get("bridge", ""), shared_storage=tuple(shared),
            address_pool=address_pool,
            deleting=row.deleting, observed=dict(row.observed or {}),
        )

    def cell_conditions(self, name: str) -> list[dict]:
        row = Cell.get_or_none(Cell.name == name)
        return list(row.conditions or []) if row else []

    def guest_ids_on_cell(self, name: str) -> list[str]:
        return [g.id for g in Guest.select(Guest.id).where(Guest.cell == name)]

    def record_cell(self, name: str, *, generation: int, observed: dict[str, Any],
                    conditions: list[dict], phase: str, last_error: str) -> None:
        Cell.update(observed=observed, conditions=conditions, phase=phase,
                    last_error=last_error, observed_generation=generation).where(
            Cell.name == name).execute()

    # -- storage pools ----------------------------------------------------------------------

    def _storage(self, name: str) -> StoragePool:
        row = StoragePool.get_or_none(StoragePool.name == name)
        if row is None:
            raise NotFound(f"no storage pool named {name!r}")
        return row

    def _storage_users(self, name: str) -> list[str]:
        return [p.name for p in ComputePool.select().where(ComputePool.storage == name)]

    def list_storage(self) -> list[dict[str, Any]]:
        return [{"name": s.name, "type": s.type, "host": s.host, "target": s.target}
                for s in StoragePool.select().order_by(StoragePool.name)]

    def storage(self, name: str) -> dict[str, Any]:
        row = self._storage(name)
        return {"name": row.name, "type": row.type, "host": row.host, "target": row.target}

    def create_storage(self, name: str, spec: dict[str, Any]) -> None:
        check_name("storage pool", name)
        spec = _check_storage_spec(spec)
        with db.atomic():
            if StoragePool.get_or_none(StoragePool.name == name):
                raise Conflict(f"storage pool {name!r} already exists")
            StoragePool.create(name=name, **spec)

    def modify_storage(self, name: str, spec: dict[str, Any]) -> None:
        with db.atomic():
            row = self._storage(name)
            users = self._storage_users(name)
            if users:
                raise Conflict(f"storage pool {name!r} is used by compute pool(s) "
                               f"{', '.join(users)}: it can change only while unused")
            merged = _check_storage_spec({"type": row.type, "host": row.host,
                                          "target": row.target, **spec})
            StoragePool.update(generation=StoragePool.generation + 1, modified_at=now(),
                               **merged).where(StoragePool.id == row.id).execute()

    def delete_storage(self, name: str) -> None:
        with db.atomic():
            row = self._storage(name)
            users = self._storage_users(name)
            if users:
                raise Conflict(f"storage pool {name!r} is used by compute pool(s) "
                               f"{', '.join(users)}: detach it from them first")
            row.delete_instance()

    # -- statistics -------------------------------------------------------------------------

    def _guest_counts(self) -> dict[tuple[str, str], list[int]]:
        """Per (pool, cell): [stopped, running, lost, migrating], one GROUP BY query."""
        counts: dict[tuple[str, str], list[int]] = {}
        rows = (Guest.select(Guest.pool, Guest.cell, Guest.phase, peewee.fn.COUNT(Guest.id))
                .group_by(Guest.pool, Guest.cell, Guest.phase).tuples())
        for pool, cell, phase, n in rows:
            slot = counts.setdefault((pool, cell), [0, 0, 0, 0])
            if phase in GUEST_STATES:
                slot[GUEST_STATES.index(phase)] += n
        return counts

    def _cell_stat(self, row: Cell, counts: dict) -> dict[str, Any]:
        obs = row.observed or {}
        alive = bool(obs.get("alive"))
        stats = obs.get("stats", {}) if alive else {}
        return {
            **cell_brief(row),
            "instances": list(counts.get((row.pool, row.name), [0, 0, 0, 0])),
            "cpu_usage": stats.get("cpu_usage", 0),
            "max_cpu": stats.get("max_cpu", 0),
            "available_memory": stats.get("available_memory", 0),
            "max_memory": stats.get("max_memory", 0),
            "available_disk": stats.get("available_disk", 0),
            "max_disk": stats.get("max_disk", 0),
            "read_speed": stats.get("read_speed", 0),
            "write_speed": stats.get("write_speed", 0),
            "receive_speed": stats.get("receive_speed", 0),
            "send_speed": stats.get("send_speed", 0),
        }

    def cell_stats(self, pool: str, name: str | None = None) -> Any:
        self._pool(pool)
        counts = self._guest_counts()
        query = Cell.select().where(Cell.pool == pool).order_by(Cell.name)
        if name is not None:
            row = query.where(Cell.name == name).first()
            if row is None:
                raise NotFound(f"cell {name!r} is not in compute pool {pool!r}")
            return self._cell_stat(row, counts)
        return [self._cell_stat(c, counts) for c in query]

    def _sum(self, name: str, cells: list[dict], counts: list[int]) -> dict[str, Any]:
        out: dict[str, Any] = {"name": name}
        for key in ("cpu_usage", "max_cpu", "available_memory", "max_memory",
                    "available_disk", "max_disk", "read_speed", "write_speed",
                    "receive_speed", "send_speed"):
            out[key] = sum(c[key] for c in cells)
        out["cpu_usage"] = round(out["cpu_usage"], 2)
        out["cells"] = [sum(1 for c in cells if not c["alive"]), sum(1 for c in cells if c["alive"])]
        out["instances"] = counts
        return out

    def _pooled_cells(self, counts: dict) -> dict[str, list[dict]]:
        by_pool: dict[str, list[dict]] = {}
        for row in Cell.select().where(Cell.pool != ""):
            by_pool.setdefault(row.pool, []).append(self._cell_stat(row, counts))
        return by_pool

    @staticmethod
    def _instances(counts: dict, pool: str | None = None) -> list[int]:
        total = [0, 0, 0, 0]
        for (p, _cell), n in counts.items():
            if pool is None or p == pool:
                total = [a + b for a, b in zip(total, n, strict=True)]
        return total

    def pool_stats(self, name: str | None = None) -> Any:
        counts = self._guest_counts()
        by_pool = self._pooled_cells(counts)
        pools = [self._pool(name)] if name is not None else \
            list(ComputePool.select().order_by(ComputePool.name))
        result = [{**self._sum(p.name, by_pool.get(p.name, []), self._instances(counts, p.name)),
                   "enabled": p.enabled} for p in pools]
        return result[0] if name is not None else result

    def zone_stats(self, started_at: float) -> dict[str, Any]:
        counts = self._guest_counts()
        cells = [c for group in self._pooled_cells(counts).values() for c in group]
        zone = self._sum("default", cells, self._instances(counts))
        enabled = [p.enabled for p in ComputePool.select(ComputePool.enabled)]
        zone["pools"] = [enabled.count(False), enabled.count(True)]
        zone["start_time"] = format_time(dt.datetime.fromtimestamp(started_at)
                                         .replace(microsecond=0))
        return zone


def _check_failover(spec: dict[str, Any], storage: str) -> None:
    """`failover: true` needs shared storage: the guests of a lost (and fenced) cell start
    on another cell from their disks on it (reconciler/failover.py)."""
    if spec.get("failover") and not storage:
        raise Invalid("failover: true needs shared storage: give the pool a storage pool "
                      "(storage: NAME) whose disks every cell reaches, or send failover: false")


def _normalize_cell_spec(spec: dict[str, Any], rules: CellRules) -> dict[str, Any]:
    """The spec as stored, or `Invalid` naming the first field refused: nothing of a
    refused spec is stored."""
    out = dict(spec)
    out.setdefault("virt_type", "kvm")
    if out["virt_type"] not in ("kvm", "qemu"):
        raise Invalid(f"virt_type: {out['virt_type']!r} is not 'kvm' or 'qemu'")
    ssh = out.get("ssh") or {}
    uri = out.get("libvirt_uri", "")
    remote = uri and not (uri == "qemu:///system" or uri.startswith("test:"))
    if not out.get("address"):
        if ssh or remote:
            reason = "ssh is given" if ssh else f"libvirt_uri {uri!r} is not local"
            raise Invalid(f"address: is required because {reason}: send the cell's host name "
                          "or IP address, e.g. \"address\": \"192.0.2.10\" (only a local cell, "
                          "without ssh, defaults it to 127.0.0.1)")
        out["address"] = "127.0.0.1"
    if ssh:  # `ssh: {}` is a local cell, as no ssh at all
        if not (ssh.get("key_file") or ssh.get("password")):
            raise Invalid("ssh: give key_file (a private key path on the management node) or "
                          "password")
        out["ssh"] = {"user": ssh.get("user", "root"), "port": int(ssh.get("port", 22)),
                      **{k: ssh[k] for k in ("key_file", "password", "host_key")
                         if ssh.get(k)}}
    cell_transport(out, rules)  # the way in: every field of it checked, or refused
    path = out.get("storage_path", DEFAULT_STORAGE_PATH)
    if not str(path).startswith("/") or ".." in str(path).split("/"):
        raise Invalid(f"storage_path: {path!r} must be an absolute path without '..'")
    out["storage_path"] = str(path).rstrip("/") or "/"
    return out


def _check_storage_spec(spec: dict[str, Any]) -> dict[str, str]:
    """`nfs`: an export every cell of the pool mounts (libvirt netfs pool). `dir`
    (extension): a directory every cell of the pool already sees as shared storage (a
    cluster file system or an NFS mount the operator made); nano only makes it a libvirt
    dir pool on each cell."""
    kind = spec.get("type", "nfs")
    host, target = spec.get("host", "") or "", spec.get("target", "") or ""
    if kind == "dir":
        if not target.startswith("/") or ".." in target.split("/"):
            raise Invalid("target: must be the absolute path of the shared directory on "
                          "every cell, without '..'")
        return {"type": kind, "host": "", "target": target.rstrip("/") or "/"}
    if kind != "nfs":
        raise Invalid(f"type: {kind!r} is not supported; use 'nfs', or 'dir' for a directory "
                      "the cells already share (ceph is not available)")
    if not host:
        raise Invalid("host: is required for an nfs storage pool (the NFS server)")
    if not target.startswith("/"):
        raise Invalid("target: must be the absolute export path on the NFS server")
    return {"type": kind, "host": host, "target": target}


def monotonic() -> float:
    return time.monotonic()
