"""Images reaching a real cell: a qcow2 uploaded through the API becomes a guest's system
disk on the local libvirtd (streamed there as a volume, checked, then copied), an ISO made
with pycdlib is inserted into and ejected from a running guest, a guest boots once from
media, a system reset makes the disk from an image again, and cached copies are removed
once nobody needs them. The libvirt test driver cannot stream volumes (checked in
tests/drivers/test_volumes.py), so distribution is real-libvirt only."""

from __future__ import annotations

import subprocess

import libvirt
import pytest

from tests.api.identity_helpers import logs
from tests.api.test_compute import until
from tests.api.test_images import create, make_iso, sha1, upload
from tests.conftest import TEST_NAMES_PREFIX as PREFIX
from tests.conftest import reconciling
from tests.integration.test_guest_drift import cond, converged
from tests.integration.test_guests_real import (  # noqa: F401  (fixtures)
    cell,
    created,
    guest_body,
    instance,
)

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture
def settings(settings):
    return reconciling(settings)


def qcow2_with_data(path) -> bytes:
    """A 48 MiB qcow2 whose first MiB holds a recognisable pattern."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as fh:
        fh.write(b"nano-image-pattern" * 58000)
        fh.truncate(48 * MiB)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(path)], check=True)
    return path.read_bytes()


def volumes(conn, prefix=""):
    pool = conn.storagePoolLookupByName(f"{PREFIX}-local-g")
    try:
        pool.refresh(0)
    except libvirt.libvirtError:  # a volume job of the reconciler is under way: list as is
        pass
    return {v.name(): v for v in pool.listAllVolumes() if v.name().startswith(prefix)}


@pytest.mark.gen_test(timeout=300)
async def test_guest_from_image_media_and_reset(api, cell, system, tmp_path):  # noqa: F811
    image = qcow2_with_data(tmp_path / "base.qcow2")
    disk_id = await create(api, "disk", "base-disk", description="pattern", tags=["test"])
    reply = await upload(api, "disk", disk_id, image, checksum=sha1(image),
                         filename="base.qcow2")
    assert reply.code == 0, reply.message

    body = guest_body("from-img", modules=[], disks=[64 * MiB], from_image=disk_id)
    del body["cloud_init"]
    gid = (await api.ok("POST", "/guests/", body))["id"]
    data = await created(api, gid)
    assert data["from_image"] == disk_id
    disk = volumes(system)[f"{PREFIX}-{gid}-disk0"]
    assert disk.info()[1] == 64 * MiB  # grown to the requested size
    base = tmp_path / "base.qcow2"
    same = subprocess.run(["qemu-img", "compare", "-q", "-U", str(base), disk.path()])
    assert same.returncode == 0, "the system disk does not hold the image's data"

    # once the guest exists, the cached image copy on the cell is removed
    async def cache_dropped():
        return not volumes(system, f"{PREFIX}-disk-{disk_id}")

    await until(cache_dropped, timeout=30, what="cached image copy removed")

    # media: an ISO made here, inserted into the running guest, then ejected
    iso = make_iso(label="NANOMEDIA")
    media_id = await create(api, "media", "tools-iso")
    assert (await upload(api, "media", media_id, iso, filename="tools.iso")).code == 0
    await api.ok("POST", f"/instances/{gid}", {})
    await instance(api, gid, True)
    await api.ok("POST", f"/instances/{gid}/media", {"source": media_id, "type": 0})

    async def inserted():
        data = await api.ok("GET", f"/instances/{gid}")
        return data if data["media_attached"] else None

    data = await until(inserted, timeout=30, what="media attached")
    assert data["media_source"] == media_id
    dom = system.lookupByName(f"{PREFIX}-{gid}")
    assert f"{PREFIX}-media-{media_id}-v1" in dom.XMLDesc(0)
    media_volume = volumes(system)[f"{PREFIX}-media-{media_id}-v1"]
    assert media_volume.info()[1] == len(iso)
    # nanod's own insert (the image sent to the cell first) is no drift
    item = await converged(api, gid)
    assert cond(item, "Drifted")["reason"] == "InSync", cond(item, "Drifted")
    assert not [e for e in (await logs(api, limit=100))["logs"] if "drifted" in e["content"]]
    await api.ok("DELETE", f"/instances/{gid}/media")

    async def ejected():
        data = await api.ok("GET", f"/instances/{gid}")
        return not data["media_attached"]

    await until(ejected, timeout=30, what="media ejected")

    # one boot from media: the live domain boots from the cdrom, the definition does not
    await api.ok("DELETE", f"/instances/{gid}", {"reboot": False, "force": True})
    await instance(api, gid, False)
    await api.ok("POST", f"/instances/{gid}", {"from_media": True, "source": media_id})
    await instance(api, gid, True)
    live = dom.XMLDesc(0)
    assert "<boot dev='cdrom'/>" in live and f"{PREFIX}-media-{media_id}-v1" in live
    assert "<boot dev='cdrom'/>" not in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)

    # system reset from the image makes the system disk again
    await api.ok("DELETE", f"/instances/{gid}", {"reboot": False, "force": True})
    await instance(api, gid, False)
    before = volumes(system)[f"{PREFIX}-{gid}-disk0"].key()
    await api.ok("PUT", f"/guests/{gid}/system/", {"from_image": disk_id})

    async def reset_done():
        from state.models import Guest

        done = (Guest.get_by_id(gid).observed or {}).get("system_reset_generation")
        if not done:  # the old disk holds the same data: wait for the reset itself
            return False
        vols = volumes(system)
        vol = vols.get(f"{PREFIX}-{gid}-disk0")
        if vol is None:
            return False
        return subprocess.run(["qemu-img", "compare", "-q", "-U", str(base),
                               vol.path()]).returncode == 0 and vol.info()[1] == 64 * MiB

    await until(reset_done, timeout=60, what="system disk made again from the image")
    assert before  # (same path, new contents: the key of a dir volume is its path)

    # a disk image cloned back from the stopped guest: 202, progress, then the same data
    reply = await api.call("POST", "/disk_images/", {"name": "cloned", "guest": gid,
                                                     "description": "from from-img"})
    assert reply.status == 202 and reply.code == 0, reply.message
    clone_id = reply.data["id"]

    async def cloned():
        reply = await api.call("GET", f"/disk_images/{clone_id}")
        assert not reply.data.get("error"), reply.data
        return reply.data if reply.status == 200 and reply.data["created"] else None

    clone = await until(cloned, timeout=60, what="disk image cloned from the guest")
    download = await api.http.fetch(api.base + f"/disk_images/{clone_id}/file/",
                                    headers={"Nano-Session": api.session},
                                    request_timeout=60)
    clone_file = tmp_path / "clone.qcow2"
    clone_file.write_bytes(download.body)
    assert clone["size"] == len(download.body) and clone["checksum"] == sha1(download.body)
    assert subprocess.run(["qemu-img", "compare", "-q", str(base),
                           str(clone_file)]).returncode == 0

    await api.ok("DELETE", f"/guests/{gid}", {"force": True})

    async def nothing_left():
        return not volumes(system, f"{PREFIX}-{gid}")

    await until(nothing_left, timeout=60, what="guest volumes removed")
