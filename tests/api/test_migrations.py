"""The seed's migration group through the API, on cells no reconciler touches (the moves
themselves run on the second host: tests/integration/test_migration_real.py): every refusal
is made before anything is stored or moved, a started migration answers 202 with its id,
GET answers HTTP 201 {finished: false, progress} while its guests move and 200 {finished:
true} (+ error) once the guests' moves are recorded, and the list holds it."""

from __future__ import annotations

import pytest

from state.migrations import Move
from state.models import Guest, Migration
from tests.api.guest_helpers import (
    GIB,
    create_guest,
    guest_body,
    make_pool,
    mark_created,
    set_cell,
)


async def two_cells(api, server) -> tuple[str, str]:
    await make_pool(api, cells={"cell-a": {}, "cell-b": {}})
    g1 = await create_guest(api, "g1", cell="cell-a")
    g2 = await create_guest(api, "g2", cell="cell-a")
    for gid in (g1, g2):
        mark_created(server, gid)
    return g1, g2


def body(**extra) -> dict:
    return {"source_pool": "pool1", "source_cell": "cell-a", **extra}


@pytest.mark.gen_test
@pytest.mark.parametrize("extra, code, words", [
    ({"source_pool": "nope"}, 404, "no compute pool named 'nope'"),
    ({"source_cell": "nope"}, 404, "source_cell: no cell named 'nope'"),
    ({"target_cell": "nope"}, 404, "target_cell: no cell named 'nope'"),
    ({"target_cell": "cell-a"}, 409, "already on cell 'cell-a'"),
    ({"instances": ["no-such-guest"]}, 404, "instances: no guest"),
    ({"target_pool": "nope"}, 404, "no compute pool named 'nope'"),
    ({"surprise": 1}, 400, "surprise"),
    ({"instances": []}, 400, "instances"),
])
async def test_refusals_name_the_field_and_store_nothing(api, server, extra, code, words):
    await two_cells(api, server)
    reply = await api.call("POST", "/migrations/", body(**extra))
    assert reply.code == code and words in reply.message, reply.message
    assert Migration.select().count() == 0
    assert {g.cell for g in Guest.select()} == {"cell-a"}


@pytest.mark.gen_test
async def test_refusals_of_the_target_and_of_the_guests(api, server):
    g1, _ = await two_cells(api, server)
    set_cell("cell-b", alive=False)
    reply = await api.call("POST", "/migrations/", body(target_cell="cell-b"))
    assert reply.code == 503 and "offline" in reply.message
    set_cell("cell-b", max_memory=3 * GIB, available_memory=3 * GIB)
    reply = await api.call("POST", "/migrations/", body(target_cell="cell-b"))
    assert reply.code == 409 and "no room" in reply.message, reply.message  # 2 x 2 GiB
    set_cell("cell-b")
    Guest.update(spec={**Guest.get_by_id(g1).spec, "media": "iso-1"}).where(
        Guest.id == g1).execute()
    reply = await api.call("POST", "/migrations/", body(instances=[g1]))
    assert reply.code == 409 and "media image iso-1" in reply.message and "eject" in \
        reply.message
    await api.ok("POST", "/compute_pools/pool2", {"storage": "", "network": "",
                                                    "failover": False})
    reply = await api.call("POST", "/migrations/", body(source_pool="pool2"))
    assert reply.code == 400 and "source_cell: cell 'cell-a' is not in compute pool 'pool2'" \
        in reply.message
    assert Migration.select().count() == 0


@pytest.mark.gen_test
async def test_a_migration_is_followed_until_every_guest_moved(api, server):
    g1, g2 = await two_cells(api, server)
    reply = await api.call("POST", "/migrations/", body())
    assert (reply.status, reply.code) == (202, 0)
    mid = reply.data["id"]
    again = await api.call("POST", "/migrations/", body(instances=[g1]))
    assert again.code == 409 and "already moving" in again.message

    status = await api.call("GET", f"/migrations/{mid}")
    assert (status.status, status.data["finished"], status.data["progress"]) == (201, False, 0)
    assert {g["target_cell"] for g in status.data["guests"]} == {"cell-b"}

    move = server.store.guest_move(g1)
    assert move == Move(mid, "cell-a", "pool1", "cell-b", "pool1")
    server.store.record_move(g1, move, phase="migrating", percent=50, mode="live")
    status = await api.call("GET", f"/migrations/{mid}")
    assert (status.status, status.data["progress"]) == (201, 25)
    server.store.record_move(g1, move, phase="done", percent=100, mode="live", done=True)
    assert Guest.get_by_id(g1).cell == "cell-b" and server.store.guest_move(g1) is None
    server.store.record_move(g2, server.store.guest_move(g2), phase="failed", percent=100,
                             mode="cold", done=True, error="target said no")
    assert Guest.get_by_id(g2).cell == "cell-a"  # a failed move leaves it where it was

    status = await api.call("GET", f"/migrations/{mid}")
    assert status.status == 200 and status.data["finished"] is True
    assert status.data["error"] == "g2: target said no" and "progress" not in status.data
    listed = await api.ok("GET", "/migrations/")
    assert [(m["id"], m["finished"]) for m in listed] == [(mid, True)]
    missing = await api.call("GET", "/migrations/nope")
    assert missing.code == 404


@pytest.mark.gen_test
async def test_draining_a_cell_moves_its_guests_and_keeps_new_ones_off(api, server):
    g1, g2 = await two_cells(api, server)
    set_cell("cell-b", max_memory=3 * GIB, available_memory=3 * GIB)
    refused = await api.call("PUT", "/cells/cell-a", {"drain": True})
    assert refused.code == 409 and "2.0 GiB memory free" in refused.message  # all or nothing
    assert (await api.ok("GET", "/cells/cell-a"))["drain"] is None
    assert Migration.select().count() == 0

    set_cell("cell-b")
    await api.ok("PUT", "/cells/cell-a", {"drain": True})
    record = await api.ok("GET", "/cells/cell-a")
    assert record["drain"]["finished"] is False and record["drain"]["progress"] == 0
    status = await api.ok("GET", f"/migrations/{record['drain']['migration']}")
    assert sorted(g["id"] for g in status["guests"]) == sorted([g1, g2])
    assert {g["target_cell"] for g in status["guests"]} == {"cell-b"}
    # new guests go elsewhere; pinned to the draining cell they are refused
    placed = await create_guest(api, "g3")
    assert Guest.get_by_id(placed).cell == "cell-b"
    pinned = await api.call("POST", "/guests/", guest_body("g4", cell="cell-a"))
    assert pinned.code == 409 and "cell-a" in pinned.message

    for gid in (g1, g2):
        server.store.record_move(gid, server.store.guest_move(gid), phase="done",
                                 percent=100, mode="cold", done=True)
    record = await api.ok("GET", "/cells/cell-a")
    assert record["drain"]["finished"] is True and record["drain"]["progress"] == 100
    await api.ok("PUT", "/cells/cell-a", {"drain": False})
    assert (await api.ok("GET", "/cells/cell-a"))["drain"] is None
    assert Guest.get_by_id(await create_guest(api, "g5", cell="cell-a")).cell == "cell-a"
