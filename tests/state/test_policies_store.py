"""Guest security policies in the store under concurrency, on SQLite and PostgreSQL: rule
edits are read-modify-writes of one row, so concurrent appends (threads with their own
connections, the first of them creating the row) must each land exactly once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from state.db import db, open_database
from state.errors import Invalid, NotFound
from state.models import Guest, GuestPolicy
from state.store import Store


@pytest.fixture
def store(database: str) -> Store:
    open_database(database)
    Guest.create(id="g-1", name="g-1", pool="p", cell="c")
    return Store()


def test_concurrent_appends_all_land(store):
    start = threading.Barrier(20)

    def append(n: int) -> None:
        try:
            start.wait()
            store.append_guest_rule("g-1", {"protocol": "tcp", "to_port": 1000 + n})
        finally:
            db.close()

    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(append, range(20)))
    policy = store.guest_policy("g-1")
    assert sorted(r["to_port"] for r in policy["rules"]) == list(range(1000, 1020))
    assert GuestPolicy.get(GuestPolicy.guest == "g-1").generation == 20


def test_guest_policy_functions(store):
    assert store.guest_policy("g-1") == {"default_action": "accept", "rules": []}
    store.set_guest_default_action("g-1", "reject")
    store.append_guest_rule("g-1", {"protocol": "udp", "to_port": 53})
    store.append_guest_rule("g-1", {"from_address": "192.168.0.0/16", "action": "reject"})
    store.move_guest_rule("g-1", 1, "up")
    store.modify_guest_rule("g-1", 1, {"protocol": "udp", "to_port": 123})
    assert store.guest_policy("g-1") == {"default_action": "reject", "rules": [
        {"action": "reject", "protocol": "all", "to_port": 0, "from_address": "192.168.0.0/16",
         "interface": 0},
        {"action": "accept", "protocol": "udp", "to_port": 123, "interface": 0}]}
    store.remove_guest_rule("g-1", 0)
    assert len(store.guest_policy("g-1")["rules"]) == 1
    with pytest.raises(Invalid, match="cannot move down"):
        store.move_guest_rule("g-1", 0, "down")
    with pytest.raises(Invalid, match="action"):
        store.set_guest_default_action("g-1", "drop")
    with pytest.raises(NotFound, match="no guest with id 'g-2'"):
        store.append_guest_rule("g-2", {})
