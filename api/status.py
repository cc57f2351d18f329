"""Extension route `GET /api/v1/resource_status/`: the reconcile status of every reconciled
resource the session may see, for `nanod drift` and `nanod apply --wait` (nanod/manifests.py).

Each item: {kind, name, id, generation, observed_generation, phase, deleting, conditions,
last_error, watched} (+ `pool` for guests, `guest` for snapshots). `watched` says whether a
reconciler for that kind runs in this nanod: true or false, or null when the server cannot
tell (no reconciler at all). A resource of an unwatched kind never converges by itself, so
clients report it as such instead of waiting for it.
"""

from __future__ import annotations

from api.base import AppContext, NanoHandler, contract

# Manifest kind -> the reconciler key kinds (reconciler.contract.Key.kind) that converge it.
WATCHED_BY: dict[str, tuple[str, ...]] = {
    "ComputePool": ("compute_pool",),
    "Cell": ("cell",),
    "StoragePool": ("storage_pool",),
    "AddressPool": ("address_pool",),
    "Guest": ("guest",),
    "Snapshot": ("snapshot", "guest"),
    "MediaImage": ("image", "media_image"),
    "DiskImage": ("image", "disk_image"),
    "SecurityPolicyGroup": ("security_policy_group",),
    "Migration": ("migration",),
    "BatchTask": ("batch", "batch_task"),
}


def reconciled_kinds(ctx: AppContext) -> set[str] | None:
    """The key kinds the running controller reconciles, or None when there is none
    (`AppContext.reconciling`, given by nanod/server.py)."""
    return None if ctx.reconciling is None else set(ctx.reconciling())


class ResourceStatusHandler(NanoHandler):
    @contract(data="resource_status_list", extension=True)
    def get(self) -> None:
        running = reconciled_kinds(self.ctx)
        items = self.store.resource_statuses(self.session)
        for item in items:
            keys = WATCHED_BY.get(item["kind"], ())
            item["watched"] = None if running is None else any(k in running for k in keys)
        self.reply(items)


ROUTES = [
    (r"/resource_status", ResourceStatusHandler),
]
