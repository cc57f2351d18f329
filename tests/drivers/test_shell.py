"""HostShell contract, proven the same way on both adapters: LocalShell on this machine and
ParamikoShell against a real sshd on loopback (tests/helpers/sshd.py)."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.drivers.shell import (
    RC_NOT_FOUND,
    CommandResult,
    HostKeyPolicy,
    HostShell,
    LocalShell,
    ParamikoShell,
    check,
)
from state.errors import Permanent, Unavailable
from tests.helpers.sshd import SshServer, start_sshd


def paramiko_shell(server: SshServer, **options: object) -> ParamikoShell:
    kwargs: dict = {"key_file": server.key_file, "known_hosts": server.known_hosts}
    kwargs.update(options)  # known_hosts=None: none
    return ParamikoShell(server.host, server.port, server.user, **kwargs)


@pytest.fixture(params=["local", pytest.param("ssh", marks=pytest.mark.integration)])
def shell(request: pytest.FixtureRequest) -> Iterator[HostShell]:
    if request.param == "local":
        sh: HostShell = LocalShell()
    else:
        sh = paramiko_shell(request.getfixturevalue("sshd"))
    try:
        yield sh
    finally:
        sh.close()


def test_words_reach_the_program_unparsed(shell: HostShell) -> None:
    words = ["it's", "$HOME", "a b", "; rm -rf /", "`id`", "*", ""]
    result = shell.run(["printf", "%s|", *words])
    assert result == CommandResult(0, "|".join(words) + "|", "")


def test_failure_is_a_result_with_stderr(shell: HostShell) -> None:
    result = shell.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.rc, result.stdout, result.stderr, result.ok) == (3, "out\n", "err\n", False)


def test_missing_program_is_rc_127(shell: HostShell) -> None:
    result = shell.run(["nano-no-such-program", "--version"])
    assert result.rc == RC_NOT_FOUND
    assert "nano-no-such-program" in result.stderr and "not found" in result.stderr


def test_input_goes_to_stdin_and_large_output_on_both_streams(shell: HostShell) -> None:
    assert shell.run(["wc", "-c"], input=b"x" * 100_000).stdout.strip() == "100000"
    assert shell.run(["cat"]).stdout == ""  # no input: stdin is empty, not inherited
    # more than an SSH window on each stream at once: must not deadlock
    both = shell.run(["sh", "-c", "head -c 3000000 /dev/zero; head -c 3000000 /dev/zero >&2"])
    assert (len(both.stdout), len(both.stderr)) == (3_000_000, 3_000_000)


def test_timeout_is_unavailable(shell: HostShell) -> None:
    with pytest.raises(Unavailable, match="timed out after 0.3s"):
        shell.run(["sleep", "3"], timeout=0.3)
    assert shell.run(["echo", "still usable"]).stdout == "still usable\n"


def test_check_raises_permanent_with_stderr() -> None:
    ok = CommandResult(0, "fine", "")
    assert check(ok, "probe") is ok
    with pytest.raises(Permanent, match=r"nft -f - failed \(exit 1\): Error: syntax error"):
        check(CommandResult(1, "", "Error: syntax error\n"), "nft -f -")
    with pytest.raises(Permanent, match=r"exit 2\): only stdout"):
        check(CommandResult(2, "only stdout", ""), "tool")


def test_empty_argv_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        LocalShell().run([])
    with pytest.raises(ValueError):
        LocalShell().run("echo hi")  # type: ignore[arg-type]


# -- SSH specifics ---------------------------------------------------------------------


@pytest.mark.integration
def test_concurrent_commands_share_one_connection(sshd: SshServer) -> None:
    sh = paramiko_shell(sshd)
    results: list[str] = []
    try:

        def work() -> None:
            results.append(sh.run(["sh", "-c", "echo $PPID"]).stdout)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # every command's parent is the same per-connection sshd: one connection served all
        assert len(results) == 8 and len(set(results)) == 1
        assert int(results[0]) in sshd.session_pids()
    finally:
        sh.close()


@pytest.mark.integration
def test_unknown_host_key_is_refused_when_strict(sshd: SshServer, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    sh = paramiko_shell(sshd, known_hosts=str(empty), host_key_policy=HostKeyPolicy.STRICT)
    with pytest.raises(Unavailable, match=rf"127\.0\.0\.1:{sshd.port}.*not found in known_hosts"):
        sh.run(["true"])


class Refused(Unavailable):
    """What a HostKeyCheck raises to refuse a key (nanod's own: reconciler/cells.py)."""


class RecordingCheck:
    """A `HostKeyCheck` that records the keys it is asked about and accepts or refuses
    them all; `expected` is what it tells the connection to ask for first."""

    def __init__(self, *, accept: bool, expected: tuple[str, str] | None = None) -> None:
        self.accept = accept
        self._expected = expected
        self.asked: list[tuple[str, str]] = []

    def expected(self) -> tuple[str, str] | None:
        return self._expected

    def check(self, key_type: str, key_base64: str) -> None:
        self.asked.append((key_type, key_base64))
        if not self.accept:
            raise Refused(f"refused {key_type}")


def accepted_logins(server: SshServer) -> int:
    return Path(server.log_file).read_text().count("Accepted publickey")


@pytest.mark.integration
def test_a_host_key_check_decides_before_authentication(sshd: SshServer, tmp_path: Path) -> None:
    host_key = tuple(Path(sshd.known_hosts).read_text().split()[1:3])
    # nothing known: the check is asked and accepts
    check = RecordingCheck(accept=True)
    sh = paramiko_shell(sshd, known_hosts=None, host_key_policy=check)
    try:
        assert sh.run(["true"]).ok
    finally:
        sh.close()
    assert check.asked == [host_key]

    # a refusal reaches the caller as raised, and no login happened
    logins = accepted_logins(sshd)
    check = RecordingCheck(accept=False)
    sh = paramiko_shell(sshd, known_hosts=None, host_key_policy=check)
    with pytest.raises(Refused, match="refused ssh-ed25519"):
        sh.run(["true"])
    assert check.asked == [host_key] and accepted_logins(sshd) == logins

    # the expected key presented: accepted, and the check still hears of it
    check = RecordingCheck(accept=True, expected=host_key)
    sh = paramiko_shell(sshd, known_hosts=None, host_key_policy=check)
    try:
        assert sh.run(["true"]).ok
    finally:
        sh.close()
    assert check.asked == [host_key]

    # another key expected: the check is asked about the one presented, and refuses it
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True
    )
    other = tuple((tmp_path / "other.pub").read_text().split()[:2])
    logins = accepted_logins(sshd)
    check = RecordingCheck(accept=False, expected=other)
    sh = paramiko_shell(sshd, known_hosts=None, host_key_policy=check)
    with pytest.raises(Refused):
        sh.run(["true"])
    assert check.asked == [host_key] and accepted_logins(sshd) == logins

    # a check keeps its own keys: a known_hosts file beside it would be ignored, so refused
    with pytest.raises(ValueError, match="known_hosts is read by HostKeyPolicy.STRICT only"):
        paramiko_shell(sshd, host_key_policy=check)


@pytest.mark.integration
def test_no_policy_writes_the_known_hosts_file(sshd: SshServer, tmp_path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True
    )
    other = (tmp_path / "other.pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(other)}\n")
    pinned = paramiko_shell(sshd, known_hosts=str(known), host_key_policy="strict")
    with pytest.raises(Unavailable, match="host key differs from the known one"):
        pinned.run(["true"])
    insecure = paramiko_shell(sshd, known_hosts=str(known), host_key_policy="insecure")
    try:
        assert insecure.run(["true"]).ok  # checks nothing (loopback test servers only)
    finally:
        insecure.close()
    assert known.read_text().split()[2] == other[1]  # and records nothing
    with pytest.raises(ValueError):
        paramiko_shell(sshd, host_key_policy="accept-new")  # gone: one writer, nanod's


@pytest.mark.integration
def test_connection_failures_name_the_target_never_the_password(sshd: SshServer) -> None:
    refused = ParamikoShell("127.0.0.1", 1, "root", password="s3cret-pw", connect_timeout=2)
    with pytest.raises(Unavailable, match=r"root@127\.0\.0\.1:1: cannot connect") as info:
        refused.run(["true"])
    assert "s3cret-pw" not in info.value.message

    wrong = paramiko_shell(sshd, key_file=None, password="s3cret-pw")
    with pytest.raises(Unavailable, match="authentication failed") as info:
        wrong.run(["true"])
    assert "s3cret-pw" not in info.value.message and f":{sshd.port}" in info.value.message


@pytest.mark.integration
def test_reconnects_after_the_server_restarts(tmp_path: Path) -> None:
    first = start_sshd(tmp_path)
    sh = paramiko_shell(first)
    try:
        assert sh.run(["echo", "one"]).stdout == "one\n"
        first.stop()  # kills our session too
        second = start_sshd(tmp_path, port=first.port)  # same host key, same port
        try:
            assert sh.run(["echo", "two"]).stdout == "two\n"
        finally:
            second.stop()
        with pytest.raises(Unavailable, match="cannot connect"):
            sh.run(["true"])
    finally:
        sh.close()
        first.stop()


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A TCP echo server on 127.0.0.1 (stands in for a VNC server on the cell)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(5)


@pytest.mark.integration
def test_tunnel_reaches_a_port_on_the_cell(sshd: SshServer, echo_server: int) -> None:
    sh = paramiko_shell(sshd)
    try:
        chan = sh.open_tunnel("127.0.0.1", echo_server)
        chan.settimeout(5)
        chan.sendall(b"RFB 003.008\n")
        assert chan.recv(100) == b"RFB 003.008\n"
        chan.close()
        closed = socket.create_server(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        with pytest.raises(Unavailable, match=rf"tunnel to 127\.0\.0\.1:{port} refused"):
            sh.open_tunnel("127.0.0.1", port)
    finally:
        sh.close()
