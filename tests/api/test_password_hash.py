"""The argon2id cost of password hashes is a setting (`password_hash`, state/identity.py):
hashes are made with it, a stored hash of another cost is made again at its user's next
login, and a cost below OWASP's least for argon2id stops nanod at start, naming the key."""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher

from nanod import config
from state.models import User
from tests.api.identity_helpers import PASSWORD, make_user
from tests.conftest import ADMIN, TEST_SETTINGS


def cost_of(stored: str) -> str:
    """`m=...,t=...,p=...` of an encoded argon2 hash."""
    return stored.split("$")[3]


@pytest.mark.gen_test(timeout=30)
async def test_hashes_carry_the_set_cost_and_an_old_cost_is_remade_at_login(api):
    conf = TEST_SETTINGS["password_hash"]
    wanted = f"m={conf['memory_kib']},t={conf['time_cost']},p={conf['parallelism']}"
    assert cost_of(User.get_by_id(ADMIN).password_hash) == wanted
    await make_user(api, "olduser", menu=["dashboard"])
    # an account hashed before the setting changed (the library's default cost)
    User.update(password_hash=PasswordHasher().hash(PASSWORD)).where(
        User.name == "olduser").execute()
    assert cost_of(User.get_by_id("olduser").password_hash) == "m=65536,t=3,p=4"
    reply = await api.call("POST", "/sessions/", {"user": "olduser", "password": PASSWORD,
                                                  "nonce": "n"}, session="")
    assert reply.code == 0, reply.message
    assert cost_of(User.get_by_id("olduser").password_hash) == wanted  # remade
    wrong = await api.call("POST", "/sessions/", {"user": "olduser", "password": "Wr0ngPass",
                                                  "nonce": "n"}, session="")
    assert wrong.code == 401 and cost_of(User.get_by_id("olduser").password_hash) == wanted


@pytest.mark.parametrize("value, message", [
    ({"time_cost": 1, "memory_kib": 65536, "parallelism": 4},
     "password_hash.time_cost must be a whole number of at least 2"),
    ({"time_cost": 3, "memory_kib": 8192, "parallelism": 4},
     "password_hash.memory_kib must be a whole number of at least 19456"),
    ({"time_cost": 3, "memory_kib": 65536, "parallelism": 0},
     "password_hash.parallelism must be a whole number of at least 1"),
    ({"time_cost": 3, "memory_kib": 65536, "parallelism": 4, "salt_len": 8},
     "password_hash takes exactly the keys"),
])
def test_a_cost_below_the_least_stops_nanod_naming_the_key(tmp_path, value, message):
    with pytest.raises(SystemExit, match=message):
        config.load(None, {"data_dir": str(tmp_path), "password_hash": value})


def test_the_default_cost_is_the_librarys(tmp_path):
    settings = config.load(None, {"data_dir": str(tmp_path)})
    default = PasswordHasher()
    assert settings["password_hash"] == {"time_cost": default.time_cost,
                                         "memory_kib": default.memory_cost,
                                         "parallelism": default.parallelism}
