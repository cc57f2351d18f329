"""Routes of the seed's "Resource Pool" group: compute pools, compute pool cells, storage
pools, cell storages, zone/pool/cell statistics and instance status; plus the cell
registration extension (`/cells/{name}`).

Every change is stored as desired state and the affected cells are enqueued; the
reconciler (`reconciler/cells.py`) makes libvirt agree and records what it observed.
"""

from __future__ import annotations

import asyncio
import time

from api.base import NanoHandler, Resource, contract
from reconciler.contract import Key
from state.cell_transport import parse_host_key
from state.errors import Conflict


def _enqueue_cells(handler: NanoHandler, names: list[str]) -> None:
    for name in names:
        handler.ctx.enqueue(Key("cell", name))


async def wait_probed(handler: NanoHandler, name: str, timeout: float = 20.0) -> None:
    """Wait (without blocking the IOLoop) until the reconciler has observed the cell's
    current generation, so an add-to-pool right after registration sees a real probe."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = await handler.stored(handler.store.cell_record, name)
        if rec["status"]["observed_generation"] >= rec["generation"]:
            return
        await asyncio.sleep(0.1)


class PoolsHandler(NanoHandler):
    menu = "compute_pool"

    @contract(data="compute_pool_list")
    def get(self) -> None:
        self.reply(self.store.list_pools())


class PoolHandler(NanoHandler):
    menu = "compute_pool"
    creates = True
    resource = Resource("compute_pool")

    @contract(data="compute_pool_info")
    def get(self, name: str) -> None:
        self.reply(self.store.pool(name))

    @contract(data="nothing", body="compute_pool")
    def post(self, name: str) -> None:
        self.store.create_pool(name, self.body())
        self.ctx.enqueue(Key("compute_pool", name))
        self.audit(f"created compute pool {name}")
        self.reply()

    @contract(data="nothing", body="compute_pool")
    def put(self, name: str) -> None:
        cells = self.store.modify_pool(name, self.body())
        _enqueue_cells(self, cells)
        self.ctx.enqueue(Key("compute_pool", name))
        self.audit(f"modified compute pool {name}")
        self.reply()

    @contract(data="nothing", body="no_fields")
    def delete(self, name: str) -> None:
        self.body()  # JSON or nothing; nothing in it is used
        self.store.delete_pool(name)
        self.audit(f"deleted compute pool {name}")
        self.reply()


class UnallocatedCellsHandler(NanoHandler):
    menu = "compute_pool"

    @contract(data="pool_cell_list")
    def get(self) -> None:
        self.reply(self.store.cells(unallocated=True))


class PoolCellsHandler(NanoHandler):
    menu = "compute_pool"

    @contract(data="pool_cell_list")
    def get(self, pool: str) -> None:
        self.reply(self.store.cells(pool))


class PoolCellHandler(NanoHandler):
    menu = "compute_pool"
    creates = True
    resource = Resource("cell", (1,))

    @contract(data="pool_cell_detail")
    def get(self, pool: str, cell: str) -> None:
        self.reply(self.store.cell_status(pool, cell))

    @contract(data="nothing", body="no_fields")
    async def post(self, pool: str, cell: str) -> None:
        self.body()  # the portal sends an empty body
        await self.stored(self.store.pool, pool)
        self.ctx.enqueue(Key("cell", cell))
        await wait_probed(self, cell)
        await self.stored(self.store.add_cell_to_pool, pool, cell)
        self.ctx.enqueue(Key("cell", cell))
        self.audit(f"added cell {cell} to compute pool {pool}")
        self.reply()

    @contract(data="nothing", body="cell_enable")
    def put(self, pool: str, cell: str) -> None:
        enable = self.body()["enable"]
        self.store.enable_cell(pool, cell, enable)
        self.ctx.enqueue(Key("cell", cell))
        self.audit(f"{'enabled' if enable else 'disabled'} cell {cell} in compute pool {pool}")
        self.reply()

    @contract(data="nothing", body="no_fields")
    def delete(self, pool: str, cell: str) -> None:
        self.body()
        self.store.remove_cell_from_pool(pool, cell)
        self.ctx.enqueue(Key("cell", cell))
        self.audit(f"removed cell {cell} from compute pool {pool}")
        self.reply()


class StoragePoolsHandler(NanoHandler):
    menu = "storage_pool"

    @contract(data="storage_pool_list")
    def get(self) -> None:
        self.reply(self.store.list_storage())


class StoragePoolHandler(NanoHandler):
    menu = "storage_pool"
    creates = True
    resource = Resource("storage_pool")

    @contract(data="storage_pool_info")
    def get(self, name: str) -> None:
        data = self.store.storage(name)
        self.reply({k: v for k, v in data.items() if k != "name"})

    @contract(data="nothing", body="storage_pool")
    def post(self, name: str) -> None:
        self.store.create_storage(name, self.body())
        self.ctx.enqueue(Key("storage_pool", name))
        self.audit(f"created storage pool {name}")
        self.reply()

    @contract(data="nothing", body="storage_pool_modify")
    def put(self, name: str) -> None:
        self.store.modify_storage(name, self.body())
        self.ctx.enqueue(Key("storage_pool", name))
        self.audit(f"modified storage pool {name}")
        self.reply()

    @contract(data="nothing", body="no_fields")
    def delete(self, name: str) -> None:
        self.body()  # JSON or nothing; nothing in it is used
        self.store.delete_storage(name)
        self.audit(f"deleted storage pool {name}")
        self.reply()


class ZoneStatusHandler(NanoHandler):
    @contract(data="zone_status")
    def get(self) -> None:
        self.reply(self.store.zone_stats(self.ctx.started_at))


class PoolStatusesHandler(NanoHandler):
    @contract(data="pool_status_list")
    def get(self) -> None:
        self.reply(self.store.pool_stats())


class PoolStatusHandler(NanoHandler):
    @contract(data="pool_status")
    def get(self, pool: str) -> None:
        self.reply(self.store.pool_stats(pool))


class CellStatusesHandler(NanoHandler):
    @contract(data="cell_status_list")
    def get(self, pool: str) -> None:
        self.reply(self.store.cell_stats(pool))


class CellStatusHandler(NanoHandler):
    @contract(data="cell_status")
    def get(self, pool: str, cell: str) -> None:
        self.reply(self.store.cell_stats(pool, cell))


class CellStoragesHandler(NanoHandler):
    menu = "compute_pool"

    @contract(data="cell_storages")
    def get(self, pool: str, cell: str) -> None:
        self.reply(self.store.cell_storages(pool, cell))

    @contract(data="nothing", body="cell_storage")
    def put(self, pool: str, cell: str) -> None:
        path = self.body()["default"]
        self.store.set_cell_storage(pool, cell, path)
        self.ctx.enqueue(Key("cell", cell))
        self.audit(f"set storage path of cell {cell} to {path}")
        self.reply()


class InstanceStatusHandler(NanoHandler):
    @contract(data="guest_status_list")
    def get(self, pool: str, cell: str | None = None) -> None:
        self.store.pool(pool)
        if cell is not None:
            self.store.cell_stats(pool, cell)  # 404 when the cell is not in the pool
        self.reply(self.store.instance_statuses(self.session, pool=pool, cell=cell))


class CellsHandler(NanoHandler):
    menu = "compute_pool"

    @contract(data="cell_list", extension=True)
    def get(self) -> None:
        self.reply([self.store.cell_record(n) for n in self.store.cell_names()])


class CellHandler(NanoHandler):
    """Extension: register a KVM host as a cell, read, change or forget it."""

    menu = "compute_pool"
    creates = True
    resource = Resource("cell")

    @contract(data="cell_record", extension=True)
    def get(self, name: str) -> None:
        self.reply(self.store.cell_record(name))

    @contract(data="nothing", body="cell", extension=True)
    def post(self, name: str) -> None:
        self.store.register_cell(name, self.body())
        self.ctx.enqueue(Key("cell", name))
        self.audit(f"registered cell {name}")
        self.reply()

    @contract(data="nothing", body="cell_modify", extension=True)
    def put(self, name: str) -> None:
        body = self.body()
        drain = body.pop("drain", None)
        pinned = self.store.cell_record(name)["spec"].get("ssh", {}).get("host_key", "")
        if body or drain is None:
            self.store.modify_cell_spec(name, body)
        if drain is not None:
            assert self.session is not None  # prepare() refuses requests without a session
            mid, guests = self.store.drain_cell(self.session, name, drain)
            for guest_id in guests:
                self.ctx.enqueue(Key("guest", guest_id))
            self.audit(f"cell {name}: drain {'on' if drain else 'off'}" + (
                f", migration {mid} moves {len(guests)} guest(s)" if mid else ""))
        self.ctx.enqueue(Key("cell", name))
        given = self.store.cell_record(name)["spec"].get("ssh", {}).get("host_key", "")
        if given != pinned:  # re-pinning a host key is a security event: say which key
            what = (f"now {parse_host_key(given).fingerprint}" if given else
                    "removed (the key pinned in known_hosts stays)")
            self.audit(f"modified cell {name}; ssh.host_key {what}")
        else:
            self.audit(f"modified cell {name}")
        self.reply()

    @contract(data="nothing", body="no_fields", extension=True)
    async def delete(self, name: str) -> None:
        self.body()  # JSON or nothing; nothing in it is used
        record = await self.stored(self.store.cell_record, name)
        if record["pool"]:
            raise Conflict(f"cell {name!r} is in compute pool {record['pool']!r}: remove it "
                           "from the pool first")
        await self.stored_write(self.store.unregister_cell, name)
        self.ctx.enqueue(Key("cell", name))
        self.audit(f"unregistered cell {name}")
        # the reconciler removes what nano made on the cell, then the record: wait a little
        # (without blocking the IOLoop) so a client usually sees it gone when we answer
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and not await self.stored(self.store.cell_gone, name):
            await asyncio.sleep(0.1)
        self.reply()


ROUTES = [
    (r"/compute_pools", PoolsHandler),
    (r"/compute_pools/([^/]+)", PoolHandler),
    (r"/compute_pool_cells", UnallocatedCellsHandler),
    (r"/compute_pool_cells/([^/]+)", PoolCellsHandler),
    (r"/compute_pool_cells/([^/]+)/([^/]+)", PoolCellHandler),
    (r"/storage_pools", StoragePoolsHandler),
    (r"/storage_pools/([^/]+)", StoragePoolHandler),
    (r"/compute_zone_status", ZoneStatusHandler),
    (r"/compute_pool_status", PoolStatusesHandler),
    (r"/compute_pool_status/([^/]+)", PoolStatusHandler),
    (r"/compute_cell_status/([^/]+)", CellStatusesHandler),
    (r"/compute_cell_status/([^/]+)/([^/]+)", CellStatusHandler),
    (r"/compute_cell_status/([^/]+)/([^/]+)/storages", CellStoragesHandler),
    (r"/instance_status/([^/]+)", InstanceStatusHandler),
    (r"/instance_status/([^/]+)/([^/]+)", InstanceStatusHandler),
    (r"/cells", CellsHandler),
    (r"/cells/([^/]+)", CellHandler),
]
