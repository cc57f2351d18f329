"""Routes of the seed's "Address Pool" and "Address Range" groups: address pools (list,
status, create, modify, delete) and their internal/external ranges (list, status, add,
remove). Changes need the 'address_pool' menu tag; reads need a session.

The store (`state/networks.py`) validates and refuses; here we authorize, enqueue the
pool's network for the reconciler (Key('address_pool', name), rendered on every cell of the
compute pools that use it) and reply.
"""

from __future__ import annotations

from api.base import NanoHandler, Resource, contract
from reconciler.contract import Key
from state.errors import Invalid
from state.networks import RANGE_TYPES


def _range_type(kind: str) -> str:
    if kind not in RANGE_TYPES:
        raise Invalid(f"range type {kind!r} in the path is not one of {', '.join(RANGE_TYPES)}")
    return kind


class AddressPoolsHandler(NanoHandler):
    menu = "address_pool"

    @contract(data="address_pool_list")
    def get(self) -> None:
        self.reply(self.store.list_address_pools())


class AddressPoolHandler(NanoHandler):
    menu = "address_pool"
    creates = True
    resource = Resource("address_pool")

    @contract(data="address_pool_detail")
    def get(self, name: str) -> None:
        self.reply(self.store.address_pool(name))

    @contract(data="nothing", body="address_pool_create")
    def post(self, name: str) -> None:
        self.store.create_address_pool(name, self.body())
        self.ctx.enqueue(Key("address_pool", name))
        self.audit(f"created address pool {name}")
        self.reply()

    @contract(data="nothing", body="address_pool_modify")
    def put(self, name: str) -> None:
        self.store.modify_address_pool(name, self.body())
        self.ctx.enqueue(Key("address_pool", name))
        self.audit(f"modified address pool {name}")
        self.reply()

    @contract(data="nothing", body="no_fields")
    def delete(self, name: str) -> None:
        self.body()  # clients may send {} on DELETE
        self.store.delete_address_pool(name)
        self.ctx.enqueue(Key("address_pool", name))
        self.audit(f"deleted address pool {name}")
        self.reply()


class AddressRangesHandler(NanoHandler):
    menu = "address_pool"

    @contract(data="address_range_list")
    def get(self, name: str, kind: str) -> None:
        self.reply(self.store.address_ranges(name, _range_type(kind)))


class AddressRangeHandler(NanoHandler):
    menu = "address_pool"
    creates = True
    resource = Resource("address_pool")

    @contract(data="address_range_detail")
    def get(self, name: str, kind: str, start: str) -> None:
        self.reply(self.store.address_range(name, _range_type(kind), start))

    @contract(data="nothing", body="address_range")
    def post(self, name: str, kind: str, start: str) -> None:
        spec = self.body()
        if spec.get("start", start) != start:
            raise Invalid(f"start: {spec['start']!r} in the body differs from {start!r} in the "
                          "path: the path names the range")
        self.store.add_address_range(name, _range_type(kind), start, spec)
        self.ctx.enqueue(Key("address_pool", name))
        self.audit(f"added {kind} range {start}-{spec['end']} to address pool {name}")
        self.reply()

    @contract(data="nothing", body="no_fields")
    def delete(self, name: str, kind: str, start: str) -> None:
        self.body()
        self.store.remove_address_range(name, _range_type(kind), start)
        self.ctx.enqueue(Key("address_pool", name))
        self.audit(f"removed {kind} range starting at {start} from address pool {name}")
        self.reply()


ROUTES = [
    (r"/address_pools", AddressPoolsHandler),
    (r"/address_pools/([^/]+)", AddressPoolHandler),
    (r"/address_pools/([^/]+)/([^/]+)/ranges", AddressRangesHandler),
    (r"/address_pools/([^/]+)/([^/]+)/ranges/([^/]+)", AddressRangeHandler),
]
