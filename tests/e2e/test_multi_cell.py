"""examples/multi-cell on a real `nanod serve` with three test-driver cells: apply, re-apply
(all ok), --check (no change), --diff (classified), change, export -> apply round trip,
delete; plus invalid manifests, missing references and concurrent applies.

The cells' node files are written with write_test_cell into the directory the manifests
name as ${NANO_EXAMPLE_DIR}.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from nanod.kinds import ORDER
from tests.e2e.conftest import EXAMPLES, Nanod, lines
from tests.helpers.testdriver import write_test_cell

EXAMPLE = EXAMPLES / "multi-cell"
RESOURCES = ["Role/operator", "User/olivia", "UserGroup/operators", "StoragePool/shared-nfs",
             "ComputePool/east", "ComputePool/west", "Cell/sim-1", "Cell/sim-2", "Cell/sim-3"]


def cells(tmp_path: Path) -> dict[str, str]:
    where = tmp_path / "cells"
    for index in (1, 2, 3):
        write_test_cell(where / f"cell-{index}.xml", cpus=4, memory_kib=8 << 20)
    return {"NANO_EXAMPLE_DIR": str(where)}


def changed_copy(tmp_path: Path) -> Path:
    """The example with a few edits an operator would make."""
    copy = tmp_path / "changed"
    shutil.copytree(EXAMPLE, copy)
    compute = copy / "compute.yaml"
    text = compute.read_text()
    text = text.replace("name: west\nspec:\n  enabled: true", "name: west\nspec:\n  enabled: false")
    text = text.replace("  pool: west\n", "  pool: east\n")
    compute.write_text(text)
    identity = copy / "identity.yaml"
    identity.write_text(identity.read_text().replace("media, templates]", "media, templates, log]")
                        .replace("members: [olivia]", "members: []"))
    return copy


def test_multi_cell_example_lifecycle(nanod: Nanod, tmp_path: Path):
    env = cells(tmp_path)

    first = nanod.run("apply", "-f", str(EXAMPLE), "--wait", "60", extra_env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    out = lines(first.stdout)
    assert [line.split()[:3] for line in out[:9]] == [
        ["changed", name, "created"] for name in RESOURCES]
    assert "ok=0 changed=9 failed=0" in out
    # the three cells, both compute pools and the storage pool (its netfs pool is simulated
    # by the test driver, so it attaches)
    assert out[-1].startswith("converged: 6 resource(s)")
    assert not [line for line in out if line.startswith("not waited for")]
    cell = nanod.data_of("/cells/sim-3")
    assert cell["pool"] == "west" and cell["status"]["phase"] == "online"
    assert cell["spec"]["overcommit"] == {"cpu": 8}  # the manifest's per-cell ratio
    assert nanod.data_of("/user_groups/operators")["member"] == ["olivia"]

    again = nanod.run("apply", "-f", str(EXAMPLE), extra_env=env)
    assert again.returncode == 0, again.stderr
    assert lines(again.stdout) == [f"ok {name}" for name in RESOURCES] + [
        "ok=9 changed=0 failed=0"]

    changed = changed_copy(tmp_path)
    check = nanod.run("apply", "-f", str(changed), "--check", "--diff", extra_env=env)
    assert check.returncode == 0, check.stderr
    out = lines(check.stdout)
    assert "changed Role/operator would update menu" in out
    assert "changed UserGroup/operators would update members" in out
    assert "~ members: ['olivia'] -> [] [live]" in out
    assert "changed ComputePool/west would update enabled" in out
    assert "~ enabled: True -> False [live]" in out
    assert "changed Cell/sim-3 would update pool" in out
    assert "~ pool: 'west' -> 'east' [replaces: moves the cell between compute pools]" in out
    assert out[-1] == "ok=5 changed=4 failed=0"
    # --check changed nothing
    assert nanod.data_of("/compute_pools/west")["enabled"] is True
    assert nanod.data_of("/cells/sim-3")["pool"] == "west"
    assert nanod.data_of("/user_groups/operators")["member"] == ["olivia"]

    applied = nanod.run("apply", "-f", str(changed), "--diff", extra_env=env)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    out = lines(applied.stdout)
    assert "changed Cell/sim-3 updated pool" in out and out[-1] == "ok=5 changed=4 failed=0"
    assert nanod.data_of("/cells/sim-3")["pool"] == "east"
    assert nanod.data_of("/compute_pools/west")["enabled"] is False
    assert "log" in nanod.data_of("/roles/operator")["menu"]
    settled = nanod.run("apply", "-f", str(changed), extra_env=env)
    assert lines(settled.stdout)[-1] == "ok=9 changed=0 failed=0"

    exported = nanod.run("export")
    assert exported.returncode == 0, exported.stderr
    dump = tmp_path / "export.yaml"
    dump.write_text(exported.stdout)
    assert "kind: Cell\nname: sim-3\nspec:\n  pool: east\n" in exported.stdout
    round_trip = nanod.run("apply", "-f", str(dump), "--diff")
    assert round_trip.returncode == 0, round_trip.stdout + round_trip.stderr
    out = lines(round_trip.stdout)
    assert out[-1].endswith("changed=0 failed=0") and all(
        line.startswith("ok ") for line in out[:-1]), round_trip.stdout

    table = nanod.run("get", "cells")
    assert table.returncode == 0, table.stderr
    rows = lines(table.stdout)
    assert rows[0] == "NAME PHASE READY GEN CONDITIONS"
    assert rows[1].startswith("sim-1 online True ")
    as_json = nanod.run("get", "ComputePool", "west", "-o", "json")
    assert '"enabled": false' in as_json.stdout and '"watched": true' in as_json.stdout
    assert '"phase": "disabled"' in as_json.stdout

    drift = nanod.run("drift")
    assert drift.returncode == 0, drift.stdout
    assert lines(drift.stdout)[-1] == "drifted=0"

    deleted = nanod.run("delete", "-f", str(changed), "--diff", extra_env=env)
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    out = lines(deleted.stdout)
    assert [line.split()[:3] for line in out if not line.startswith("-")][:-1] == [
        ["changed", name, "deleted"]
        for name in sorted(RESOURCES, key=lambda n: -ORDER.index(n.split("/")[0]))]
    assert "- Cell/sim-1 [destructive: delete]" in out
    assert nanod.data_of("/cells/") == [] and nanod.data_of("/compute_pools/") == []
    assert "olivia" not in nanod.data_of("/users/")
    gone = nanod.run("delete", "-f", str(changed), extra_env=env)
    assert lines(gone.stdout)[-1] == "ok=9 changed=0 failed=0"


def test_invalid_manifests_change_nothing(nanod: Nanod, tmp_path: Path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.yaml").write_text("kind: ComputePool\nname: fine\nspec: {}\n")
    (tmp_path / "m" / "b.yaml").write_text(
        "kind: Role\nname: ok\nspec: {menu: [user]}\n---\n"
        "kind: Cell\nname: c\nspec: {virt_type: xen, libvirt_uri: 5}\n")
    done = nanod.run("apply", "-f", str(tmp_path / "m"))
    assert done.returncode == 2
    where = tmp_path / "m" / "b.yaml"
    assert done.stderr.splitlines() == [
        "invalid manifests, nothing was changed:",
        f"  {where}#2 (Cell/c): spec.libvirt_uri: must be of type string, got int",
        f"  {where}#2 (Cell/c): spec.virt_type: 'xen' is not one of 'kvm', 'qemu'",
    ]
    assert done.stdout == ""
    assert nanod.data_of("/compute_pools/") == [] and "ok" not in nanod.data_of("/roles/")


def test_missing_references_fail_cleanly(nanod: Nanod, tmp_path: Path):
    env = cells(tmp_path)
    manifest = tmp_path / "refs.yaml"
    manifest.write_text(
        "kind: ComputePool\nname: p\nspec: {storage: no-such-storage}\n---\n"
        "kind: Cell\nname: c\nspec:\n  pool: no-such-pool\n"
        "  libvirt_uri: test://${NANO_EXAMPLE_DIR}/cell-1.xml\n---\n"
        "kind: UserGroup\nname: g\nspec: {display: G, roles: [ghost-role]}\n---\n"
        "kind: Role\nname: r\nspec: {menu: [user]}\n")
    done = nanod.run("apply", "-f", str(manifest), extra_env=env)
    assert done.returncode == 1
    out = lines(done.stdout)
    assert out == [
        "changed Role/r created",
        f"failed UserGroup/g spec.roles: no Role named 'ghost-role' on the server or in these "
        f"manifests [{manifest}#3]",
        f"failed ComputePool/p spec.storage: no StoragePool named 'no-such-storage' on the "
        f"server or in these manifests [{manifest}#1]",
        f"failed Cell/c spec.pool: no ComputePool named 'no-such-pool' on the server or in "
        f"these manifests [{manifest}#2]",
        "ok=0 changed=1 failed=3",
    ]
    assert nanod.data_of("/cells/") == [] and nanod.data_of("/compute_pools/") == []


def test_concurrent_applies_do_not_double_create(nanod: Nanod, tmp_path: Path):
    manifest = tmp_path / "many.yaml"
    docs = [f"kind: Role\nname: role-{i}\nspec: {{menu: [user, log]}}\n" for i in range(6)]
    docs += [f"kind: ComputePool\nname: pool-{i}\nspec: {{failover: false}}\n" for i in range(4)]
    docs += [f"kind: Template\nname: tpl-{i}\nspec: {{admin: root, operating_system: linux, "
             f"disk: sata, network: e1000, display: vga, control: vnc}}\n" for i in range(3)]
    manifest.write_text("---\n".join(docs))
    procs = [nanod.spawn("apply", "-f", str(manifest)) for _ in range(3)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    for code, out, err in results:
        assert code == 0, out + err
        assert not [line for line in lines(out) if line.startswith("failed")], out
    created = sum(line.endswith("created") for _, out, _ in results for line in lines(out))
    assert created == len(docs)  # each resource created by exactly one of the applies
    roles = nanod.data_of("/roles/")
    assert sorted(r for r in roles if r.startswith("role-")) == [f"role-{i}" for i in range(6)]
    assert len(nanod.data_of("/compute_pools/")) == 4
    names = [t["name"] for t in nanod.data_of("/templates/")]
    assert sorted(n for n in names if n.startswith("tpl-")) == ["tpl-0", "tpl-1", "tpl-2"]
    again = nanod.run("apply", "-f", str(manifest))
    assert lines(again.stdout)[-1] == f"ok={len(docs)} changed=0 failed=0"


def test_create_that_loses_a_race_compares_instead_of_failing(nanod: Nanod, tmp_path: Path):
    """The 409 of a create whose name another apply took between plan and execute becomes a
    re-read and compare: ok when equal, an update when not."""
    from nanod import manifests
    from nanod.client import ClientConfig, NanoClient

    manifest = tmp_path / "race.yaml"
    manifest.write_text("kind: Role\nname: same\nspec: {menu: [user]}\n---\n"
                        "kind: Role\nname: differs\nspec: {menu: [user, log]}\n")
    docs = manifests.load([manifest])
    client = NanoClient(ClientConfig.resolve(environ=nanod.env))
    planner = manifests.Planner(client, docs)
    plans = [planner.plan(d) for d in docs]
    assert [p.actions[0].verb.value for p in plans] == ["create", "create"]
    nanod.call("POST", "/roles/same", {"menu": ["user"]})  # the other apply wins both races
    nanod.call("POST", "/roles/differs", {"menu": ["user"]})
    assert manifests.execute(client, planner, plans[0]) == (
        manifests.Outcome.OK, "created concurrently")
    assert manifests.execute(client, planner, plans[1]) == (
        manifests.Outcome.CHANGED, "updated menu")
    assert sorted(nanod.data_of("/roles/differs")["menu"]) == ["log", "user"]
