"""Moving a guest to another cell: the guest reconciler's part of a migration
(state/migrations.py holds the record; api/migrations.py the routes).

While a guest has an active move (`store.guest_move`), its reconcile is this module's
`GuestMover.step` instead of the usual plan: observe the guest's domain on both cells, ask
the pure `plan_move` for the next step, do it, record the phase. A running guest moves
**live** (libvirt migration, persistent on the target, undefined on the source; with local
storage its disks are copied during the migration into target volumes made first with the
same names; with shared storage they stay where they are). A stopped guest moves **cold**
(each volume copied with libvirt streams and verified by SHA-1, the domain defined on the
target, then undefined and its volumes removed on the source).

Every step is decided from what both cells show, so a crash or a restart of nanod at any
moment converges: a domain defined on both cells is finished (target persistent: the
source copy goes) or rolled back (the source still runs: the target's half goes); a copy
that was interrupted is made again. Progress comes from libvirt's job stats (memory and
disk bytes) of a live migration and from the bytes a cold copy moved. Nothing runs a guest
twice: a step never starts a domain, and a domain seen running on both cells stops the
move with an error for an operator.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from reconciler.cells import CellConnections, local_pool_name, shared_pool_name
from reconciler.contract import Key, Result, set_condition
from reconciler.longwork import InProgress, LongWork
from reconciler.naming import names
from state.compute import CellSpec
from state.errors import NanoError, Unavailable
from state.migrations import Move

log = logging.getLogger("nano.reconciler.migration")
READY = "Ready"
ATTEMPTS = 5  # a step that fails this often in a row ends the move (the guest stays)


class MoveFailed(Exception):
    """libvirt's live migration or a cold copy failed: the move ends, the guest stays."""


class Step(StrEnum):
    """What a move does next (`plan_move`)."""

    FAIL = "fail"                            # refused or impossible: the guest stays
    CREATE_TARGET_VOLUMES = "create_target_volumes"  # local storage, live: empty twins
    MIGRATE_LIVE = "migrate_live"            # long work: libvirt live migration
    COPY_VOLUMES = "copy_volumes"            # long work: streams, verified
    DEFINE_TARGET = "define_target"          # cold: the domain on the target
    UNDEFINE_SOURCE = "undefine_source"      # the target holds it: the source copy goes
    REMOVE_TARGET = "remove_target"          # roll back a half-made target
    REMOVE_SOURCE_VOLUMES = "remove_source_volumes"
    WAIT = "wait"                            # libvirt is still moving it
    DONE = "done"


@dataclass(frozen=True)
class Seen:
    """Both cells' view of one moving guest, read in one observation."""

    source: str | None           # the domain's state on the source cell, None = absent
    source_persistent: bool
    target: str | None
    target_persistent: bool
    shared: bool                 # storage shared by both cells: no disk copy
    missing_on_target: tuple[str, ...]  # guest volumes the target pool lacks
    left_on_source: tuple[str, ...]     # guest volumes still in the source pool
    copied: bool                 # a verified cold copy was recorded for this move
    # libvirt runs a migration job on the source domain. Read BEFORE the domains' states:
    # with no job then, a half-made target seen after is a leftover; read after, a job
    # that ended in between (the guest now on the target) would look like one, and its
    # removal would destroy the only running copy.
    source_job: bool = False


@dataclass(frozen=True)
class Plan:
    step: Step
    reason: str
    mode: str = ""  # live | cold


def plan_move(seen: Seen) -> Plan:
    """Pure: the next step of a move from what both cells show."""
    s, t = seen.source, seen.target
    if seen.source_job:  # whatever both cells show meanwhile (a switchover pauses both)
        return Plan(Step.WAIT, "libvirt is migrating the guest", "live")
    if s == "running" and t == "running":
        return Plan(Step.FAIL, "the guest's domain runs on both cells: nanod changes neither; "
                    "stop the copy that must not run, then migrate again")
    if t is not None and seen.target_persistent and t != "paused":
        if s is not None:
            if s == "running":  # a cold define raced a start: keep the running one
                return Plan(Step.REMOVE_TARGET, "the guest runs on the source again: the "
                            "target's copy goes", "cold")
            return Plan(Step.UNDEFINE_SOURCE, "the target holds the guest: the source's "
                        "definition goes")
        if not seen.shared and seen.left_on_source:
            return Plan(Step.REMOVE_SOURCE_VOLUMES, "the guest's old volumes go from the "
                        "source pool")
        return Plan(Step.DONE, "the guest is on the target cell only")
    if t is not None:  # transient or paused on the target: an incoming live migration
        if s is None:
            return Plan(Step.WAIT, "the guest arrives on the target", "live")
        return Plan(Step.REMOVE_TARGET, "a live migration stopped half way: the target's "
                    "half goes and the guest stays where it runs", "live")
    if s is None:
        return Plan(Step.FAIL, "the guest's domain is on neither cell: nothing to move "
                    "(it is lost; see the guest's conditions)")
    if s == "running":
        if not seen.shared and seen.missing_on_target:
            return Plan(Step.CREATE_TARGET_VOLUMES, "volumes for the disks on the target",
                        "live")
        return Plan(Step.MIGRATE_LIVE, "live migration", "live")
    if s != "stopped":
        return Plan(Step.WAIT, f"the guest is {s} on the source: it moves once it runs or "
                    "is stopped")
    if not seen.source_persistent:
        return Plan(Step.FAIL, "the guest's domain on the source is not persistent")
    if not seen.shared and (seen.missing_on_target or not seen.copied):
        return Plan(Step.COPY_VOLUMES, "copy the disks to the target cell", "cold")
    return Plan(Step.DEFINE_TARGET, "define the guest on the target cell", "cold")


def retarget_xml(xml: str, pools: dict[str, str], paths: dict[str, str]) -> str:
    """The domain XML with its disks moved from each storage pool of `pools` (source pool
    name -> target pool name; `<source pool=... volume=...>` disks) and each directory of
    `paths` (source pool path -> target pool path; `<source file=...>` disks) to the other;
    everything else as it is."""
    root = ET.fromstring(xml)
    for source in root.iterfind("./devices/disk/source"):
        pool, file = source.get("pool"), source.get("file")
        if pool in pools:
            source.set("pool", pools[pool])
        if file:
            folder, _, base = file.rpartition("/")
            if folder in paths:
                source.set("file", f"{paths[folder]}/{base}")
    return ET.tostring(root, encoding="unicode")


class GuestMover:
    """Drives one guest's move (module docstring); used by the guest reconciler."""

    def __init__(self, store: Any, connections: CellConnections, long: LongWork,
                 enqueue: Callable[[Key], None], *, poll_seconds: float = 2.0,
                 bandwidth_mib: int = 0) -> None:
        self.store = store
        self.bandwidth_mib = bandwidth_mib  # a live migration's limit, 0 = none
        self.connections = connections
        self.long = long
        self.enqueue = enqueue
        self.poll_seconds = poll_seconds

    def step(self, desired: Any, move: Move) -> Result:
        key = Key("guest", desired.id)
        source = self.store.cell_spec(move.source_cell)
        target = self.store.cell_spec(move.target_cell)
        last = (desired.observed.get("move") or {})
        last = last if last.get("migration") == move.migration else {}
        if target is None or source is None:
            missing = move.target_cell if target is None else move.source_cell
            return self._end(desired, move, last, f"cell {missing!r} is not registered any more")
        if not source.observed.get("alive"):
            if (source.observed.get("fence") or {}).get("ok"):  # failover takes the guest
                return self._end(desired, move, last, f"source cell {source.name} was lost "
                                 "and fenced: the pool's failover places the guest")
            return self._phase(desired, move, last, "waiting", f"source cell {source.name} "
                               "is offline: the move goes on once it answers")
        if not target.observed.get("alive"):
            if not last.get("phase") or last.get("phase") == "waiting":
                return self._end(desired, move, last, f"target cell {target.name} is offline: "
                                 "nothing moved; migrate again once it answers")
            return self._phase(desired, move, last, "waiting", f"target cell {target.name} "
                               "is offline: the move goes on once it answers")
        try:
            return self._step(desired, move, last, source, target, key)
        except InProgress as progress:
            job = progress.job
            phase = "migrating" if "/migrate/" in job.job_id else "copying"
            percent = 100 * job.done // job.total if job.total else int(last.get("percent", 0))
            return self._phase(desired, move, last, phase, job.describe(),
                               mode="live" if phase == "migrating" else "cold",
                               percent=percent)
        except MoveFailed as failed:  # libvirt's migration or the copy failed: it is over
            return self._end(desired, move, last, str(failed), rollback=(source, target))
        except NanoError as exc:
            if isinstance(exc, Unavailable):
                self._phase(desired, move, last, last.get("phase") or "waiting", exc.message)
                raise
            attempts = int(last.get("attempts", 0)) + 1
            if attempts >= ATTEMPTS:
                return self._end(desired, move, last, f"{exc.message} ({attempts} attempts)",
                                 rollback=(source, target))
            self._phase(desired, move, last, last.get("phase") or "waiting",
                        f"{exc.message} (attempt {attempts} of {ATTEMPTS})", attempts=attempts)
            raise

    # -- one step ------------------------------------------------------------------------

    def _step(self, desired: Any, move: Move, last: dict[str, Any], source: CellSpec,
              target: CellSpec, key: Key) -> Result:
        from reconciler.drivers.domains import LibvirtGuests

        s_link, t_link = self.connections.link(source), self.connections.link(target)
        s_drv, t_drv = LibvirtGuests(s_link.hypervisor), LibvirtGuests(t_link.hypervisor)
        s_pool, t_pool = self._pool(desired, source), self._pool(desired, target)
        name = names().domain(desired.id)
        vols = self._volumes(desired)
        job = self.long.running_for(key)
        if job is not None:
            raise InProgress(job)
        source_job = s_drv.migrating(name)  # first: see Seen.source_job
        s_seen, t_seen = s_drv.presence(name), t_drv.presence(name)
        shared = bool(desired.storage_pool)
        seen = Seen(
            source=s_seen[0] if s_seen else None, source_persistent=bool(s_seen and s_seen[1]),
            target=t_seen[0] if t_seen else None, target_persistent=bool(t_seen and t_seen[1]),
            shared=shared,
            missing_on_target=() if shared else tuple(
                v for v in vols if t_drv.volume(t_pool, v) is None),
            left_on_source=() if shared else tuple(
                v for v in vols if s_drv.volume(s_pool, v) is not None),
            copied=bool(last.get("copied")),
            source_job=source_job)
        plan = plan_move(seen)
        mode = plan.mode or last.get("mode") or ("live" if seen.source == "running" else "cold")
        log.info("guest %s (%s) move %s: %s (%s)", desired.name, desired.id, move.migration,
                 plan.step, plan.reason)
        if plan.step is Step.FAIL:
            return self._end(desired, move, last, plan.reason, mode=mode)
        if plan.step is Step.DONE:
            result = self._end(desired, move, last, "", mode=mode)
            self._settle_cells(move)
            return result
        if plan.step is Step.WAIT:
            return self._phase(desired, move, last, "moving", plan.reason, mode=mode)
        if plan.step in (Step.CREATE_TARGET_VOLUMES, Step.MIGRATE_LIVE) and \
                not last.get("cpu_checked"):
            live_xml = s_drv.domain_xml(name, migratable=True) or ""
            refusal = t_drv.cpu_refusal(live_xml, target.virt_type)
            if refusal:
                return self._end(desired, move, last, f"the guest's CPU does not run on cell "
                                 f"{target.name}: {refusal}", mode="live")
            last = {**last, "cpu_checked": True}
        if plan.step is Step.CREATE_TARGET_VOLUMES:
            from reconciler.drivers.volumes import copy_volume

            seed = names().seed_volume(desired.id)
            for v in seen.missing_on_target:
                if v == seed:  # read-only: not copied by the migration, its bytes matter
                    copy_volume(s_link.hypervisor, s_pool, t_link.hypervisor, t_pool, v)
                    continue
                info = s_drv.volume(s_pool, v)
                t_drv.create_volume(t_pool, v, info.capacity if info else 0,
                                    fmt=info.format if info else "qcow2")
        elif plan.step is Step.MIGRATE_LIVE:
            if shared:  # the target lists the guest's volumes of the shared pool
                t_drv.refresh_pool(t_pool)
            self._live(desired, move, last, s_drv, t_link, s_pool, t_pool, seen, key)
        elif plan.step is Step.COPY_VOLUMES:
            self._copy(desired, move, last, s_link, t_link, s_pool, t_pool, vols, key)
            last = {**last, "copied": True}
            self._phase(desired, move, last, "copied", "disks copied and verified",
                        mode="cold", percent=90, copied=True)
        elif plan.step is Step.DEFINE_TARGET:
            if shared:
                t_drv.refresh_pool(t_pool)
            xml = s_drv.domain_xml(name, inactive=True) or ""
            t_drv.define(retarget_xml(xml, {s_pool: t_pool},
                                      self._paths(s_drv.hv, t_drv.hv, s_pool, t_pool)))
        elif plan.step is Step.UNDEFINE_SOURCE:
            s_drv.undefine(name)
        elif plan.step is Step.REMOVE_TARGET:
            t_drv.undefine(name)
            if not shared:
                for v in vols:
                    t_drv.delete_volume(t_pool, v)
            if mode == "live":
                return self._end(desired, move, last, "the live migration stopped half way "
                                 "(nanod restarted or libvirt aborted it): the guest runs "
                                 f"on {source.name}; migrate again", mode=mode)
        elif plan.step is Step.REMOVE_SOURCE_VOLUMES:
            for v in seen.left_on_source:
                s_drv.delete_volume(s_pool, v)
        return self._phase(desired, move, last, str(plan.step), plan.reason, mode=mode,
                           percent=max(int(last.get("percent", 0)), 95 if plan.step in (
                               Step.UNDEFINE_SOURCE, Step.REMOVE_SOURCE_VOLUMES) else 0),
                           requeue=0.1)

    def _live(self, desired: Any, move: Move, last: dict[str, Any], s_drv: Any, t_link: Any,
              s_pool: str, t_pool: str, seen: Seen, key: Key) -> None:
        from reconciler.drivers.migrate import migrate_live

        name = names().domain(desired.id)
        paths = self._paths(s_drv.hv, t_link.hypervisor, s_pool, t_pool)
        xml = s_drv.domain_xml(name, migratable=True) or ""
        dest_xml = retarget_xml(xml, {s_pool: t_pool}, paths)
        copy = [] if seen.shared else _disk_targets(xml)
        target = self.store.cell_spec(move.target_cell)
        # a `dir` storage pool is a directory the operator declares shared (a cluster file
        # system libvirt does not recognise, or the test rig's bind mount): libvirt's own
        # shared-storage check would refuse it
        declared = bool(desired.storage_pool) and \
            self.store.storage(desired.storage_pool)["type"] == "dir"

        def run(report: Any) -> dict[str, Any]:
            return migrate_live(s_drv.hv, t_link.hypervisor, name, dest_xml=dest_xml,
                                migrate_host=target.address if target else "",
                                copy_disks=copy, report=report, declared_shared=declared,
                                bandwidth_mib=self.bandwidth_mib)

        self._phase(desired, move, last, "migrating", "live migration", mode="live")
        try:
            stats = self.long.run(key, f"guest/{desired.id}/migrate/{move.migration}",
                                  f"live migration of {desired.name} to {move.target_cell}",
                                  run)
        except NanoError as exc:
            raise MoveFailed(exc.message) from exc
        log.info("guest %s live-migrated to %s: %s", desired.name, move.target_cell, stats)

    def _copy(self, desired: Any, move: Move, last: dict[str, Any], s_link: Any, t_link: Any,
              s_pool: str, t_pool: str, vols: list[str], key: Key) -> None:
        from reconciler.drivers.volumes import copy_volume

        def run(report: Any) -> None:
            sizes = [0] * len(vols)
            for i, v in enumerate(vols):
                def part(done: int, total: int, i: int = i) -> None:
                    sizes[i] = total
                    report(sum(sizes[:i]) + done, sum(sizes[:i]) + total * (len(vols) - i))
                copy_volume(s_link.hypervisor, s_pool, t_link.hypervisor, t_pool, v,
                            progress=part, digest_on_target=lambda path: _file_digest(
                                t_link.shell, path))

        self._phase(desired, move, last, "copying", "cold copy of the disks", mode="cold")
        try:
            self.long.run(key, f"guest/{desired.id}/copy/{move.migration}",
                          f"copy the disks of {desired.name} to {move.target_cell}", run)
        except NanoError as exc:
            raise MoveFailed(exc.message) from exc

    # -- helpers -----------------------------------------------------------------------------

    def _pool(self, desired: Any, cell: CellSpec) -> str:
        return shared_pool_name(desired.storage_pool) if desired.storage_pool else \
            local_pool_name(cell.name)

    def _volumes(self, desired: Any) -> list[str]:
        vols = [names().volume(desired.id, i) for i in range(len(desired.spec["disks"]))]
        if "cloud-init" in desired.spec.get("modules", []):
            vols.append(names().seed_volume(desired.id))
        return vols

    @staticmethod
    def _paths(s_hv: Any, t_hv: Any, s_pool: str, t_pool: str) -> dict[str, str]:
        """{source pool path: target pool path} (disks given by file name)."""
        src = (s_hv.pool_state(s_pool, refresh=False).path or "").rstrip("/")
        dst = (t_hv.pool_state(t_pool, refresh=False).path or "").rstrip("/")
        return {src: dst} if src and dst else {}

    def _settle_cells(self, move: Move) -> None:
        """Wake what follows the guest: both cells' networks (port forwards) and
        firewalls (its policy chains), and the guest itself on its new cell."""
        for cell in (move.source_cell, move.target_cell):
            self.enqueue(Key("network", cell))
            self.enqueue(Key("firewall", cell))

    def _phase(self, desired: Any, move: Move, last: dict[str, Any], phase: str, why: str, *,
               mode: str = "", percent: int | None = None, requeue: float | None = None,
               copied: bool | None = None, attempts: int = 0) -> Result:
        mode = mode or last.get("mode", "")
        percent = int(last.get("percent", 0)) if percent is None else percent
        self.store.record_move(desired.id, move, phase=phase, percent=percent, mode=mode,
                               copied=bool(last.get("copied") if copied is None else copied),
                               attempts=attempts, cpu_checked=bool(last.get("cpu_checked")))
        conditions = set_condition(list(self.store.guest_conditions(desired.id)), "Migrating",
                                   True, phase.capitalize().replace("_", ""),
                                   f"{mode or 'migration'} to {move.target_cell}: {why} "
                                   f"({percent}%)", _now())
        conditions = set_condition(conditions, READY, False, "Migrating",
                                   f"moving to cell {move.target_cell}: {why}", _now())
        self.store.record_guest_observed(desired.id, phase="migrating", conditions=conditions)
        return Result(requeue_after=self.poll_seconds if requeue is None else requeue,
                      note=f"moving: {phase}")

    def _end(self, desired: Any, move: Move, last: dict[str, Any], error: str, *,
             mode: str = "", rollback: tuple[CellSpec, CellSpec] | None = None) -> Result:
        mode = mode or last.get("mode", "")
        if error and rollback is not None:
            error = self._roll_back(desired, *rollback, error)
        where = move.target_cell if not error else desired.cell
        self.store.record_move(desired.id, move, phase="failed" if error else "done",
                               percent=100, mode=mode, error=error, done=True)
        reason, text = ("MigrationFailed", f"{mode or 'migration'} to {move.target_cell} "
                        f"failed: {error}; the guest stays on {where}") if error else (
            "Migrated", f"{mode} migration from {move.source_cell} to {move.target_cell} done")
        conditions = set_condition(list(self.store.guest_conditions(desired.id)), "Migrating",
                                   False, reason, text, _now())
        # the next reconcile (on the cell the guest is on now) records its real phase
        self.store.record_guest_observed(desired.id, phase=desired.phase if desired.phase !=
                                         "migrating" else "pending", conditions=conditions)
        if error:
            log.warning("guest %s (%s): %s", desired.name, desired.id, text)
        return Result(requeue_after=0.1, note=text)

    def _roll_back(self, desired: Any, source: CellSpec, target: CellSpec, error: str) -> str:
        """A failed move leaves nothing on the target: its half-made volumes go (only when
        the source still holds the guest and the target holds no definition of it)."""
        from reconciler.drivers.domains import LibvirtGuests

        if desired.storage_pool:
            return error  # shared: the volumes are the guest's own, nothing was made
        try:
            s_drv = LibvirtGuests(self.connections.link(source).hypervisor)
            t_drv = LibvirtGuests(self.connections.link(target).hypervisor)
            name = names().domain(desired.id)
            if s_drv.presence(name) is None or t_drv.presence(name) is not None:
                return error
            pool = self._pool(desired, target)
            for vol in self._volumes(desired):
                t_drv.delete_volume(pool, vol)
        except NanoError as exc:
            return f"{error}; removing what was made on {target.name} failed too: " \
                   f"{exc.message} (remove the guest's volumes there by hand)"
        return error


def _file_digest(shell: Any, path: str) -> tuple[int, str]:
    """(size, SHA-1) of a file on a cell, computed there (argv, no shell string)."""
    from reconciler.drivers.shell import check

    size = check(shell.run(["stat", "-c", "%s", path]), f"size of {path}").stdout.strip()
    # about 1 GiB in 3 s on a slow disk: no fixed limit fits every volume
    digest = check(shell.run(["sha1sum", path], timeout=3600), f"SHA-1 of {path}")
    return int(size), digest.stdout.split()[0]


def _disk_targets(xml: str) -> list[str]:
    """Target devs (vda, sda, ...) of the domain's writable file disks: the disks a live
    migration with local storage copies (read-only seeds and media are made beforehand)."""
    root = ET.fromstring(xml)
    out = []
    for disk in root.iterfind("./devices/disk"):
        if disk.get("device") != "disk" or disk.find("readonly") is not None:
            continue
        target = disk.find("target")
        if target is not None and target.get("dev"):
            out.append(target.get("dev"))
    return out


def _now() -> str:
    from reconciler.guests import now_text

    return now_text()


