"""Schema step 3 (state/db.py, `_log_request_ids`): a store made before audit entries named their request
(no `log_entry.request_id`) gains the column on open, keeps its entries (with no request
id) and then records one; on SQLite and PostgreSQL."""

from __future__ import annotations

from state.db import MIGRATIONS, close_database, open_database
from state.store import Store


def test_a_store_from_before_request_ids_gains_them_and_keeps_its_entries(database):
    handle = open_database(database)
    old = Store().add_log("written before request ids", user="admin")
    # the store as schema version 2 left it
    handle.execute_sql("ALTER TABLE log_entry DROP COLUMN request_id")
    handle.execute_sql("DELETE FROM schema_version WHERE version >= 3")
    close_database()

    open_database(database)
    assert len(MIGRATIONS) >= 3
    store = Store()
    new = store.add_log("written after", user="admin", request_id="req-9")
    entries = {e["id"]: e for e in store.query_logs(limit=10)["logs"]}
    assert entries[old]["content"] == "written before request ids"
    assert entries[old]["request_id"] == ""
    assert entries[new]["request_id"] == "req-9"
