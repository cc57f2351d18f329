"""Network and firewall status of cells and address pools, and the reads the network and
firewall reconcilers (reconciler/networking.py, reconciler/firewalls.py) work from.

A mixin of `state.store.Store`, placed before `ComputeStore` in its bases: its
`record_cell` wraps the cell reconciler's, because that one writes a cell's `observed` and
`conditions` whole, from a copy read when its probe began. The keys of `observed` and the
condition types below belong to the network and firewall reconcilers; the wrapper keeps
whatever is stored for them, so neither side erases the other's report.

The cell's `Drifted` condition (what `nanod drift` reads) is derived here from
`NetworkDrifted` and `FirewallDrifted`, whichever reconciler records last.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from state.db import db
from state.models import (
    AddressAllocation,
    AddressPool,
    Cell,
    ComputePool,
    Guest,
    GuestInterface,
    GuestPolicy,
    PortAllocation,
    now,
)

NETWORK_KEY = "address_network"
FIREWALL_KEY = "firewall"
OWNED_KEYS = (NETWORK_KEY, FIREWALL_KEY)
"""Keys of a cell's `observed` that the cell reconciler never writes."""

DRIFTED = "Drifted"
PART_DRIFT = {"NetworkDrifted", "FirewallDrifted"}
OWNED_CONDITIONS = ("NetworkReady", "NetworkDrifted", "FirewallReady", "FirewallDrifted",
                    DRIFTED)
"""Condition types of a cell that the cell reconciler never writes."""


def _stamp() -> str:
    return now().strftime("%Y-%m-%d %H:%M:%S")


def merge_conditions(stored: Iterable[Mapping[str, Any]],
                     updates: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`stored` with each condition of `updates` put in place of the one of its type
    (appended when new); then `Drifted` recomputed from the part conditions present:
    true when any part is, its message theirs joined. `last_transition` moves only when a
    status flips (the rule of reconciler.contract.set_condition, whose callers computed
    the updates)."""
    out = [dict(c) for c in stored]
    for update in updates:
        for i, current in enumerate(out):
            if current.get("type") == update.get("type"):
                out[i] = dict(update)
                break
        else:
            out.append(dict(update))
    parts = [c for c in out if c.get("type") in PART_DRIFT]
    if not parts:
        return out
    drifted = [c for c in parts if c.get("status")]
    status = bool(drifted)
    reason = "+".join(c.get("reason", "") for c in drifted) if drifted else "InSync"
    message = "; ".join(c.get("message", "") for c in drifted if c.get("message"))
    previous = next((c for c in out if c.get("type") == DRIFTED), None)
    since = (previous.get("last_transition") if previous and
             bool(previous.get("status")) == status and previous.get("last_transition")
             else _stamp())
    entry = {"type": DRIFTED, "status": status, "reason": reason, "message": message,
             "last_transition": since}
    if previous is None:
        out.append(entry)
    else:
        out[out.index(previous)] = entry
    return out


def address_pool_uid(row: AddressPool) -> str:
    """A stable identity of one address pool record (its name alone may come back after a
    delete, or exist in another installation sharing a host): written into the ownership
    mark of the libvirt networks made for it."""
    seed = f"{row.name}|{row.id}|{row.created_at}"
    return hashlib.sha1(seed.encode()).hexdigest()[:16]


class NetStatusStore:
    """Mixin of `state.store.Store` (before ComputeStore): network/firewall status."""

    # -- the cell reconciler's write, keeping our parts ---------------------------------------

    def record_cell(self, name: str, *, generation: int, observed: dict[str, Any],
                    conditions: list[dict], phase: str, last_error: str) -> None:
        """The cell reconciler's record (ComputeStore.record_cell), with the network and
        firewall parts of `observed` and `conditions` taken from what is stored now."""
        with db.atomic():
            row = Cell.get_or_none(Cell.name == name)
            if row is not None:
                stored = row.observed or {}
                observed = {**{k: v for k, v in observed.items() if k not in OWNED_KEYS},
                            **{k: stored[k] for k in OWNED_KEYS if k in stored}}
                ours = [c for c in (row.conditions or []) if c.get("type") in OWNED_CONDITIONS]
                conditions = merge_conditions(
                    [c for c in conditions if c.get("type") not in OWNED_CONDITIONS], ours)
            super().record_cell(  # type: ignore[misc]
                name, generation=generation, observed=observed, conditions=conditions,
                phase=phase, last_error=last_error)

    # -- our own part of a cell's status ------------------------------------------------------

    def cell_net_status(self, name: str, key: str) -> dict[str, Any]:
        """What the network (`address_network`) or firewall (`firewall`) reconciler last
        recorded for cell `name` ({} when nothing)."""
        row = Cell.get_or_none(Cell.name == name)
        if row is None:
            return {}
        return dict((row.observed or {}).get(key) or {})

    def record_cell_net_status(self, name: str, key: str, observed: dict[str, Any] | None,
                               conditions: Iterable[Mapping[str, Any]] = ()) -> bool:
        """Replace `observed[key]` of cell `name` (None removes it) and put `conditions`
        (computed with set_condition from `cell_conditions`) in place; one transaction, the
        other keys and conditions untouched. False when the cell is gone."""
        if key not in OWNED_KEYS:
            raise ValueError(f"{key!r} is not a network status key")
        with db.atomic():
            row = Cell.get_or_none(Cell.name == name)
            if row is None:
                return False
            facts = dict(row.observed or {})
            if observed is None:
                facts.pop(key, None)
            else:
                facts[key] = observed
            merged = merge_conditions(row.conditions or [], conditions)
            Cell.update(observed=facts, conditions=merged).where(Cell.id == row.id).execute()
        return True

    # -- what the network reconciler renders ------------------------------------------------

    def address_pool_uid(self, name: str) -> str | None:
        row = AddressPool.get_or_none(AddressPool.name == name)
        return address_pool_uid(row) if row else None

    def cell_port_forwards(self, cell: str, address_pool: str) -> list[dict[str, Any]]:
        """[{guest, port, guest_port, address}] of every port forwarded on `cell`, by port;
        `address` is the guest's internal address in `address_pool` (the DNAT target), ""
        when it holds none. Guests being deleted keep theirs until their record goes."""
        addresses: dict[str, str] = {}
        pool = AddressPool.get_or_none(AddressPool.name == address_pool) if address_pool \
            else None
        if pool is not None:
            addresses = {a.guest: a.address for a in AddressAllocation.select().where(
                (AddressAllocation.pool == pool.id) & (AddressAllocation.type == "internal"))}
        return [{"guest": p.guest, "port": p.port, "guest_port": p.guest_port,
                 "address": addresses.get(p.guest, "")}
                for p in PortAllocation.select().where(PortAllocation.cell == cell)
                .order_by(PortAllocation.port)]

    def address_pool_cells(self, name: str) -> list[str]:
        """Cells of the compute pools whose guests use address pool `name`."""
        pools = [p.name for p in ComputePool.select(ComputePool.name)
                 .where(ComputePool.network == name)]
        if not pools:
            return []
        return [c.name for c in Cell.select(Cell.name).where(Cell.pool.in_(pools))
                .order_by(Cell.name)]

    def address_pool_names(self) -> list[str]:
        return [p.name for p in AddressPool.select(AddressPool.name).order_by(AddressPool.name)]

    def address_pool_generation(self, name: str) -> int | None:
        row = AddressPool.get_or_none(AddressPool.name == name)
        return row.generation if row else None

    def address_pool_conditions(self, name: str) -> list[dict[str, Any]]:
        row = AddressPool.get_or_none(AddressPool.name == name)
        return list(row.conditions or []) if row else []

    def record_address_pool_status(self, name: str, *, generation: int | None, phase: str,
                                   conditions: list[dict[str, Any]],
                                   observed: dict[str, Any], last_error: str = "") -> None:
        """The address pool reconciler's record; `generation` None leaves
        observed_generation as it is (not converged on every cell yet)."""
        columns: dict[Any, Any] = {AddressPool.phase: phase, AddressPool.conditions: conditions,
                                   AddressPool.observed: observed,
                                   AddressPool.last_error: last_error}
        if generation is not None:
            columns[AddressPool.observed_generation] = generation
        AddressPool.update(columns).where(AddressPool.name == name).execute()

    # -- what the firewall reconciler renders -------------------------------------------------

    def firewall_guests(self, cell: str) -> list[dict[str, Any]]:
        """The guests placed on (or moving to) `cell` that have a security policy of their
        own and are not being deleted: [{id, name, default_action, rules, macs: {internal|external: mac}}],
        by id. Guests without a policy row are left alone (no chain at all)."""
        # guests moving here get theirs before they arrive (state/migrations.py)
        here = (Guest.cell == cell) | Guest.id.in_(self.guests_moving_to(cell))  # type: ignore[attr-defined]
        rows = list(GuestPolicy.select(GuestPolicy, Guest.id, Guest.name)
                    .join(Guest).where(here & (Guest.deleting == False))  # noqa: E712
                    .order_by(Guest.id))
        ids = [r.guest.id for r in rows]
        macs: dict[str, dict[str, str]] = {}
        for start in range(0, len(ids), 500):
            for nic in GuestInterface.select().where(
                    GuestInterface.guest.in_(ids[start:start + 500])):
                macs.setdefault(nic.guest_id, {})[nic.type] = nic.mac
        return [{"id": r.guest.id, "name": r.guest.name, "default_action": r.default_action,
                 "rules": list(r.rules or []), "macs": macs.get(r.guest.id, {})}
                for r in rows]
