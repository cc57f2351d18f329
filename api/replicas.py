"""Extension route `GET /api/v1/replicas/`: the nanods serving this store (state/leases.py),
each with whether it is alive, the age of its last heartbeat, and the leases it holds (the
cells it reconciles, `global`, their fencing tokens and ages). Any replica answers it the
same way: it reads the store.

Read by people and `nanod get replicas`-style tooling; the compute-pool menu (who manages
cells) may read it, since it names every cell.
"""

from __future__ import annotations

from api.base import NanoHandler, contract


class ReplicasHandler(NanoHandler):
    read_menu = "compute_pool"

    @contract(data="replica_list", extension=True)
    def get(self) -> None:
        self.reply(self.store.replicas_view())


ROUTES = [
    (r"/replicas", ReplicasHandler),
]
