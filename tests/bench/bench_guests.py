"""Benchmarks of issue 5, each against a baseline measured in the same run:

1. create-to-running latency of one guest through nanod (REST create, reconcile: volume,
   definition; REST start) against the same volume + define + start done with libvirt
   directly (goal: ratio <= 1.5);
2. batch create of 500 guests on 10 simulated cells (libvirt test driver): time until all
   are created;
3. console proxy throughput: an RFB client in its own process asks a real QEMU VNC server
   (a TCG guest) for full raw framebuffer updates back to back, directly over TCP and
   through nanod's websocket proxy (goal: >= 0.8).

Run: .venv/bin/python tests/bench/bench_guests.py [--skip-real] [--repeat 3] [--batch 500]
     [--cells 10] [--console-seconds 5] [--quick]
Real guests run under TCG in a temporary pool and are removed; nanod runs in-process on a
free loopback port with its own temp data directory (tests/bench/common.py), simulated
cells are test-driver node files in the temp directory, and the one real cell (for
create-to-running) has this run's own name and storage pool, removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402

from reconciler.guest_xml import DiskSpec, DomainSpec, render_domain_xml  # noqa: E402
from tests.bench.common import (  # noqa: E402
    PREFIX,
    QOS,
    MiB,
    add_quick,
    cannot_run,
    parse,
    start_server,
    wait_for,
)
from tests.helpers.testdriver import write_test_cell  # noqa: E402


def direct_libvirt(pool_path: Path) -> float:
    """Volume + define + start with libvirt directly, as a tool without nano would."""
    conn = libvirt.open("qemu:///system")
    name = f"{PREFIX}-bench-{uuid.uuid4().hex[:8]}"
    pool = conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{name}</name><target><path>{pool_path}</path></target></pool>")
    pool.build(0)
    pool.create(0)
    start = time.perf_counter()
    pool.createXML(f"<volume><name>{name}-0</name><capacity>{64 * MiB}</capacity>"
                   "<target><format type='qcow2'/></target></volume>", 0)
    gid = str(uuid.uuid4())
    spec = DomainSpec(guest_id=gid, title="direct", vcpus=1, memory_bytes=128 * MiB,
                      virt_type="qemu", disks=(DiskSpec(index=0, pool=name,
                                                        volume=f"{name}-0"),),
                      monitor_secret="abcdefgh")
    dom = conn.defineXML(render_domain_xml(spec))
    dom.create()
    took = time.perf_counter() - start
    dom.destroy()
    dom.undefine()
    for vol in pool.listAllVolumes():
        vol.delete(0)
    pool.destroy()
    pool.undefine()
    conn.close()
    return took


async def through_nanod(tmp: Path, pool_path: Path, repeat: int) -> list[float]:
    # The one benchmark cell that is not simulated: create-to-running needs real QEMU. Its
    # name is this run's own, so is its storage pool (<prefix>-<cell>), removed at the end.
    cell = f"bench-{uuid.uuid4().hex[:8]}"
    server, client = await start_server(tmp / "data-real", {
        "enabled": True, "workers": 4, "resync_seconds": 600, "probe_seconds": 600,
        "guest_poll_seconds": 600})
    times = []
    try:
        await client.call("POST", f"/cells/{cell}", {"libvirt_uri": "qemu:///system",
                                                     "virt_type": "qemu",
                                                     "storage_path": str(pool_path)})
        await wait_for(lambda: _alive(client, cell), 60)
        await client.call("POST", "/compute_pools/bp", {})
        await client.call("POST", f"/compute_pool_cells/bp/{cell}", {})
        for i in range(repeat):
            start = time.perf_counter()
            _, data = await client.call("POST", "/guests/", {
                "name": f"g{i}", "pool": "bp", "cores": 1, "memory": 128 * MiB,
                "disks": [64 * MiB], "auto_start": False, "template": "", "modules": [],
                "qos": QOS})
            gid = data["id"]
            await wait_for(lambda gid=gid: _created(client, gid))
            await client.call("POST", f"/instances/{gid}", {})
            await wait_for(lambda gid=gid: _running(client, gid))
            times.append(time.perf_counter() - start)
            await client.call("DELETE", f"/guests/{gid}", {"force": True})
            await wait_for(lambda gid=gid: _gone(client, gid))
    finally:
        await server.shutdown()
        _drop_pool(f"{PREFIX}-{cell}")
    return times


def _drop_pool(name: str) -> None:
    conn = libvirt.open("qemu:///system")
    try:
        pool = conn.storagePoolLookupByName(name)
        for vol in pool.listAllVolumes():
            vol.delete(0)
        pool.destroy()
        pool.undefine()
    except libvirt.libvirtError:
        pass
    conn.close()


async def _alive(client, name):
    return (await client.call("GET", f"/cells/{name}"))[1]["alive"]


async def _created(client, gid):
    code, data = await client.call("GET", f"/guests/{gid}")
    if data.get("error"):
        raise RuntimeError(data["error"])
    return code == 200


async def _running(client, gid):
    return (await client.call("GET", f"/instances/{gid}"))[1]["running"]


async def _gone(client, gid):
    try:
        await client.call("GET", f"/guests/{gid}")
    except RuntimeError:
        return True
    return False


async def batch(tmp: Path, count: int, cells: int) -> float:
    server, client = await start_server(tmp / "data-batch", {
        "enabled": True, "workers": 4, "resync_seconds": 600, "probe_seconds": 600,
        "guest_poll_seconds": 600})
    try:
        await client.call("POST", "/compute_pools/sim", {})
        for i in range(cells):
            cell = write_test_cell(tmp / f"sim-{i}.xml", cpus=256, memory_kib=1 << 30)
            await client.call("POST", f"/cells/sim{i}", {"libvirt_uri": cell.uri,
                                                         "virt_type": "qemu",
                                                         "storage_path": f"/sim/{i}"})
        for i in range(cells):
            await wait_for(lambda i=i: _alive(client, f"sim{i}"), 60)
            await client.call("POST", f"/compute_pool_cells/sim/sim{i}", {})
        start = time.perf_counter()
        _, data = await client.call("POST", "/batch/create_guest/", {
            "name_rule": "order", "name_prefix": "b", "pool": "sim", "count": count,
            "cores": 1, "memory": 64 * MiB, "disks": [16 * MiB], "auto_start": False,
            "template": "", "modules": [], "qos": QOS})
        task = data["id"]

        async def done():
            code, entries = await client.call("GET", f"/batch/create_guest/{task}")
            failed = [e for e in entries if e["status"] == "fail"]
            if failed:
                raise RuntimeError(failed[0].get("error"))
            return code == 200

        await wait_for(done)
        return time.perf_counter() - start
    finally:
        await server.shutdown()


VNC_READER = r"""
import base64, os, socket, struct, sys, time
host, port, path, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
sock = socket.create_connection((host, port))
pending = bytearray()
ws = path != "-"

def raw_exact(n):
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(max(n - len(data), 65536) if not ws else n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)

def recv_some():
    if not ws:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise EOFError
        return chunk
    while True:  # one websocket frame's payload
        b1, b2 = raw_exact(2)
        length = b2 & 0x7F
        if length == 126:
            length = int.from_bytes(raw_exact(2), "big")
        elif length == 127:
            length = int.from_bytes(raw_exact(8), "big")
        data = raw_exact(length)
        if b1 & 0x0F in (1, 2):
            return data

def exact(n):
    global pending
    while len(pending) < n:
        pending += recv_some()
    out, pending = bytes(pending[:n]), pending[n:]
    return out

def send(data):
    if not ws:
        sock.sendall(data)
        return
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    n = len(data)
    head = bytes([0x82, 0x80 | n]) if n < 126 else bytes([0x82, 0x80 | 126]) + n.to_bytes(2, "big")
    sock.sendall(head + mask + body)

if ws:
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
exact(12); send(b"RFB 003.008\n")
count = exact(1)[0]; exact(count); send(b"\x01")          # security: None
assert exact(4) == b"\x00\x00\x00\x00"
send(b"\x01")                                               # ClientInit: shared
width, height = struct.unpack(">HH", exact(4)); bpp = exact(16)[0] // 8
exact(struct.unpack(">I", exact(4))[0])
send(struct.pack(">BxHi", 2, 1, 0))                         # SetEncodings: Raw
request = struct.pack(">BBHHHH", 3, 0, 0, 0, width, height)
got, start = 0, time.perf_counter()
send(request)
while time.perf_counter() - start < seconds:
    kind = exact(1)[0]
    if kind != 0:
        continue
    exact(1); rects = struct.unpack(">H", exact(2))[0]
    send(request)  # keep one full update in flight
    for _ in range(rects):
        x, y, w, h, enc = struct.unpack(">HHHHi", exact(12))
        n = w * h * bpp
        exact(n)
        got += n
print(got / (time.perf_counter() - start))
"""


def vnc_rate(port: int, path: str, seconds: float) -> float:
    """Framebuffer bytes per second a separate RFB client process reads (full, raw updates
    requested back to back), directly (`path` "-") or through the websocket proxy."""
    out = subprocess.run([sys.executable, "-c", VNC_READER, "127.0.0.1", str(port), path,
                          str(seconds)], capture_output=True, text=True, timeout=120,
                         check=True)
    return float(out.stdout.strip())


def vnc_guest(pool_path: Path) -> tuple[libvirt.virDomain, libvirt.virStoragePool, int]:
    """A TCG guest whose VNC has no password (bench only), its pool, and its VNC port."""
    conn = libvirt.open("qemu:///system")
    name = f"{PREFIX}-bench-vnc-{uuid.uuid4().hex[:8]}"
    pool = conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{name}</name><target><path>{pool_path}</path></target></pool>")
    pool.build(0)
    pool.create(0)
    pool.createXML(f"<volume><name>{name}-0</name><capacity>{64 * MiB}</capacity>"
                   "<target><format type='qcow2'/></target></volume>", 0)
    spec = DomainSpec(guest_id=str(uuid.uuid4()), title="vnc", vcpus=1, memory_bytes=128 * MiB,
                      virt_type="qemu", disks=(DiskSpec(index=0, pool=name,
                                                        volume=f"{name}-0"),))
    dom = conn.defineXML(render_domain_xml(spec))
    dom.create()
    import xml.etree.ElementTree as ET

    port = int(ET.fromstring(dom.XMLDesc(0)).find("devices/graphics").get("port"))
    return dom, pool, port


async def console(tmp: Path, seconds: float) -> tuple[float, float]:
    dom, pool, port = vnc_guest(tmp / "vnc-pool")
    loop = asyncio.get_running_loop()
    server, client = await start_server(tmp / "data-console", {
        "enabled": True, "workers": 2, "resync_seconds": 600, "probe_seconds": 600})
    try:
        await asyncio.sleep(2)  # let the firmware draw something
        direct = await loop.run_in_executor(None, vnc_rate, port, "-", seconds)
        cell = write_test_cell(tmp / "console-cell.xml", cpus=4, memory_kib=1 << 22)
        await client.call("POST", "/cells/con", {"libvirt_uri": cell.uri, "virt_type": "qemu",
                                                 "storage_path": "/sim/con"})
        token = server.store.open_channel("bench", "con", port, 15.0)
        proxied = await loop.run_in_executor(None, vnc_rate, server.port,
                                             f"/monitor_channels/{token}", seconds)
    finally:
        await server.shutdown()
        dom.destroy()
        dom.undefine()
        for vol in pool.listAllVolumes():
            vol.delete(0)
        pool.destroy()
        pool.undefine()
    return direct, proxied


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-real", action="store_true",
                        help="leave out create-to-running on the real libvirtd")
    parser.add_argument("--repeat", type=int, default=3, help="create-to-running samples")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--cells", type=int, default=10)
    parser.add_argument("--console-seconds", type=float, default=5.0)
    add_quick(parser, {"repeat": 1, "batch": 20, "cells": 2, "console_seconds": 1.0})
    args = parse(parser)
    try:  # create-to-running and the console's VNC server need the real libvirtd and QEMU
        libvirt.open("qemu:///system").close()
    except libvirt.libvirtError as exc:
        cannot_run(f"qemu:///system cannot be opened: {exc.get_error_message()}")
    base = Path("/var/tmp/nano-tests")
    base.mkdir(mode=0o755, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=base))
    tmp.chmod(0o755)
    try:
        if not args.skip_real:
            direct = [direct_libvirt(tmp / f"direct-{i}") for i in range(args.repeat)]
            nano = await through_nanod(tmp, tmp / "nano-pool", args.repeat)
            print(f"create-to-running, direct libvirt: median {statistics.median(direct):.3f} s")
            print(f"create-to-running, through nanod:  median {statistics.median(nano):.3f} s")
            print(f"ratio nanod/direct: {statistics.median(nano) / statistics.median(direct):.2f}"
                  "  (goal <= 1.5)")
        took = await batch(tmp, args.batch, args.cells)
        print(f"batch create of {args.batch} guests on {args.cells} test-driver cells: "
              f"{took:.1f} s ({args.batch / took:.0f} guests/s)")
        direct_bps, proxied_bps = await console(tmp, args.console_seconds)
        print(f"console (QEMU VNC, raw full updates): direct TCP {direct_bps / MiB:.1f} MiB/s; "
              f"through nanod's websocket proxy {proxied_bps / MiB:.1f} MiB/s; "
              f"ratio {proxied_bps / direct_bps:.2f} (goal >= 0.8)")
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
