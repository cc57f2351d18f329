"""The seed ISO's password hash (reconciler/cloudinit.py `sha512_crypt`): checked against
an implementation that is not ours, OpenSSL's `openssl passwd -6`, and against the
published test vector of the SHA-crypt specification; and a seed ISO read back carries
the hash a guest's `chpasswd -e` takes, never the password."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from reconciler.cloudinit import build_seed_iso, read_seed_iso, sha512_crypt

PASSWORDS = ["Adm1nPassword", "S3cr3t: 'pa\"ss #word", "späte Grüße 7", "x", "a" * 128,
             "$6$looks$like-a-hash", "with:colon:s"]


def openssl_sha512_crypt(password: str, salt: str) -> str:
    """`openssl passwd -6 -salt SALT`, the password on stdin (never in argv)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: it is the independent check of the hash")
    done = subprocess.run(["openssl", "passwd", "-6", "-salt", salt, "-stdin"],
                          input=password.encode() + b"\n", capture_output=True, check=True)
    return done.stdout.decode().strip()


def test_the_specification_vector() -> None:
    # Ulrich Drepper, "Unix crypt using SHA-256 and SHA-512", test vector 1 for SHA-512
    assert sha512_crypt("Hello world!", "saltstring") == (
        "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBF"
        "dcbYEdFCoEOfaS35inz1")


@pytest.mark.parametrize("password", PASSWORDS)
def test_openssl_computes_the_same_hash_with_the_same_salt(password: str) -> None:
    hashed = sha512_crypt(password)
    _, scheme, salt, digest = hashed.split("$")
    assert scheme == "6" and len(salt) == 16 and len(digest) == 86
    assert openssl_sha512_crypt(password, salt) == hashed
    assert openssl_sha512_crypt(password + "!", salt) != hashed  # the check can fail


def test_every_hash_has_its_own_salt() -> None:
    salts = {sha512_crypt("Same-Passw0rd").split("$")[2] for _ in range(20)}
    assert len(salts) == 20


@pytest.mark.parametrize("bad", ["a\0b", "x" * 512])
def test_what_libcrypt_cannot_hash_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        sha512_crypt(bad)


@pytest.mark.parametrize("salt", ["", "has space", "x" * 17, "$6$"])
def test_bad_salts_are_refused(salt: str) -> None:
    with pytest.raises(ValueError):
        sha512_crypt("pw", salt)


@pytest.mark.parametrize("admin", ["nano", None])
def test_seed_iso_carries_a_hash_openssl_agrees_with(admin: str | None) -> None:
    password = "Gu3st-Login-Pw"
    iso = build_seed_iso(instance_id="i-1", hostname="web", admin_name=admin,
                         admin_password=password)
    assert password.encode() not in iso
    config = yaml.safe_load(read_seed_iso(iso)["user-data"])
    user = admin or "root"
    (entry,) = config["chpasswd"]["users"]
    assert entry["name"] == user and entry["type"] == "hash"
    salt = entry["password"].split("$")[2]
    assert entry["password"] == openssl_sha512_crypt(password, salt)
    # the legacy list form carries the same hash (cloud-init runs `chpasswd -e` for it)
    assert config["chpasswd"]["list"] == [f"{user}:{entry['password']}"]
