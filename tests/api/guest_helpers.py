"""Helpers of the guest, snapshot and batch API tests (tests/api/test_guests*.py,
tests/api/test_batches.py).

The reconciler is disabled in API tests, so what it would write is written here through the
store: cell liveness and stats (`set_cell`, what the cell reconciler records) and guest
status through `record_guest_observed`, the very function the guest reconciler uses.
Pools, cells, users and guests are made through the API like a client would.
"""

from __future__ import annotations

import uuid
from typing import Any

from state.models import Cell, Guest, Image
from tests.conftest import Api

GIB = 1 << 30
PASSWORD = "Us3rPassword"
STATS = {"max_cpu": 16, "available_memory": 64 * GIB, "available_disk": 1000 * GIB,
         "max_memory": 64 * GIB, "max_disk": 1000 * GIB, "cpu_usage": 0}


def guest_body(name: str = "g1", pool: str = "pool1", **extra: Any) -> dict[str, Any]:
    """What the portal sends for a new guest: template "", modules [], a full qos."""
    return {"name": name, "owner": "admin", "group": "admin", "pool": pool, "cores": 2,
            "memory": 2 * GIB, "disks": [10 * GIB], "auto_start": False, "from_image": "",
            "template": "", "modules": [],
            "qos": {"cpu_priority": "medium", "write_speed": 0, "write_iops": 0,
                    "read_speed": 0, "read_iops": 0, "receive_speed": 0, "send_speed": 0},
            **extra}


def set_cell(name: str, *, alive: bool = True, **stats: int) -> None:
    """Record a cell as the cell reconciler would: alive (or not) with these stats."""
    Cell.update(observed={"alive": alive, "stats": {**STATS, **stats}}).where(
        Cell.name == name).execute()


async def make_pool(api: Api, pool: str = "pool1", cells: dict[str, dict] | None = None
                    ) -> None:
    """A compute pool with alive cells (`cells`: name -> stats overrides), made through the
    API; the cells' liveness is recorded directly."""
    await api.ok("POST", f"/compute_pools/{pool}", {"storage": "", "network": "",
                                                    "failover": False})
    for name, stats in (cells if cells is not None else {"cell-a": {}}).items():
        # a test driver node file that is never opened: no reconciler runs here
        await api.ok("POST", f"/cells/{name}", {"libvirt_uri": f"test:///nonexistent/{name}.xml",
                                                "address": f"10.0.0.{len(name)}"})
        row = Cell.get(Cell.name == name)
        Cell.update(observed_generation=row.generation).where(Cell.name == name).execute()
        set_cell(name, **stats)
        await api.ok("POST", f"/compute_pool_cells/{pool}/{name}")


async def create_guest(api: Api, name: str = "g1", **extra: Any) -> str:
    reply = await api.call("POST", "/guests/", guest_body(name, **extra))
    assert reply.code == 0, reply.message
    assert reply.status == 202
    return reply.data["id"]


def mark_created(server: Any, guest_id: str, *, running: bool = False, **observed: Any) -> None:
    """Record a guest as the guest reconciler does once its domain and volumes exist."""
    row = Guest.get_by_id(guest_id)
    server.store.record_guest_observed(
        guest_id, generation=row.generation, phase="running" if running else "stopped",
        progress=100, observed={"created": True, "running": running,
                                "create_time": "2026-01-02 03:04:05", **observed})


def set_running(server: Any, guest_id: str, running: bool) -> None:
    """Record a power state change as observed by the reconciler."""
    server.store.record_guest_observed(guest_id, phase="running" if running else "stopped",
                                       observed={"running": running})


def make_image(kind: str, owner: str = "admin", group: str = "admin", *,
               uploaded: bool = True) -> str:
    """An image row with (or without) a file, as the image store leaves it after an upload."""
    image_id = str(uuid.uuid4())
    Image.create(id=image_id, kind=kind, name=f"{kind}-{image_id[:8]}", owner=owner,
                 group=group, version=1 if uploaded else 0, size=GIB if uploaded else 0)
    return image_id


async def user_session(api: Api, name: str, *, group: str | None = None,
                       menu: list[str] | None = None) -> str:
    """A new user in its own group `<name>_group` whose role grants `menu` (default:
    'instance' and 'visibility'), or added to an existing `group`; returns its session
    token (the client's own session is left as it was)."""
    await api.ok("POST", f"/users/{name}", {"password": PASSWORD})
    if group is None:
        group = f"{name}_group"
        await api.ok("POST", f"/roles/{name}_role", {"menu": menu or ["instance", "visibility"]})
        await api.ok("POST", f"/user_groups/{group}", {"display": group,
                                                       "role": [f"{name}_role"]})
    await api.ok("POST", f"/user_groups/{group}/members/{name}")
    data = await api.ok("POST", "/sessions/", {"user": name, "password": PASSWORD,
                                               "nonce": "n"}, session="")
    return data["session"]
