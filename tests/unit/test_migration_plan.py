"""Table tests of the pure move planner (reconciler/migration.py `plan_move`): from what
both cells show, the next step of a guest's move; among them every state a crash of nanod
can leave behind (a domain on both cells, a half-made target, an interrupted copy), each
of which must finish or roll back and never run the guest twice."""

from __future__ import annotations

import pytest

from reconciler.migration import Seen, Step, plan_move, retarget_xml


def seen(source="running", target=None, *, shared=False, missing=("v0",), left=("v0",),
         copied=False, job=False, sp=True, tp=True) -> Seen:
    return Seen(source=source, source_persistent=sp, target=target, target_persistent=tp,
                shared=shared, missing_on_target=missing, left_on_source=left,
                copied=copied, source_job=job)


@pytest.mark.parametrize("case, step, mode", [
    # live, local storage: twins first, then the migration, then the old volumes go
    (seen("running"), Step.CREATE_TARGET_VOLUMES, "live"),
    (seen("running", missing=()), Step.MIGRATE_LIVE, "live"),
    (seen("running", shared=True), Step.MIGRATE_LIVE, "live"),
    (seen(None, "running", missing=()), Step.REMOVE_SOURCE_VOLUMES, ""),
    (seen(None, "running", missing=(), left=()), Step.DONE, ""),
    (seen(None, "running", shared=True), Step.DONE, ""),
    # cold: copy (again after a crash: not recorded as copied), define, undefine, clean
    (seen("stopped"), Step.COPY_VOLUMES, "cold"),
    (seen("stopped", missing=()), Step.COPY_VOLUMES, "cold"),
    (seen("stopped", missing=(), copied=True), Step.DEFINE_TARGET, "cold"),
    (seen("stopped", shared=True), Step.DEFINE_TARGET, "cold"),
    (seen("stopped", "stopped", missing=()), Step.UNDEFINE_SOURCE, ""),
    (seen(None, "stopped", missing=()), Step.REMOVE_SOURCE_VOLUMES, ""),
    # crashes in the middle of a live migration
    (seen("running", "paused", tp=False, job=True), Step.WAIT, "live"),
    (seen("running", "paused", tp=False), Step.REMOVE_TARGET, "live"),
    (seen(None, "paused", tp=False), Step.WAIT, "live"),
    (seen("running", job=True), Step.WAIT, "live"),
    # libvirt's switchover pauses both copies, and the target turns persistent before the
    # source's job ends: while the job runs, nothing is removed anywhere
    (seen("paused", "paused", tp=False, job=True), Step.WAIT, "live"),
    (seen("paused", "running", job=True), Step.WAIT, "live"),
    (seen("running", "running", tp=False, job=True), Step.WAIT, "live"),
    (seen("stopped", "running", missing=()), Step.UNDEFINE_SOURCE, ""),
    (seen("running", "stopped", missing=()), Step.REMOVE_TARGET, "cold"),
    # never two running copies, never a guest from nowhere
    (seen("running", "running"), Step.FAIL, ""),
    (seen(None, None), Step.FAIL, ""),
    (seen("stopped", sp=False), Step.FAIL, ""),
    (seen("paused"), Step.WAIT, ""),
])
def test_the_next_step_of_a_move(case: Seen, step: Step, mode: str) -> None:
    plan = plan_move(case)
    assert (plan.step, plan.mode) == (step, mode), plan.reason
    assert plan.reason


def test_no_step_starts_a_domain() -> None:
    """Whatever both cells show, the planner never asks to start anything: a guest runs
    where libvirt runs it, never twice."""
    states = [None, "running", "stopped", "paused"]
    for s in states:
        for t in states:
            for tp in (True, False):
                plan = plan_move(seen(s, t, tp=tp))
                assert "start" not in plan.step.value


def test_retarget_moves_only_disks_of_the_source_pool() -> None:
    xml = ("<domain><name>d</name><devices>"
           "<disk type='file' device='disk'><source file='/a/pool/v0'/></disk>"
           "<disk type='file' device='cdrom'><source file='/a/pool/seed.iso'/></disk>"
           "<disk type='file' device='disk'><source file='/elsewhere/v1'/></disk>"
           "<disk type='volume' device='disk'><source pool='p-a' volume='v2'/></disk>"
           "<disk type='volume' device='disk'><source pool='other' volume='v3'/></disk>"
           "</devices></domain>")
    out = retarget_xml(xml, {"p-a": "p-b"}, {"/a/pool": "/b/other"})
    assert "/b/other/v0" in out and "/b/other/seed.iso" in out and "/elsewhere/v1" in out
    assert "/a/pool" not in out
    assert "pool=\"p-b\" volume=\"v2\"" in out and "pool=\"other\" volume=\"v3\"" in out
