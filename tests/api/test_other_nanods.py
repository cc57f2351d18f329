"""Two nanods on one host (reconciler/naming.py): a cell whose libvirt holds guests of
another nanod (our ownership mark, another names prefix: here a production `nano`
installation beside the tests' `nanotest`) counts their load, but they are neither ours
nor reported among the cell's unowned domains, and the cell is Ready."""

from __future__ import annotations

import pytest

from reconciler.drivers.libvirt_hv import LibvirtHypervisor
from reconciler.naming import using
from tests.api.test_compute import settings, until  # noqa: F401  (fixture)
from tests.conftest import TEST_NAMES_PREFIX
from tests.helpers.testdriver import write_test_cell


def test_the_driver_tells_ours_from_another_nanods(tmp_path):
    with using("nano"):
        theirs = write_test_cell(tmp_path / "cell.xml", cpus=4, memory_kib=8 << 20, domains=2)
    assert [d.name for d in theirs.domains] == [f"nano-{d.owned_id}" for d in theirs.domains]
    hv = LibvirtHypervisor(theirs.uri)
    try:
        listed = hv.list_domains()
        assert {(d.name, d.owned_id, d.foreign) for d in listed} == {
            (d.name, None, True) for d in theirs.domains}
        with using("nano"):  # seen by the production nanod: its own
            assert {(d.owned_id, d.foreign) for d in hv.list_domains()} == {
                (d.owned_id, False) for d in theirs.domains}
    finally:
        hv.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_cell_with_another_nanods_guests(api, tmp_path):
    with using("nano"):
        theirs = write_test_cell(tmp_path / "cell.xml", cpus=8, memory_kib=16 << 20,
                                 domains=2)
    await api.ok("POST", "/cells/shared", {"libvirt_uri": theirs.uri, "virt_type": "qemu",
                                          "storage_path": str(tmp_path / "images")})

    async def probed():
        rec = await api.ok("GET", "/cells/shared")
        return rec if rec["alive"] else None

    rec = await until(probed, what="cell alive")
    observed = rec["status"]["observed"]
    assert observed["domains"] == 2 and observed["stats"]["cpu_usage"] == 2  # their load
    assert observed["unowned_domains"] == [] and observed["owned_domains"] == 0
    assert [p["name"] for p in observed["storage_pools"]] == [f"{TEST_NAMES_PREFIX}-shared"]
    conds = {c["type"]: c["status"] for c in rec["status"]["conditions"]}
    assert conds["Ready"] is True
