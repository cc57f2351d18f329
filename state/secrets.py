"""Secrets at rest: the passwords nanod must give back or hand on later are kept in the
database sealed, with a key that never enters the database.

Which ones: a guest's admin password (`spec.admin.password` and its copy
`spec.cloud_init.admin_secret`; `GET /guests/{id}/auth` returns it and the guest agent
sets it) and a cell's SSH password (`spec.ssh.password`; paramiko logs in with it). User
passwords are not secrets of this kind: they are kept as argon2 hashes only
(state/identity.py).

The key is `DATA_DIR/secrets.key`, made on first use with mode 0600 (owner only) and never
changed. A sealed value is `sealed:v1:` + a Fernet token (AES-128-CBC with an HMAC-SHA256
over it, from the `cryptography` package): a copy of the database, a PostgreSQL dump or a
backup without the key file gives away no password, and a value altered in the database is
refused rather than used. Losing the key file loses these passwords (reset them: `PUT
/guests/{id}/auth`, `PUT /cells/{name}`), so back it up with the database; several nanods
on one PostgreSQL database need the same key file.

Called by the store only: `state/guests.py` and `state/guest_changes.py` (guest admin
passwords), `state/compute.py` (cell SSH passwords); `nanod/server.py` calls
`seal_plain_secrets` at start for rows written before sealing existed.
"""

from __future__ import annotations

import os
import stat
import threading
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from state.errors import Internal

PREFIX = "sealed:v1:"
KEY_FILE = "secrets.key"


class SecretBox:
    """Seals and opens the secrets of one data directory with its key file."""

    def __init__(self, data_dir: str) -> None:
        if not data_dir:
            raise Internal("the store has no data directory, so no key file to seal secrets "
                           "with: give Store(data_dir=...) (nanod passes settings data_dir)")
        self.path = os.path.join(os.path.abspath(data_dir), KEY_FILE)
        self._lock = threading.Lock()
        self._fernet: Fernet | None = None

    def seal(self, plain: str) -> str:
        """`plain` sealed for the database; "" stays "" (no password is not a secret). A
        value this key already sealed is returned as it is, so a spec read back and written
        again (a cell's spec merged with a change) is not sealed twice."""
        if not plain:
            return ""
        if plain.startswith(PREFIX) and self._opens(plain):
            return plain
        return PREFIX + self._key().encrypt(plain.encode("utf-8")).decode("ascii")

    def unseal(self, stored: str) -> str:
        """The password a stored value holds. A value without the prefix was written before
        sealing existed and is returned as it is (`seal_plain_secrets` seals those at the
        next start); a sealed value this key cannot open is an error naming the key file."""
        if not stored or not stored.startswith(PREFIX):
            return stored
        try:
            return self._key().decrypt(stored[len(PREFIX):].encode("ascii")).decode("utf-8")
        except (InvalidToken, ValueError, UnicodeError):
            raise Internal(f"a stored password cannot be opened with the key file {self.path}: "
                           "the file was replaced or belongs to another data directory; put "
                           "the original key file back, or set the password again") from None

    def _opens(self, value: str) -> bool:
        try:
            self._key().decrypt(value[len(PREFIX):].encode("ascii"))
        except (InvalidToken, ValueError):
            return False
        return True

    def _key(self) -> Fernet:
        with self._lock:
            if self._fernet is None:
                self._fernet = Fernet(_load_or_create_key(self.path))
            return self._fernet


def _load_or_create_key(path: str) -> bytes:
    """The key in `path`, made first when the file does not exist. It is written to a
    private temporary file and linked into place, so a reader never sees half a key and
    two processes creating it at once agree on one (the loser of the link reads the
    winner's). A key file that others may read is refused, not silently used."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, Fernet.generate_key())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            os.unlink(tmp)
        dir_fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise Internal(f"the secrets key file {path} may be read by others (mode "
                       f"{mode:04o}): make it private with `chmod 600 {path}`")
    with open(path, "rb") as fh:
        key = fh.read().strip()
    try:
        Fernet(key)
    except ValueError:
        raise Internal(f"the secrets key file {path} does not hold a key: restore it from a "
                       "backup (without it the stored guest and cell passwords are lost)") from None
    return key


_boxes: dict[str, SecretBox] = {}
_boxes_lock = threading.Lock()


def secret_box(data_dir: str) -> SecretBox:
    """The box of a data directory, one per process (the key file is read once)."""
    with _boxes_lock:
        box = _boxes.get(data_dir)
        if box is None:
            box = _boxes[data_dir] = SecretBox(data_dir)
        return box


def seal_plain_secrets(data_dir: str) -> int:
    """Seal the guest admin passwords and cell SSH passwords that rows written before
    sealing existed still hold in clear; returns how many rows changed. Called once at
    start by `nanod serve`; cheap when there is nothing to do."""
    from state.db import db
    from state.models import Cell, Guest

    box = secret_box(data_dir)
    guests: list[tuple[str, dict[str, Any]]] = []
    cells: list[tuple[str, dict[str, Any]]] = []
    with db.atomic():
        # read first, write after: no update while a cursor walks the same table
        for row in Guest.select(Guest.id, Guest.spec):
            spec = row.spec or {}
            if _seal_in(box, spec.get("admin"), "password") | \
                    _seal_in(box, spec.get("cloud_init"), "admin_secret"):
                guests.append((row.id, spec))
        for cell in Cell.select(Cell.name, Cell.spec):
            spec = cell.spec or {}
            if _seal_in(box, spec.get("ssh"), "password"):
                cells.append((cell.name, spec))
        for guest_id, spec in guests:
            Guest.update(spec=spec).where(Guest.id == guest_id).execute()
        for name, spec in cells:
            Cell.update(spec=spec).where(Cell.name == name).execute()
    return len(guests) + len(cells)


def _seal_in(box: SecretBox, holder: Any, key: str) -> bool:
    value = holder.get(key) if isinstance(holder, dict) else None
    if not value or value.startswith(PREFIX):
        return False
    holder[key] = box.seal(value)
    return True


# -- cell SSH passwords (state/compute.py wraps its writes and its read with these) -------


def sealed_cell_spec(data_dir: str, spec: dict[str, Any]) -> dict[str, Any]:
    """`spec` as stored: a copy whose `ssh.password`, if any, is sealed."""
    ssh = spec.get("ssh")
    if not isinstance(ssh, dict) or not ssh.get("password"):
        return spec
    return {**spec, "ssh": {**ssh, "password": secret_box(data_dir).seal(ssh["password"])}}


def opened_ssh(data_dir: str, ssh: dict[str, Any] | None) -> dict[str, Any]:
    """A stored cell's `ssh` settings with the password opened, for the reconciler."""
    out = dict(ssh or {})
    if out.get("password"):
        out["password"] = secret_box(data_dir).unseal(out["password"])
    return out
