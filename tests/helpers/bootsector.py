"""Tiny bootable disks for guests that must run real guest code without an operating
system: a 512-byte boot sector (assembled here, byte by byte) that SeaBIOS loads, which
prints a line to the first serial port and then either halts or powers the machine off
through ACPI (PM1a control at port 0x604: QEMU's i440fx, the machine libvirt gives our
guests), exactly as a guest OS shutting itself down would.

Used by the guest status tests on the real cell (a guest that powers itself off must stay
off and say so).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

SERIAL = 0x3F8      # COM1
PM1A_CONTROL = 0x604
S5_SLEEP = 0x2000   # SLP_EN with SLP_TYP 0: soft off


def boot_sector(message: str, *, power_off: bool) -> bytes:
    """The boot sector: print `message` + CRLF on COM1, then power off (or halt)."""
    text = message.encode("ascii") + b"\r\n\0"
    code = bytearray()
    code += b"\xfa\x31\xc0\x8e\xd8"                        # cli; xor ax,ax; mov ds,ax
    code += b"\xba" + SERIAL.to_bytes(2, "little")         # mov dx, COM1
    si_at = len(code) + 1
    code += b"\xbe\x00\x00"                                # mov si, message (fixed below)
    loop = len(code)
    code += b"\xac\x84\xc0"                                # lodsb; test al,al
    jz_at = len(code)
    code += b"\x74\x00"                                    # jz done (fixed below)
    code += b"\xee"                                        # out dx, al
    code += bytes([0xEB, (loop - (len(code) + 2)) & 0xFF])  # jmp loop
    code[jz_at + 1] = len(code) - (jz_at + 2)
    if power_off:
        code += b"\xba" + PM1A_CONTROL.to_bytes(2, "little")  # mov dx, PM1a_CNT
        code += b"\xb8" + S5_SLEEP.to_bytes(2, "little")      # mov ax, SLP_EN
        code += b"\xef"                                       # out dx, ax
    halt = len(code)
    code += b"\xf4"                                        # hlt
    code += bytes([0xEB, (halt - (len(code) + 2)) & 0xFF])  # jmp halt
    code[si_at:si_at + 2] = (0x7C00 + len(code)).to_bytes(2, "little")
    code += text
    if len(code) > 510:
        raise ValueError("message too long for a boot sector")
    return bytes(code).ljust(510, b"\0") + b"\x55\xaa"


def boot_disk(path: Path, message: str, *, power_off: bool, size: int = 1 << 20) -> Path:
    """A qcow2 disk image at `path` whose first sector is `boot_sector(...)`."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as fh:
        fh.write(boot_sector(message, power_off=power_off))
        fh.truncate(size)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(path)], check=True)
    raw.unlink()
    return path
