"""Ground truth about this host's kernel for tests, found by trying, not by reading what
nanod reads: whether the sfq qdisc (which libvirt needs to limit a NIC's bandwidth) can be
attached to a device, tried on a veth pair inside a network namespace made for it."""

from __future__ import annotations

import functools
import os
import subprocess


@functools.cache
def has_sfq() -> bool:
    name = f"nanotest-sfq-{os.getpid()}"

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", name, *argv], capture_output=True,
                              text=True, timeout=10)

    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        made = run("ip", "link", "add", "sfq0", "type", "veth", "peer", "name", "sfq1")
        if made.returncode != 0:
            raise RuntimeError(f"cannot make a veth pair to try sfq: {made.stderr.strip()}")
        return run("tc", "qdisc", "add", "dev", "sfq0", "root", "sfq").returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=10)
