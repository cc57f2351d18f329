"""The firewall reconciler: one cell's nftables table `nano` holding the security policy of
every guest placed there, kept equal to the store and reported in the cell's status.

Registered by `reconciler/kinds.py`; key `firewall/<cell>`, enqueued by the API after a
guest policy change, by the guest reconciler when a guest is created, deleted, started or
stopped, and by the cell reconciler on every probe (so a hand edit is found within a probe
period). The table's shape, rendering, parsing and planning are `reconciler.firewall`'s;
running `nft` is `reconciler.drivers.nft.NftFirewall`'s. Here: who is desired, observe,
plan, apply, re-observe, record.

Desired: for each guest on the cell with a policy of its own (a `GuestPolicy` row: one made
through the API or copied from its `security_policy_group` at create), one chain per NIC
MAC with the guest's default action and rules in order. The host-side tap names go into
the chain only for guests whose rules name an interface (they are read from the running
domain's live XML; a stopped guest has none, and its interface rules wait for it to run).
A guest whose policy the cell's family cannot express (interface rules under the `inet`
fallback) keeps whatever chain it has and is listed in the status with the reason.

A cell is left alone until one of its guests has a policy (so a cell that never hosted a
policy never sees a table of ours); when the last such guest goes, the table is removed.
A cell whose kernel or tools cannot host the table is reported (`FirewallReady` false,
reason `NftMissing` or `Unsupported`, the driver's explanation as message); a simulated
cell (libvirt test driver, whose shell is this host's) is reported as such and never
touched.

Drift: the table differing from what we last applied and verified (a rule added, changed
or deleted by hand, the table deleted) is reported in `FirewallDrifted` (and the cell's
`Drifted`) with what differed, logged, and corrected in the same reconcile.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from reconciler.contract import Key, Result, format_time, set_condition
from reconciler.firewall import (
    Family,
    GuestPolicy,
    ObservedFirewall,
    plan_firewall,
    render_ruleset,
    validate_policy,
)
from state.errors import Invalid, NanoError, Permanent, Unavailable

log = logging.getLogger("nano.reconciler.firewalls")

FIREWALL_KEY = "firewall"  # the cell's observed key (state/netstatus.py)
FIREWALL_READY = "FirewallReady"
FIREWALL_DRIFTED = "FirewallDrifted"
SIMULATED = "a simulated cell (libvirt test driver) has no firewall of its own"


def now_text() -> str:
    return format_time(dt.datetime.now().replace(microsecond=0))


def policy_dict(policy: GuestPolicy) -> dict[str, Any]:
    return {"mac": policy.mac, "default_action": policy.default_action,
            "rules": [rule.to_api() for rule in policy.rules],
            "internal_if": policy.internal_if, "external_if": policy.external_if}


def policy_from_dict(data: Mapping[str, Any]) -> GuestPolicy:
    return validate_policy(data["mac"], data["default_action"], data.get("rules") or [],
                           internal_if=data.get("internal_if"),
                           external_if=data.get("external_if"))


def uses_interfaces(rules: Iterable[Mapping[str, Any]]) -> bool:
    return any(int(rule.get("interface") or 0) for rule in rules)


def desired_policies(guests: Iterable[Mapping[str, Any]], taps: Mapping[str, str], *,
                     family: Family) -> tuple[list[GuestPolicy], dict[str, str]]:
    """Pure: (the chains the cell's table should hold, {guest id: why it has none}).

    `guests` are `Store.firewall_guests(cell)` rows; `taps` maps a MAC to the tap of a
    running guest's NIC. Each NIC MAC of a guest gets a chain with the guest's policy and
    both of its taps (so interface rules match whichever NIC the frame leaves by)."""
    policies: list[GuestPolicy] = []
    refused: dict[str, str] = {}
    for guest in guests:
        macs = guest["macs"]
        if not macs:
            refused[guest["id"]] = "the guest has no network interface"
            continue
        internal_if = taps.get(macs.get("internal", ""))
        external_if = taps.get(macs.get("external", ""))
        mine: list[GuestPolicy] = []
        try:
            for kind in ("internal", "external"):
                if kind in macs:
                    mine.append(validate_policy(macs[kind], guest["default_action"],
                                                guest["rules"], internal_if=internal_if,
                                                external_if=external_if))
            render_ruleset(mine, family=family)  # raises Invalid what the family cannot say
        except Invalid as exc:
            waiting = uses_interfaces(guest["rules"]) and internal_if is None \
                and external_if is None
            refused[guest["id"]] = ("interface rules apply once the guest runs" if waiting
                                    and family is Family.BRIDGE else exc.message)
            continue
        policies.extend(mine)
    return policies, refused


class FirewallReconciler:
    """Converges one cell's `nano` table per key `firewall/<cell>`."""

    kind = "firewall"

    def __init__(self, store: Any, connections: Any, enqueue: Callable[[Key], None], *,
                 retry_seconds: float = 30.0, unsupported_seconds: float = 300.0) -> None:
        self.store = store
        self.connections = connections
        self.enqueue = enqueue
        self.retry_seconds = retry_seconds
        self.unsupported_seconds = unsupported_seconds
        self._firewalls: dict[str, tuple[Any, Any]] = {}  # cell -> (shell, NftFirewall)

    def keys(self) -> Iterable[Key]:
        return [Key(self.kind, name) for name in self.store.cell_names()]

    def reconcile(self, key: Key) -> Result:
        spec = self.store.cell_spec(key.id)
        if spec is None:
            self._firewalls.pop(key.id, None)
            return Result()
        status = self.store.cell_net_status(spec.name, FIREWALL_KEY)
        guests = [] if spec.deleting else self.store.firewall_guests(spec.name)
        if not guests and not status.get("table"):
            return Result()  # never applied here: the cell's ruleset is none of our business
        if not spec.observed.get("alive"):
            return Result(note="cell offline: its probe enqueues the firewall again")
        if spec.libvirt_uri.startswith("test:"):
            # a simulated cell (libvirt test driver) runs its shell on this host: the host's
            # ruleset is not the cell's to change
            if status.get("reason") != SIMULATED:
                self._record(spec.name, {"available": False, "reason": SIMULATED},
                             ready=(False, "Simulated", SIMULATED), drift=None)
            return Result(note=SIMULATED)
        link = self.connections.link(spec)
        firewall = self._firewall(spec.name, link.shell)
        try:
            try:
                family = firewall.family()
            except Permanent as exc:
                missing = "not installed" in exc.message
                self._record(spec.name, {**status, "available": False, "reason": exc.message},
                             ready=(False, "NftMissing" if missing else "Unsupported",
                                    exc.message), drift=None)
                return Result(requeue_after=self.unsupported_seconds,
                              note=f"firewall unavailable: {exc.message}")
            if not guests:
                firewall.remove()
                self._record(spec.name, {"available": True, "family": str(family),
                                         "table": False, "chains": 0, "applied": []},
                             ready=(True, "NoPolicies", "no guest on this cell has a "
                                    "security policy: table removed"), drift=[])
                return Result(note="table removed")
            return self._converge(spec, link, firewall, family, guests, status)
        except NanoError as exc:
            if not isinstance(exc, Unavailable):
                self._record(spec.name, {**status, "error": exc.message},
                             ready=(False, "Error", exc.message), drift=None)
            raise

    def _firewall(self, cell: str, shell: Any) -> Any:
        from reconciler.drivers.nft import NftFirewall

        cached = self._firewalls.get(cell)
        if cached is None or cached[0] is not shell:
            cached = (shell, NftFirewall(shell, cell=cell))
            self._firewalls[cell] = cached
        return cached[1]

    def _converge(self, spec: Any, link: Any, firewall: Any, family: Family,
                  guests: list[dict[str, Any]], status: dict[str, Any]) -> Result:
        taps = self._taps(link, [g for g in guests if uses_interfaces(g["rules"])])
        desired, refused = desired_policies(guests, taps, family=family)
        observed: ObservedFirewall = firewall.inspect()
        if refused:  # those keep whatever chain they have
            keep = {g["macs"].get(k) for g in guests if g["id"] in refused
                    for k in ("internal", "external")}
            desired += [p for p in observed.policies if p.mac in keep]
        drift = self._drift(status, observed, family)
        actions = plan_firewall(desired, observed, family=family)
        if actions:
            firewall.apply(desired, observed=observed)
            observed = firewall.inspect()
        left = plan_firewall(desired, observed, family=family)
        problems = [a.describe() for a in left]
        problems += [f"guest {gid}: {why}" for gid, why in sorted(refused.items())]
        record = {
            "available": True, "family": str(family), "table": True,
            "chains": len(observed.policies), "guests": len(guests) - len(refused),
            "refused": [{"guest": gid, "reason": why} for gid, why in sorted(refused.items())],
            "applied": ([policy_dict(p) for p in observed.policies] if not left
                        else status.get("applied", [])),
            "error": "",
        }
        ready = (not problems, "Converged" if not problems else
                 ("PoliciesRefused" if not left else "NotConverged"),
                 "; ".join(problems) or f"{len(observed.policies)} guest chain(s) in table "
                 f"{family} nano")
        self._record(spec.name, record, ready=ready, drift=drift)
        return Result(requeue_after=self.retry_seconds if left else None,
                      actions=tuple(actions), note="; ".join(drift))

    def _taps(self, link: Any, guests: list[dict[str, Any]]) -> dict[str, str]:
        """MAC -> host tap of the running guests among `guests` (live domain XML)."""
        if not guests:
            return {}
        from reconciler.drivers.domains import LibvirtGuests
        from reconciler.guest_xml import domain_name, parse_domain_xml

        drv = LibvirtGuests(link.hypervisor)
        taps: dict[str, str] = {}
        for guest in guests:
            xml = drv.domain_xml(domain_name(guest["id"]))
            if not xml:
                continue
            for nic in parse_domain_xml(xml).interfaces:
                if nic.target:
                    taps[nic.mac.lower()] = nic.target
        return taps

    def _drift(self, status: dict[str, Any], observed: ObservedFirewall,
               family: Family) -> list[str]:
        """What differs from what we last applied and verified ([]: nothing, or never
        applied). Changes we are about to make are not drift: only the cell moving."""
        if not status.get("table"):
            return []
        try:
            applied = [policy_from_dict(p) for p in status.get("applied") or []]
        except Invalid:
            return []
        if observed.clean and sorted(observed.policies, key=lambda p: p.mac) == applied:
            return []
        if not observed.present:
            return [f"table {family} nano vanished from the cell"]
        return [a.describe() for a in plan_firewall(applied, observed, family=family)]

    def _record(self, cell: str, observed: dict[str, Any], *, ready: tuple[bool, str, str],
                drift: list[str] | None) -> None:
        now = now_text()
        conditions = list(self.store.cell_conditions(cell))
        conditions = set_condition(conditions, FIREWALL_READY, *ready, now)
        if drift is not None:
            conditions = set_condition(
                conditions, FIREWALL_DRIFTED, bool(drift),
                "Corrected" if drift else "InSync",
                ("found and corrected: " + "; ".join(drift)) if drift else "", now)
        previous = self.store.cell_net_status(cell, FIREWALL_KEY)
        if drift:
            observed = {**observed, "last_drift": {"at": now, "changes": drift}}
            log.warning("cell %s: firewall drifted: %s", cell, "; ".join(drift))
            self.store.add_log(f"firewall of cell {cell} drifted and was corrected: "
                               + "; ".join(drift)[:900], user="nanod",
                               resource=f"cell/{cell}")
        elif "last_drift" in previous:
            observed = {**observed, "last_drift": previous["last_drift"]}
        wanted = [c for c in conditions if c["type"] in (FIREWALL_READY, FIREWALL_DRIFTED)]
        self.store.record_cell_net_status(cell, FIREWALL_KEY, observed, wanted)
