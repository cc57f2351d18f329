"""`Store`: the one object the API, the reconciler and the CLI hold to read and write state.

It is a composition of per-domain mixins (identity, compute, images, guests, networks);
each lives in its own module of `state/` and works on the models of `state/models.py`.
"""

from __future__ import annotations

import os

from state.batches import BatchStore
from state.cell_transport import CellRules
from state.clones import CloneStore
from state.compute import ComputeStore
from state.conditional import ConditionalStore
from state.console import ConsoleStore
from state.events import EventStore
from state.guest_changes import GuestChangeStore
from state.idempotency import IdempotencyStore
from state.identity import IdentityStore
from state.images import ImageStore
from state.leases import LeaseStore
from state.migrations import MigrationStore
from state.netconfig import NetConfigStore
from state.netstatus import NetStatusStore
from state.networks import NetworkStore
from state.placement import overcommit_from
from state.poolstatus import PoolStatusStore
from state.quotas import QuotaStore
from state.replicas import ReplicaStore
from state.snapshots import SnapshotStore
from state.status import StatusStore
from state.templates import TemplateStore


# NetStatusStore first: its record_cell wraps ComputeStore's (see state/netstatus.py)
class Store(CloneStore, PoolStatusStore, NetStatusStore, IdentityStore, ComputeStore, ImageStore, NetworkStore,
            GuestChangeStore, SnapshotStore, TemplateStore, BatchStore, StatusStore, ReplicaStore,
            ConsoleStore, NetConfigStore, MigrationStore, ConditionalStore, IdempotencyStore,
            EventStore, QuotaStore, LeaseStore):
    """Facade over the database opened by `state.db.open_database`."""

    def __init__(self, *, session_timeout: int = 180, limits: dict | None = None,
                 data_dir: str = "", overcommit: dict | None = None,
                 cell_rules: CellRules | None = None, replica: str = "",
                 image_dir: str = "") -> None:
        self.session_timeout = session_timeout
        # which cell transports are accepted (state/cell_transport.py); default: no test
        # cells, no key files
        self.cell_rules = cell_rules or CellRules()
        self.data_dir = data_dir
        # this nanod's replica id (state/leases.py; "" outside `nanod serve`) and where the
        # image files are (shared by the replicas; "" = DATA_DIR/images)
        self.replica = replica
        self.image_dir = image_dir or (os.path.join(data_dir, "images") if data_dir else "")
        self.limits = {"max_cores": 24, "max_memory": 32, "max_disk": 64, **(limits or {})}
        # placement's ratios (state/placement.py); cells may override them
        self.overcommit = overcommit_from(overcommit or {}, "overcommit")
