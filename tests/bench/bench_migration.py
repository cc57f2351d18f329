"""Migration between two cells through nanod against the same move done with libvirt
directly, in one run (issue: "total time <= 1.2x and guest downtime <= 1.2x"):

1. live: a running guest (256 MiB memory, 1 core, its disk from the counter boot sector of
   tests/helpers/bootsector.py on shared storage: a `dir` storage pool on the second
   host's shared directory) moved from this host's libvirtd to the second host's through
   `POST /migrations/`, timed from the POST to `GET /migrations/{id}` answering
   finished=true; against a plain libvirt domain of the same shape (nanod's own domain XML
   without its mark, its disk a file on the same shared directory) moved with
   `migrateToURI3` and the flags and parameters nanod uses (peer to peer from
   qemu:///system, LIVE|PERSIST_DEST|UNDEFINE_SOURCE|ABORT_ON_ERROR|UNSAFE, the migration
   stream to tcp://<second host's address>), timed around that call. The downtime of both
   is libvirt's own figure (the completed job's "downtime", ms), taken from the
   job-completed event this host's libvirtd (the source) sends for each (nanod reads the
   target's completed stats itself, and reading them without
   VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED discards them, so they are not read there);
2. cold: a stopped guest with a system disk (the counter image) and a data disk of
   `--cold-mib` MiB filled with random data (written into its qcow2 with qemu-img) on
   local storage, moved through `POST /migrations/`; against copying the same two volume
   files from a pool on this host to a pool on the second host with
   `virsh vol-create-as` + `virsh vol-download ... | virsh vol-upload ...` (no check of
   the copy: nanod reads its copy back and compares SHA-1s, a cost the baseline does not
   pay).

Each repetition moves a new guest (creating, filling and starting it is not timed) and
does the direct move, nanod's first in even repetitions, the direct one first in odd ones.
Ratios are of the medians. nanod runs with its default settings (reconciler on).

Each guest gets a disk image of its own. (This bench found three faults of nanod, fixed
since: the target's shared pool was not refreshed before a live migration; a second guest
of one image failed once the first one's cached copy was dropped; a migration held two of
its cell's libvirt threads for its whole length.)

Run: .venv/bin/python tests/bench/bench_migration.py [--repeat 5] [--cold-repeat 3]
     [--cold-mib 1024] [--quick]
Needs root, qemu:///system and scripts/second-host. Everything runs under the tests'
names prefix (`nanotest`) and this run's own names: a second host `bm<pid>`, cells
`bm<pid>-local` and `bm<pid>`, a nanod process with its own data directory in a temporary
directory under /var/tmp (stopped by its pid), the direct domains and pools
`nanotest-bm<pid>-*`; all are removed at the end, on Ctrl-C too. The traffic stays on
loopback and the second host's veth.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402

from reconciler.naming import names  # noqa: E402
from tests.bench.common import (  # noqa: E402
    PREFIX,
    QOS,
    MiB,
    add_quick,
    cannot_run,
    parse,
    write_nanod_config,
)
from tests.helpers.bootsector import counter_disk  # noqa: E402
from tests.helpers.realos import Nano, free_port, serve_nanod, stop_process, wait  # noqa: E402
from tests.helpers.second_host import SCRIPT as SECOND_HOST  # noqa: E402
from tests.helpers.second_host import SecondHost, second_host_up, unavailable  # noqa: E402

ADMIN, PASSWORD = "admin", "Adm1nPassword"
LOCAL = "qemu:///system"
QEMU_LOGS = Path("/var/log/libvirt/qemu")
MEMORY = 256 * MiB
SYSTEM_DISK = 64 * MiB
FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST
         | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE | libvirt.VIR_MIGRATE_ABORT_ON_ERROR
         | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_UNSAFE)


class JobEvents:
    """libvirt's job-completed events of one connection: domain name -> the job's stats."""

    def __init__(self, conn: libvirt.virConnect) -> None:
        self.stats: dict[str, dict[str, Any]] = {}
        self.seen = threading.Condition()
        self.conn = conn
        self.id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._completed, None)

    def _completed(self, _conn: Any, dom: libvirt.virDomain, params: dict[str, Any],
                   _opaque: Any) -> None:
        with self.seen:
            self.stats[dom.name()] = dict(params)
            self.seen.notify_all()

    def figures(self, name: str, timeout: float = 30) -> tuple[float, float]:
        """(downtime ms, libvirt's own job time s) of `name`'s completed migration."""
        with self.seen:
            self.seen.wait_for(lambda: name in self.stats, timeout)
            stats = self.stats.pop(name, {})
        if "downtime" not in stats:
            raise RuntimeError(f"no completed-job stats with a downtime for {name}: {stats}")
        return float(stats["downtime"]), float(stats.get("time_elapsed", "nan")) / 1000

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.domainEventDeregisterAny(self.id)


def event_loop() -> None:
    """libvirt's default event loop in a daemon thread (events, keepalives)."""
    libvirt.virEventRegisterDefaultImpl()

    def run() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=run, name="libvirt-events", daemon=True).start()


# -- the rig ---------------------------------------------------------------------------------


class Rig:
    """This run's second host, nanod and names; `close()` removes all of it."""

    def __init__(self, tag: str, workdir: Path) -> None:
        self.tag = tag  # second host and its cell; the local cell is TAG-local
        self.workdir = workdir
        self.local_cell = f"{tag}-local"
        self.pool = tag  # compute pool
        self.storage = f"{tag}-shared"  # storage pool (dir, on the second host's shared dir)
        self.direct_pool = f"{PREFIX}-{tag}-cold"  # the direct copy's pools, both hosts
        self.host: SecondHost | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.nano: Nano | None = None
        self.local: libvirt.virConnect | None = None
        self.remote: libvirt.virConnect | None = None
        self.guests: list[str] = []  # nanod's guests not deleted yet
        self.domains: list[str] = []  # the direct domains
        self.made: list[str] = []  # every domain name of this run (their logs go too)

    def up(self, virt_type: str) -> None:
        try:
            self.host = second_host_up(self.tag)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            cannot_run(f"the second host does not start: {exc}")
        self.remote = libvirt.open(self.host.uri())
        data = self.workdir / "data"
        data.mkdir()
        conf = write_nanod_config(self.workdir / "nanod.yaml", {
            "ssh": {"key_dir": str(Path(self.host.state["key_file"]).parent)},
            "reconciler": {"enabled": True}})  # otherwise nanod's defaults
        port = free_port()
        self.proc = serve_nanod(data, port, conf, self.workdir / "nanod.log")
        nano = self.nano = Nano(port)
        nano.ok("POST", "/system/", {"user": ADMIN, "password": PASSWORD})
        nano.login(ADMIN, PASSWORD)
        nano.ok("POST", f"/cells/{self.local_cell}", {
            "libvirt_uri": LOCAL, "virt_type": virt_type,
            "storage_path": str(self.workdir / "pool")})
        nano.ok("POST", f"/cells/{self.tag}", self.host.body)
        for cell in (self.local_cell, self.tag):
            wait(lambda cell=cell: nano.ok("GET", f"/cells/{cell}")["alive"], 60,
                 f"cell {cell} alive")
        nano.ok("POST", f"/compute_pools/{self.pool}", {})
        for cell in (self.local_cell, self.tag):
            nano.ok("POST", f"/compute_pool_cells/{self.pool}/{cell}", {})
        nano.ok("POST", f"/storage_pools/{self.storage}", {"type": "dir",
                                                           "target": str(self.host.shared)})

    def use_storage(self, storage: str) -> None:
        """The compute pool's guests on `storage` ('' = each cell's local storage)."""
        assert self.nano is not None
        self.nano.ok("PUT", f"/compute_pools/{self.pool}", {"storage": storage, "network": "",
                                                            "failover": False})
        if not storage:
            return

        def ready() -> bool:
            for cell in (self.local_cell, self.tag):
                rec = self.nano.ok("GET", f"/cells/{cell}")
                pools = [p for p in rec["status"]["observed"].get("storage_pools", [])
                         if storage in p["name"]]
                if not pools or pools[0].get("error"):
                    return False
            return True

        wait(ready, 60, f"storage pool {storage} ready on both cells")

    def close(self) -> None:
        """Everything of this run goes, by name and pid; a second Ctrl-C (or the test's
        SIGINT to the process group) does not cut this short."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        if self.proc is not None:
            stop_process(self.proc)
        shared = names().shared_pool(self.storage)
        for conn, cell in ((self.local, self.local_cell), (self.remote, self.tag)):
            if conn is None:
                continue
            for name in [*self.domains, *(names().domain(g) for g in self.guests)]:
                _remove_domain(conn, name)
            for pool in (self.direct_pool, names().local_pool(cell), shared):
                _remove_pool(conn, pool, volumes=pool != shared)
        for conn in (self.local, self.remote):
            if conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()
        for name in self.made:  # this host's libvirt logs of them
            for suffix in (".log", "-serial.log"):
                (QEMU_LOGS / f"{name}{suffix}").unlink(missing_ok=True)
        # the second host's own daemons, namespaces and directories (by pid and name), in
        # a session of its own: a signal to this process group does not stop it half way
        done = subprocess.run([sys.executable, str(SECOND_HOST), "down", "--name", self.tag],
                              capture_output=True, text=True, timeout=120,
                              start_new_session=True)
        if done.returncode:
            print(f"second-host down: {done.stderr.strip()}", file=sys.stderr)


def _remove_domain(conn: libvirt.virConnect, name: str) -> None:
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            dom.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)


def _remove_pool(conn: libvirt.virConnect, name: str, *, volumes: bool) -> None:
    for _attempt in range(20):  # volume jobs still under way: libvirt refuses for a while
        try:
            pool = conn.storagePoolLookupByName(name)
        except libvirt.libvirtError:
            return
        try:
            if volumes and pool.isActive():
                pool.refresh(0)
                for vol in pool.listAllVolumes():
                    vol.delete(0)
            if pool.isActive():
                pool.destroy()
            pool.undefine()
            return
        except libvirt.libvirtError:
            time.sleep(0.5)
    print(f"could not remove storage pool {name}", file=sys.stderr)


# -- through nanod ---------------------------------------------------------------------------


def new_guest(rig: Rig, image: Path, name: str, disks: list[int]) -> str:
    """A guest on this host's cell, its system disk from `image` (uploaded as an image of
    its own: a second guest made from one disk image more than a cell probe after the
    first fails, see the module docstring)."""
    assert rig.nano is not None
    image_id = rig.nano.upload_disk_image(f"{rig.tag}-{name}", image)
    gid = rig.nano.ok("POST", "/guests/", {
        "name": name, "owner": ADMIN, "group": "admin", "pool": rig.pool, "cores": 1,
        "memory": MEMORY, "disks": disks, "auto_start": False, "template": "",
        "from_image": image_id, "modules": [], "cell": rig.local_cell, "qos": QOS})["id"]
    rig.guests.append(gid)
    rig.made.append(names().domain(gid))
    errors: list[str] = []

    def created() -> bool:
        # an error on the way is retried by nanod (e.g. its cell probe dropping the image
        # copy a creation was about to use): only the end counts
        data = rig.nano.ok("GET", f"/guests/{gid}")
        if data.get("error"):
            errors.append(data["error"])
        return bool(data.get("created"))

    try:
        wait(created, 300, f"guest {name} created", every=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; errors seen: {errors[-3:]}") from None
    return gid


def migrate(rig: Rig, gid: str, mode: str) -> float:
    """POST /migrations/ until finished=true: seconds."""
    nano = rig.nano
    assert nano is not None
    start = time.perf_counter()
    mid = nano.ok("POST", "/migrations/", {"source_pool": rig.pool,
                                           "source_cell": rig.local_cell,
                                           "target_cell": rig.tag, "instances": [gid]})["id"]
    while True:
        status = nano.ok("GET", f"/migrations/{mid}")
        if status["finished"]:
            break
        time.sleep(0.02)
    took = time.perf_counter() - start
    guest = status["guests"][0]
    if status.get("error") or guest.get("error") or guest.get("mode") != mode:
        raise RuntimeError(f"migration {mid} ({mode}) failed: {status}")
    return took


def delete_guest(rig: Rig, gid: str) -> None:
    assert rig.nano is not None
    rig.nano.delete_guest(gid, timeout=120)
    rig.guests.remove(gid)


# -- directly --------------------------------------------------------------------------------


def direct_xml(nanod_xml: str, name: str, disk: Path) -> str:
    """nanod's domain definition as a plain domain: its name and uuid, no nanod mark, its
    disk a file."""
    root = ET.fromstring(nanod_xml)
    old = root.findtext("name") or ""
    for tag in ("metadata", "title", "description"):
        for el in root.findall(tag):
            root.remove(el)
    root.find("name").text = name  # type: ignore[union-attr]
    root.find("uuid").text = str(uuid.uuid4())  # type: ignore[union-attr]
    for el in root.iterfind("./devices/disk"):
        if el.get("device") != "disk":
            continue
        el.set("type", "file")
        source = el.find("source")
        source.attrib.clear()  # type: ignore[union-attr]
        source.set("file", str(disk))  # type: ignore[union-attr]
    return ET.tostring(root, encoding="unicode").replace(old, name)


def direct_live(rig: Rig, xml: str, image: Path, i: int, events: JobEvents
                ) -> tuple[float, float, float]:
    """Define and start a plain domain on this host, migrate it as nanod does: (seconds,
    downtime ms, libvirt's job seconds)."""
    assert rig.host is not None and rig.local is not None
    name = f"{PREFIX}-{rig.tag}-direct{i}"
    disk = rig.host.shared / f"{name}.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(image), str(disk)],
                   check=True)
    subprocess.run(["qemu-img", "resize", "-q", str(disk), str(SYSTEM_DISK)], check=True)
    rig.domains.append(name)
    rig.made.append(name)
    dom = rig.local.defineXML(direct_xml(xml, name, disk))
    dom.create()
    time.sleep(1.0)  # as nanod's guest: running a moment before it moves
    params = {libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{rig.host.address}",
              libvirt.VIR_MIGRATE_PARAM_DEST_XML: dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)}
    start = time.perf_counter()
    dom.migrateToURI3(rig.host.uri(), params, FLAGS)
    took = time.perf_counter() - start
    downtime, job = events.figures(name)
    _remove_domain(rig.remote, name)
    disk.unlink(missing_ok=True)
    return took, downtime, job


def virsh(uri: str, *args: str) -> None:
    subprocess.run(["virsh", "-q", "-c", uri, *args], check=True, capture_output=True)


def direct_pools(rig: Rig) -> None:
    """A dir pool for the direct copy on both hosts."""
    assert rig.local is not None and rig.remote is not None
    for conn, path in ((rig.local, rig.workdir / "cold"),
                       (rig.remote, Path("/var/lib/libvirt") / f"{rig.tag}-cold")):
        pool = conn.storagePoolDefineXML(
            f"<pool type='dir'><name>{rig.direct_pool}</name>"
            f"<target><path>{path}</path></target></pool>", 0)
        pool.build(0)
        pool.create(0)


def direct_cold(rig: Rig, vols: list[str]) -> float:
    """Volumes of this host's direct pool copied to the second host's, each with
    vol-create-as + vol-download | vol-upload: seconds. Then the copies are checked by
    size (not timed) and both sides removed."""
    assert rig.host is not None and rig.local is not None and rig.remote is not None
    local = rig.local.storagePoolLookupByName(rig.direct_pool)
    local.refresh(0)
    remote_uri = rig.host.uri()
    start = time.perf_counter()
    for vol in vols:
        virsh(remote_uri, "vol-create-as", rig.direct_pool, vol, "0", "--format", "raw")
        subprocess.run(
            ["bash", "-o", "pipefail", "-c",
             f"virsh -q -c {LOCAL} vol-download --pool {rig.direct_pool} {vol} /dev/stdout"
             f" | virsh -q -c {shlex.quote(remote_uri)} vol-upload --pool {rig.direct_pool}"
             f" {vol} /dev/stdin"], check=True)
    took = time.perf_counter() - start
    remote = rig.remote.storagePoolLookupByName(rig.direct_pool)
    remote.refresh(0)
    for vol in vols:
        want = local.storageVolLookupByName(vol).info()[1]
        size = remote.storageVolLookupByName(vol).info()[1]
        if size != want:
            raise RuntimeError(f"direct copy of {vol}: {size} bytes, not {want}")
        remote.storageVolLookupByName(vol).delete(0)
        local.storageVolLookupByName(vol).delete(0)
    return took


# -- the run ---------------------------------------------------------------------------------


def nanod_live(rig: Rig, image: Path, i: int, events: JobEvents, xml: list[str]
               ) -> tuple[float, float, float]:
    """A running guest through nanod: (seconds, downtime ms, libvirt's job seconds). Its
    domain XML goes to `xml` (the direct domain's shape)."""
    assert rig.nano is not None and rig.local is not None and rig.remote is not None
    gid = new_guest(rig, image, f"live-{i}", [SYSTEM_DISK])
    rig.nano.ok("POST", f"/instances/{gid}", {})
    name = names().domain(gid)
    wait(lambda: rig.local.lookupByName(name).isActive(), 60, f"{name} running")
    xml[:] = [rig.local.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)]
    time.sleep(1.0)
    took = migrate(rig, gid, "live")
    figures = events.figures(name)
    delete_guest(rig, gid)
    return (took, *figures)


def live_round(rig: Rig, image: Path, i: int, events: JobEvents,
               xml: list[str]) -> tuple[float, ...]:
    """Both moves, nanod's first in even rounds, the direct one first in odd ones (the
    first round gives the direct domain its shape)."""
    if i % 2 == 0 or not xml:
        nanod = nanod_live(rig, image, i, events, xml)
        direct = direct_live(rig, xml[0], image, i, events)
    else:
        direct = direct_live(rig, xml[0], image, i, events)
        nanod = nanod_live(rig, image, i, events, xml)
    return (*nanod, *direct)


def cold_round(rig: Rig, image: Path, data: Path, size: int, i: int) -> tuple[float,
                                                                                 float]:
    """A stopped guest whose data disk holds `data`, moved through nanod; then the same
    two volume files (copied aside before the move) copied directly: (seconds, seconds)."""
    assert rig.nano is not None and rig.local is not None
    gid = new_guest(rig, image, f"cold-{i}", [SYSTEM_DISK, size])
    pool = rig.workdir / "pool"
    files = [pool / names().volume(gid, 0), pool / names().volume(gid, 1)]
    subprocess.run(["qemu-img", "convert", "-q", "-n", "-f", "raw", "-O", "qcow2", str(data),
                    str(files[1])], check=True)
    rig.local.storagePoolLookupByName(names().local_pool(rig.local_cell)).refresh(0)
    vols = []
    for n, path in enumerate(files):
        vol = f"{PREFIX}-{rig.tag}-c{i}-{n}"
        shutil.copyfile(path, rig.workdir / "cold" / vol)
        vols.append(vol)
    if i % 2:  # the direct copy first in odd rounds
        direct = direct_cold(rig, vols)
    took = migrate(rig, gid, "cold")
    delete_guest(rig, gid)
    if i % 2 == 0:
        direct = direct_cold(rig, vols)
    return took, direct


def random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        for _ in range(size // (16 * MiB)):
            fh.write(os.urandom(16 * MiB))
        fh.write(os.urandom(size % (16 * MiB)))
    return path


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="live migrations of each kind")
    parser.add_argument("--cold-repeat", type=int, default=3,
                        help="cold migrations of each kind")
    parser.add_argument("--cold-mib", type=int, default=1024)
    parser.add_argument("--log", type=Path, help="keep nanod's log there")
    add_quick(parser, {"repeat": 1, "cold_repeat": 1, "cold_mib": 64})
    args = parse(parser)
    why = unavailable()
    if why:
        cannot_run(why)
    event_loop()
    libvirt.registerErrorHandler(lambda *_: None, None)  # errors are raised, not printed
    try:
        local = libvirt.open(LOCAL)
    except libvirt.libvirtError as exc:
        cannot_run(f"{LOCAL} is not reachable: {exc}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tag = f"bm{os.getpid() % 1000000}"
    base = Path("/var/tmp")
    workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-{tag}-", dir=base))
    workdir.chmod(0o755)
    rig = Rig(tag, workdir)
    rig.local = local
    live: list[tuple[float, ...]] = []
    cold: list[tuple[float, float]] = []
    try:
        rig.up("qemu")
        assert rig.nano is not None and rig.remote is not None
        events = JobEvents(local)
        image = counter_disk(workdir / "counter.qcow2")
        rig.use_storage(rig.storage)
        xml: list[str] = []
        for i in range(args.repeat):
            live.append(live_round(rig, image, i, events, xml))
            t, d, j, dt, dd, dj = live[-1]
            print(f"live {i + 1}/{args.repeat}: nanod {t:.2f} s (libvirt's job {j:.2f} s, "
                  f"downtime {d:.0f} ms); direct {dt:.2f} s (libvirt's job {dj:.2f} s, "
                  f"downtime {dd:.0f} ms)", flush=True)
        events.close()
        rig.use_storage("")
        direct_pools(rig)
        data = random_file(workdir / "random.raw", args.cold_mib * MiB)
        for i in range(args.cold_repeat):
            cold.append(cold_round(rig, image, data, args.cold_mib * MiB, i))
            t, dt = cold[-1]
            print(f"cold {i + 1}/{args.cold_repeat} ({args.cold_mib} MiB data disk): nanod "
                  f"{t:.2f} s; direct {dt:.2f} s", flush=True)
    except BaseException:
        log = workdir / "nanod.log"
        if log.exists():
            tail = log.read_text(errors="replace").splitlines()[-40:]
            print("nanod.log (tail):\n" + "\n".join(tail), file=sys.stderr)
        raise
    finally:
        rig.close()
        if args.log and (workdir / "nanod.log").exists():
            shutil.copyfile(workdir / "nanod.log", args.log)
        shutil.rmtree(workdir, ignore_errors=True)
    report(live, cold, args)


def report(live: list[tuple[float, ...]], cold: list[tuple[float, float]],
           args: argparse.Namespace) -> None:
    n = args.repeat
    t, d, j, dt, dd, dj = (median([row[k] for row in live]) for k in range(6))
    print(f"live migration, {MEMORY // MiB} MiB guest on shared storage, median of {n}: "
          f"nanod {t:.2f} s (libvirt's job {j:.2f} s, downtime {d:.0f} ms), direct {dt:.2f} s"
          f" (libvirt's job {dj:.2f} s, downtime {dd:.0f} ms)")
    print(f"live migration: nanod/direct time ratio {t / dt:.2f} (goal <= 1.2)")
    print(f"live migration: nanod/direct downtime ratio {d / dd:.2f} (goal <= 1.2)")
    c, dc = (median([row[k] for row in cold]) for k in range(2))
    print(f"cold migration, {args.cold_mib} MiB random data disk, median of "
          f"{args.cold_repeat}: nanod {c:.2f} s (copy checked by sha1sum on the target), direct "
          f"{dc:.2f} s (vol-download | vol-upload)")
    print(f"cold migration: nanod/direct time ratio {c / dc:.2f} (goal <= 1.2)")
    load = open("/proc/loadavg").read().split()[:3]
    print(f"load average at the end: {' '.join(load)}")


if __name__ == "__main__":
    main()
