"""Tiny bootable disks for guests that must run real guest code without an operating
system: `reconciler.bootsector.hello_sector` (prints a line on the serial console, then
halts or powers off through ACPI) as the first sector of a qcow2 disk image.

Used by the guest status tests on the real cell (a guest that powers itself off must stay
off and say so; one that prints shows a sign of life).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from reconciler.bootsector import hello_sector


def boot_disk(path: Path, message: str, *, power_off: bool, size: int = 1 << 20) -> Path:
    """A qcow2 disk image at `path` whose first sector is `hello_sector(...)`."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as fh:
        fh.write(hello_sector(message, power_off=power_off))
        fh.truncate(size)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(path)], check=True)
    raw.unlink()
    return path
