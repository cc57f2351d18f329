"""Compute pool and storage pool reconcilers: nothing on a host belongs to a pool itself
(its cells and their storage pools are the cell reconciler's), so these only derive and
record status: Ready with a message naming the offline cells or the cells where a shared
storage pool is not attached. Registered by reconciler/kinds.py; the cell reconciler wakes
them when a cell's state changes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from reconciler.contract import READY, Key, Result, format_time, set_condition


def now_text() -> str:
    return format_time(dt.datetime.now().replace(microsecond=0))


def compute_pool_status(view: dict[str, Any]) -> tuple[str, bool, str, str]:
    """Pure: (phase, ready, reason, message) of a compute pool from its cells."""
    cells = view["cells"]
    online = [c["name"] for c in cells if c["alive"]]
    offline = [c["name"] for c in cells if not c["alive"]]
    usable = [c["name"] for c in cells if c["alive"] and c["enabled"]]
    if not view["enabled"]:  # as desired: converged, not broken
        return "disabled", True, "Disabled", "the pool is disabled: it takes no new guests"
    if not cells:
        return "empty", False, "NoCells", "add a cell to the pool"
    if not usable:
        return "unavailable", False, "NoUsableCell", (
            f"no cell is both online and enabled (offline: {', '.join(offline) or 'none'})")
    message = f"{len(online)} of {len(cells)} cells online"
    if offline:
        return "degraded", True, "SomeCellsOffline", f"{message} (offline: {', '.join(offline)})"
    return "ready", True, "AllCellsOnline", message


def storage_pool_status(view: dict[str, Any]) -> tuple[str, bool, str, str]:
    """Pure: (phase, ready, reason, message) of a storage pool from its cells."""
    if not view["users"]:
        return "unused", True, "Unused", "no compute pool uses this storage pool"
    failing = [f"{c['cell']}: {c['error'] or 'not attached'}" for c in view["cells"]
               if not c["attached"]]
    if failing:
        return "degraded", False, "NotAttached", "; ".join(failing)
    return "ready", True, "Attached", f"attached on {len(view['cells'])} cell(s)"


class _PoolReconciler:
    kind = ""

    def __init__(self, store: Any) -> None:
        self.store = store

    def _names(self) -> list[str]:
        raise NotImplementedError

    def _view(self, name: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def _status(self, view: dict[str, Any]) -> tuple[str, bool, str, str]:
        raise NotImplementedError

    def keys(self) -> Iterable[Key]:
        return [Key(self.kind, name) for name in self._names()]

    def reconcile(self, key: Key) -> Result:
        view = self._view(key.id)
        if view is None:
            return Result()
        phase, ready, reason, message = self._status(view)
        conditions = set_condition(view["conditions"], READY, ready, reason, message,
                                   now_text())
        self.store.record_pool_status(self.kind, key.id, generation=view["generation"],
                                      phase=phase, conditions=conditions,
                                      observed={k: v for k, v in view.items()
                                                if k in ("cells", "users")})
        return Result(note=f"{phase}: {message}")


class ComputePoolReconciler(_PoolReconciler):
    kind = "compute_pool"

    def _names(self) -> list[str]:
        return self.store.compute_pool_names()

    def _view(self, name: str) -> dict[str, Any] | None:
        return self.store.compute_pool_view(name)

    def _status(self, view: dict[str, Any]) -> tuple[str, bool, str, str]:
        return compute_pool_status(view)


class StoragePoolReconciler(_PoolReconciler):
    kind = "storage_pool"

    def _names(self) -> list[str]:
        return self.store.storage_pool_names()

    def _view(self, name: str) -> dict[str, Any] | None:
        return self.store.storage_pool_view(name)

    def _status(self, view: dict[str, Any]) -> tuple[str, bool, str, str]:
        return storage_pool_status(view)
