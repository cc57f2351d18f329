"""Tiny bootable disks for guests that must run real guest code without an operating
system: `reconciler.bootsector.hello_sector` (prints a line on the serial console, then
halts or powers off through ACPI) as the first sector of a qcow2 disk image.

Used by the guest status tests on the real cell (a guest that powers itself off must stay
off and say so; one that prints shows a sign of life).
"""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

from reconciler.bootsector import COM1, Asm, hello_sector, sector


def boot_disk(path: Path, message: str, *, power_off: bool, size: int = 1 << 20) -> Path:
    """A qcow2 disk image at `path` whose first sector is `hello_sector(...)`."""
    return _disk(path, hello_sector(message, power_off=power_off), size)


def _disk(path: Path, first_sector: bytes, size: int) -> Path:
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as fh:
        fh.write(first_sector)
        fh.truncate(size)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(path)], check=True)
    raw.unlink()
    return path


def counter_sector() -> bytes:
    """A sector that prints an increasing counter on COM1 every 100 ms, as four hex digits
    and CRLF ("0000", "0001", ...), forever: a guest whose console shows whether it kept
    running (a live migration) or started again (a reboot)."""
    asm = Asm(0x7C00)
    asm.emit(b"\xfa\x31\xc0\x8e\xd8\x8e\xd0")             # cli; xor ax,ax; mov ds,ax; mov ss,ax
    asm.emit(b"\xbc\x00\x7c\xfb")                         # mov sp, 0x7c00; sti
    asm.emit(b"\xc7\x06\x00\x05\x00\x00")                 # mov word [0x500], 0
    asm.label("line")
    asm.emit(b"\xba" + struct.pack("<H", COM1))            # mov dx, COM1
    asm.emit(b"\xa1\x00\x05")                             # mov ax, [0x500]
    asm.emit(b"\xb9\x04\x00")                             # mov cx, 4
    asm.label("digit")
    asm.emit(b"\xc1\xc0\x04\x50")                         # rol ax, 4; push ax
    asm.emit(b"\x24\x0f\x04\x30\x3c\x39\x76\x02\x04\x07")  # and al,15; add al,'0'; cmp al,'9'; jbe +2; add al,7
    asm.emit(b"\xee\x58\xe2")                             # out dx, al; pop ax; loop digit
    asm.ref("rel8", "digit")
    asm.emit(b"\xb0\x0d\xee\xb0\x0a\xee")                 # CR, LF
    asm.emit(b"\xff\x06\x00\x05")                         # inc word [0x500]
    asm.emit(b"\xb4\x86\xb9\x01\x00\xba\xa0\x86\xcd\x15")  # int 15h AH=86h: wait 100000 us
    asm.emit(b"\xeb")                                     # jmp line
    asm.ref("rel8", "line")
    return sector(asm)


def counter_disk(path: Path, *, size: int = 1 << 20, noise: int = 0) -> Path:
    """A qcow2 disk image at `path` whose first sector is `counter_sector()`, followed by
    `noise` bytes of random data (a disk whose copy takes time: zeros copy for free)."""
    return _disk(path, counter_sector() + os.urandom(noise), max(size, 512 + noise))
