"""The seed ISO the guest reconciler writes on the real local libvirtd carries the admin
password as a SHA-512 crypt hash only: read back from the cell's storage pool, its
user-data holds a hash that OpenSSL computes again from the password with the same salt
(what the guest's `chpasswd -e` stores, so the guest logs in with the password), and the
image holds no clear text. After `PUT /guests/{id}/auth`, a seed written again (the old
one removed behind nano's back, which the reconciler repairs) carries the new password's
hash. The database holds neither password in clear.

There is no OS image here to boot and log in to; the hash is checked the way a guest's
libc checks a login: recomputed from the password and the hash's own salt."""

from __future__ import annotations

import os
import shutil
import subprocess

import libvirt
import pytest
import yaml

from reconciler.cloudinit import read_seed_iso
from state.models import Guest
from tests.api.test_compute import until
from tests.conftest import TEST_NAMES_PREFIX as PREFIX
from tests.integration.test_guests_real import (  # noqa: F401 (fixtures)
    cell,
    created,
    guest_body,
    settings,
)

pytestmark = pytest.mark.integration
FIRST = "Seed-First-Pw-31"
SECOND = "Seed-Second-Pw-62"


def seed_of(system, guest_id: str) -> bytes:
    pool = system.storagePoolLookupByName(f"{PREFIX}-local-g")
    pool.refresh(0)
    vol = pool.storageVolLookupByName(f"{PREFIX}-{guest_id}-seed.iso")
    with open(vol.path(), "rb") as fh:
        return fh.read()


def openssl_hash(password: str, salt: str) -> str:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: it is the independent check of the hash")
    return subprocess.run(["openssl", "passwd", "-6", "-salt", salt, "-stdin"],
                          input=password.encode() + b"\n", capture_output=True,
                          check=True).stdout.decode().strip()


def seed_hash(iso: bytes) -> str:
    (entry,) = yaml.safe_load(read_seed_iso(iso)["user-data"])["chpasswd"]["users"]
    return entry["password"]


def salt_of(iso: bytes) -> str:
    return seed_hash(iso).split("$")[2]


def check_seed(iso: bytes, password: str) -> str:
    assert password.encode() not in iso
    config = yaml.safe_load(read_seed_iso(iso)["user-data"])
    (entry,) = config["chpasswd"]["users"]
    assert entry["name"] == "nano" and entry["type"] == "hash"
    assert entry["password"] == openssl_hash(password, entry["password"].split("$")[2])
    assert config["chpasswd"]["list"] == [f"nano:{entry['password']}"]
    return entry["password"]


@pytest.mark.gen_test(timeout=300)
async def test_the_seed_on_the_cell_carries_only_the_password_hash(
        api, cell, system, settings):  # noqa: F811
    body = guest_body("seeded")
    body["cloud_init"] = {**body["cloud_init"], "admin_secret": FIRST}
    reply = await api.call("POST", "/guests/", body)
    assert reply.code == 0, reply.message
    gid = reply.data["id"]
    await created(api, gid)
    check_seed(seed_of(system, gid), FIRST)

    # a new password; the seed vanishes from the cell and the reconciler writes it again
    assert (await api.ok("PUT", f"/guests/{gid}/auth", {"password": SECOND}))["password"] == SECOND
    pool = system.storagePoolLookupByName(f"{PREFIX}-local-g")
    pool.storageVolLookupByName(f"{PREFIX}-{gid}-seed.iso").delete(0)

    async def rewritten():
        try:
            iso = seed_of(system, gid)
        except libvirt.libvirtError:  # not there yet
            return None
        # a pass that read the guest before the PUT may write the old seed first; the
        # next pass sees it is out of date and writes it again
        return iso if iso and seed_hash(iso) == openssl_hash(SECOND, salt_of(iso)) else None

    iso = await until(rewritten, timeout=90, what="the seed written again, with the new hash")
    check_seed(iso, SECOND)
    assert "sealed:v1:" in str(Guest.get_by_id(gid).spec["admin"])
    db = settings["database"][len("sqlite:///"):]
    for path in (db, db + "-wal"):
        if os.path.exists(path):
            with open(path, "rb") as fh:
                content = fh.read()
            assert FIRST.encode() not in content and SECOND.encode() not in content, path
    await api.ok("DELETE", f"/guests/{gid}", {"force": True})
