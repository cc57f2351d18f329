"""Failover: the guests of a cell that stopped answering start on other cells of its pool,
but only after the cell is fenced; and when the cell comes back, the stale copies of the
guests that left are destroyed before it is used again. Used by the cell reconciler
(reconciler/cells.py) for cells of compute pools with `failover: true` (which needs shared
storage: the guests' disks are where every cell of the pool reaches them).

Fencing (never two copies of one guest writing one disk):
- the fence is a command of the management node's settings, never of the API (a command
  given through the API would be a road from a request to a root shell): `fencing.commands`
  maps a cell name to an argv list, `fencing.default` is the argv for the others; `{cell}`
  and `{address}` in an argument are replaced by the cell's name and address (no shell, no
  other expansion). Exit status 0 within `fencing.timeout_seconds` is a fence; anything else
  is not, and is tried again at the next probe;
- without a successful fence the guests stay `lost`, the cell's condition `Fenced` says
  why, and nothing starts elsewhere;
- libvirt's lock manager (virtlockd, `lock_manager = "lockd"` on the cells) and QEMU's own
  image locks refuse a second writer of a disk as the last line: a start elsewhere while the
  old copy still runs fails, and the guest reports that failure.

After a fence each guest goes to another alive, enabled cell of the pool with room
(placement, counting each guest placed): guests with auto_start are started there, the
others are defined and stay stopped. One log entry per guest says from where to where.
"""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from reconciler.contract import Key
from state.compute import CellSpec
from state.errors import NanoError

log = logging.getLogger("nano.reconciler.failover")


@dataclass(frozen=True)
class Fencing:
    """The fencing settings: per-cell argv, a default argv, a time limit."""

    commands: dict[str, list[str]] = field(default_factory=dict)
    default: list[str] = field(default_factory=list)
    timeout_seconds: float = 60.0

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> Fencing:
        conf = settings.get("fencing") or {}
        return cls(commands={k: list(v) for k, v in (conf.get("commands") or {}).items()},
                   default=list(conf.get("default") or []),
                   timeout_seconds=float(conf.get("timeout_seconds", 60)))

    def argv(self, cell: CellSpec) -> list[str]:
        template = self.commands.get(cell.name) or self.default
        return [arg.replace("{cell}", cell.name).replace("{address}", cell.address)
                for arg in template]


def check_fencing(conf: Any) -> str:
    """'' when the `fencing` setting is sound, else what is wrong with it."""
    if not isinstance(conf, dict) or set(conf) - {"commands", "default", "timeout_seconds"}:
        return "fencing takes {commands: {CELL: [argv...]}, default: [argv...], " \
               "timeout_seconds: N}"
    argvs = [conf.get("default") or [], *(conf.get("commands") or {}).values()]
    if not isinstance(conf.get("commands") or {}, dict) or not all(
            isinstance(a, list) and all(isinstance(x, str) for x in a) for a in argvs):
        return "fencing commands are argv lists of strings, e.g. [ipmitool, -H, '{address}', " \
               "chassis, power, off]"
    timeout = conf.get("timeout_seconds", 60)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        return f"fencing.timeout_seconds must be a number of seconds > 0, not {timeout!r}"
    return ""


class Failover:
    """The cell reconciler's failover steps (module docstring)."""

    def __init__(self, store: Any, enqueue: Any, fencing: Fencing) -> None:
        self.store = store
        self.enqueue = enqueue
        self.fencing = fencing

    # -- a cell is lost -----------------------------------------------------------------------

    def lost(self, spec: CellSpec, fence: dict[str, Any] | None
             ) -> tuple[dict[str, Any] | None, tuple[bool, str, str] | None]:
        """The cell is offline. Returns its fence record (kept in its observed facts until
        it answers again) and its `Fenced` condition (status, reason, message); None for a
        cell whose pool has no failover (its guests wait for it)."""
        if not self.store.pool_fails_over(spec.pool):
            return fence, None
        guests = self.store.guests_to_fail_over(spec.name)
        if not guests and not fence:
            return fence, (False, "NothingToMove", "the cell hosts no guest")
        if not (fence or {}).get("ok"):
            fence = self._fence(spec)
            if not fence["ok"]:
                return fence, (False, fence["reason"], fence["message"])
        moved = self.store.fail_over(spec.name, guests, note=fence["message"])
        for guest_id, target in moved:
            log.warning("failover: guest %s from cell %s to %s", guest_id, spec.name, target)
            self.enqueue(Key("guest", guest_id))
            for cell in (spec.name, target):
                self.enqueue(Key("network", cell))
                self.enqueue(Key("firewall", cell))
        left = self.store.guests_to_fail_over(spec.name)
        if left:
            return fence, (True, "Fenced", f"{fence['message']}; {len(left)} guest(s) wait "
                           "for room on another cell of the pool")
        return fence, (True, "Fenced", fence["message"])

    def _fence(self, spec: CellSpec) -> dict[str, Any]:
        argv = self.fencing.argv(spec)
        at = time.strftime("%Y-%m-%d %H:%M:%S")
        if not argv:
            return {"ok": False, "at": at, "reason": "NoFenceCommand",
                    "message": f"cell {spec.name} cannot be fenced: no fence command for it "
                    "(settings fencing.commands or fencing.default); its guests stay lost "
                    "until it answers again"}
        try:
            done = subprocess.run(argv, capture_output=True, text=True,
                                  timeout=self.fencing.timeout_seconds, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return {"ok": False, "at": at, "reason": "FenceFailed",
                    "message": f"fencing cell {spec.name} with {argv[0]} failed: {exc}; its "
                    "guests stay lost (tried again at the next probe)"}
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
            return {"ok": False, "at": at, "reason": "FenceFailed",
                    "message": f"fencing cell {spec.name} with {argv[0]} exited "
                    f"{done.returncode}: {tail[0][:200]}; its guests stay lost (tried again "
                    "at the next probe)"}
        log.warning("cell %s fenced by %s", spec.name, argv[0])
        self.store.add_log(f"failover: cell {spec.name} fenced by {argv[0]}")
        return {"ok": True, "at": at, "reason": "Fenced",
                "message": f"cell {spec.name} fenced by {argv[0]} at {at}"}

    # -- a lost cell answers again --------------------------------------------------------------

    def returned(self, spec: CellSpec, hv: Any, domains: list[Any]) -> list[str]:
        """Before a cell is used again: destroy and undefine the domains of guests that now
        live on another cell (failed over while it was away). Their disks are the guests'
        own on shared storage: never touched. Returns the domains removed."""
        from reconciler.drivers.domains import LibvirtGuests

        owned = {d.owned_id: d.name for d in domains if d.owned_id}
        stale = self.store.stale_guests(spec.name, list(owned))
        removed = []
        drv = LibvirtGuests(hv)
        for guest_id in stale:
            try:
                drv.undefine(owned[guest_id])
            except NanoError as exc:
                log.warning("cell %s: stale domain %s stays: %s", spec.name, owned[guest_id],
                            exc.message)
                continue
            removed.append(owned[guest_id])
            self.store.add_log(f"failover: cell {spec.name} is back; the stale copy of guest "
                               f"{guest_id} (now on another cell) was destroyed and undefined")
        return removed
