"""examples/quotas on a real `nanod serve` through the `nanod` CLI: apply (the Quota after its
group), re-apply (all ok), --check --diff of a changed limit, the change, export -> apply
round trip, and delete (the Quota before its group); and a guest create that the applied
quota refuses, on a test-driver cell, as an operator would meet it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.e2e.conftest import EXAMPLES, Nanod, lines
from tests.helpers.testdriver import write_test_cell

EXAMPLE = EXAMPLES / "quotas"
RESOURCES = ["Role/team-member", "UserGroup/team-a", "Quota/team-a"]
GIB = 1 << 30
LIMITS = {"cores": 16, "memory": 32 * GIB, "disk": 500 * GIB, "guests": 10,
          "image_storage": 100 * GIB}


def test_quota_example_lifecycle(nanod: Nanod, tmp_path: Path):
    first = nanod.run("apply", "-f", str(EXAMPLE))
    assert first.returncode == 0, first.stdout + first.stderr
    out = lines(first.stdout)
    assert [line.split()[:3] for line in out[:3]] == [
        ["changed", name, "created"] for name in RESOURCES]
    assert out[-1] == "ok=0 changed=3 failed=0"
    quota = nanod.data_of("/user_groups/team-a/quota")
    assert quota["limits"] == LIMITS
    assert quota["usage"] == {"cores": 0, "memory": 0, "disk": 0, "guests": 0,
                              "image_storage": 0}

    again = nanod.run("apply", "-f", str(EXAMPLE))
    assert lines(again.stdout) == [f"ok {name}" for name in RESOURCES] + [
        "ok=3 changed=0 failed=0"]

    changed = tmp_path / "changed"
    shutil.copytree(EXAMPLE, changed)
    team = changed / "team.yaml"
    team.write_text(team.read_text().replace("  guests: 10\n", "  guests: 12\n"))
    check = nanod.run("apply", "-f", str(changed), "--check", "--diff")
    out = lines(check.stdout)
    assert "changed Quota/team-a would update guests" in out, check.stdout
    assert "~ guests: 10 -> 12 [live]" in out
    assert nanod.data_of("/user_groups/team-a/quota")["limits"]["guests"] == 10
    applied = nanod.run("apply", "-f", str(changed))
    assert lines(applied.stdout)[-1] == "ok=2 changed=1 failed=0", applied.stdout
    assert nanod.data_of("/user_groups/team-a/quota")["limits"] == {**LIMITS, "guests": 12}

    exported = nanod.run("export")
    assert exported.returncode == 0, exported.stderr
    assert "kind: Quota\nname: team-a\nspec:\n" in exported.stdout
    dump = tmp_path / "export.yaml"
    dump.write_text(exported.stdout)
    round_trip = nanod.run("apply", "-f", str(dump))
    out = lines(round_trip.stdout)
    assert round_trip.returncode == 0 and out[-1].endswith("changed=0 failed=0"), \
        round_trip.stdout

    deleted = nanod.run("delete", "-f", str(changed))
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert [line.split()[:3] for line in lines(deleted.stdout)[:3]] == [
        ["changed", name, "deleted"] for name in reversed(RESOURCES)]
    assert nanod.call("GET", "/user_groups/team-a/quota")["error_code"] == 404


def test_an_applied_quota_refuses_a_guest_create(nanod: Nanod, tmp_path: Path):
    manifest = tmp_path / "m"
    manifest.mkdir()
    (manifest / "q.yaml").write_text("kind: Quota\nname: admin\nspec:\n  guests: 1\n")
    write_test_cell(tmp_path / "cells" / "cell-1.xml", cpus=4, memory_kib=8 << 20)
    (manifest / "c.yaml").write_text(
        "kind: ComputePool\nname: qpool\nspec: {}\n---\n"
        f"kind: Cell\nname: qcell\nspec:\n  libvirt_uri: test://{tmp_path}/cells/cell-1.xml\n"
        "  pool: qpool\n")
    applied = nanod.run("apply", "-f", str(manifest), "--wait", "60")
    assert applied.returncode == 0, applied.stdout + applied.stderr

    body = {"name": "q1", "pool": "qpool", "cores": 1, "memory": GIB, "disks": [GIB],
            "template": "", "modules": [], "auto_start": False}
    first = nanod.call("POST", "/guests/", body)
    assert first["error_code"] == 0, first
    second = nanod.call("POST", "/guests/", {**body, "name": "q2"})
    assert second["error_code"] == 409
    assert "creating guest 'q2' would exceed the quota of user group 'admin': guests " \
           "quota 1 guests: 1 guests used, the request asks 1 guests more" in second["message"]
    names = [g["name"] for g in nanod.call("POST", "/search/guests/", {})["data"]["result"]]
    assert names == ["q1"]
