"""Does KVM on a libvirt host really run guest code? `choose_virt_type(uri)` answers with
the virt type a cell should use ("kvm" or "qemu") and why.

Called by `nanod init --virt-type auto` (so by `scripts/setup`) before it registers the
local cell. A usable `/dev/kvm` is not enough: on some VM classes (nested, or a
paravirtual KVM such as PVM) QEMU starts with `-accel kvm`, libvirt shows the domain
running, and the guest's instructions are emulated one by one, thousands of times slower
than TCG: a Linux kernel then prints nothing for minutes and every guest hangs silently.
So the probe boots real guest code under KVM and watches its output:

- `boot_sector()` is a 512-byte x86 boot sector built here: SeaBIOS loads it, it prints
  `START_MARKER` to COM1 in real mode, switches straight to 64-bit long mode (identity
  paging), counts down a loop of `LOOP_ITERATIONS`, prints `OK_MARKER` and halts. Under
  KVM at hardware speed the loop takes milliseconds; under TCG well under a second;
  under instruction emulation minutes.
- `run_probe(uri, virt_type)` boots it in a transient libvirt domain (as nanod's guests
  run: QEMU as libvirt's user) with its serial console in a file, waits at most
  `timeout` seconds for `OK_MARKER`, then destroys the domain and removes its files.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt

from reconciler.bootsector import Asm, print_loop, sector
from reconciler.drivers.libvirt_hv import LibvirtHypervisor, libvirt_errors
from state.errors import NanoError

START_MARKER = b"NANO-PROBE: guest code runs\r\n"
OK_MARKER = b"NANO-PROBE-OK: 64-bit loop done\r\n"
#: Enough work that emulation cannot finish it in time (about 6 us per iteration measured
#: under PVM: 2 minutes) while TCG needs a fraction of a second and KVM milliseconds.
LOOP_ITERATIONS = 20_000_000
DEFAULT_TIMEOUT = 10.0
#: Where the probe's disk and console live: QEMU (libvirt's user) must reach them, and
#: pytest's or root's private temporary directories are not reachable.
WORK_BASE = "/var/tmp"


def boot_sector(iterations: int = LOOP_ITERATIONS) -> bytes:
    """The probe's boot sector (512 bytes ending in 55 AA); see the module docstring."""
    asm = Asm(0x7C00)
    # -- 16-bit real mode, as SeaBIOS leaves us at 0000:7C00
    asm.emit(b"\xfa\xfc")                 # cli; cld
    asm.emit(b"\x31\xc0\x8e\xd8\x8e\xc0\x8e\xd0")  # xor ax,ax; mov ds/es/ss, ax
    asm.emit(b"\xbc\x00\x7c")             # mov sp, 0x7c00
    asm.emit(b"\xbe")                     # mov si, start_msg
    asm.ref("abs16", "start_msg")
    asm.emit(b"\xba\xf8\x03")             # mov dx, 0x3f8 (COM1)
    print_loop(asm, "print16")
    # identity-map the first 2 MiB: PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000 (2 MiB page)
    asm.emit(b"\xbf\x00\x10\xb9\x00\x18\x31\xc0\xf3\xab")  # mov di,0x1000; mov cx,0x1800;
    #                                                         xor ax,ax; rep stosw
    asm.emit(b"\xc7\x06\x00\x10\x03\x20")  # mov word [0x1000], 0x2003
    asm.emit(b"\xc7\x06\x00\x20\x03\x30")  # mov word [0x2000], 0x3003
    asm.emit(b"\xc7\x06\x00\x30\x83\x00")  # mov word [0x3000], 0x0083
    asm.emit(b"\x0f\x20\xe0\x66\x83\xc8\x20\x0f\x22\xe0")  # cr4 |= PAE
    asm.emit(b"\x66\xb8\x00\x10\x00\x00\x0f\x22\xd8")      # cr3 = 0x1000
    asm.emit(b"\x66\xb9\x80\x00\x00\xc0\x0f\x32")          # rdmsr EFER
    asm.emit(b"\x66\x0d\x00\x01\x00\x00\x0f\x30")          # EFER |= LME; wrmsr
    asm.emit(b"\x0f\x01\x16")                               # lgdt [gdtr]
    asm.ref("abs16", "gdtr")
    asm.emit(b"\x0f\x20\xc0\x66\x0d\x01\x00\x00\x80\x0f\x22\xc0")  # cr0 |= PG | PE
    asm.emit(b"\xea")                                       # jmp 0x08:long_mode
    asm.ref("abs16", "long_mode")
    asm.emit(b"\x08\x00")
    # -- 64-bit long mode
    asm.label("long_mode")
    asm.emit(b"\xb9" + struct.pack("<I", iterations))      # mov ecx, iterations
    asm.emit(b"\xff\xc9\x75\xfc")                           # 1: dec ecx; jnz 1b
    asm.emit(b"\x48\x8d\x35")                               # lea rsi, [rip + ok_msg]
    asm.ref("rel32", "ok_msg")
    asm.emit(b"\x66\xba\xf8\x03")                           # mov dx, 0x3f8
    print_loop(asm, "print64")
    asm.label("halt")
    asm.emit(b"\xf4\xeb")                                   # hlt; jmp halt
    asm.ref("rel8", "halt")
    while len(asm.code) % 8:
        asm.emit(b"\0")
    asm.label("gdt")  # null, 64-bit code (selector 0x08)
    asm.emit(struct.pack("<QQ", 0, 0x00209A0000000000))
    asm.label("gdtr")
    asm.emit(struct.pack("<HI", 15, 0x7C00 + asm.labels["gdt"]))
    asm.label("start_msg")
    asm.emit(START_MARKER + b"\0")
    asm.label("ok_msg")
    asm.emit(OK_MARKER + b"\0")
    return sector(asm)


def probe_domain_xml(name: str, virt_type: str, disk: str, console: str) -> str:
    """A minimal transient domain: one IDE disk holding the boot sector, COM1 to a file,
    no network, display or balloon."""
    dom = ET.Element("domain", type=virt_type)
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = "16"
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_el, "boot", dev="hd")
    devices = ET.SubElement(dom, "devices")
    disk_el = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk_el, "driver", name="qemu", type="raw")
    ET.SubElement(disk_el, "source", file=disk)
    ET.SubElement(disk_el, "target", dev="hda", bus="ide")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=console)
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


@dataclass(frozen=True)
class ProbeResult:
    """What one probe saw: `ok` when the boot sector finished its loop within `timeout`;
    `started` when at least its first line arrived; `output` is the console's text."""

    virt_type: str
    ok: bool
    started: bool
    seconds: float
    timeout: float
    output: str
    error: str = ""

    def why(self) -> str:
        """One line for people: what the guest did (or not) under this virt type."""
        if self.error:
            return f"{self.virt_type} guest could not start: {self.error}"
        if self.ok:
            return (f"a {self.virt_type} guest ran {LOOP_ITERATIONS:,} loop iterations and "
                    f"printed to its serial console in {self.seconds:.1f} s")
        if self.started:
            return (f"{self.virt_type.upper()} ran the probe's first instructions but not "
                    f"its {LOOP_ITERATIONS:,}-iteration loop in {self.timeout:g} s (guest "
                    "code is emulated, not run by the CPU: an OS would not boot)")
        return (f"{self.virt_type.upper()} started but executed no guest code in "
                f"{self.timeout:g} s")


def run_probe(uri: str, virt_type: str, *, timeout: float = DEFAULT_TIMEOUT) -> ProbeResult:
    """Boot the probe under `virt_type` (kvm or qemu) on `uri` and wait for its output;
    the domain and its files are gone when this returns, whatever happened."""
    work = tempfile.mkdtemp(prefix="nanoprobe-kvm-", dir=WORK_BASE)
    os.chmod(work, 0o755)  # QEMU runs as libvirt's user
    disk = os.path.join(work, "boot.img")
    console = os.path.join(work, "console.log")
    with open(disk, "wb") as fh:
        fh.write(boot_sector().ljust(1 << 20, b"\0"))  # a whole MiB: SeaBIOS sees a disk
    name = f"nanoprobe-kvm-{uuid.uuid4().hex[:8]}"
    hv = LibvirtHypervisor(uri)
    domain: libvirt.virDomain | None = None
    try:
        try:
            domain = hv.call(f"start the {virt_type} probe domain on {uri}",
                             lambda c: c.createXML(
                                 probe_domain_xml(name, virt_type, disk, console),
                                 libvirt.VIR_DOMAIN_START_AUTODESTROY))
        except NanoError as exc:
            return ProbeResult(virt_type, False, False, 0.0, timeout, "", exc.message)
        started = time.monotonic()
        output = b""
        while True:
            output = _read(console)
            elapsed = time.monotonic() - started
            if OK_MARKER in output or elapsed > timeout:
                break
            time.sleep(0.1)
        return ProbeResult(virt_type, OK_MARKER in output, START_MARKER in output,
                           round(elapsed, 2), timeout, output.decode(errors="replace"))
    finally:
        if domain is not None:
            try:
                with libvirt_errors(f"destroy probe domain {name}"):
                    domain.destroy()
            except NanoError:
                pass  # gone already: autodestroy or it stopped by itself
        hv.close()  # closing also autodestroys a domain we lost track of
        shutil.rmtree(work, ignore_errors=True)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return b""


def choose_virt_type(uri: str = "qemu:///system", *, timeout: float = DEFAULT_TIMEOUT,
                     kvm_device: str = "/dev/kvm") -> tuple[str, str]:
    """("kvm" | "qemu", why): kvm only when a KVM guest really ran the probe."""
    if not os.path.exists(kvm_device):
        return "qemu", f"no {kvm_device}: using TCG (qemu)"
    result = run_probe(uri, "kvm", timeout=timeout)
    if result.ok:
        return "kvm", result.why()
    return "qemu", f"{result.why()}: using TCG (qemu)"
