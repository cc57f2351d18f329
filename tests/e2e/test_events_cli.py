"""`nanod apply --wait` and `nanod get -w` follow the event stream (nanod/watch.py) of a
real `nanod serve` with a test-driver cell: the wait ends converged with the stream's
events as its progress lines (stdout is no terminal here), and `get -w` prints the event of
a change made meanwhile.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.e2e.conftest import Nanod, lines
from tests.helpers.testdriver import write_test_cell

MANIFEST = """\
kind: Cell
name: sim-1
spec:
  libvirt_uri: test://{dir}/cell-1.xml
  virt_type: qemu
  storage_path: {dir}/images-1
"""


def test_apply_wait_and_get_watch_follow_the_stream(nanod: Nanod, tmp_path: Path):
    manifest = tmp_path / "cells.yaml"
    manifest.write_text(MANIFEST.format(dir=tmp_path))

    # the cell's node file appears only once the wait has begun: the cell can come
    # online only while `apply --wait` follows the stream
    applying = nanod.spawn("apply", "-f", str(manifest), "--wait", "60")
    assert applying.stdout is not None
    out = []
    for line in applying.stdout:
        out.append(" ".join(line.split()))
        if line.startswith("ok=0 changed=1 failed=0"):
            break
    write_test_cell(tmp_path / "cell-1.xml", cpus=4, memory_kib=8 << 20)
    rest, err = applying.communicate(timeout=120)
    out += lines(rest)
    assert applying.returncode == 0, "\n".join(out) + err
    assert out[-1].startswith("converged: 1 resource(s)")
    # the progress came from the stream: the cell's transition is one of its lines
    assert any(" Cell/sim-1 online" in line for line in out), "\n".join(out)

    watcher = nanod.spawn("get", "Cell", "sim-1", "-w", "60")
    try:
        assert watcher.stdout is not None
        head = [watcher.stdout.readline() for _ in range(2)]  # the table first
        assert head[0].split()[:2] == ["NAME", "PHASE"] and head[1].split()[0] == "sim-1"
        manifest.write_text(MANIFEST.format(dir=tmp_path).replace(
            "  virt_type: qemu\n", "  virt_type: qemu\n  enabled: false\n"))
        changed = nanod.run("apply", "-f", str(manifest))
        assert changed.returncode == 0, changed.stdout + changed.stderr
        while True:
            line = watcher.stdout.readline()
            assert line, "get -w ended before the change's event"
            if " Cell/sim-1 changed by admin" in line:
                break
    finally:
        os.kill(watcher.pid, signal.SIGTERM)
        watcher.wait(timeout=10)
