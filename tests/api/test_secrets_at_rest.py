"""Secrets at rest, through the API on SQLite and on PostgreSQL: guest admin passwords
(given at create, in a batch, by `PUT /guests/{id}/auth`, or generated) and cell SSH
passwords are nowhere in the database in clear, neither in the SQLite files (database and
WAL) nor in any row of any PostgreSQL table, nor in any file of the data directory; the
key that seals them is `DATA_DIR/secrets.key`, mode 0600.

What clients get keeps the contract: `PUT /guests/{id}/auth` answers the new password,
`GET /guests/{id}/auth` (the document's "Get Administrator Password") gives the current
one, and no other read (guest, search, status, cell) carries a password or its sealed
form. The reconciler reads them opened (`guest_desired().admin_password`, `cell_spec().ssh`).
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

import pytest

from state.models import Guest
from state.secrets import KEY_FILE, PREFIX
from tests.api.guest_helpers import create_guest, make_pool, mark_created

CREATE_PW = "Gu3st-Create-Pw-4711"
BATCH_PW = "Gu3st-Batch-Pw-0042"
RESET_PW = "Gu3st-Reset-Pw-0815"
CELL_PW = "Cell-Ssh-Pw-2023x"
CI = {"root_enabled": False, "admin_name": "nano", "data_path": "/opt/data"}


def files_holding(settings: dict[str, Any], needle: bytes) -> list[str]:
    """Files whose bytes contain `needle`: every file under the data directory, and the
    SQLite database with its WAL and shared memory (the tests keep it beside)."""
    paths = [os.path.join(folder, name)
             for folder, _, names in os.walk(settings["data_dir"]) for name in names]
    if settings["database"].startswith("sqlite:///"):
        db = settings["database"][len("sqlite:///"):]
        paths += [p for p in (db, db + "-wal", db + "-shm") if os.path.exists(p)]
    found = []
    for path in dict.fromkeys(paths):
        with open(path, "rb") as fh:
            if needle in fh.read():
                found.append(os.path.basename(path))
    return found


def postgres_rows_holding(settings: dict[str, Any], needle: str) -> list[str]:
    """Tables of the test's PostgreSQL schema with a row whose text contains `needle`."""
    import psycopg2

    conn = psycopg2.connect(settings["database"])
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT table_name FROM information_schema.tables "
                        "WHERE table_schema = current_schema()")
            tables = [row[0] for row in cur.fetchall()]
            assert "guest" in tables and "cell" in tables, tables
            hits = []
            for table in tables:
                cur.execute(f'SELECT count(*) FROM "{table}" t WHERE t::text LIKE %s',
                            (f"%{needle}%",))
                if cur.fetchone()[0]:
                    hits.append(table)
            return hits
    finally:
        conn.close()


def stored_anywhere(settings: dict[str, Any], secret: str) -> list[str]:
    if settings["database"].startswith("postgresql"):
        return postgres_rows_holding(settings, secret) + files_holding(settings,
                                                                       secret.encode())
    return files_holding(settings, secret.encode())


@pytest.mark.gen_test(timeout=60)
async def test_passwords_are_sealed_at_rest_and_given_back_only_where_the_api_says(
        api, server, settings):
    await make_pool(api)
    await api.ok("POST", "/cells/remote", {"address": "192.0.2.7", "ssh": {
        "user": "root", "password": CELL_PW}})
    guest_id = await create_guest(api, "g1", modules=["qemu", "cloud-init"],
                                  cloud_init={**CI, "admin_secret": CREATE_PW})
    mark_created(server, guest_id)
    batch = await api.call("POST", "/batch/create_guest/", {
        "name_rule": "order", "name_prefix": "b", "count": 2, "owner": "admin",
        "group": "admin", "pool": "pool1", "cores": 1, "memory": 1 << 30,
        "disks": [1 << 30], "auto_start": False, "template": "",
        "modules": ["cloud-init"], "cloud_init": {**CI, "admin_secret": BATCH_PW},
        "qos": {"cpu_priority": "medium", "write_speed": 0, "write_iops": 0, "read_speed": 0,
                "read_iops": 0, "receive_speed": 0, "send_speed": 0}})
    assert batch.code == 0, batch.message
    generated_id = await create_guest(api, "gen", modules=["qemu"])

    # the API gives the password back where the document says, and only there
    assert await api.ok("GET", f"/guests/{guest_id}/auth") == {"user": "nano",
                                                               "password": CREATE_PW}
    generated = (await api.ok("GET", f"/guests/{generated_id}/auth"))["password"]
    assert len(generated) == 12
    reset = await api.ok("PUT", f"/guests/{guest_id}/auth", {"password": RESET_PW})
    assert reset == {"user": "nano", "password": RESET_PW}
    assert await api.ok("GET", f"/guests/{guest_id}/auth") == reset
    fresh = await api.ok("PUT", f"/guests/{generated_id}/auth", {})
    assert len(fresh["password"]) == 12 and fresh["password"] != generated

    # the reconciler reads them opened
    assert server.store.guest_desired(guest_id).admin_password == RESET_PW
    assert server.store.guest_desired(generated_id).admin_password == fresh["password"]
    assert server.store.cell_spec("remote").ssh["password"] == CELL_PW
    batch_ids = [g.id for g in Guest.select().where(Guest.batch != "")]
    assert len(batch_ids) == 2
    assert all(server.store.guest_desired(g).admin_password == BATCH_PW for g in batch_ids)

    # no read other than GET .../auth carries a password, nor its sealed form
    reads = [f"/guests/{guest_id}", f"/instances/{guest_id}", "/guest_search/?pool=pool1",
             "/instance_status/pool1", "/instance_status/pool1/cell-a", "/cells/",
             "/cells/remote", "/resource_status/", f"/guests/{batch_ids[0]}",
             f"/batch/create_guest/{batch.data['id']}"]
    texts = [json.dumps(await api.ok("GET", path)) for path in reads]
    texts.append(json.dumps(await api.ok("POST", "/search/guests/", {"limit": 50})))
    texts.append(json.dumps(await api.ok("POST", f"/guests/{guest_id}/plan", {"cores": 3})))
    for secret in (CREATE_PW, BATCH_PW, RESET_PW, CELL_PW, generated, fresh["password"],
                   PREFIX):
        leaks = [path for path, text in zip([*reads, "search", "plan"], texts, strict=True)
                 if secret in text]
        assert not leaks, f"{secret!r} in {leaks}"

    # at rest: sealed in the rows, nowhere in clear (the search does find what is kept in
    # clear, such as the cell's address)
    assert stored_anywhere(settings, "192.0.2.7")
    spec = Guest.get_by_id(guest_id).spec
    assert spec["admin"]["password"].startswith(PREFIX)
    assert spec["cloud_init"]["admin_secret"] == spec["admin"]["password"]
    for secret in (CREATE_PW, BATCH_PW, RESET_PW, CELL_PW, generated, fresh["password"]):
        assert stored_anywhere(settings, secret) == [], secret
    # the key: in the data directory, the owner's alone
    key = os.path.join(settings["data_dir"], KEY_FILE)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    with open(key, "rb") as fh:
        assert stored_anywhere(settings, fh.read().strip().decode()) == [KEY_FILE]


@pytest.mark.gen_test(timeout=60)
async def test_a_cell_change_keeps_its_password_sealed_once(api, server, settings):
    """PUT /cells/{name} merges the change into the stored spec (its password sealed
    already): the password is not sealed twice, and a new one replaces it."""
    await api.ok("POST", "/cells/remote", {"address": "192.0.2.7", "ssh": {
        "user": "root", "password": CELL_PW}})
    await api.ok("PUT", "/cells/remote", {"virt_type": "qemu"})
    assert server.store.cell_spec("remote").ssh["password"] == CELL_PW
    await api.ok("PUT", "/cells/remote", {"address": "192.0.2.7", "ssh": {
        "user": "root", "password": "An0ther-Cell-Pw"}})
    assert server.store.cell_spec("remote").ssh["password"] == "An0ther-Cell-Pw"
    rec = await api.ok("GET", "/cells/remote")
    assert rec["spec"]["ssh"]["password"] == "********"
    for secret in (CELL_PW, "An0ther-Cell-Pw"):
        assert stored_anywhere(settings, secret) == [], secret
