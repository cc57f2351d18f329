"""Guest status tells the truth on the real local libvirtd (QEMU, TCG): hand-made changes on
the cell (virsh destroy of a guest that should run, virsh edit of its memory, virsh
undefine) are reported and corrected, with the correction in the guest's Drifted condition
and in the log; a guest that powers itself off (real guest code: a boot sector that prints
to its serial console and asks ACPI for soft-off) stays off and says so instead of
"Converged"; speed limits on a kernel without the sfq qdisc are refused at once."""

from __future__ import annotations

import asyncio
import re

import libvirt
import pytest

from tests.api.test_compute import until
from tests.api.test_images import create as create_image
from tests.api.test_images import sha1, upload
from tests.conftest import TEST_NAMES_PREFIX as PREFIX
from tests.conftest import reconciling
from tests.helpers.bootsector import boot_disk
from tests.helpers.kernel import has_sfq
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
    return reconciling(settings, sign_of_life_seconds=8)


async def status(api, gid):
    for item in await api.ok("GET", "/resource_status/"):
        if item["kind"] == "Guest" and item["id"] == gid:
            return item
    raise AssertionError(f"guest {gid} has no status")


def cond(item, kind):
    return next((c for c in item["conditions"] if c["type"] == kind), None)


async def converged(api, gid):
    async def check():
        item = await status(api, gid)
        ready = cond(item, "Ready")
        return item if ready and ready["status"] and \
            item["observed_generation"] == item["generation"] else None
    return await until(check, timeout=90, what="guest Ready")


async def corrected(api, gid, text):
    async def check():
        item = await status(api, gid)
        drifted = cond(item, "Drifted")
        return item if drifted and drifted["reason"] == "Corrected" and \
            text in drifted["message"] else None
    return await until(check, timeout=60, what=f"drift corrected: {text}")


async def blank_guest(api, name, *, running):
    body = guest_body(name, modules=[], disks=[64 * MiB])
    del body["cloud_init"]
    gid = (await api.ok("POST", "/guests/", body))["id"]
    await created(api, gid)
    if running:
        await api.ok("POST", f"/instances/{gid}", {})
        await instance(api, gid, True)
    await converged(api, gid)
    return gid


async def boot_sector_guest(api, tmp_path, name, *, power_off):
    """A guest whose system disk is a boot sector printing NANO-<NAME> (then powering off
    or halting), uploaded as a disk image through the API; created and started."""
    image = boot_disk(tmp_path / f"{name}.qcow2", f"NANO-{name.upper()}", power_off=power_off)
    data = image.read_bytes()
    image_id = await create_image(api, "disk", f"{name}-sector")
    reply = await upload(api, "disk", image_id, data, checksum=sha1(data),
                         filename=f"{name}.qcow2")
    assert reply.code == 0, reply.message
    body = guest_body(name, modules=[], disks=[64 * MiB], from_image=image_id)
    del body["cloud_init"]
    gid = (await api.ok("POST", "/guests/", body))["id"]
    await created(api, gid)
    await api.ok("POST", f"/instances/{gid}", {})
    return gid


async def logged(api, text):
    entries = await api.ok("GET", "/logs/?limit=100")
    return [e for e in entries["logs"] if text in e["content"]]


@pytest.mark.gen_test(timeout=300)
async def test_a_guest_destroyed_behind_nanos_back_is_started_again(api, cell, system):  # noqa: F811
    gid = await blank_guest(api, "drift-destroy", running=True)
    dom = system.lookupByName(f"{PREFIX}-{gid}")
    first_id = dom.ID()
    dom.destroy()  # virsh destroy
    item = await corrected(api, gid, "stopped outside nano (destroyed)")
    assert cond(item, "Drifted")["status"] is False
    assert dom.isActive() and dom.ID() != first_id, "nanod did not start it again"
    item = await converged(api, gid)
    assert (await api.ok("GET", f"/instances/{gid}"))["running"] is True
    assert await logged(api, "drift-destroy drifted and was corrected")
    await api.ok("DELETE", f"/guests/{gid}", {"force": True})


@pytest.mark.gen_test(timeout=300)
async def test_memory_edited_on_the_cell_is_restored(api, cell, system):  # noqa: F811
    gid = await blank_guest(api, "drift-memory", running=False)
    dom = system.lookupByName(f"{PREFIX}-{gid}")
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
    xml = dom.XMLDesc(flags)
    edited = re.sub(r"<memory unit='KiB'>\d+</memory>", "<memory unit='KiB'>262144</memory>",
                    xml)
    edited = re.sub(r"<currentMemory unit='KiB'>\d+</currentMemory>",
                    "<currentMemory unit='KiB'>262144</currentMemory>", edited)
    assert edited != xml
    system.defineXML(edited)  # virsh edit
    await corrected(api, gid, "memory_bytes")
    restored = system.lookupByName(f"{PREFIX}-{gid}").XMLDesc(flags)
    assert "<memory unit='KiB'>131072</memory>" in restored
    await converged(api, gid)
    await api.ok("DELETE", f"/guests/{gid}", {"force": True})


@pytest.mark.gen_test(timeout=300)
async def test_an_undefined_guest_is_defined_again(api, cell, system):  # noqa: F811
    gid = await blank_guest(api, "drift-undefine", running=False)
    system.lookupByName(f"{PREFIX}-{gid}").undefine()  # virsh undefine: the disks stay
    await corrected(api, gid, "vanished")
    dom = system.lookupByName(f"{PREFIX}-{gid}")
    assert f"{PREFIX}-{gid}-disk0" in dom.XMLDesc(0)
    await converged(api, gid)
    await api.ok("DELETE", f"/guests/{gid}", {"force": True})


@pytest.mark.gen_test(timeout=300)
async def test_a_guest_that_powers_itself_off_stays_off_and_says_so(api, cell, system,  # noqa: F811
                                                                    tmp_path):
    gid = await boot_sector_guest(api, tmp_path, "self-off", power_off=True)

    async def powered_off():
        item = await status(api, gid)
        ready = cond(item, "Ready")
        return item if ready and ready["reason"] == "PoweredOffByGuest" else None
    item = await until(powered_off, timeout=90, what="PoweredOffByGuest")
    assert cond(item, "Ready")["status"] is False
    assert "POST /instances/" in cond(item, "Ready")["message"]
    assert cond(item, "Drifted")["status"] is False  # not drift: the guest's own choice
    dom = system.lookupByName(f"{PREFIX}-{gid}")
    state, reason = dom.state()
    assert (state, reason) == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN)
    await asyncio.sleep(3)  # several reconcile periods: it is not started again
    assert not dom.isActive()
    assert (await api.ok("GET", f"/instances/{gid}"))["running"] is False
    # starting it again through the API is honoured (and it powers off again)
    await api.ok("POST", f"/instances/{gid}", {})
    await until(powered_off, timeout=90, what="PoweredOffByGuest after a second start")
    await api.ok("DELETE", f"/guests/{gid}", {"force": True})


@pytest.mark.gen_test(timeout=300)
async def test_network_speed_limits_need_the_sfq_qdisc(api, cell, system):  # noqa: F811
    body = guest_body("speed", modules=[], disks=[64 * MiB])
    del body["cloud_init"]
    body["qos"]["receive_speed"] = 1 << 20
    gid = (await api.ok("POST", "/guests/", body))["id"]
    if not has_sfq():
        async def refused():
            reply = await api.call("GET", f"/guests/{gid}")
            return reply.data if reply.data.get("error") else None
        data = await until(refused, timeout=30, what="the guest refused at once")
        assert "CONFIG_NET_SCH_SFQ" in data["error"] and "receive_speed" in data["error"]
        item = await status(api, gid)
        assert item["phase"] == "failed"
        assert cond(item, "Ready")["reason"] == "MissingCapability"
    else:
        await created(api, gid)
        await api.ok("POST", f"/instances/{gid}", {})
        await instance(api, gid, True)
        assert "<inbound average='1024'" in system.lookupByName(f"{PREFIX}-{gid}").XMLDesc(0)
    await api.ok("DELETE", f"/guests/{gid}", {"force": True})


@pytest.mark.gen_test(timeout=300)
async def test_guest_active_tells_a_guest_that_executes_from_one_that_shows_nothing(
        api, cell, system, tmp_path):  # noqa: F811
    hello = await boot_sector_guest(api, tmp_path, "hello", power_off=False)
    silent = await blank_guest(api, "silent", running=True)  # SeaBIOS, no OS: prints nothing

    async def active(gid, reason):
        item = await status(api, gid)
        found = cond(item, "GuestActive")
        return found if found and found["reason"] == reason else None
    found = await until(lambda: active(hello, "ConsoleOutput"), timeout=60,
                        what="console output seen")
    assert found["status"] is True and "bytes on its serial console" in found["message"]
    found = await until(lambda: active(silent, "NoSignOfLife"), timeout=60,
                        what="no sign of life reported")
    assert found["status"] is False and "virt_type qemu" in found["message"]
    for gid in (hello, silent):
        await api.ok("DELETE", f"/guests/{gid}", {"force": True})
