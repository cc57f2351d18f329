"""Cloud-init NoCloud seed ISOs for guests: build them, and read them back.

The guest reconciler calls `build_seed_iso(...)` when a guest has the cloud-init module,
uploads the bytes as a volume on the guest's cell and attaches it as the seed cdrom
(`DomainSpec.seed_iso`, ARCHITECTURE.md §4). `read_seed_iso` parses an ISO back into its
files, for tests and drift checks (ISO bytes differ on every build: they carry dates).

Pure: no I/O beyond in-memory buffers. The ISO is labelled `cidata` and carries Joliet
and Rock Ridge names, so the guest sees exactly `user-data`, `meta-data` and
`network-config` (cloud-init's NoCloud data source). Every YAML document is dumped by
pyyaml from dicts, never formatted from user input. The admin password never goes in as
it is: `user-data` carries its SHA-512 crypt hash (`$6$<salt>$...`, what `chpasswd -e`
and /etc/shadow take), computed by the system's libcrypt (libxcrypt, the library behind
glibc's crypt(3) and Python's deprecated `crypt` module). The seed ISO sits in the cell's
storage pool and stays attached to the guest, so whoever reads it learns no password.
Which modules a guest may ask for is decided elsewhere; here we build.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import io
import os
import posixpath
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pycdlib
import yaml

VOLUME_LABEL = "cidata"
USER_DATA = "user-data"
META_DATA = "meta-data"
NETWORK_CONFIG = "network-config"
DEFAULT_DATA_PATH = "/opt/data"
ROOT = "root"

# ISO 9660 level-3 names (d-characters) for readers without Joliet/Rock Ridge
_ISO_NAMES = {
    USER_DATA: "USER_DATA.;1",
    META_DATA: "META_DATA.;1",
    NETWORK_CONFIG: "NETWORK_CONFIG.;1",
}
_USER_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_DEVICE = re.compile(r"^((/dev/)?[a-z][a-z0-9]*|/dev/disk/by-id/[A-Za-z0-9][A-Za-z0-9_.:-]*)$")
_HOST_LABEL = re.compile(r"[^a-z0-9-]+")
_SALT_CHARS = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SALT = re.compile(r"^[./0-9A-Za-z]{1,16}$")
_CRYPT_DATA_SIZE = 32768
"""sizeof(struct crypt_data) in libxcrypt: the scratch buffer crypt_rn works in."""

# Lets root log in over SSH with its password where the image's sshd says
# "prohibit-password" (Debian, Ubuntu). Static text: nothing from the user goes in.
_PERMIT_ROOT_LOGIN = (
    "f=/etc/ssh/sshd_config; "
    "if grep -qE '^[#[:space:]]*PermitRootLogin' \"$f\"; then "
    "sed -i -E 's/^[#[:space:]]*PermitRootLogin.*/PermitRootLogin yes/' \"$f\"; "
    "else echo 'PermitRootLogin yes' >> \"$f\"; fi; "
    "systemctl try-restart sshd ssh 2>/dev/null || service sshd restart 2>/dev/null "
    "|| service ssh restart 2>/dev/null || true"
)


def sha512_crypt(password: str, salt: str | None = None) -> str:
    """The SHA-512 crypt hash of `password` (`$6$<salt>$<86 characters>`, 5000 rounds, the
    default of glibc, `chpasswd` and `openssl passwd -6`), with a random 16-character salt
    unless `salt` is given. ValueError for a password libcrypt refuses (over 511 bytes, a
    NUL); RuntimeError when this host has no libcrypt with crypt_rn (Debian: libcrypt1)."""
    if salt is None:
        salt = "".join(secrets.choice(_SALT_CHARS) for _ in range(16))
    if not _SALT.match(salt):
        raise ValueError(f"not a crypt salt (1-16 of [./0-9A-Za-z]): {salt!r}")
    phrase = password.encode("utf-8")
    if b"\0" in phrase:
        raise ValueError("the password contains a NUL character")
    scratch = ctypes.create_string_buffer(_CRYPT_DATA_SIZE)
    try:
        hashed = _crypt_rn()(phrase, f"$6${salt}".encode("ascii"), scratch, _CRYPT_DATA_SIZE)
    finally:
        ctypes.memset(scratch, 0, _CRYPT_DATA_SIZE)  # libcrypt's copy of the password
    if not hashed or not hashed.startswith(b"$6$"):
        error = os.strerror(ctypes.get_errno()) if ctypes.get_errno() else "refused"
        raise ValueError(f"libcrypt cannot hash this password ({error}): at most 511 bytes")
    return hashed.decode("ascii")


@functools.cache
def _crypt_rn() -> Callable[..., bytes | None]:
    name = ctypes.util.find_library("crypt")
    if not name:
        raise RuntimeError("no libcrypt on this host to hash guest passwords with: install "
                           "it (Debian: apt-get install libcrypt1)")
    lib = ctypes.CDLL(name, use_errno=True)
    if not hasattr(lib, "crypt_rn"):  # a foreign library, not a method of ours
        raise RuntimeError(f"{name} has no crypt_rn: nanod needs libxcrypt (Debian: libcrypt1)")
    fn = lib.crypt_rn
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
    fn.restype = ctypes.c_char_p
    return fn  # type: ignore[no-any-return]


def build_seed_iso(
    *,
    instance_id: str,
    hostname: str,
    admin_name: str | None,
    admin_password: str,
    root_enabled: bool = True,
    data_disks: Sequence[str] = (),
    data_path: str = DEFAULT_DATA_PATH,
    network_config: Mapping[str, Any] | None = None,
    legacy_password_list: bool = True,
    password_salt: str | None = None,
) -> bytes:
    """A NoCloud seed ISO for one guest; the arguments are `build_seed_files`'."""
    return pack_seed_iso(
        build_seed_files(
            instance_id=instance_id,
            hostname=hostname,
            admin_name=admin_name,
            admin_password=admin_password,
            root_enabled=root_enabled,
            data_disks=data_disks,
            data_path=data_path,
            network_config=network_config,
            legacy_password_list=legacy_password_list,
            password_salt=password_salt,
        )
    )


def build_seed_files(
    *,
    instance_id: str,
    hostname: str,
    admin_name: str | None,
    admin_password: str,
    root_enabled: bool = True,
    data_disks: Sequence[str] = (),
    data_path: str = DEFAULT_DATA_PATH,
    network_config: Mapping[str, Any] | None = None,
    legacy_password_list: bool = True,
    password_salt: str | None = None,
) -> dict[str, str]:
    """The seed's files by name: `user-data`, `meta-data`, and `network-config` when given.

    `admin_name` None or "root": root gets the password; otherwise that user is created
    with passwordless sudo and the password. `root_enabled` is the API's "allow root login
    via SSH" (`disable_root`, and sshd's PermitRootLogin when root is the admin).
    `data_disks` are the guest's device names of the data disks in order (`sdb`,
    `/dev/sdb`, or a stable `/dev/disk/by-id/...` path: the reconciler gives those): each gets one partition with ext4 labelled `data`, `data2`, ... mounted
    at `data_path`, `data_path` + "2", ... (`nofail`: a missing disk never blocks boot).
    `network_config` is a cloud-init network config (version 1 or 2) as a dict.

    The password goes in as its SHA-512 crypt hash (`sha512_crypt`, salted with
    `password_salt`, random when None): `chpasswd.users` with `type: hash` (cloud-init >=
    22.2); `legacy_password_list` adds the older `chpasswd.list` entry `user:<hash>` that
    the templates' CentOS 7 images understand (cloud-init >= 17.1 recognises a `$6$` value
    there and runs `chpasswd -e`; newer cloud-init applies both and logs a deprecation).
    ValueError for unusable input.
    """
    if not instance_id or any(c.isspace() for c in instance_id):
        raise ValueError("instance_id must be non-empty without whitespace")
    admin = admin_name or ROOT
    if not _USER_NAME.match(admin):
        raise ValueError(f"not a usable Linux user name: {admin!r}")
    if not admin_password or "\n" in admin_password or "\r" in admin_password:
        raise ValueError("admin_password must be a non-empty single line")
    mount_root = _data_path(data_path)
    password_hash = sha512_crypt(admin_password, password_salt)

    config: dict[str, Any] = {}
    if admin != ROOT:
        config["users"] = [
            {
                "name": admin,
                "lock_passwd": False,
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "shell": "/bin/bash",
            }
        ]
    chpasswd: dict[str, Any] = {
        "expire": False,
        "users": [{"name": admin, "password": password_hash, "type": "hash"}],
    }
    if legacy_password_list:
        chpasswd["list"] = [f"{admin}:{password_hash}"]
    config["chpasswd"] = chpasswd
    config["ssh_pwauth"] = True
    config["disable_root"] = not root_enabled

    if data_disks:
        disk_setup: dict[str, Any] = {}
        fs_setup: list[dict[str, Any]] = []
        mounts: list[list[str]] = []
        for n, name in enumerate(data_disks, start=1):
            device = _device(name)
            # `layout: [100]` (one partition, the whole disk), never `layout: true`:
            # cloud-init before 23.1 feeds sfdisk "0," for `true`, which sfdisk of
            # util-linux 2.38 (Debian 12) refuses ("Start sector 0 out of range"), so the
            # data disk stayed blank; [100] becomes ",,83", which every sfdisk takes
            disk_setup[device] = {"table_type": "mbr", "layout": [100], "overwrite": False}
            fs_setup.append(
                {
                    "label": _data_label(n),
                    "filesystem": "ext4",
                    "device": device,
                    "partition": "auto",
                }
            )
            # the whole disk: cloud-init mounts its first partition (`sdb1` of `sdb`; of a
            # by-id path its `-part1` link, which cloud-init 22.x looks for)
            mounts.append(
                [device, data_mount_path(mount_root, n), "ext4", "defaults,nofail", "0", "2"]
            )
        config["disk_setup"] = disk_setup
        config["fs_setup"] = fs_setup
        config["mounts"] = mounts

    if root_enabled and admin == ROOT:
        config["runcmd"] = [["sh", "-c", _PERMIT_ROOT_LOGIN]]

    files = {
        USER_DATA: "#cloud-config\n" + _dump(config),
        META_DATA: _dump({"instance-id": instance_id, "local-hostname": local_hostname(hostname)}),
    }
    if network_config is not None:
        files[NETWORK_CONFIG] = _dump(dict(network_config))
    return files


def data_mount_path(data_path: str, n: int) -> str:
    """Where the n-th data disk (1-based) is mounted: data_path, data_path2, ..."""
    return data_path if n == 1 else f"{data_path}{n}"


def _data_label(n: int) -> str:
    return "data" if n == 1 else f"data{n}"


def local_hostname(name: str) -> str:
    """A guest name as a host name: lower case, `_` and other non-label characters as
    `-`, at most 63 characters; "guest" when nothing is left."""
    label = _HOST_LABEL.sub("-", name.lower()).strip("-")[:63].rstrip("-")
    return label or "guest"


def _device(name: str) -> str:
    if not _DEVICE.match(name):
        raise ValueError(f"not a device name: {name!r}")
    return name if name.startswith("/dev/") else "/dev/" + name


def _data_path(path: str) -> str:
    # fstab fields are whitespace separated
    if not path.startswith("/") or any(c.isspace() for c in path):
        raise ValueError(f"data_path must be absolute without whitespace: {path!r}")
    normal = posixpath.normpath(path)
    if normal == "/":
        raise ValueError("data_path cannot be /")
    return normal


def _dump(document: Mapping[str, Any]) -> str:
    return yaml.safe_dump(
        dict(document), default_flow_style=False, sort_keys=False, allow_unicode=True, width=1 << 16
    )


# -- the ISO -----------------------------------------------------------------------------


def pack_seed_iso(files: Mapping[str, str]) -> bytes:
    """An ISO 9660 image labelled `cidata` holding `files` (name -> text) at its root,
    with Joliet and Rock Ridge names. Only the NoCloud file names are accepted."""
    unknown = set(files) - set(_ISO_NAMES)
    if unknown:
        raise ValueError(f"not NoCloud seed files: {sorted(unknown)}")
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=VOLUME_LABEL, joliet=3, rock_ridge="1.09")
    try:
        for name in (USER_DATA, META_DATA, NETWORK_CONFIG):
            if name not in files:
                continue
            data = files[name].encode("utf-8")
            iso.add_fp(
                io.BytesIO(data),
                len(data),
                iso_path="/" + _ISO_NAMES[name],
                rr_name=name,
                joliet_path="/" + name,
            )
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()


def read_seed_iso(data: bytes) -> dict[str, str]:
    """The files at the root of an ISO by name (Rock Ridge, else Joliet, else ISO 9660
    names without `;1`), decoded as UTF-8. ValueError for bytes that are not an ISO."""
    iso = pycdlib.PyCdlib()
    try:
        iso.open_fp(io.BytesIO(data))
    except pycdlib.pycdlibexception.PyCdlibException as exc:
        raise ValueError(f"not an ISO image: {exc}") from exc
    try:
        if iso.has_rock_ridge():
            key = "rr_path"
        elif iso.has_joliet():
            key = "joliet_path"
        else:
            key = "iso_path"
        found: dict[str, str] = {}
        for _, _, names in iso.walk(**{key: "/"}):
            for name in names:
                buf = io.BytesIO()
                iso.get_file_from_iso_fp(buf, **{key: "/" + name})
                shown = name.split(";", 1)[0].rstrip(".") if key == "iso_path" else name
                found[shown] = buf.getvalue().decode("utf-8")
            break  # the root only: seeds have no directories
        return found
    finally:
        iso.close()
