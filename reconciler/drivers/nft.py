"""The firewall driver: a cell's `nano` nftables table (named by the names prefix,
reconciler/naming.py), driven through a `HostShell`.

Callers: the guest reconciler (apply a cell's policies after a guest starts or its policy
changes, report drift) and the cell reconciler (`available()` in the cell's facts). What
goes into the table and how listings read back is `reconciler.firewall` (pure); this module
only runs `nft` with argv lists: `nft -f -` with the script on stdin (one transaction),
`nft -j list table <family> nano`, `nft -c -f -` for probes.

The family is chosen per cell (see `reconciler.firewall`): `bridge` when the kernel takes
conntrack and reject in bridge tables (probed with `nft -c`, which the kernel checks but
never commits), else `inet` when br_netfilter hands bridged IP traffic to the inet hooks,
else the cell cannot host security policies and `available()` says why.

Errors: `Permanent` when nft is missing, refuses a script or cannot run (shown in status);
`Unavailable` (from the shell) when the cell cannot be reached.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from reconciler.drivers.shell import RC_NOT_FOUND, CommandResult, HostShell, check
from reconciler.firewall import (
    Family,
    GuestPolicy,
    ObservedFirewall,
    parse_observed,
    render_changes,
    render_ruleset,
)
from reconciler.naming import names
from state.errors import Permanent

log = logging.getLogger("nano.drivers.nft")

BR_NETFILTER_SYSCTL = "/proc/sys/net/bridge/bridge-nf-call-iptables"

# Checked by the kernel (`nft -c`), never committed: what the bridge family must accept.
_BRIDGE_PROBE = """table bridge nano_probe {
\tchain forward {
\t\ttype filter hook forward priority 0; policy accept;
\t\tct state established,related accept
\t\tmeta l4proto tcp reject with tcp reset
\t\treject
\t}
}
"""
_INET_PROBE = _BRIDGE_PROBE.replace("table bridge", "table inet")
_HINTS = {
    Family.BRIDGE: "load the kernel modules nf_conntrack_bridge and nft_reject_bridge",
    Family.INET: "load br_netfilter and set net.bridge.bridge-nf-call-iptables=1",
}


class NftFirewall:
    """One cell's firewall. Thread-safe as far as its shell is; the family is probed once
    (on first need) unless given.

    `cell` names the cell in messages (default: the shell's `target`, else "localhost");
    `nft` is the program to run (a path when the remote PATH lacks /usr/sbin).
    """

    def __init__(
        self,
        shell: HostShell,
        *,
        family: Family | None = None,
        cell: str | None = None,
        nft: str = "nft",
        timeout: float = 120,
    ) -> None:
        self.shell = shell
        self.cell = cell or str(getattr(shell, "target", "") or "localhost")
        self._nft = nft
        self._timeout = timeout
        self._family = family
        self._checked = False
        self._lock = threading.Lock()

    # -- capability ------------------------------------------------------------------

    def _run(self, args: list[str], *, input: bytes | None = None) -> CommandResult:
        result = self.shell.run([self._nft, *args], input=input, timeout=self._timeout)
        if result.rc == RC_NOT_FOUND:
            raise Permanent(f"nft is not installed on {self.cell}: install nftables")
        return result

    def _probe(self, family: Family) -> str:
        """'' when `family` takes our statements on this kernel, else the reason."""
        script = _BRIDGE_PROBE if family is Family.BRIDGE else _INET_PROBE
        result = self._run(["-c", "-f", "-"], input=script.encode())
        if not result.ok:
            text = result.stderr.strip() or result.stdout.strip() or f"exit {result.rc}"
            errors = [
                line.split("Error: ", 1)[1] for line in text.splitlines() if "Error: " in line
            ]
            return "; ".join(dict.fromkeys(errors)) if errors else text[-500:]
        if family is Family.INET:
            sysctl = self.shell.run(["cat", BR_NETFILTER_SYSCTL], timeout=self._timeout)
            if not sysctl.ok:
                return f"br_netfilter is not loaded ({BR_NETFILTER_SYSCTL} missing)"
            if sysctl.stdout.strip() != "1":
                return "net.bridge.bridge-nf-call-iptables is 0"
        return ""

    def family(self) -> Family:
        """The family our table lives in on this cell (probed on first use, then
        remembered); raises `Permanent` with `available()`'s reason when none works."""
        if self._family is not None and self._checked:
            return self._family
        ok, reason = self.available()
        if not ok:
            raise Permanent(reason)
        assert self._family is not None
        return self._family

    def available(self) -> tuple[bool, str]:
        """(True, "<family> family") when this cell can enforce security policies, else
        (False, what to install or load). Never raises for a missing nft; `Unavailable`
        when the cell cannot be reached."""
        with self._lock:
            try:
                version = self._run(["--version"])
                if not version.ok:
                    return False, f"nft does not run on {self.cell}: {version.stderr.strip()}"
                if self._family is not None:
                    reason = self._probe(self._family)
                    if reason:
                        hint = _HINTS[self._family]
                        return False, (
                            f"nft on {self.cell} refuses our {self._family} table ({reason}): "
                            f"{hint}"
                        )
                    self._checked = True
                    return True, f"{self._family} family"
                bridge = self._probe(Family.BRIDGE)
                if not bridge:
                    self._family, self._checked = Family.BRIDGE, True
                    return True, "bridge family"
                inet = self._probe(Family.INET)
                if not inet:
                    self._family, self._checked = Family.INET, True
                    log.info("%s: bridge family unusable (%s); using inet", self.cell, bridge)
                    return True, (
                        "inet family through br_netfilter (bridge family unusable: the kernel "
                        "lacks nf_conntrack_bridge/nft_reject_bridge; interface rules "
                        "unsupported)"
                    )
            except Permanent as exc:
                return False, exc.message
        return False, (
            f"{self.cell} cannot filter bridged guest traffic statefully: the bridge family "
            f"fails ({bridge}) and the inet family fails ({inet}); {_HINTS[Family.BRIDGE]}, "
            f"or {_HINTS[Family.INET]}"
        )

    # -- observe ---------------------------------------------------------------------

    def _listing(self, family: Family) -> str | None:
        """`nft -j list table <family> nano`, None when there is no such table. (Listing
        one table is cheap when it is absent; `nft list tables` is not: nft 1.0.6 loads
        every rule first.)"""
        table = names().firewall_table
        result = self._run(["-j", "list", "table", str(family), table])
        if result.ok:
            return result.stdout
        if "No such file or directory" in result.stderr or "not supported" in result.stderr:
            return None
        check(result, f"nft list table {family} {table} on {self.cell}")
        return None

    def _stale(self, family: Family) -> tuple[Family, ...]:
        """Other families that also hold a `nano` table (left by a change of family)."""
        return tuple(other for other in Family if other is not family and self._listing(other))

    def inspect(self) -> ObservedFirewall:
        """The table as it is, in the model plus the problems the model cannot hold, and
        `nano` tables left in other families (`stale`)."""
        family = self.family()
        stale = self._stale(family)
        listing = self._listing(family)
        if listing is None:
            return ObservedFirewall(family=None, present=False, stale=stale)
        try:
            observed = parse_observed(listing)
        except ValueError as exc:
            raise Permanent(f"nft listing on {self.cell}: {exc}") from exc
        return ObservedFirewall(
            observed.family, observed.present, observed.policies, observed.problems, stale
        )

    def observe(self) -> list[GuestPolicy]:
        """The guest policies the cell's table holds now (empty when there is none)."""
        return list(self.inspect().policies)

    # -- change ----------------------------------------------------------------------

    def _load(self, script: str, what: str) -> None:
        result = self._run(["-f", "-"], input=script.encode())
        check(result, f"{what} on {self.cell}")

    def apply(
        self, policies: Iterable[GuestPolicy], *, observed: ObservedFirewall | None = None
    ) -> None:
        """Make the cell's table hold exactly `policies`, in one nft transaction.

        Without `observed`, the whole table is re-declared. With a fresh `observed` (the
        reconciler's own observation) that is clean, only the guest chains that differ are
        replaced; should that transaction fail (the table changed meanwhile), the whole
        table is re-declared. Raises `Invalid` for policies the family cannot express,
        `Permanent` when nft refuses."""
        wanted = list(policies)
        family = self.family()
        if observed is not None and observed.clean and observed.family is family:
            script = render_changes(wanted, observed, family=family)
            if not script:
                return
            try:
                self._load(script, "nft update")
                return
            except Permanent as exc:
                log.warning(
                    "%s: incremental firewall update failed, re-declaring: %s",
                    self.cell,
                    exc.message,
                )
        stale = observed.stale if observed is not None else self._stale(family)
        self._load(render_ruleset(wanted, family=family, purge=stale), "nft apply")

    def remove(self) -> None:
        """Delete our `nano` table in every family; other tables are never touched.
        Idempotent."""
        tables = [family for family in Family if self._listing(family) is not None]
        if not tables:
            return
        table = names().firewall_table
        script = "".join(f"delete table {family} {table}\n" for family in tables)
        self._load(script, "nft delete table")
