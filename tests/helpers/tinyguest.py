"""A real tiny guest for network tests: Debian's kernel and a busybox initramfs that asks
for an address with DHCP and says what it got on its serial console.

`build()` makes (once, cached under /var/tmp/nano-tests/cache) a kernel taken from Debian's
`linux-image-cloud-amd64` package (`apt-get download` + the package's data tarball, no
install; 26 MB instead of the generic kernel's 70, and it reaches /init under TCG in less
than half the time: fewer built-in drivers probe for hardware a VM does not have)
and an initramfs (cpio newc, gzip, written here in Python) holding the host's static
busybox and the package's virtio modules (virtio, virtio_ring, virtio_pci and its helpers,
failover, net_failover, virtio_net), loaded in dependency order read from each module's
`.modinfo`. Its /init brings up eth0, runs `udhcpc` until a lease comes, then prints
`NANO-ADDRESS=<ip>` to ttyS0 and serves TCP: port 80 and 81 answer "hello <port>" and close
(busybox `nc -ll -e`).

`domain_xml(...)` is a minimal transient domain (TCG, direct kernel boot, one virtio NIC on
a libvirt network with a given MAC, serial console to a file) for tests to create with
`createXML` and destroy: the running host kernel (a custom build without modules) plays no
part. `unavailable()` says why the guest cannot be built here ('' when it can).
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import os
import re
import shutil
import stat
import subprocess
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

CACHE = Path("/var/tmp/nano-tests/cache")
META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX = Path("/bin/busybox")
WANTED_MODULES = ("virtio_net", "virtio_pci")
SERVICE_PORTS = (80, 81)
ADDRESS_LINE = re.compile(r"NANO-ADDRESS=(\d+\.\d+\.\d+\.\d+)")

INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /var/run
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
say() { echo "$@" > /dev/ttyS0; }
say NANO-BOOT
for m in $(cat /lib/modules/order); do
  insmod "/lib/modules/$m.ko" || say "NANO-ERROR=insmod $m"
done
ip link set lo up
n=0
while ! ip link show eth0 >/dev/null 2>&1; do
  n=$((n + 1)); [ $n -gt 50 ] && say "NANO-ERROR=no eth0" && break; sleep 0.2
done
ip link set eth0 up
until udhcpc -i eth0 -s /bin/dhcp-event -n -q -t 5 -T 1; do say NANO-DHCP-RETRY; sleep 1; done
for p in PORTS; do nc -ll -p $p -e /bin/hello $p & done
say NANO-READY
while true; do sleep 3600; done
""".replace("PORTS", " ".join(map(str, SERVICE_PORTS)))

DHCP_EVENT = """#!/bin/sh
case "$1" in
  bound|renew)
    ifconfig "$interface" "$ip" netmask "$subnet" up
    if [ -n "$router" ]; then
      route del default 2>/dev/null
      route add default gw "${router%% *}" dev "$interface"
    fi
    echo "NANO-ADDRESS=$ip" > /dev/ttyS0
    echo "NANO-ROUTER=${router%% *}" > /dev/ttyS0
    ;;
esac
exit 0
"""

HELLO = """#!/bin/sh
echo "hello $1"
"""


@dataclass(frozen=True)
class TinyImage:
    kernel: Path
    initrd: Path
    version: str  # the kernel package's version


def unavailable() -> str:
    """'' when a tiny guest can be built here, else why not."""
    if os.geteuid() != 0:
        return "the tiny guest is built and booted as root"
    if not BUSYBOX.exists():
        return "busybox-static is not installed (/bin/busybox missing)"
    for tool in ("apt-get", "apt-cache", "dpkg-deb"):
        if shutil.which(tool) is None:
            return f"{tool} is missing: not a Debian host"
    return ""


def _run(argv: list[str], *, cwd: Path | None = None, timeout: float = 600) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {(done.stderr or done.stdout).strip()[-500:]}")
    return done.stdout


def _kernel_package() -> str:
    """The versioned package the meta package points at (linux-image-6.1.0-NN-amd64)."""
    out = _run(["apt-cache", "depends", META_PACKAGE])
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    raise RuntimeError(f"apt-cache names no kernel package behind {META_PACKAGE}")


def _download(debs: Path) -> Path:
    found = sorted(debs.glob("linux-image-*-cloud-amd64_*_amd64.deb"))
    if found:
        return found[-1]
    package = _kernel_package()
    _run(["apt-get", "download", package], cwd=debs, timeout=900)
    found = sorted(debs.glob(f"{package}_*_amd64.deb"))
    if not found:
        raise RuntimeError(f"apt-get download {package} left no .deb in {debs}")
    return found[-1]


def _modinfo_depends(data: bytes) -> list[str]:
    match = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", data)
    if not match or not match.group(1):
        return []
    return [name.decode() for name in match.group(1).split(b",") if name]


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _extract(deb: Path) -> tuple[str, bytes, dict[str, bytes]]:
    """(kernel version, vmlinuz bytes, {module name: .ko bytes} of every module in the
    package's kernel/drivers/{virtio,net} and net/core directories)."""
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                          check=True, timeout=300).stdout
    kernel = b""
    version = ""
    modules: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            name = member.name
            if re.fullmatch(r"\./boot/vmlinuz-.*", name):
                version = name.split("vmlinuz-", 1)[1]
                kernel = tar.extractfile(member).read()  # type: ignore[union-attr]
            elif name.endswith(".ko") and re.search(
                    r"/kernel/(drivers/virtio|drivers/net|net/core)/[^/]+\.ko$", name):
                modules[_norm(Path(name).stem)] = tar.extractfile(member).read()  # type: ignore[union-attr]
    if not kernel:
        raise RuntimeError(f"{deb.name} holds no /boot/vmlinuz-*")
    return version, kernel, modules


def _load_order(modules: dict[str, bytes], wanted: tuple[str, ...]) -> list[str]:
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise RuntimeError(f"module dependency cycle: {' -> '.join(path + (name,))}")
        if name not in modules:
            raise RuntimeError(f"module {name} is not in the package's virtio/net modules")
        for dep in _modinfo_depends(modules[name]):
            visit(_norm(dep), path + (name,))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


def _cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio 'newc' archive of (path, mode, data) entries (directories have no data)."""
    out = io.BytesIO()

    def pad(n: int) -> None:
        out.write(b"\0" * ((4 - n % 4) % 4))

    for ino, (path, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        name = path.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        header = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name), 0))
        out.write(header.encode())
        out.write(name)
        pad(110 + len(name))
        out.write(data)
        pad(len(data))
    return out.getvalue()


def _initramfs(modules: dict[str, bytes], order: list[str]) -> bytes:
    directory, program, plain = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755, stat.S_IFREG | 0o644
    entries: list[tuple[str, int, bytes]] = [
        (d, directory, b"") for d in ("bin", "dev", "proc", "sys", "tmp", "etc", "lib",
                                       "lib/modules", "run", "var")]
    entries += [
        ("bin/busybox", program, BUSYBOX.read_bytes()),
        ("init", program, INIT.encode()),
        ("bin/dhcp-event", program, DHCP_EVENT.encode()),
        ("bin/hello", program, HELLO.encode()),
        ("lib/modules/order", plain, ("\n".join(order) + "\n").encode()),
    ]
    entries += [(f"lib/modules/{name}.ko", plain, modules[name]) for name in order]
    return gzip.compress(_cpio(entries), compresslevel=6, mtime=0)


def build(cache: Path = CACHE) -> TinyImage:
    """The kernel and initramfs, built on first use and then taken from `cache`. Safe to
    call from several processes (a lock file serialises builds). Raises RuntimeError when
    the package cannot be had (no mirror, ...)."""
    for path in (cache.parent, cache, cache / "debs", cache / "tiny"):
        path.mkdir(mode=0o755, exist_ok=True)
        path.chmod(0o755)  # QEMU (libvirt-qemu) reads the kernel and initramfs here
    with open(cache / "tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        deb = _download(cache / "debs")
        recipe = hashlib.sha1(INIT.encode() + DHCP_EVENT.encode() + HELLO.encode()
                              + BUSYBOX.read_bytes() + deb.name.encode()).hexdigest()[:12]
        kernel, initrd = cache / "tiny" / f"vmlinuz-{deb.stem}", cache / "tiny" / \
            f"initrd-{recipe}.gz"
        version = deb.stem.split("_")[1] if "_" in deb.stem else deb.stem
        if kernel.exists() and initrd.exists():
            return TinyImage(kernel, initrd, version)
        _release, vmlinuz, modules = _extract(deb)
        order = _load_order(modules, WANTED_MODULES)
        for path, data in ((kernel, vmlinuz), (initrd, _initramfs(modules, order))):
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.chmod(0o644)
            os.replace(tmp, path)
        return TinyImage(kernel, initrd, version)


def domain_xml(name: str, image: TinyImage, *, mac: str, network: str, console_log: Path,
               memory_mib: int = 256) -> str:
    """A transient TCG domain booting the tiny image with one virtio NIC (`mac`) on libvirt
    network `network`, its serial console written to `console_log`."""
    root = ET.Element("domain", type="qemu")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(root, "vcpu").text = "1"
    os_el = ET.SubElement(root, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_el, "kernel").text = str(image.kernel)
    ET.SubElement(os_el, "initrd").text = str(image.initrd)
    ET.SubElement(os_el, "cmdline").text = "console=ttyS0 loglevel=3 panic=-1"
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(root, event).text = "destroy"
    devices = ET.SubElement(root, "devices")
    nic = ET.SubElement(devices, "interface", type="network")
    ET.SubElement(nic, "source", network=network)
    ET.SubElement(nic, "mac", address=mac)
    ET.SubElement(nic, "model", type="virtio")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(console_log))
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(root, encoding="unicode")


def wait_for_line(console_log: Path, pattern: re.Pattern[str], *, timeout: float) -> str:
    """The first match of `pattern` in the console log (its group 1 when it has one),
    waiting up to `timeout` seconds; raises TimeoutError with the log's tail."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        try:
            text = console_log.read_text(errors="replace")
        except OSError:
            text = ""
        found = pattern.search(text)
        if found:
            return found.group(1) if pattern.groups else found.group(0)
        time.sleep(0.5)
    raise TimeoutError(f"no {pattern.pattern!r} on the console within {timeout:.0f}s; "
                       f"its tail: {text[-1500:]!r}")
