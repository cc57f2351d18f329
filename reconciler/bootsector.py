"""A tiny assembler for 512-byte x86 boot sectors, and the sectors nano boots to see guest
code run: SeaBIOS loads a sector at 0000:7C00 and jumps to it, no operating system needed.

Pure (bytes only). Used by the KVM probe (reconciler/drivers/kvmprobe.py: a sector that
proves KVM runs guest code at speed) and by the guest status tests (a sector that prints a
line on the serial console and halts, or powers the machine off through ACPI as an OS
shutting itself down would).
"""

from __future__ import annotations

import struct

COM1 = 0x3F8
PM1A_CONTROL = 0x604  # ACPI PM1a control on QEMU's i440fx (the machine libvirt gives guests)
S5_SLEEP = 0x2000     # SLP_EN with SLP_TYP 0: soft off


class Asm:
    """Just enough of an assembler for one boot sector: bytes, labels and fix-ups."""

    def __init__(self, origin: int) -> None:
        self.origin = origin
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str, str]] = []  # (offset, label, kind)

    def emit(self, data: bytes) -> None:
        self.code += data

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def ref(self, kind: str, label: str) -> None:
        """A placeholder for `label`: abs16 (address), rel8/rel32 (from the next byte)."""
        self.fixups.append((len(self.code), label, kind))
        self.code += b"\0" * {"abs16": 2, "rel8": 1, "rel32": 4}[kind]

    def link(self) -> bytes:
        for at, label, kind in self.fixups:
            target = self.labels[label]
            if kind == "abs16":
                self.code[at:at + 2] = struct.pack("<H", self.origin + target)
            elif kind == "rel8":
                self.code[at:at + 1] = struct.pack("<b", target - (at + 1))
            else:
                self.code[at:at + 4] = struct.pack("<i", target - (at + 4))
        return bytes(self.code)


def print_loop(asm: Asm, name: str) -> None:
    """`lodsb; test al, al; jz done; out dx, al; jmp loop` (same bytes in 16 and 64 bit)."""
    asm.label(name)
    asm.emit(b"\xac\x84\xc0\x74")         # lodsb; test al, al; jz
    asm.ref("rel8", name + "_done")
    asm.emit(b"\xee\xeb")                 # out dx, al; jmp
    asm.ref("rel8", name)
    asm.label(name + "_done")


def sector(asm: Asm) -> bytes:
    """The linked code as one bootable sector (510 bytes of code, then 55 AA)."""
    code = asm.link()
    if len(code) > 510:
        raise ValueError(f"boot sector code is {len(code)} bytes, more than 510")
    return code.ljust(510, b"\0") + b"\x55\xaa"


def hello_sector(message: str, *, power_off: bool) -> bytes:
    """A sector that prints `message` and CRLF on COM1, then powers off (ACPI soft-off)
    or halts."""
    asm = Asm(0x7C00)
    asm.emit(b"\xfa\x31\xc0\x8e\xd8")                     # cli; xor ax,ax; mov ds,ax
    asm.emit(b"\xba" + struct.pack("<H", COM1))            # mov dx, COM1
    asm.emit(b"\xbe")                                      # mov si, message
    asm.ref("abs16", "message")
    print_loop(asm, "print")
    if power_off:
        asm.emit(b"\xba" + struct.pack("<H", PM1A_CONTROL))  # mov dx, PM1a_CNT
        asm.emit(b"\xb8" + struct.pack("<H", S5_SLEEP))      # mov ax, SLP_EN
        asm.emit(b"\xef")                                    # out dx, ax
    asm.label("halt")
    asm.emit(b"\xf4\xeb")                                   # hlt; jmp halt
    asm.ref("rel8", "halt")
    asm.label("message")
    asm.emit(message.encode("ascii") + b"\r\n\0")
    return sector(asm)
