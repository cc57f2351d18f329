"""Host key pins without a network (reconciler/cells.py, state/cell_transport.py):
`KnownHosts` is one writer that keeps every entry under concurrent pins and never shows
a reader half a file; `HostKeyGuard` decides as documented (given key, pinned key, first
contact, trust on first use off); fingerprints are ssh-keygen's. Keys are real ones made by
ssh-keygen; the SSH side is tests/integration/test_cells_host_keys.py."""

from __future__ import annotations

import re
import subprocess
import threading
from pathlib import Path

import pytest

from reconciler.cells import CellRefused, HostKeyGuard, KnownHosts
from state.cell_transport import CellTransport, fingerprint, parse_host_key
from state.errors import Invalid


def keygen(tmp_path: Path, name: str, kind: str = "ed25519") -> tuple[str, str, str]:
    """(type, base64, fingerprint printed by ssh-keygen) of a new key."""
    path = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
    key_type, blob = (tmp_path / f"{name}.pub").read_text().split()[:2]
    printed = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", f"{path}.pub"],
                             check=True, capture_output=True, text=True).stdout.split()[1]
    return key_type, blob, printed


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa", "rsa"])
def test_keys_and_fingerprints_are_ssh_keygens(tmp_path, kind):
    key_type, blob, printed = keygen(tmp_path, "k", kind)
    assert fingerprint(blob) == printed
    assert parse_host_key(f"{key_type} {blob} comment") == parse_host_key(
        f"host.example {key_type} {blob}") == type(parse_host_key(printed))(
        printed, key_type, blob)
    assert parse_host_key(printed).fingerprint == printed
    with pytest.raises(Invalid, match="^ssh.host_key: "):
        parse_host_key(f"{key_type} {blob[:-8]}")


def test_known_hosts_keeps_every_pin_under_concurrent_writers(tmp_path):
    path = tmp_path / "known_hosts"
    path.write_text("# kept\nforeign.example ssh-ed25519 AAAAforeign\n")
    known = KnownHosts(str(path))
    seen_partial: list[str] = []
    done = threading.Event()

    def reader() -> None:  # every read sees whole lines, each of three words
        while not done.is_set():
            for line in path.read_text().splitlines():
                if not line.startswith("#") and len(line.split()) != 3:
                    seen_partial.append(line)

    def writer(i: int) -> None:
        for round_ in range(5):
            known.pin(f"[10.0.0.{i}]:22{round_}", "ssh-ed25519", f"AAAA{i}x{round_}")

    watcher = threading.Thread(target=reader)
    watcher.start()
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    watcher.join()
    lines = path.read_text().splitlines()
    assert lines[:2] == ["# kept", "foreign.example ssh-ed25519 AAAAforeign"]
    assert sorted(lines[2:]) == sorted(f"[10.0.0.{i}]:22{r} ssh-ed25519 AAAA{i}x{r}"
                                       for i in range(20) for r in range(5))
    assert seen_partial == []
    assert not list(tmp_path.glob("*.tmp"))

    # re-pinning replaces that server's key only; pinning the same key writes nothing
    assert known.pin("[10.0.0.3]:220", "ssh-rsa", "AAAAnew") is True
    assert known.get("[10.0.0.3]:220") == ("ssh-rsa", "AAAAnew")
    assert len(path.read_text().splitlines()) == len(lines)
    mtime = path.stat().st_mtime_ns
    assert known.pin("[10.0.0.3]:220", "ssh-rsa", "AAAAnew") is False
    assert path.stat().st_mtime_ns == mtime
    assert known.forget("[10.0.0.3]:220") is True and known.get("[10.0.0.3]:220") is None
    assert known.get("foreign.example") == ("ssh-ed25519", "AAAAforeign")


def guard(tmp_path, *, host_key: str = "", tofu: bool = True) -> HostKeyGuard:
    transport = CellTransport("ssh", host="192.0.2.4", user="root", ssh_port=2222,
                              host_key=parse_host_key(host_key) if host_key else None)
    return HostKeyGuard("c1", transport, KnownHosts(str(tmp_path / "known_hosts")),
                        trust_on_first_use=tofu)


def test_first_contact_pins_and_a_changed_key_is_refused(tmp_path):
    key_type, blob, printed = keygen(tmp_path, "a")
    _, other, other_printed = keygen(tmp_path, "b")
    first = guard(tmp_path)
    assert first.expected() is None
    first.check(key_type, blob)
    assert first.accepted == {"type": key_type, "fingerprint": printed, "source": "pinned"}
    assert (tmp_path / "known_hosts").read_text() == f"[192.0.2.4]:2222 {key_type} {blob}\n"

    again = guard(tmp_path)
    assert again.expected() == (key_type, blob)  # asked for first, as OpenSSH would
    with pytest.raises(CellRefused) as refused:
        again.check(key_type, other)
    assert refused.value.reason == "HostKeyMismatch"
    assert (f"the cell presents {other_printed} ({key_type}), the key pinned for "
            f"[192.0.2.4]:2222 is {printed}") in refused.value.message
    assert (tmp_path / "known_hosts").read_text() == f"[192.0.2.4]:2222 {key_type} {blob}\n"

    # the explicit pin: the given key wins and replaces the file's
    repinned = guard(tmp_path, host_key=f"{key_type} {other}")
    assert repinned.expected() == (key_type, other)
    repinned.check(key_type, other)
    assert repinned.accepted["source"] == "ssh.host_key"
    assert (tmp_path / "known_hosts").read_text() == f"[192.0.2.4]:2222 {key_type} {other}\n"
    # by fingerprint: the pinned key is expected only while it has that fingerprint
    assert guard(tmp_path, host_key=other_printed).expected() == (key_type, other)
    assert guard(tmp_path, host_key=printed).expected() is None
    with pytest.raises(CellRefused, match=re.escape(f"ssh.host_key is {printed}")):
        guard(tmp_path, host_key=printed).check(key_type, other)


def test_without_trust_on_first_use_an_unknown_key_is_refused(tmp_path):
    key_type, blob, printed = keygen(tmp_path, "a")
    with pytest.raises(CellRefused) as refused:
        guard(tmp_path, tofu=False).check(key_type, blob)
    assert refused.value.reason == "HostKeyUnknown"
    assert f"{printed} ({key_type}) is not pinned" in refused.value.message
    assert not (tmp_path / "known_hosts").exists()
    guard(tmp_path, tofu=False, host_key=printed).check(key_type, blob)  # named: accepted
    guard(tmp_path, tofu=False).check(key_type, blob)  # and pinned from then on
