"""Guests on real QEMU (TCG) through the API, on the local libvirtd: create with an empty
disk and cloud-init, watch it run, every stop mode, changes visible in the domain XML, disk
growth seen by qemu-img, snapshots, and a delete that leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
import subprocess
import xml.etree.ElementTree as ET

import libvirt
import pytest

from tests.api.test_compute import until
from tests.conftest import TEST_NAMES_PREFIX as PREFIX
from tests.conftest import reconciling
from tests.integration.conftest import remove_cell_leftovers

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture
def settings(settings):
    return reconciling(settings)


@pytest.fixture
def cell(api, io_loop, server, system, qemu_dir):
    """The local libvirtd as cell 'local-g' in compute pool 'gp'; afterwards every libvirt
    object it made is removed (once the reconciler stopped)."""
    remove_cell_leftovers(system, f"{PREFIX}-local-g")  # of a test that failed before

    async def setup():
        await api.ok("POST", "/cells/local-g", {"libvirt_uri": "qemu:///system",
                                                "virt_type": "qemu",
                                                "storage_path": str(qemu_dir / "pool")})
        await until(lambda: _alive(api, "local-g"), timeout=30, what="cell alive")
        await api.ok("POST", "/compute_pools/gp", {})
        await api.ok("POST", "/compute_pool_cells/gp/local-g", {})

    io_loop.run_sync(setup)
    yield "local-g"
    if server.controller:
        server.controller.stop(10.0)
    remove_cell_leftovers(system, f"{PREFIX}-local-g")


async def _alive(api, name):
    rec = await api.ok("GET", f"/cells/{name}")
    return rec if rec["alive"] else None


def guest_body(name, **extra):
    body = {"name": name, "owner": "admin", "group": "admin", "pool": "gp", "cores": 1,
            "memory": 128 * MiB, "disks": [64 * MiB], "auto_start": False, "template": "",
            "modules": ["cloud-init"],
            "cloud_init": {"root_enabled": True, "admin_name": "nano",
                           "admin_secret": "Secret-pass1", "data_path": "/opt/data"},
            "qos": {"cpu_priority": "medium", "write_speed": 0, "write_iops": 0,
                    "read_speed": 0, "read_iops": 0, "receive_speed": 0, "send_speed": 0}}
    body.update(extra)
    return body


async def created(api, guest_id):
    async def check():
        reply = await api.call("GET", f"/guests/{guest_id}")
        assert reply.code == 0, reply.message
        if reply.data.get("error"):
            raise AssertionError(f"creation failed: {reply.data['error']}")
        return reply.data if reply.status == 200 and reply.data["created"] else None

    return await until(check, timeout=90, what="guest created")


async def instance(api, guest_id, running: bool):
    async def check():
        data = await api.ok("GET", f"/instances/{guest_id}")
        return data if data["running"] is running else None

    return await until(check, timeout=60, what=f"guest running={running}")


def domain(system, guest_id):
    return system.lookupByName(f"{PREFIX}-{guest_id}")


def qemu_img_size(path: str) -> int:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", path],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["virtual-size"]


@pytest.mark.gen_test(timeout=300)
async def test_guest_lifecycle_on_real_qemu(api, cell, system):
    reply = await api.call("POST", "/guests/", guest_body("g1"))
    assert reply.status == 202 and reply.code == 0, reply.message
    gid = reply.data["id"]
    first = await api.call("GET", f"/guests/{gid}")
    assert first.status in (200, 201)

    data = await created(api, gid)
    assert data["name"] == "g1" and data["cell"] == "local-g" and data["disks"] == [64 * MiB]
    dom = domain(system, gid)
    xml = ET.fromstring(dom.XMLDesc(0))
    assert xml.findtext("vcpu").strip() in ("2", "1")
    assert xml.find("devices/vcpu") is None
    assert "org.qemu.guest_agent.0" in dom.XMLDesc(0)
    pool = system.storagePoolLookupByName(f"{PREFIX}-local-g")
    names = {v.name() for v in pool.listAllVolumes()}
    assert {f"{PREFIX}-{gid}-disk0", f"{PREFIX}-{gid}-seed.iso"} <= names

    # start, and watch it run
    await api.ok("POST", f"/instances/{gid}", {})
    running = await instance(api, gid, True)
    assert dom.isActive() and running["display_protocol"] == "vnc"
    assert running["internal"]["display_address"].startswith("127.0.0.1:")

    # reboot and reset keep it running; force stop powers it off
    await api.ok("DELETE", f"/instances/{gid}", {"reboot": True, "force": False})
    await api.ok("DELETE", f"/instances/{gid}", {"reboot": True, "force": True})
    assert (await api.ok("GET", f"/instances/{gid}"))["running"] is True
    await api.ok("DELETE", f"/instances/{gid}", {"reboot": False, "force": True})
    await instance(api, gid, False)
    assert not dom.isActive()
    # ACPI shutdown of a stopped guest is refused
    refused = await api.call("DELETE", f"/instances/{gid}", {"reboot": False, "force": False})
    assert refused.code == 409

    # changes while stopped land in the definition
    await api.ok("PUT", f"/guests/{gid}/cores", {"cores": 2, "immediate": False})
    await api.ok("PUT", f"/guests/{gid}/memory", {"memory": 192 * MiB, "immediate": False})
    await api.ok("PUT", f"/guests/{gid}/qos/cpu/", {"priority": "high"})
    await api.ok("PUT", f"/guests/{gid}/qos/disk/", {"write_speed": 2 * MiB, "write_iops": 200,
                                                     "read_speed": 1 * MiB, "read_iops": 100})
    await api.ok("PUT", f"/guests/{gid}/disks/resize/0", {"size": 96 * MiB})
    await api.ok("PUT", f"/guests/{gid}/auto_start", {"enable": True})

    def converged():
        x = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        vcpus = int(x.find("vcpu").get("current") or x.findtext("vcpu"))
        shares = x.findtext("cputune/shares")
        tune = x.find("devices/disk/iotune")
        return (vcpus == 2 and int(x.findtext("currentMemory")) == 192 * 1024
                and shares == "2000" and tune is not None
                and tune.findtext("read_bytes_sec") == str(1 * MiB)
                and tune.findtext("write_bytes_sec") == str(2 * MiB)
                and tune.findtext("write_iops_sec") == "200" and dom.autostart() == 1)

    async def xml_converged():
        return converged()

    await until(xml_converged, timeout=30, what="domain XML shows the changes")
    vol = pool.storageVolLookupByName(f"{PREFIX}-{gid}-disk0")

    async def grown():
        return qemu_img_size(vol.path()) == 96 * MiB

    await until(grown, timeout=30, what="disk grown")
    smaller = await api.call("PUT", f"/guests/{gid}/disks/resize/0", {"size": 32 * MiB})
    assert smaller.code == 400

    # shrink compacts the qcow2 file of the stopped guest (qemu-img convert on the cell)
    await api.ok("PUT", f"/guests/{gid}/disks/shrink/0", {})

    async def compacted():
        rec = (await api.call("GET", f"/guests/{gid}")).data
        return rec if rec.get("phase") == "stopped" and observed_of(gid).get(
            "disk_shrink", {}).get("0") else None

    await until(compacted, timeout=30, what="disk compacted")
    check = subprocess.run(["qemu-img", "check", "-q", "-U", vol.path()])
    assert check.returncode == 0 and qemu_img_size(vol.path()) == 96 * MiB

    # a password reset needs the guest agent: the stored password changes, and the guest
    # says why it is not set yet
    auth = await api.ok("PUT", f"/guests/{gid}/auth", {"password": "N3w-password"})
    assert auth["password"] == "N3w-password"
    assert (await api.ok("GET", f"/guests/{gid}/auth"))["password"] == "N3w-password"

    async def agent_condition():
        conds = {c["type"]: c for c in conditions_of(gid)}
        return conds.get("AgentReady")

    agent = await until(agent_condition, timeout=30, what="AgentReady condition")
    assert agent["status"] is False and "guest agent" in agent["message"]

    # snapshots of the stopped guest
    await api.ok("POST", f"/instances/{gid}/snapshots/", {"name": "s1", "description": "one"})

    async def snapshot_made(name):
        async def check():
            return name in [s.getName() for s in dom.listAllSnapshots()]
        return await until(check, timeout=30, what=f"snapshot {name}")

    await snapshot_made("s1")
    await api.ok("POST", f"/instances/{gid}/snapshots/", {"name": "s2", "description": "two"})
    await snapshot_made("s2")
    tree = await api.ok("GET", f"/instances/{gid}/snapshots/")
    assert tree["s1"].get("is_root") is True and tree["s2"]["backing"] == "s1"
    info = await api.ok("GET", f"/instances/{gid}/snapshots/s1")
    assert info["description"] == "one" and info["running"] is False
    await api.ok("PUT", f"/instances/{gid}/snapshots/", {"target": "s1"})

    async def restored():
        return dom.snapshotCurrent().getName() == "s1"

    await until(restored, timeout=30, what="snapshot s1 current")
    await api.ok("DELETE", f"/instances/{gid}/snapshots/s2")

    async def s2_gone():
        return [s.getName() for s in dom.listAllSnapshots()] == ["s1"]

    await until(s2_gone, timeout=30, what="snapshot s2 deleted")

    # one boot from the network (PXE): the live domain boots from it, the definition not
    await api.ok("POST", f"/instances/{gid}", {"from_network": True})
    await instance(api, gid, True)
    assert "<boot dev='network'/>" in dom.XMLDesc(0)
    assert "<boot dev='network'/>" not in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    await api.ok("DELETE", f"/instances/{gid}", {"reboot": False, "force": True})
    await instance(api, gid, False)

    # delete: nothing of it stays behind
    await api.ok("DELETE", f"/guests/{gid}", {"force": True})

    async def gone():
        reply = await api.call("GET", f"/guests/{gid}")
        return reply.code == 404

    await until(gone, timeout=60, what="guest deleted")
    assert f"{PREFIX}-{gid}" not in [d.name() for d in system.listAllDomains()]
    async def volumes_gone():
        try:
            pool.refresh(0)
        except libvirt.libvirtError:  # deletions under way
            return False
        return not [v.name() for v in pool.listAllVolumes() if gid in v.name()]

    await until(volumes_gone, timeout=30, what="volumes removed")


@pytest.mark.gen_test(timeout=300)
async def test_console_channel_reads_the_vnc_greeting(api, cell, server, monkeypatch):
    from tornado.websocket import websocket_connect

    from api import console as console_module

    body = guest_body("con1", modules=[])
    del body["cloud_init"]
    gid = (await api.ok("POST", "/guests/", body))["id"]
    await created(api, gid)
    refused = await api.call("POST", "/monitor_channels/", {"guest": gid})
    assert refused.code == 409 and "start it" in refused.message
    await api.ok("POST", f"/instances/{gid}", {})
    await instance(api, gid, True)

    async def channel_when_displayed():
        reply = await api.call("POST", "/monitor_channels/", {"guest": gid})
        return reply.data if reply.code == 0 else None

    chan = await until(channel_when_displayed, timeout=30, what="monitor channel")
    assert chan["protocol"] == "vnc" and len(chan["password"]) == 8 and chan["username"] == ""
    url = f"ws://127.0.0.1:{server.port}/monitor_channels/{chan['id']}"
    conn = await websocket_connect(url)  # no subprotocol offered, like the portal's noVNC
    greeting = await conn.read_message()
    assert isinstance(greeting, bytes) and greeting.startswith(b"RFB 003.00")
    assert conn.selected_subprotocol is None
    conn.close()

    again = await websocket_connect(url)  # single use: the second attempt is closed
    assert await again.read_message() is None

    monkeypatch.setattr(console_module, "CHANNEL_TTL", 0.2)
    chan = (await api.ok("POST", "/monitor_channels/", {"guest": gid}))
    await asyncio.sleep(0.5)
    late = await websocket_connect(f"ws://127.0.0.1:{server.port}/api/v1/monitor_channels/"
                                   f"{chan['id']}", subprotocols=["binary"])
    assert await late.read_message() is None

    chan = (await api.ok("POST", "/monitor_channels/", {"guest": gid}))
    binary = await websocket_connect(f"ws://127.0.0.1:{server.port}/api/v1/monitor_channels/"
                                     f"{chan['id']}", subprotocols=["binary"])
    assert binary.selected_subprotocol == "binary"
    assert (await binary.read_message()).startswith(b"RFB 003.00")
    binary.close()
    await api.ok("DELETE", f"/guests/{gid}", {"force": True})


def observed_of(gid):  # what the reconciler recorded
    from state.models import Guest

    return Guest.get_by_id(gid).observed or {}


def conditions_of(gid):
    from state.models import Guest

    return Guest.get_by_id(gid).conditions or []

