"""A real OpenSSH server on loopback for tests of the remote path (ARCHITECTURE.md §5).

`start_sshd(tmpdir)` generates a host key and a client ed25519 key, writes its own
sshd_config (127.0.0.1 only, a free port, key login for root, no PAM) and runs
`/usr/sbin/sshd -D -e` as a child process; `SshServer.stop()` ends that pid only.
`start_sshd(tmpdir, port=..., new_host_key=True)` restarts it as a host whose keys changed
(a reinstalled cell, or a man in the middle).
The `sshd` fixture (session scope) wraps it and skips, saying why, where sshd is missing.

Used by driver tests (`ParamikoShell`, `gather_facts`, `qemu+ssh://` libvirt URIs) and
integration tests that need a cell reached over SSH.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
PRIVSEP_DIR = Path("/run/sshd")


@dataclass(frozen=True)
class SshServer:
    """A running sshd: log in as `user` with `key_file`; `known_hosts` holds its host key
    (`[127.0.0.1]:port ssh-ed25519 ...`) so clients can verify it strictly."""

    host: str
    port: int
    user: str
    key_file: str
    host_key: str  # "ssh-ed25519 BASE64", as in the host's .pub file and known_hosts
    known_hosts: str
    ssh_wrapper: str
    log_file: str
    pid: int
    process: subprocess.Popen[bytes]

    def libvirt_uri(self, driver: str = "qemu", path: str = "/system") -> str:
        """A `DRIVER+ssh://` URI to this server's host: libvirt runs our `ssh_wrapper`,
        which pins known_hosts to the tmp file (strict checking, the user's
        ~/.ssh/known_hosts is neither read nor written)."""
        return (
            f"{driver}+ssh://{self.user}@{self.host}:{self.port}{path}"
            f"?keyfile={self.key_file}&command={self.ssh_wrapper}&no_tty=1"
        )

    def session_pids(self) -> list[int]:
        """Pids of the per-connection sshd processes this server forked (children of
        `pid`), e.g. to cut a client's connection in a test."""
        children: list[int] = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat_line = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # "pid (comm) state ppid ...": comm may hold spaces, so split after the ')'
            fields = stat_line.rsplit(")", 1)[-1].split()
            if len(fields) > 1 and fields[1] == str(self.pid):
                children.append(int(entry))
        return children

    def stop(self) -> None:
        """Terminate this sshd and the sessions it forked (by pid) and wait; idempotent."""
        for child in self.session_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _keygen(path: Path) -> None:
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "nano-test", "-f", str(path)],
        check=True,
        capture_output=True,
    )


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {log.read_text()[-2000:]}")
        # sshd answers with its banner only once it is ready to serve
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as s:
            s.settimeout(0.5)
            if s.recv(4).startswith(b"SSH-"):
                return
        time.sleep(0.02)
    raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port}: {log.read_text()[-2000:]}")


def host_key_fingerprint(public_key: str) -> str:
    """`SHA256:...` of a public key line, as `ssh-keygen -l` prints it (ssh-keygen says)."""
    out = subprocess.run([SSH_KEYGEN, "-l", "-E", "sha256", "-f", "-"], input=public_key,
                         capture_output=True, text=True, check=True).stdout
    return out.split()[1]


def start_sshd(
    tmpdir: str | os.PathLike[str], *, port: int | None = None, timeout: float = 10,
    new_host_key: bool = False, force_command: str | None = None,
) -> SshServer:
    """Start sshd on 127.0.0.1 with keys and config under `tmpdir` (kept when already
    there, so a restart in the same dir presents the same host key, unless `new_host_key`);
    `port` pins the port (e.g. to restart a stopped server), else a free one is picked;
    `force_command` (sshd's ForceCommand) runs instead of every command a client asks for
    (which it finds in $SSH_ORIGINAL_COMMAND)."""
    if not os.access(SSHD, os.X_OK):
        raise FileNotFoundError(f"{SSHD} is not installed")
    base = Path(tmpdir)
    base.mkdir(parents=True, exist_ok=True)
    host_key, client_key = base / "ssh_host_ed25519_key", base / "client_ed25519"
    if new_host_key:
        for old in (host_key, base / "ssh_host_ed25519_key.pub"):
            old.unlink(missing_ok=True)
    for key in (host_key, client_key):
        if not key.exists():
            _keygen(key)
    authorized = base / "authorized_keys"
    authorized.write_text((base / "client_ed25519.pub").read_text())
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)  # sshd refuses to start without it

    wrapper = base / "ssh-wrapper"
    known_hosts = base / "known_hosts"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"exec ssh -F /dev/null -o UserKnownHostsFile={known_hosts} "
        "-o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes -o BatchMode=yes "
        '"$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    host_pub = (base / "ssh_host_ed25519_key.pub").read_text().split()

    last_error: Exception | None = None
    # a free port may be taken by someone else before sshd binds it: try another one
    for _ in range(1 if port is not None else 3):
        listen_port = port if port is not None else _free_port()
        config = base / "sshd_config"
        log = base / "sshd.log"
        config.write_text(
            "\n".join(
                [
                    "ListenAddress 127.0.0.1",
                    f"Port {listen_port}",
                    f"HostKey {host_key}",
                    f"PidFile {base / 'sshd.pid'}",
                    f"AuthorizedKeysFile {authorized}",
                    "StrictModes no",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "AllowTcpForwarding yes",
                    "X11Forwarding no",
                    "PrintMotd no",
                    "MaxSessions 64",
                    "MaxStartups 64",
                    "LogLevel INFO",
                    *([f"ForceCommand {force_command}"] if force_command else []),
                    "",
                ]
            )
        )
        known_hosts.write_text(f"[127.0.0.1]:{listen_port} {host_pub[0]} {host_pub[1]}\n")
        with log.open("ab") as log_out:
            proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log_out,
                stderr=subprocess.STDOUT,
            )
        server = SshServer(
            host="127.0.0.1",
            port=listen_port,
            user="root",
            key_file=str(client_key),
            host_key=" ".join(host_pub[:2]),
            known_hosts=str(known_hosts),
            ssh_wrapper=str(wrapper),
            log_file=str(log),
            pid=proc.pid,
            process=proc,
        )
        try:
            _wait_listening(proc, listen_port, log, time.monotonic() + timeout)
            return server
        except RuntimeError as exc:
            server.stop()
            last_error = exc
    raise RuntimeError(f"could not start sshd: {last_error}")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """A loopback sshd for the whole session, stopped (by pid) at the end."""
    if not os.access(SSHD, os.X_OK):
        pytest.skip(f"{SSHD} is not installed (apt-get install openssh-server)")
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()
