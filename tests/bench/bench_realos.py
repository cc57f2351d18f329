"""Create-to-SSH-ready of a real Debian guest (issue 14): through nanod against libvirt
directly, in one run (goal: ratio <= 1.1).

Through nanod: `POST /guests/` from the uploaded image (the upload is not timed) with
cloud-init (admin and password) on an address pool with the `dhcp` provider, start, then
SSH until the admin logs in with the password. Directly: the same image copied to a
volume of the same size (`qemu-img convert` + resize, as a tool without nano would), a
NoCloud seed written by hand (user-data with the admin and password, meta-data, a
network-config with a fixed address on the same network), the domain defined and started
with libvirt, then SSH until the admin logs in. Both guests have 1 core and 512 MiB under
TCG; they run one after the other, nanod's first, `--repeat` times each.

Run: .venv/bin/python tests/bench/bench_realos.py [--repeat 1]
The image is scripts/build-guest-image's (built once, cached; NANO_GUEST_IMAGE names
another). Not part of tests/test_benchmarks.py's quick run: two Debian boots under TCG
take minutes. nanod runs as a process with its own temporary data directory and the
tests' names prefix (`nanotest`); everything is named `realos-bench*` and removed at the
end, and the nanod is stopped by its pid.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402
import pycdlib  # noqa: E402

from reconciler.drivers.networks import delete_nft_table  # noqa: E402
from reconciler.drivers.shell import LocalShell  # noqa: E402
from reconciler.guest_xml import (  # noqa: E402
    DiskSpec,
    DomainSpec,
    InterfaceSpec,
    render_domain_xml,
)
from reconciler.networking import nat_table, network_name  # noqa: E402
from tests.bench.common import PREFIX, QOS, cannot_run, write_nanod_config  # noqa: E402
from tests.helpers.realos import (  # noqa: E402
    GiB,
    MiB,
    Nano,
    free_port,
    guest_image,
    serve_nanod,
    ssh_ready,
    stop_process,
)

ADMIN, PASSWORD = "admin", "Adm1nPassword"
SECRET = "Bench-Realos-3q"
DISK = 3 * GiB
MEMORY = 512 * MiB
READY_LIMIT = 900.0


def ssh_ready_after(start: float, address: str) -> float:
    ssh_ready(address, "nano", SECRET, READY_LIMIT).close()
    return time.perf_counter() - start


def through_nanod(nano: Nano, pool: str, image_id: str, i: int) -> tuple[float, str]:
    start = time.perf_counter()
    gid = nano.ok("POST", "/guests/", {
        "name": f"realos-bench-{i}", "owner": ADMIN, "group": "admin", "pool": pool,
        "cores": 1, "memory": MEMORY, "disks": [DISK], "auto_start": False, "template": "",
        "from_image": image_id, "modules": ["cloud-init", "qemu"], "qos": QOS,
        "cloud_init": {"admin_name": "nano", "admin_secret": SECRET, "root_enabled": False}})["id"]
    nano.created(gid, timeout=READY_LIMIT)
    nano.ok("POST", f"/instances/{gid}", {})
    address = nano.ok("GET", f"/guests/{gid}")["internal"]["allocated_address"]
    took = ssh_ready_after(start, address)
    nano.delete_guest(gid)
    return took, address


def seed_by_hand(address: str, gateway: str, mac: str) -> bytes:
    """A NoCloud seed as a user writes one (the password in plain text, as cloud-init's
    documentation shows)."""
    files = {
        "user-data": "#cloud-config\n"
                     "users:\n  - name: nano\n    lock_passwd: false\n"
                     "    sudo: ALL=(ALL) NOPASSWD:ALL\n    shell: /bin/bash\n"
                     f"chpasswd:\n  expire: false\n  users:\n    - name: nano\n"
                     f"      password: {SECRET}\n      type: text\n"
                     "ssh_pwauth: true\n",
        "meta-data": f"instance-id: bench-{uuid.uuid4().hex[:8]}\nlocal-hostname: direct\n",
        "network-config": "version: 2\nethernets:\n  nic0:\n"
                          f"    match:\n      macaddress: '{mac}'\n"
                          f"    addresses: [{address}/24]\n"
                          f"    routes: [{{to: 0.0.0.0/0, via: {gateway}}}]\n",
    }
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident="cidata", joliet=3, rock_ridge="1.09")
    for n, (name, text) in enumerate(files.items()):
        data = text.encode()
        iso.add_fp(io.BytesIO(data), len(data), f"/F{n}.;1", rr_name=name,
                   joliet_path="/" + name)
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def direct(conn: libvirt.virConnect, image: Path, workdir: Path, net: str, network: str,
           i: int) -> float:
    """Volume, seed, define, start with libvirt and qemu-img, then SSH."""
    gid = str(uuid.uuid4())
    mac = f"00:16:3e:be:00:{i:02x}"
    address, gateway = f"{net}.{200 + i}", f"{net}.1"
    folder = workdir / f"direct-{i}"
    folder.mkdir()
    folder.chmod(0o755)
    disk, seed = folder / "disk0.qcow2", folder / "seed.iso"
    start = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(image), str(disk)],
                   check=True)
    subprocess.run(["qemu-img", "resize", "-q", str(disk), str(DISK)], check=True)
    seed.write_bytes(seed_by_hand(address, gateway, mac))
    xml = render_domain_xml(DomainSpec(
        guest_id=gid, title="direct", vcpus=1, memory_bytes=MEMORY, virt_type="qemu",
        disks=(DiskSpec(index=0, path=str(disk)),), seed_iso=str(seed),
        interfaces=(InterfaceSpec(mac=mac, network=network),), monitor_secret="abcdefgh"))
    dom = conn.defineXML(xml)
    try:
        dom.create()
        took = ssh_ready_after(start, address)
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    image, reason = guest_image()
    if image is None:
        cannot_run(reason)
    try:
        conn = libvirt.open("qemu:///system")
    except libvirt.libvirtError as exc:
        cannot_run(f"qemu:///system is not reachable: {exc}")
    workdir = Path(tempfile.mkdtemp(prefix="realos-bench-", dir="/var/tmp"))
    workdir.chmod(0o755)
    (workdir / "data").mkdir()
    tag = uuid.uuid4().hex[:6]
    cell, pool = f"realos-bench-{tag}", f"realos-bench-{tag}"
    net = f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}"
    conf = write_nanod_config(workdir / "nanod.yaml", {
        "reconciler": {"enabled": True, "workers": 4, "resync_seconds": 30,
                       "probe_seconds": 5, "guest_poll_seconds": 1},
        "limits": {"guest_ports": [47500, 47599]}})
    port = free_port()
    proc = serve_nanod(workdir / "data", port, conf, workdir / "nanod.log")
    nano = Nano(port)
    nanod_times: list[float] = []
    direct_times: list[float] = []
    try:
        nano.ok("POST", "/system/", {"user": ADMIN, "password": PASSWORD})
        nano.login(ADMIN, PASSWORD)
        image_id = nano.upload_disk_image("realos-bench", image)
        nano.ok("POST", f"/cells/{cell}", {"libvirt_uri": "qemu:///system", "virt_type": "qemu",
                                           "storage_path": str(workdir / "pool")})
        deadline = time.monotonic() + 60
        while not nano.ok("GET", f"/cells/{cell}")["alive"]:
            if time.monotonic() > deadline:
                raise SystemExit(f"cell {cell} did not come alive")
            time.sleep(0.5)
        nano.ok("POST", f"/address_pools/{pool}", {"gateway": f"{net}.1", "dns": [f"{net}.1"],
                                                   "provider": "dhcp", "mode": "internal"})
        nano.ok("POST", f"/address_pools/{pool}/internal/ranges/{net}.10",
                {"end": f"{net}.99", "netmask": "255.255.255.0"})
        nano.ok("POST", f"/compute_pools/{pool}", {"network": pool})
        nano.ok("POST", f"/compute_pool_cells/{pool}/{cell}", {})
        for i in range(args.repeat):
            took, address = through_nanod(nano, pool, image_id, i)
            nanod_times.append(took)
            print(f"through nanod: create to SSH ready {took:.1f} s ({address})", flush=True)
            took = direct(conn, image, workdir, net, network_name(pool), i)
            direct_times.append(took)
            print(f"libvirt directly: define to SSH ready {took:.1f} s", flush=True)
    finally:
        stop_process(proc)
        _clean(conn, cell, pool)
        conn.close()
        shutil.rmtree(workdir, ignore_errors=True)
    best_nanod, best_direct = min(nanod_times), min(direct_times)
    print(f"create-to-SSH-ready, best of {args.repeat}: nanod {best_nanod:.1f} s, "
          f"direct {best_direct:.1f} s")
    print(f"ratio nanod/direct: {best_nanod / best_direct:.2f} (goal <= 1.1)")
    load = open("/proc/loadavg").read().split()[:3]
    print(f"load average at the end: {' '.join(load)}")


def _clean(conn: libvirt.virConnect, cell: str, pool: str) -> None:
    from tests.integration.conftest import remove_cell_leftovers

    remove_cell_leftovers(conn, f"{PREFIX}-{cell}")
    try:
        network = conn.networkLookupByName(network_name(pool))
        if network.isActive():
            network.destroy()
        network.undefine()
    except libvirt.libvirtError:
        pass
    delete_nft_table(LocalShell(), "ip", nat_table(pool))


if __name__ == "__main__":
    main()
