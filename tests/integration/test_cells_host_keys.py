"""Host keys of SSH cells, pinned and never trusted silently, against a real sshd on
loopback (tests/helpers/sshd.py) and the real local libvirtd behind it (qemu+ssh through
nanod's wrapper): the key met at first contact is pinned; a cell whose key then changes
(sshd restarted with a new host key) is refused with HostKeyMismatch naming both
fingerprints, before nanod authenticates to it; a PUT with the new key (or its
fingerprint) re-pins it; a given wrong key is refused; trust on first use can be turned
off; known_hosts keeps every cell's key. And a host that accepts TCP and never answers
(a socket this test opens) makes its cell unreachable within the connect timeout, for
paramiko and for libvirt's ssh, while another cell keeps converging on the one worker.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from reconciler.drivers.libvirt_hv import LibvirtHypervisor
from state.errors import Unavailable
from tests.api.test_compute import register, until
from tests.conftest import reconciling
from tests.helpers.sshd import SSHD, SshServer, host_key_fingerprint, start_sshd
from tests.integration.conftest import remove_cell_pools

pytestmark = pytest.mark.integration

CELLS = ("pin", "given", "strict", "k-a", "k-b", "silent", "busy")


@pytest.fixture
def ssh_settings() -> dict:
    """This test's `ssh` settings (parametrize to change them)."""
    return {}


@pytest.fixture
def workers() -> int:
    return 4


@pytest.fixture
def settings(settings, tmp_path, ssh_settings, workers):
    settings["ssh"].update({"key_dir": str(tmp_path), **ssh_settings})
    return reconciling(settings, probe_seconds=0.5, offline_after=2, workers=workers)


@pytest.fixture
def pools(server) -> Iterator[None]:
    """The libvirt pools this test's cells made on the real libvirtd go at the end, once
    the reconciler has stopped (else it would make them again)."""
    if not os.access(SSHD, os.X_OK):
        pytest.skip(f"{SSHD} missing: apt-get install openssh-server")
    try:
        libvirt.open("qemu:///system").close()
    except libvirt.libvirtError as exc:
        pytest.skip(f"qemu:///system is not reachable here: {exc}")
    yield
    if server.controller:
        server.controller.stop(10.0)
    remove_cell_pools(CELLS)


def cell_body(sshd: SshServer, tmp_path: Path, name: str, **ssh: str) -> dict:
    return {"address": "127.0.0.1", "virt_type": "qemu",
            "ssh": {"user": "root", "port": sshd.port, "key_file": sshd.key_file, **ssh},
            "storage_path": str(tmp_path / f"images-{name}")}


def condition(record: dict, kind: str) -> dict:
    return next((c for c in record["status"]["conditions"] if c["type"] == kind), {})


async def record_when(api, name: str, check, what: str, timeout: float = 30) -> dict:
    async def probe():
        rec = await api.ok("GET", f"/cells/{name}")
        return rec if check(rec) else None

    return await until(probe, timeout=timeout, what=what)


def refused_because(reason: str):
    return lambda r: condition(r, "CellReachable").get("reason") == reason


def converged(r: dict) -> bool:
    return r["alive"] and r["status"]["observed_generation"] >= r["generation"]


def pinned(tmp_path: Path) -> dict[str, str]:
    """known_hosts of the test's nanod: server name -> "type base64"."""
    path = tmp_path / "data" / "known_hosts"
    lines = path.read_text().splitlines() if path.exists() else []
    return {w[0]: f"{w[1]} {w[2]}" for w in (line.split() for line in lines)}


def logins(sshd: SshServer) -> int:
    """Logins this sshd (its log file, across restarts) accepted."""
    return Path(sshd.log_file).read_text().count("Accepted publickey")


def new_public_key(tmp_path: Path, name: str) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)],
                   check=True)
    return " ".join((tmp_path / f"{name}.pub").read_text().split()[:2])


@pytest.mark.gen_test(timeout=180)
async def test_first_contact_pins_a_changed_key_is_refused_and_a_put_re_pins(
        api, tmp_path, pools):
    sshd = start_sshd(tmp_path / "sshd")
    name = f"[127.0.0.1]:{sshd.port}"
    try:
        body = cell_body(sshd, tmp_path, "pin")
        await api.ok("POST", "/cells/pin", body)
        rec = await record_when(api, "pin", converged, "first contact")
        first = host_key_fingerprint(sshd.host_key)
        assert rec["status"]["observed"]["host_key"] == {
            "type": "ssh-ed25519", "fingerprint": first, "source": "pinned"}
        assert condition(rec, "HostKeyVerified")["status"] is True
        assert pinned(tmp_path) == {name: sshd.host_key}

        # the host comes back with other keys: refused, before any login, pin unchanged
        first_key = sshd.host_key
        sshd.stop()
        sshd = start_sshd(tmp_path / "sshd", port=sshd.port, new_host_key=True)
        second = host_key_fingerprint(sshd.host_key)
        assert second != first
        before = logins(sshd)
        rec = await record_when(api, "pin", refused_because("HostKeyMismatch"), "mismatch")
        message = condition(rec, "CellReachable")["message"]
        assert f"presents {second} (ssh-ed25519)" in message, message
        assert f"the key pinned for {name} is {first}" in message, message
        assert "PUT /api/v1/cells/pin" in message
        assert (rec["alive"], rec["status"]["phase"]) == (False, "offline")
        verified = condition(rec, "HostKeyVerified")
        assert (verified["status"], verified["reason"]) == (False, "HostKeyMismatch")
        # and it stays refused, probe after probe
        probed = rec["status"]["observed"]["probed_at"]
        rec = await record_when(api, "pin", lambda r: r["status"]["observed"]["probed_at"]
                                > probed + 1, "more probes")
        assert condition(rec, "CellReachable")["reason"] == "HostKeyMismatch"
        assert pinned(tmp_path) == {name: first_key}
        assert logins(sshd) == before

        # an explicit PUT with the new key re-pins it, for paramiko and libvirt's ssh alike
        # (the cell is alive only once libvirt answered through the wrapper)
        await api.ok("PUT", "/cells/pin", {"ssh": {**body["ssh"], "host_key": sshd.host_key}})
        rec = await record_when(api, "pin", converged, "re-pinned with the key")
        assert rec["status"]["observed"]["host_key"] == {
            "type": "ssh-ed25519", "fingerprint": second, "source": "ssh.host_key"}
        assert pinned(tmp_path) == {name: sshd.host_key}
        assert logins(sshd) > before

        # once more, re-pinned by fingerprint: the file gets the key the cell presented
        sshd.stop()
        sshd = start_sshd(tmp_path / "sshd", port=sshd.port, new_host_key=True)
        third = host_key_fingerprint(sshd.host_key)
        rec = await record_when(api, "pin", refused_because("HostKeyMismatch"),
                                "mismatch with the given key")
        message = condition(rec, "CellReachable")["message"]
        assert f"presents {third}" in message and f"ssh.host_key is {second}" in message
        await api.ok("PUT", "/cells/pin", {"ssh": {**body["ssh"], "host_key": third}})
        rec = await record_when(api, "pin", converged, "re-pinned with the fingerprint")
        assert rec["status"]["observed"]["host_key"]["fingerprint"] == third
        assert pinned(tmp_path) == {name: sshd.host_key}
    finally:
        sshd.stop()


@pytest.mark.gen_test(timeout=120)
async def test_a_given_wrong_key_is_refused_before_login(api, tmp_path, pools):
    sshd = start_sshd(tmp_path / "sshd")
    try:
        wrong = new_public_key(tmp_path, "wrong")
        body = cell_body(sshd, tmp_path, "given", host_key=wrong)
        await api.ok("POST", "/cells/given", body)
        rec = await record_when(api, "given", refused_because("HostKeyMismatch"), "refused")
        message = condition(rec, "CellReachable")["message"]
        assert f"presents {host_key_fingerprint(sshd.host_key)}" in message
        assert f"ssh.host_key is {host_key_fingerprint(wrong)}" in message
        assert rec["alive"] is False and logins(sshd) == 0
        assert pinned(tmp_path) == {}  # nothing pinned from a refused contact

        right = host_key_fingerprint(sshd.host_key)
        await api.ok("PUT", "/cells/given", {"ssh": {**body["ssh"], "host_key": right}})
        rec = await record_when(api, "given", converged, "the right fingerprint")
        assert pinned(tmp_path) == {f"[127.0.0.1]:{sshd.port}": sshd.host_key}
    finally:
        sshd.stop()


@pytest.mark.parametrize("ssh_settings", [{"trust_on_first_use": False}])
@pytest.mark.gen_test(timeout=120)
async def test_without_trust_on_first_use_every_cell_names_its_key(api, tmp_path, pools):
    sshd = start_sshd(tmp_path / "sshd")
    try:
        body = cell_body(sshd, tmp_path, "strict")
        await api.ok("POST", "/cells/strict", body)
        rec = await record_when(api, "strict", refused_because("HostKeyUnknown"), "unknown")
        message = condition(rec, "CellReachable")["message"]
        assert f"{host_key_fingerprint(sshd.host_key)} (ssh-ed25519) is not pinned" in message
        assert "setting ssh.trust_on_first_use" in message
        assert condition(rec, "HostKeyVerified")["reason"] == "HostKeyUnknown"
        assert rec["alive"] is False and logins(sshd) == 0 and pinned(tmp_path) == {}

        await api.ok("PUT", "/cells/strict", {"ssh": {**body["ssh"],
                                                      "host_key": sshd.host_key}})
        await record_when(api, "strict", converged, "named key")
        assert pinned(tmp_path) == {f"[127.0.0.1]:{sshd.port}": sshd.host_key}
    finally:
        sshd.stop()


@pytest.mark.gen_test(timeout=120)
async def test_known_hosts_keeps_every_cells_key(api, tmp_path, pools):
    servers = [start_sshd(tmp_path / "sshd-a"), start_sshd(tmp_path / "sshd-b")]
    try:
        for cell, sshd in zip(("k-a", "k-b"), servers, strict=True):
            await api.ok("POST", f"/cells/{cell}", cell_body(sshd, tmp_path, cell))
        for cell in ("k-a", "k-b"):
            await record_when(api, cell, converged, f"{cell} pinned")
        assert pinned(tmp_path) == {f"[127.0.0.1]:{s.port}": s.host_key for s in servers}
        # unregistering a cell forgets its pin only
        await api.ok("DELETE", "/cells/k-a")
        assert (await api.call("GET", "/cells/k-a")).code == 404
        assert pinned(tmp_path) == {f"[127.0.0.1]:{servers[1].port}": servers[1].host_key}
    finally:
        for sshd in servers:
            sshd.stop()


@pytest.fixture
def silent_host() -> Iterator[int]:
    """A port on loopback that accepts TCP connections and never says a word."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        for conn in held:
            conn.close()


@pytest.mark.parametrize("workers", [1])
@pytest.mark.parametrize("ssh_settings", [{"connect_timeout": 1, "command_timeout": 6}])
@pytest.mark.gen_test(timeout=120)
async def test_a_host_that_never_answers_does_not_hang_a_worker(
        api, server, tmp_path, silent_host, pools):
    await register(api, tmp_path, "busy")
    await record_when(api, "busy", converged, "busy cell alive")

    await api.ok("POST", "/cells/silent", {
        "address": "127.0.0.1", "virt_type": "qemu", "storage_path": str(tmp_path / "s"),
        "ssh": {"port": silent_host, "key_file": str(tmp_path / "none")}})
    # within the connect timeout (1 s; the bound here is loose for a loaded machine)
    rec = await record_when(api, "silent", refused_because("ProbeFailed"), "silent refused",
                            timeout=20)
    message = condition(rec, "CellReachable")["message"]
    assert message.startswith(f"ssh root@127.0.0.1:{silent_host}: no SSH banner within 1s"), \
        message

    # on the one worker, the other cell still converges while the silent one is retried
    probed = rec["status"]["observed"]["probed_at"]
    await api.ok("PUT", "/cells/busy", {"storage_path": str(tmp_path / "busy-moved")})
    busy = await record_when(api, "busy", converged, "busy cell converged", timeout=30)
    assert busy["spec"]["storage_path"] == str(tmp_path / "busy-moved")
    pools_seen = busy["status"]["observed"]["storage_pools"]
    assert [p["path"] for p in pools_seen] == [str(tmp_path / "busy-moved")]
    rec = await record_when(api, "silent", lambda r: r["status"]["observed"]["probed_at"]
                            > probed, "silent cell probed again")
    assert rec["alive"] is False

    # libvirt's ssh (nanod's wrapper: ConnectTimeout) gives up on it too
    transport = server.store.cell_spec("silent").transport
    uri = server.controller.connections.uri(transport)
    assert "command=" in uri and "ssh-known-hosts-wrapper" in uri
    started = time.monotonic()
    with pytest.raises(Unavailable, match="timed out during banner exchange"):
        LibvirtHypervisor(uri).node_info()
    assert time.monotonic() - started < 15  # ConnectTimeout=1: not an unbounded wait
