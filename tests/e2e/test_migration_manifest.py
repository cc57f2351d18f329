"""A Guest manifest whose `cell` changes is a migration, not a replacement: `nanod apply
--diff --check` shows `[cold migration]` for a stopped guest and changes nothing, `nanod
apply --wait` moves it (the same guest id, on the second host's libvirtd), and applying the
same manifest again finds nothing to do. The cells are this host's libvirtd and the second
host (scripts/second-host)."""

from __future__ import annotations

import uuid
from pathlib import Path

import libvirt
import pytest

from reconciler.naming import names
from tests.conftest import TEST_NAMES_PREFIX as PREFIX
from tests.e2e.conftest import Nanod, lines
from tests.helpers.second_host import SecondHost
from tests.integration.conftest import remove_cell_leftovers
from tests.integration.test_faults import wait

pytestmark = pytest.mark.integration
MIB = 1 << 20


@pytest.fixture
def nanod_config(second_host: SecondHost) -> str:
    key_dir = Path(second_host.state["key_file"]).parent
    return (f"ssh: {{key_dir: {key_dir}}}\n"
            "reconciler: {workers: 2, resync_seconds: 2, probe_seconds: 1, offline_after: 3,"
            " guest_poll_seconds: 2}\n")


@pytest.fixture
def tag(second_host: SecondHost):
    """This run's tag; taken before `nanod`, so the cleanup runs after nanod stopped (a
    running reconciler would make the pools again)."""
    tag = uuid.uuid4().hex[:6]
    yield tag
    conn = libvirt.open("qemu:///system")
    remove_cell_leftovers(conn, f"{PREFIX}-mm-{tag}")
    conn.close()
    conn = libvirt.open(second_host.uri())
    remove_cell_leftovers(conn, f"{PREFIX}-{second_host.name}")
    conn.close()


@pytest.fixture
def cells(tag: str, nanod: Nanod, second_host: SecondHost, qemu_dir: Path):
    local, pool = f"mm-{tag}", f"mp-{tag}"
    body = {"libvirt_uri": "qemu:///system", "virt_type": "qemu",
            "storage_path": str(qemu_dir / "pool")}
    assert nanod.call("POST", f"/cells/{local}", body)["error_code"] == 0
    assert nanod.call("POST", f"/cells/{second_host.name}", second_host.body)[
        "error_code"] == 0
    assert nanod.call("POST", f"/compute_pools/{pool}", {})["error_code"] == 0
    for cell in (local, second_host.name):
        wait(lambda cell=cell: nanod.data_of(f"/cells/{cell}")["alive"], 60, f"{cell} alive")
        assert nanod.call("POST", f"/compute_pool_cells/{pool}/{cell}", {})["error_code"] == 0
    return {"local": local, "h2": second_host.name, "pool": pool, "tag": tag}


def manifest(path: Path, cells: dict[str, str], cell: str) -> Path:
    path.write_text(f"""kind: Guest
name: mover-{cells['tag']}
spec:
  pool: {cells['pool']}
  cell: {cell}
  cores: 1
  memory: {64 * MIB}
  disks: [{32 * MIB}, {16 * MIB}]
  power: stopped
""")
    return path


def test_a_new_cell_in_a_manifest_moves_the_guest(tag, nanod: Nanod, cells, second_host,
                                                 tmp_path: Path) -> None:
    first = manifest(tmp_path / "guest.yaml", cells, cells["local"])
    done = nanod.run("apply", "-f", str(first), "--wait", "120")
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = [g for g in nanod.data_of(f"/guest_search/?pool={cells['pool']}")]
    gid = row["id"]
    assert row["cell"] == cells["local"]

    moved = manifest(tmp_path / "guest.yaml", cells, cells["h2"])
    check = nanod.run("apply", "-f", str(moved), "--diff", "--check")
    assert check.returncode == 0, check.stdout + check.stderr
    out = lines(check.stdout)
    assert f"~ cell: '{cells['local']}' -> '{cells['h2']}' [cold migration]" in out, out
    assert nanod.data_of(f"/guests/{gid}")["cell"] == cells["local"]  # --check changed nothing

    done = nanod.run("apply", "-f", str(moved), "--wait", "180")
    assert done.returncode == 0, done.stdout + done.stderr
    after = nanod.data_of(f"/guests/{gid}")
    assert after["cell"] == cells["h2"]  # the same guest (its id), moved
    conn = libvirt.open(second_host.uri())
    try:
        dom = conn.lookupByName(names().domain(gid))
        assert dom.isPersistent() and not dom.isActive()
    finally:
        conn.close()
    again = nanod.run("apply", "-f", str(moved), "--diff", "--check")
    assert again.returncode == 0 and "cell" not in again.stdout, again.stdout
