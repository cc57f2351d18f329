"""The README's two commands together: a nanod that `scripts/setup` started on this host
must be left as it was by the test suite (a pytest plugin, loaded by tests/conftest.py).

At the start of the session it finds that nanod (NANO_SETUP_URL, default
http://127.0.0.1:5870; it logs in as NANO_ADMIN_USER, default admin, with
NANO_ADMIN_PASSWORD) and records what `nanod drift` would report and every host object of
the production names prefix (NANO_SETUP_PREFIX, default nano): libvirt domains, storage
pools and their volumes, networks, the nft tables `nano` and `nano_nat_*`. At the end it
waits until that nanod has probed each of its cells again, then compares: a resource that
drifts or is not Ready now but was converged at the start, or any production host object
created, changed or removed, fails the session (exit status 1) with what differs.

No such nanod answering: the check is skipped, and the summary says so. One answering
without NANO_ADMIN_PASSWORD: the session fails, saying to set it (the suite cannot prove it
left the installation alone). The suite's own nanods use the prefix `nanotest`
(tests/conftest.py), so nothing of theirs counts here.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

import pytest

from nanod import manifests
from nanod.client import ApiError, ClientConfig, ClientError, NanoClient

URL = os.environ.get("NANO_SETUP_URL", "http://127.0.0.1:5870")
USER = os.environ.get("NANO_ADMIN_USER", "admin")
PREFIX = os.environ.get("NANO_SETUP_PREFIX", "nano")
PROBE_WAIT = 60.0  # seconds to wait for the setup nanod to probe its cells after the suite


@dataclass
class Guard:
    state: str = "off"  # off | absent | broken | watching
    reason: str = ""
    client: NanoClient | None = None
    drift_before: dict[str, list[str]] = field(default_factory=dict)
    host_before: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    summary: str = ""


GUARD = Guard()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/v1/system/", timeout=3):
            return True
    except urllib.error.HTTPError:
        return True  # something answers HTTP there: treat it as the setup nanod
    except OSError:
        return False


def drift_report(client: NanoClient) -> dict[str, list[str]]:
    """What `nanod drift` reports, by resource: the same function it runs."""
    drifting, _unwatched = manifests.drift(client)
    return {item.label: problems for item, problems in drifting}


def _nft_json(*args: str) -> Any:
    done = subprocess.run(["nft", "-j", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return {"error": done.stderr.strip()}
    return json.loads(done.stdout)


def _without_handles(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_handles(v) for k, v in value.items() if k != "handle"}
    if isinstance(value, list):
        return [_without_handles(v) for v in value]
    return value


def _pool_definition(xml: str) -> str:
    """A pool's XML without its sizes (they follow whatever else fills the disk) and the
    target's permissions (libvirt fills them in when it builds the pool and forgets them
    when libvirtd restarts: measured, with tests/integration/test_faults.py restarting it)."""
    root = ET.fromstring(xml)
    for tag in ("capacity", "allocation", "available"):
        for element in root.findall(tag):
            root.remove(element)
    for target in root.findall("target"):
        for element in target.findall("permissions"):
            target.remove(element)
    return ET.tostring(root, encoding="unicode")


def host_snapshot(prefix: str) -> dict[str, Any]:
    """Every host object a nanod of names prefix `prefix` may own, with what matters of
    it: libvirt domains (state, definition), storage pools (state, target, volumes),
    networks (state, definition), nft tables (their rules, handles left out)."""
    import libvirt

    snap: dict[str, Any] = {}
    conn = libvirt.open("qemu:///system")
    try:
        owned = f"{prefix}-"
        for dom in conn.listAllDomains():
            if dom.name().startswith(owned):
                snap[f"domain {dom.name()}"] = (dom.state()[0], dom.XMLDesc(
                    libvirt.VIR_DOMAIN_XML_INACTIVE))
        for pool in conn.listAllStoragePools():
            if pool.name().startswith(owned):
                volumes = sorted(v.name() for v in pool.listAllVolumes()) if pool.isActive() \
                    else []
                snap[f"storage pool {pool.name()}"] = (pool.isActive(), _pool_definition(
                    pool.XMLDesc(libvirt.VIR_STORAGE_XML_INACTIVE)), volumes)
        for net in conn.listAllNetworks():
            if net.name().startswith(owned):
                snap[f"network {net.name()}"] = (net.isActive(), net.XMLDesc(
                    libvirt.VIR_NETWORK_XML_INACTIVE))
    finally:
        conn.close()
    tables = _nft_json("list", "tables")
    for item in tables.get("nftables", []) if isinstance(tables, dict) else []:
        table = item.get("table")
        if table and (table["name"] == prefix or table["name"].startswith(f"{prefix}_nat_")):
            listing = _nft_json("list", "table", table["family"], table["name"])
            snap[f"nft table {table['family']} {table['name']}"] = _without_handles(listing)
    return snap


def _compare(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(before) | set(after)):
        if key not in after:
            out.append(f"{key} was removed")
        elif key not in before:
            out.append(f"{key} was created")
        elif before[key] != after[key]:
            out.append(f"{key} was changed: {_difference(before[key], after[key])}")
    return out


def _difference(before: Any, after: Any) -> str:
    """What differs between two snapshots of one object, short enough for a summary."""
    if isinstance(before, tuple) and isinstance(after, tuple) and len(before) == len(after):
        parts = [_difference(b, a) for b, a in zip(before, after, strict=True) if b != a]
        return "; ".join(parts)
    if isinstance(before, list) and isinstance(after, list) and all(
            isinstance(v, str) for v in before + after):
        gone, new = sorted(set(before) - set(after)), sorted(set(after) - set(before))
        return f"removed {gone} added {new}"
    text_before, text_after = repr(before), repr(after)
    if len(text_before) + len(text_after) > 600:
        at = next((i for i, (x, y) in enumerate(zip(text_before, text_after, strict=False))
                   if x != y), 0)
        text_before = "..." + text_before[max(0, at - 40):at + 160]
        text_after = "..." + text_after[max(0, at - 40):at + 160]
    return f"{text_before} -> {text_after}"


def _wait_for_fresh_probes(client: NanoClient, since: float) -> list[str]:
    """Wait until every cell of the setup nanod was probed after `since` (its status then
    shows the host as the suite left it); the cells that were not, if time runs out."""
    deadline = time.monotonic() + PROBE_WAIT
    while True:
        stale = []
        for cell in client.ok("GET", "/cells/") or []:
            name = cell["name"] if isinstance(cell, dict) else str(cell)
            rec = client.ok("GET", f"/cells/{name}")
            probed = float(((rec.get("status") or {}).get("observed") or {}).get(
                "probed_at") or 0)
            if probed <= since:
                stale.append(name)
        if not stale or time.monotonic() > deadline:
            return stale
        time.sleep(1.0)


def start() -> None:
    if not _answers(URL):
        GUARD.state, GUARD.reason = "absent", (
            f"no nanod answers at {URL} (scripts/setup starts one; NANO_SETUP_URL names "
            "another)")
        return
    password = os.environ.get("NANO_ADMIN_PASSWORD", "")
    if not password:
        GUARD.state, GUARD.reason = "broken", (
            f"a nanod answers at {URL} but NANO_ADMIN_PASSWORD is not set: set it (and "
            "NANO_ADMIN_USER if not admin) so the suite can check it leaves that installation "
            "as it was")
        return
    client = NanoClient(ClientConfig(URL, USER, password, "environment"))
    try:
        client.login()
        GUARD.drift_before = drift_report(client)
    except ClientError as exc:
        GUARD.state, GUARD.reason = "broken", f"setup nanod at {URL}: {exc}"
        return
    GUARD.client = client
    try:
        GUARD.host_before = host_snapshot(PREFIX)
    except Exception as exc:  # libvirt or nft unusable: say so rather than pass
        GUARD.state, GUARD.reason = "broken", f"cannot read this host's objects: {exc}"
        return
    GUARD.state = "watching"


def finish() -> None:
    client = GUARD.client
    if GUARD.state == "broken":
        GUARD.failures.append(GUARD.reason)
    if GUARD.state != "watching" or client is None:
        return
    ended = time.time()
    try:
        stale = _wait_for_fresh_probes(client, ended)
        after = drift_report(client)
    except (ClientError, ApiError) as exc:
        GUARD.failures.append(f"setup nanod at {URL} stopped answering: {exc}")
        return
    if stale:
        GUARD.failures.append(f"cells not probed again within {PROBE_WAIT:g} s after the "
                              f"suite: {', '.join(stale)}")
    for label, problems in sorted(after.items()):
        if label not in GUARD.drift_before:
            GUARD.failures.append(f"{label}: {'; '.join(problems)}")
    GUARD.failures += _compare(GUARD.host_before, host_snapshot(PREFIX))
    already = len(GUARD.drift_before)
    objects = len(GUARD.host_before)
    GUARD.summary = (f"setup nanod at {URL}: no drift after the suite, and its {objects} "
                     f"host object(s) of prefix {PREFIX!r} as they were"
                     + (f" ({already} resource(s) were already not converged at the start)"
                        if already else ""))


# -- the pytest hooks (tests/conftest.py loads this module as a plugin) -------------------


def pytest_sessionstart(session: pytest.Session) -> None:
    start()


def pytest_report_header(config: pytest.Config) -> str:
    if GUARD.state == "watching":
        return (f"setup nanod check: watching {URL} ({len(GUARD.drift_before)} resource(s) "
                f"not converged at start, {len(GUARD.host_before)} host object(s) of prefix "
                f"{PREFIX!r})")
    return f"setup nanod check: {GUARD.state}: {GUARD.reason}"


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    finish()
    if GUARD.failures:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    write = terminalreporter.write_line
    if GUARD.failures:
        terminalreporter.section("setup nanod check FAILED", sep="=", red=True)
        for line in GUARD.failures:
            write(line)
    elif GUARD.state == "watching":
        terminalreporter.section("setup nanod check", sep="-")
        write(GUARD.summary)
    else:
        terminalreporter.section("setup nanod check", sep="-")
        write(f"skipped: {GUARD.reason}")
