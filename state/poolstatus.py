"""Status of compute pools and storage pools, derived from what the cell reconciler
observed on their cells; read and recorded by reconciler/pools.py."""

from __future__ import annotations

from typing import Any

from state.models import Cell, ComputePool, StoragePool


class PoolStatusStore:
    """Mixin of `state.store.Store`."""

    def compute_pool_names(self) -> list[str]:
        return [p.name for p in ComputePool.select(ComputePool.name).order_by(ComputePool.name)]

    def storage_pool_names(self) -> list[str]:
        return [p.name for p in StoragePool.select(StoragePool.name).order_by(StoragePool.name)]

    def compute_pool_view(self, name: str) -> dict[str, Any] | None:
        row = ComputePool.get_or_none(ComputePool.name == name)
        if row is None:
            return None
        cells = [{"name": c.name, "enabled": c.enabled,
                  "alive": bool((c.observed or {}).get("alive"))}
                 for c in Cell.select().where(Cell.pool == name).order_by(Cell.name)]
        return {"name": name, "generation": row.generation, "enabled": row.enabled,
                "cells": cells, "conditions": list(row.conditions or [])}

    def storage_pool_view(self, name: str) -> dict[str, Any] | None:
        row = StoragePool.get_or_none(StoragePool.name == name)
        if row is None:
            return None
        users = [p.name for p in ComputePool.select().where(ComputePool.storage == name)]
        cells = []
        for cell in Cell.select().where(Cell.pool.in_(users)).order_by(Cell.name) if users \
                else []:
            # libvirt names `<names prefix>-shared-<name>` (reconciler/naming.py; the prefix
            # has no '-')
            pools = {p["name"].partition("-")[2]: p
                     for p in (cell.observed or {}).get("storage_pools", [])}
            seen = pools.get(f"shared-{name}")
            cells.append({"cell": cell.name, "attached": bool(seen and seen.get("active")),
                          "error": (seen or {}).get("error", "") if seen else
                          "not set up on this cell yet"})
        return {"name": name, "generation": row.generation, "users": users, "cells": cells,
                "conditions": list(row.conditions or [])}

    def record_pool_status(self, kind: str, name: str, *, generation: int, phase: str,
                           conditions: list[dict[str, Any]], observed: dict[str, Any]) -> None:
        model = ComputePool if kind == "compute_pool" else StoragePool
        model.update(observed_generation=generation, phase=phase, conditions=conditions,
                     observed=observed).where(model.name == name).execute()
