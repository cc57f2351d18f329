"""`Store`: the one object the API, the reconciler and the CLI hold to read and write state.

It is a composition of per-domain mixins (identity, compute, images, guests, networks);
each lives in its own module of `state/` and works on the models of `state/models.py`.
"""

from __future__ import annotations

from state.compute import ComputeStore
from state.identity import IdentityStore
from state.status import StatusStore


class Store(IdentityStore, ComputeStore, StatusStore):
    """Facade over the database opened by `state.db.open_database`."""

    def __init__(self, *, session_timeout: int = 180, limits: dict | None = None) -> None:
        self.session_timeout = session_timeout
        self.limits = {"max_cores": 24, "max_memory": 32, "max_disk": 64, **(limits or {})}
