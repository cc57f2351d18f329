"""Wiring of every reconciler into one `Controller` for a store; called by nanod/server.py
(`nanod serve`) and `nanod reconcile --once`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from reconciler import naming
from reconciler.cells import CellConnections, CellReconciler
from reconciler.contract import Key, Meter
from reconciler.drivers import libvirt_hv
from reconciler.failover import Fencing
from reconciler.firewalls import FirewallReconciler
from reconciler.guests import GuestReconciler
from reconciler.images import ImageReconciler
from reconciler.leases import Membership
from reconciler.longwork import LongWork
from reconciler.loop import Controller
from reconciler.networking import AddressPoolReconciler, NetworkReconciler
from reconciler.pools import ComputePoolReconciler, StoragePoolReconciler
from state.leases import Fence, cell_lease, fenced

log = logging.getLogger(__name__)


def fenced_call(fence: Fence | None, fn: Callable[..., None], *args: Any) -> None:
    with fenced(fence):
        fn(*args)


def build(store: Any, settings: dict[str, Any], *, meter: Meter | None = None,
          shard: Membership | None = None) -> Controller:
    """`meter`: the process's metrics (nanod/server.py), told of reconciles and image bytes
    moved; None keeps nothing. `shard`: this replica's leases (reconciler/leases.py), for
    `nanod serve`; None reconciles everything (`nanod reconcile --once`)."""
    naming.use(settings["names"]["prefix"])  # before any reconciler names anything
    conf = settings.get("reconciler", {})
    # how long a reconciler worker waits for one libvirt call (reconciler/drivers/libvirt_hv.py)
    libvirt_hv.configure(call_timeout=float(conf.get("libvirt_timeout_seconds", 30)))
    pending: list[Controller] = []

    def enqueue(key: Key) -> None:
        if pending:
            pending[0].enqueue(key)

    # lifecycle events of our guests go to the event stream from a thread of their own:
    # the callback runs on libvirt's event thread, which must never wait on the database
    lifecycle = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lifecycle-events")

    def record_lifecycle(guest_id: str, cell: str, event: str) -> None:
        try:
            store.record_guest_event(guest_id, "lifecycle", {"event": event, "cell": cell})
        except Exception:  # the stream misses one entry; the guest is still reconciled
            log.exception("cannot record lifecycle event %s of guest %s", event, guest_id)

    def on_domain_event(cell: str, owned_id: str | None, event: str) -> None:
        # A lifecycle event names the domain; an owned one wakes its guest, any one
        # refreshes the cell's list of domains. Every replica connected to the cell hears
        # it; the one holding the cell's lease writes it to the event stream.
        fence = shard.fence(cell_lease(cell)) if shard is not None else None
        if owned_id and (shard is None or fence is not None):
            lifecycle.submit(fenced_call, fence, record_lifecycle, owned_id, cell, str(event))
            enqueue(Key("guest", owned_id))
        enqueue(Key("cell", cell))

    connections = CellConnections.from_settings(settings, on_domain_event=on_domain_event)
    # image streams, volume copies, disk compaction, clones: threads of their own
    long_work = LongWork(enqueue, workers=int(conf.get("long_workers", 2)),
                         holds=shard.holds if shard is not None else None)
    reconcilers: list[Any] = [
        CellReconciler(store, connections, enqueue,
                       offline_after=int(conf.get("offline_after", 3)),
                       probe_seconds=float(conf.get("probe_seconds", 10)),
                       fencing=Fencing.from_settings(settings)),
        GuestReconciler(store, connections, enqueue,
                        poll_seconds=float(conf.get("guest_poll_seconds", 15)),
                        stop_grace_seconds=float(conf.get("stop_grace_seconds", 60)),
                        sign_of_life_seconds=float(conf.get("sign_of_life_seconds", 120)),
                        long_work=long_work,
                        migration_bandwidth_mib=int(conf.get("migration_bandwidth_mib", 0)),
                        meter=meter),
        NetworkReconciler(store, connections, enqueue),
        FirewallReconciler(store, connections, enqueue),
        AddressPoolReconciler(store, enqueue),
        ImageReconciler(store, connections, enqueue, long_work=long_work, meter=meter),
        ComputePoolReconciler(store),
        StoragePoolReconciler(store),
    ]
    controller = Controller(reconcilers, workers=int(conf.get("workers", 4)),
                            resync_seconds=float(conf.get("resync_seconds", 30)), meter=meter,
                            shard=shard)
    if shard is not None:  # a lease gained: its keys are this replica's to reconcile now
        shard.subscribe(lambda gained, lost: controller.resync() if gained else None)
    controller.connections = connections  # type: ignore[attr-defined]
    pending.append(controller)
    return controller
