"""Benchmark: a cell firewall with many guests, in a throwaway network namespace (root).

    .venv/bin/python tests/bench/bench_firewall.py [--guests 500] [--rules 10] [--repeat 5]
                                                    [--quick]

Measures (median of --repeat runs):
- render: `render_ruleset` of the whole table;
- apply: `NftFirewall.apply(policies)` (lists tables, renders, `nft -f -` one transaction);
- raw nft -f: the same script from a file with `nft -f FILE` in the same namespace
  (the floor our driver is compared with: goal apply / raw <= 2);
- inspect: `nft -j list table` + `parse_observed`;
- one rule change, as the reconciler does it: with the observation it already holds,
  `apply(observed=...)` replaces one guest chain; and the same change by re-declaring the
  whole table; plus a full reconcile round (inspect + plan + apply) for that change.
Not part of the test run (ARCHITECTURE.md §5: timing is measured, never asserted).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from reconciler.drivers.nft import NftFirewall  # noqa: E402
from reconciler.firewall import (  # noqa: E402
    GuestPolicy,
    Rule,
    parse_observed,
    plan_firewall,
    render_ruleset,
)
from tests.bench.common import add_quick, cannot_run, parse  # noqa: E402
from tests.helpers.netns import Lab, netns_unusable  # noqa: E402


def make_policies(guests: int, rules: int) -> list[GuestPolicy]:
    policies = []
    for n in range(guests):
        mac = f"00:16:3e:{(n >> 16) & 0xFF:02x}:{(n >> 8) & 0xFF:02x}:{n & 0xFF:02x}"
        items = []
        for r in range(rules):
            kind = r % 5
            if kind == 0:
                items.append(Rule("accept", "tcp", 1000 + r + n % 100))
            elif kind == 1:
                items.append(Rule("accept", "udp", 2000 + r, f"10.{n % 250}.{r}.0/24"))
            elif kind == 2:
                items.append(Rule("reject", "tcp", 0, f"192.168.{r}.{n % 250}"))
            elif kind == 3:
                items.append(Rule("accept", "icmp", 0, f"172.16.{r}.0/24"))
            else:
                items.append(Rule("reject", "all", 0, f"10.{r}.0.0/16"))
        policies.append(GuestPolicy(mac, "reject" if n % 2 else "accept", tuple(items),
                                    internal_if=f"vnet{n}"))  # fmt: skip
    return policies


def timed(step: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--guests", type=int, default=500)
    parser.add_argument("--rules", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    add_quick(parser, {"guests": 20, "rules": 3, "repeat": 1})
    args = parse(parser)
    reason = netns_unusable()
    if reason:
        cannot_run(reason)

    policies = make_policies(args.guests, args.rules)
    with Lab() as lab, tempfile.TemporaryDirectory() as tmp:
        firewall = NftFirewall(lab.shell())
        ok, why = firewall.available()
        if not ok:
            cannot_run(why)
        family = firewall.family()
        script = render_ruleset(policies, family=family)
        path = Path(tmp) / "ruleset.nft"
        path.write_text(script)
        raw_argv = ["ip", "netns", "exec", lab.cell, "nft", "-f", str(path)]

        results: dict[str, float] = {}
        results["render"] = timed(lambda: render_ruleset(policies, family=family), args.repeat)
        results["apply (driver, whole table)"] = timed(
            lambda: firewall.apply(policies), args.repeat
        )
        results["raw nft -f FILE"] = timed(
            lambda: subprocess.run(raw_argv, check=True, capture_output=True), args.repeat
        )
        results["inspect (list + parse)"] = timed(firewall.inspect, args.repeat)

        # the table the driver renders (its name is the driver's business)
        table = re.search(rf"^table {family} (\S+) \{{$", script, re.MULTILINE)
        assert table, "no table in the rendered ruleset"
        listing_argv = ["nft", "-j", "list", "table", str(family), table.group(1)]
        listing = firewall.shell.run(listing_argv).stdout
        results["  of which nft -j list"] = timed(
            lambda: firewall.shell.run(listing_argv), args.repeat
        )
        results["  of which parse"] = timed(lambda: parse_observed(listing), args.repeat)

        first, rest = policies[0], policies[1:]

        def changed(port: int) -> list[GuestPolicy]:
            """The table with one rule of one guest changed."""
            rule = Rule("accept", "tcp", port)
            guest = GuestPolicy(
                first.mac, first.default_action, (rule, *first.rules[1:]), first.internal_if
            )
            return [guest, *rest]

        ports = iter(range(40000, 50000))
        samples = []
        for _ in range(args.repeat):
            observed = firewall.inspect()  # what the reconciler holds before it applies
            desired = changed(next(ports))
            start = time.perf_counter()
            firewall.apply(desired, observed=observed)
            samples.append(time.perf_counter() - start)
        results["one rule change (replace 1 chain)"] = statistics.median(samples)
        results["one rule change (whole table)"] = timed(
            lambda: firewall.apply(changed(next(ports))), args.repeat
        )

        def reconcile_round() -> None:
            desired = changed(next(ports))
            seen = firewall.inspect()
            assert plan_firewall(desired, seen, family=family)
            firewall.apply(desired, observed=seen)
            last[:] = desired

        last: list[GuestPolicy] = []
        results["one change: inspect+plan+apply"] = timed(reconcile_round, args.repeat)
        assert plan_firewall(last, firewall.inspect(), family=family) == []

    rules_total = args.guests * (args.rules + 5)
    print(f"family {family}; {args.guests} guests x {args.rules} rules "
          f"(~{rules_total} nft rules, script {len(script) / 1e6:.2f} MB); "
          f"median of {args.repeat}")  # fmt: skip
    for name, seconds in results.items():
        print(f"  {name:38s} {seconds * 1000:9.1f} ms")
    ratio = results["apply (driver, whole table)"] / results["raw nft -f FILE"]
    print(f"  apply / raw nft -f ratio                 {ratio:9.2f}  (goal <= 2)")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
