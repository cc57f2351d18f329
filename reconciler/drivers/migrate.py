"""Live migration of a domain from one cell's libvirtd to another's (reconciler/migration.py
decides when; this module only does it).

Peer-to-peer when the source is the management node's own libvirtd (`qemu:///system`):
the source libvirtd opens the destination itself with the target cell's URI as nanod
builds it (its ssh wrapper pins host keys), and the job lives in libvirtd, so it completes
even when nanod dies half way. From a remote source, nanod drives the migration over both
connections (libvirt's managed migration; a remote libvirtd cannot run nanod's ssh
wrapper); a nanod that dies then leaves libvirt to abort it and the guest runs where it
was. Either way the domain becomes persistent on the target and is undefined on the
source, and QEMU's own stream goes straight to `tcp://<target address>` (cell names need
not resolve). With `copy_disks` the named disks are copied during the migration (local
storage; their target volumes exist already).

Progress: a thread reads the source's job stats every half second while the migration
runs (`data_processed`/`data_total`: memory and disks together); the completed job's stats
(downtime, total time, bytes) are returned.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import libvirt

from reconciler.drivers.libvirt_hv import LibvirtHypervisor
from state.errors import NanoError

Report = Callable[[int, int], None]
LOCAL_URIS = ("qemu:///system",)


def migrate_live(source: LibvirtHypervisor, target: LibvirtHypervisor, name: str, *,
                 dest_xml: str, migrate_host: str, copy_disks: list[str],
                 report: Report | None = None, bandwidth_mib: int = 0,
                 declared_shared: bool = False) -> dict[str, Any]:
    """Migrate running domain `name` from `source` to `target`; returns the completed
    job's stats as libvirt gives them (downtime, time_elapsed, data_total, ...).
    `declared_shared`: the disks are on storage the operator declared shared that libvirt
    cannot recognise as such (a `dir` storage pool): its safety check is skipped."""
    p2p = source.uri in LOCAL_URIS and target.uri not in LOCAL_URIS
    flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST
             | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE | libvirt.VIR_MIGRATE_ABORT_ON_ERROR)
    if p2p:
        flags |= libvirt.VIR_MIGRATE_PEER2PEER
    if declared_shared:
        flags |= libvirt.VIR_MIGRATE_UNSAFE
    params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_DEST_XML: dest_xml}
    if migrate_host:
        params[libvirt.VIR_MIGRATE_PARAM_URI] = f"tcp://{migrate_host}"
    if copy_disks:
        flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK
        params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = list(copy_disks)
    if bandwidth_mib:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = int(bandwidth_mib)
    done = threading.Event()

    def watch(conn: libvirt.virConnect) -> None:
        dom = conn.lookupByName(name)
        while not done.wait(0.5):
            try:
                stats = dom.jobStats()
            except libvirt.libvirtError:
                return  # the domain left the source
            total = int(stats.get("data_total", 0))
            if report is not None and total:
                report(int(stats.get("data_processed", 0)), total)

    def go(conn: libvirt.virConnect) -> dict[str, Any]:
        dom = conn.lookupByName(name)
        watcher = threading.Thread(target=lambda: _quiet(source.call, "job stats", watch,
                                                         timeout=None),
                                   name=f"migration-progress-{name}", daemon=True)
        watcher.start()
        try:
            if p2p:
                dom.migrateToURI3(target.uri, params, flags)
            else:
                dconn = target.call("open the target", lambda tconn: tconn)
                dom.migrate3(dconn, params, flags)
        finally:
            done.set()
        try:
            return target.call(f"completed job of {name}", lambda tconn: tconn.lookupByName(
                name).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED))
        except NanoError:  # the move happened; only its figures are missing
            return {}

    return source.call(f"live migration of {name} to {target.uri}", go, timeout=None)


def _quiet(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    try:
        call(*args, **kwargs)
    except Exception:  # noqa: BLE001 - progress only: the migration reports its own errors
        return
