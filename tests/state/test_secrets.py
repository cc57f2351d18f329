"""state/secrets.py: the key file (made once, mode 0600 whatever the umask, one key when
several threads make it at once, refused when others may read it), sealing and opening
(no clear text in a sealed value, tampering and a foreign key refused with the file named),
and the start-up sweep that seals rows written before sealing existed, on SQLite and
PostgreSQL."""

from __future__ import annotations

import os
import stat
import threading
from typing import Any

import pytest

from state.db import open_database
from state.errors import Internal
from state.models import Cell, Guest
from state.secrets import KEY_FILE, PREFIX, SecretBox, seal_plain_secrets, secret_box
from state.store import Store


def test_the_key_file_is_made_once_private_whatever_the_umask(tmp_path: Any) -> None:
    old = os.umask(0)
    try:
        box = SecretBox(str(tmp_path / "data"))
        sealed = box.seal("Pa55word")
    finally:
        os.umask(old)
    key = tmp_path / "data" / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path / "data")) == [KEY_FILE]  # no temporary file left
    # another box on the same directory (another process) opens what the first sealed
    assert SecretBox(str(tmp_path / "data")).unseal(sealed) == "Pa55word"


def test_sealed_values_hold_no_clear_text_and_differ_each_time(tmp_path: Any) -> None:
    box = SecretBox(str(tmp_path))
    one, two = box.seal("Pa55word"), box.seal("Pa55word")
    assert one.startswith(PREFIX) and two.startswith(PREFIX) and one != two
    assert "Pa55word" not in one
    assert box.unseal(one) == box.unseal(two) == "Pa55word"
    assert box.seal(one) == one  # sealed already: kept (a spec written back)
    assert box.seal("") == "" and box.unseal("") == ""
    # a value written before sealing existed reads as it is
    assert box.unseal("old-clear-text") == "old-clear-text"
    assert box.unseal(box.seal("späte Grüße")) == "späte Grüße"


def test_threads_making_the_key_at_once_agree_on_one(tmp_path: Any) -> None:
    boxes = [SecretBox(str(tmp_path)) for _ in range(8)]
    sealed: list[str] = []
    start = threading.Barrier(len(boxes))

    def seal(box: SecretBox) -> None:
        start.wait()
        sealed.append(box.seal("Same-Passw0rd"))

    threads = [threading.Thread(target=seal, args=(b,)) for b in boxes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader = SecretBox(str(tmp_path))
    assert [reader.unseal(s) for s in sealed] == ["Same-Passw0rd"] * len(boxes)
    assert sorted(os.listdir(tmp_path)) == [KEY_FILE]


def test_tampering_and_a_foreign_key_are_refused_naming_the_key_file(tmp_path: Any) -> None:
    box = SecretBox(str(tmp_path / "a"))
    sealed = box.seal("Pa55word")
    tampered = sealed[:-6] + ("A" if sealed[-6] != "A" else "B") + sealed[-5:]
    with pytest.raises(Internal, match="cannot be opened with the key file"):
        box.unseal(tampered)
    other = SecretBox(str(tmp_path / "b"))
    with pytest.raises(Internal, match=str(tmp_path / "b" / KEY_FILE)):
        other.unseal(sealed)
    # a value that looks sealed but is not this key's is sealed, not trusted
    resealed = other.seal(sealed)
    assert resealed != sealed and other.unseal(resealed) == sealed


def test_a_key_file_others_may_read_is_refused(tmp_path: Any) -> None:
    SecretBox(str(tmp_path)).seal("x")
    os.chmod(tmp_path / KEY_FILE, 0o644)
    with pytest.raises(Internal, match="chmod 600"):
        SecretBox(str(tmp_path)).seal("x")


def test_no_data_directory_is_refused() -> None:
    with pytest.raises(Internal, match="no data directory"):
        SecretBox("")


def test_the_start_sweep_seals_rows_kept_in_clear(database: str, tmp_path: Any) -> None:
    """Rows as a nanod before sealing wrote them: the sweep seals them in place, the
    readers give the same passwords, and a second sweep finds nothing to do."""
    data_dir = str(tmp_path / "data")
    open_database(database)
    store = Store(data_dir=data_dir)
    store.register_cell("remote", {"address": "192.0.2.7",
                                   "ssh": {"user": "root", "password": "Cell-Pw-1"}})
    Cell.update(spec={**Cell.get(Cell.name == "remote").spec,
                      "ssh": {"user": "root", "port": 22, "password": "Cell-Pw-1"}}).execute()
    Guest.create(id="g-old", name="old", pool="p", cell="remote", owner="admin",
                 group="admin", spec={"admin": {"user": "nano", "password": "Guest-Pw-1",
                                                "generation": 0},
                                      "cloud_init": {"admin_secret": "Guest-Pw-1"}})
    Guest.create(id="g-none", name="none", pool="p", cell="remote", owner="admin",
                 group="admin", spec={"admin": {"user": "root", "password": "",
                                                "generation": 0}, "cloud_init": {}})
    assert seal_plain_secrets(data_dir) == 2
    spec = Guest.get_by_id("g-old").spec
    assert spec["admin"]["password"].startswith(PREFIX)
    assert spec["cloud_init"]["admin_secret"].startswith(PREFIX)
    assert "Guest-Pw-1" not in str(spec)
    assert Cell.get(Cell.name == "remote").spec["ssh"]["password"].startswith(PREFIX)
    assert Guest.get_by_id("g-none").spec["admin"]["password"] == ""
    assert store.guest_desired("g-old").admin_password == "Guest-Pw-1"
    assert store.cell_spec("remote").ssh["password"] == "Cell-Pw-1"
    generation = Guest.get_by_id("g-old").generation
    assert seal_plain_secrets(data_dir) == 0
    assert Guest.get_by_id("g-old").generation == generation  # not a spec change
    assert secret_box(data_dir).unseal(spec["admin"]["password"]) == "Guest-Pw-1"
