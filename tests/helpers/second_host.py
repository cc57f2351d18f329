"""A second host on this machine for tests (ARCHITECTURE.md §5, issue 15): wraps
`scripts/second-host`, which starts a second libvirtd + virtlogd + virtlockd + sshd in their
own mount, UTS, PID and network namespaces, reached over `qemu+ssh://` on a veth /30.

`second_host_up(name)` runs `scripts/second-host up` and returns a `SecondHost`: the cell
body it printed (for `POST /cells/{name}`), its state (pids, namespace, directories) and
ways in (`uri()` for libvirt, `ssh(...)` for a command). `down()` runs
`scripts/second-host down`, which removes everything by pid and namespace. For failover
tests: `freeze()` / `thaw()` (a hung host: every process of it SIGSTOPped, then SIGCONTed),
`kill()` (the fence: every process SIGKILLed, its disk and network kept) and `up()` (a killed
one powered on again with the same state; a new `SecondHost`), `condition()` (running,
frozen, killed or dead).
The `second_host` fixture (module scope) does both, and skips, saying why, where a part is
missing (`unavailable()`).

Used by tests/integration/test_second_host.py, and by what needs two hosts (migration).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "second-host"
STATE_DIR = Path("/run/nano-second-host")
PROGRAMS = ("/usr/sbin/libvirtd", "/usr/sbin/virtlogd", "/usr/sbin/sshd", "/usr/bin/unshare",
            "/usr/bin/nsenter", "/usr/bin/virsh")


@dataclass(frozen=True)
class SecondHost:
    name: str
    body: dict[str, Any]  # POST /cells/{name} body, without "name"
    state: dict[str, Any]  # scripts/second-host status (pids, netns, directories)

    @property
    def address(self) -> str:
        return str(self.body["address"])

    @property
    def shared(self) -> Path:
        return Path(self.state["shared"])

    @property
    def init_pid(self) -> int:
        return int(self.state["init_pid"])

    def uri(self) -> str:
        """A qemu+ssh:// URI to its libvirtd, host key pinned (strict checking)."""
        return (f"qemu+ssh://root@{self.address}:22/system?keyfile={self.state['key_file']}"
                f"&command={self.state['ssh_wrapper']}&no_tty=1")

    def ssh(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `command` on the second host over its sshd (host key pinned)."""
        return subprocess.run([self.state["ssh_wrapper"], "-i", self.state["key_file"],
                               f"root@{self.address}", *command],
                              capture_output=True, text=True, timeout=timeout)

    def host_pid(self, in_namespace_pid: int) -> int:
        """This host's pid of a process known inside the second host by `in_namespace_pid`
        (the last NSpid of /proc/PID/status)."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("NSpid:"):
                    pids = line.split()[1:]
                    if len(pids) > 1 and pids[-1] == str(in_namespace_pid) and \
                            _same_ns(int(entry), self.init_pid, "pid"):
                        return int(entry)
        raise LookupError(f"no process {in_namespace_pid} in {self.name}'s PID namespace")

    def down(self) -> subprocess.CompletedProcess[str]:
        return run_script("down", "--name", self.name)

    def status(self) -> dict[str, Any]:
        """`scripts/second-host status` now: its state file, "running" and "state"."""
        done = run_script("status", "--name", self.name)
        if done.returncode:
            raise RuntimeError(f"second-host status: {done.stderr.strip()}")
        return json.loads(done.stdout)

    def condition(self) -> str:
        """running, frozen, killed (by `kill()`) or dead (its init exited otherwise)."""
        return str(self.status()["state"])

    def freeze(self, check: bool = True) -> subprocess.CompletedProcess[str]:
        """SIGSTOP every process of its PID namespace (guests too): it hangs, TCP connects
        to it are accepted and never answered."""
        return self._verb("freeze", check)

    def thaw(self, check: bool = True) -> subprocess.CompletedProcess[str]:
        """SIGCONT them; returns once its libvirtd answers again."""
        return self._verb("thaw", check)

    def kill(self, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The fence (an IPMI power-off): its eth0 down, every process SIGKILLed (frozen or
        not), returns once all are gone; its directories (domain definitions), netns and veth
        stay. Its pids in `state` are then stale: `up()` returns a new SecondHost."""
        return self._verb("kill", check)

    def up(self) -> SecondHost:
        """`scripts/second-host up` again: on a killed host, the same host powered on (same
        directories, name, host_uuid, address, keys); on a running one, nothing new."""
        return second_host_up(self.name)

    def _verb(self, verb: str, check: bool) -> subprocess.CompletedProcess[str]:
        done = run_script(verb, "--name", self.name)
        if check and done.returncode:
            raise RuntimeError(f"second-host {verb} failed ({done.returncode}): "
                               f"{done.stderr.strip()}")
        return done


def _same_ns(pid_a: int, pid_b: int, kind: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid_a}/ns/{kind}") == os.readlink(f"/proc/{pid_b}/ns/{kind}")
    except OSError:
        return False


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout)


def second_host_up(name: str, **options: str) -> SecondHost:
    """`scripts/second-host up --name NAME [--shared DIR] [--key-dir DIR]`; raises
    RuntimeError with its stderr when it fails."""
    argv = ["up", "--name", name]
    for option, value in options.items():
        argv += [f"--{option.replace('_', '-')}", value]
    done = run_script(*argv)
    if done.returncode:
        raise RuntimeError(f"second-host up failed ({done.returncode}): {done.stderr.strip()}")
    body = json.loads(done.stdout)
    status = run_script("status", "--name", name)
    if status.returncode:
        raise RuntimeError(f"second-host status: {status.stderr.strip()}")
    return SecondHost(name=body.pop("name"), body=body, state=json.loads(status.stdout))


def unavailable() -> str:
    """'' when a second host can run here, else why not."""
    if os.geteuid() != 0:
        return "the second host needs root (namespaces, mounts, daemons)"
    for program in PROGRAMS:
        if not os.access(program, os.X_OK):
            return f"{program} is missing (scripts/install-deps installs it)"
    if shutil.which("ip") is None:
        return "ip (iproute2) is missing"
    return ""


@pytest.fixture(scope="module")
def second_host() -> Iterator[SecondHost]:
    """A second host for the module (name `t` + pid, so parallel sessions do not meet),
    removed at the end by `scripts/second-host down`."""
    why = unavailable()
    if why:
        pytest.skip(why)
    host = second_host_up(f"t{os.getpid() % 10000000}")
    try:
        yield host
    finally:
        done = host.down()
        assert done.returncode == 0, f"second-host down: {done.stderr}"
