"""Run commands on a cell: the `HostShell` role and its two adapters.

`LocalShell` runs on this machine (a local cell, tests); `ParamikoShell` runs over one kept
open SSH connection (a remote cell) and also opens direct-tcpip tunnels for VNC consoles.
Callers: `facts.gather_facts`, the firewall driver (`nft -f -`), volume helpers
(`qemu-img`), the console proxy (`ParamikoShell.open_tunnel`).

Commands are argv lists, never shell strings: the SSH adapter quotes every word with
`shlex.quote`, the local one never uses `shell=True`. A script that needs a shell is run as
`["sh", "-c", FIXED_SCRIPT, "sh", *args]` with all variable input in the positional args.

Errors: reaching the host (connect, authenticate, host key, timeout) raises `Unavailable`
(retried by the reconciler; a `HostKeyCheck` may raise its own subclass, which passes
through unchanged); a command that runs and fails is a `CommandResult` with a non-zero
`rc`, never an exception; `check()` turns that into `Permanent` where a failure must stop
the caller.

Host keys: this module never writes a known_hosts file. nanod's cells are checked by a
`HostKeyCheck` (reconciler/cells.py pins keys in its one known_hosts file); a file given
with `HostKeyPolicy.STRICT` is only read.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import select
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import paramiko

from state.errors import Permanent, Unavailable

log = logging.getLogger(__name__)

#: rc reported when the program does not exist (what a POSIX shell reports remotely).
RC_NOT_FOUND = 127
_READ_CHUNK = 65536
#: seconds a command may run when neither its caller nor the shell says otherwise
DEFAULT_COMMAND_TIMEOUT = 30.0


@dataclass(frozen=True)
class CommandResult:
    """What a finished command left: exit code (negative: killed by that signal, -1 over
    SSH when the server reported no status) and its decoded output (UTF-8, undecodable
    bytes replaced)."""

    rc: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


class HostShell(Protocol):
    """Runs programs on one host. Implementations are safe to call from several threads.

    `run(argv)` executes `argv[0]` with the remaining words as its arguments (no shell
    parsing of any word), feeds `input` to its stdin (then closes stdin; without `input`
    stdin is empty) and waits for it to exit:
    - returns a `CommandResult` whatever the exit code; a missing program is
      `rc == RC_NOT_FOUND` with the reason in stderr, the same locally and remotely;
    - raises `Unavailable` when the host cannot be reached or the command does not finish
      within `timeout` seconds (None: the shell's own command timeout; the command is then
      abandoned: killed locally, its channel closed remotely);
    - raises `ValueError` for an empty argv (a programming error, not a host's answer).
    `close()` releases connections; a later `run` reconnects.
    """

    def run(
        self, argv: Sequence[str], *, input: bytes | None = None, timeout: float | None = None
    ) -> CommandResult: ...

    def close(self) -> None: ...


def check(result: CommandResult, what: str) -> CommandResult:
    """Return `result` if the command succeeded, else raise `Permanent` naming `what`
    with the command's stderr (or stdout when stderr is empty)."""
    if result.rc == 0:
        return result
    detail = (result.stderr.strip() or result.stdout.strip() or "no output")[-2000:]
    raise Permanent(f"{what} failed (exit {result.rc}): {detail}")


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _validate(argv: Sequence[str]) -> list[str]:
    if isinstance(argv, str | bytes) or not argv:
        raise ValueError("argv must be a non-empty list of words")
    return [str(word) for word in argv]


class LocalShell:
    """`HostShell` on this machine through `subprocess` (argv lists, no shell)."""

    def __init__(self, *, command_timeout: float = DEFAULT_COMMAND_TIMEOUT) -> None:
        self._command_timeout = command_timeout

    def run(
        self, argv: Sequence[str], *, input: bytes | None = None, timeout: float | None = None
    ) -> CommandResult:
        words = _validate(argv)
        timeout = self._command_timeout if timeout is None else timeout
        try:
            # own process group: a timeout kills the command and whatever it started
            proc = subprocess.Popen(
                words,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            return CommandResult(RC_NOT_FOUND, "", f"{words[0]}: not found ({exc.strerror})")
        except PermissionError as exc:
            return CommandResult(126, "", f"{words[0]}: cannot execute ({exc.strerror})")
        try:
            out, err = proc.communicate(input if input is not None else b"", timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise Unavailable(f"local command {words[0]} timed out after {timeout:g}s") from exc
        return CommandResult(proc.returncode, _decode(out), _decode(err))

    def close(self) -> None:
        """Nothing to release."""


class HostKeyPolicy(StrEnum):
    """Fixed answers to the server's host key (for tools and tests; nanod's cells use a
    `HostKeyCheck`).

    STRICT: the key must already be in the known_hosts file given (or the user's
    ~/.ssh/known_hosts when none is given), which is only read; INSECURE: any key is
    accepted (loopback test servers only).
    """

    STRICT = "strict"
    INSECURE = "insecure"


class HostKeyCheck(Protocol):
    """Decides on the host key a server presents, before we authenticate to it (so no
    password or key signature goes to a server that is refused).

    `expected()` is the key the server must present, `(type, base64)`, when one is known:
    the connection then asks for that key type first, as OpenSSH does for keys in its
    known_hosts. `check(type, base64)` is called with the presented key: return to accept
    (recording or pinning it is the check's business), raise `Unavailable` (or a subclass,
    which reaches the caller unchanged) to refuse. It is called on every connection, also
    when the presented key equals `expected()`."""

    def expected(self) -> tuple[str, str] | None: ...

    def check(self, key_type: str, key_base64: str) -> None: ...


class _AskTheCheck(paramiko.MissingHostKeyPolicy):
    """paramiko's hook for a key it has no copy of: the `HostKeyCheck` decides."""

    def __init__(self, check: HostKeyCheck) -> None:
        self._check = check
        self.asked = False

    def decide(self, key: paramiko.PKey) -> None:
        self.asked = True
        self._check.check(key.get_name(), key.get_base64())

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        self.decide(key)


class ParamikoShell:
    """`HostShell` over SSH: one kept-open `paramiko.SSHClient` per cell.

    The connection opens on first use and is reopened once when a session cannot be opened
    on it (server restarted, network blip); a command already running when the connection
    drops is not re-run (it may not be idempotent) and raises `Unavailable`.
    """

    def __init__(
        self,
        host: str,
        port: int = 22,
        user: str = "root",
        *,
        key_file: str | None = None,
        password: str | None = None,
        known_hosts: str | None = None,
        host_key_policy: HostKeyPolicy | HostKeyCheck = HostKeyPolicy.STRICT,
        connect_timeout: float = 10,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
        keepalive: int = 15,
    ) -> None:
        self.host, self.port, self.user = host, port, user
        self._key_file = key_file
        self._password = password
        self._known_hosts = known_hosts
        self._policy: HostKeyPolicy | HostKeyCheck = (
            HostKeyPolicy(host_key_policy) if isinstance(host_key_policy, str)
            else host_key_policy)
        if known_hosts is not None and not isinstance(self._policy, HostKeyPolicy):
            raise ValueError("known_hosts is read by HostKeyPolicy.STRICT only; a HostKeyCheck "
                             "keeps its own keys")
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._keepalive = keepalive
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()

    @property
    def target(self) -> str:
        """`user@host:port`, as messages name this shell (never with a password)."""
        return f"{self.user}@{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"ParamikoShell({self.target})"

    # -- connection ------------------------------------------------------------------

    @property
    def _host_key_name(self) -> str:
        """How known_hosts files and paramiko name this server."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def _set_host_key_policy(self, client: paramiko.SSHClient) -> _AskTheCheck | None:
        # Keys are only ever loaded into the client's memory: paramiko saves a file only
        # when one was loaded with load_host_keys and a policy adds to it, never here.
        if isinstance(self._policy, HostKeyPolicy):
            if self._policy is HostKeyPolicy.INSECURE:
                # no file loaded, so AutoAddPolicy adds to memory only
                client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
                return None
            if self._known_hosts is not None:
                client.load_host_keys(self._known_hosts)  # read; RejectPolicy adds nothing
            else:
                client.load_system_host_keys()
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            return None
        expected = self._policy.expected()
        if expected is not None:  # asked for first; a different key is BadHostKeyException
            key_type, key_base64 = expected
            key = paramiko.PKey.from_type_string(key_type, base64.b64decode(key_base64))
            client.get_host_keys().add(self._host_key_name, key_type, key)
        ask = _AskTheCheck(self._policy)
        client.set_missing_host_key_policy(ask)
        return ask

    def _new_client(self) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        ask = self._set_host_key_policy(client)
        explicit = self._key_file is not None or self._password is not None
        try:
            client.connect(
                self.host,
                port=self.port,
                username=self.user,
                password=self._password,
                key_filename=self._key_file,
                timeout=self._connect_timeout,
                banner_timeout=self._connect_timeout,
                auth_timeout=self._connect_timeout,
                channel_timeout=self._connect_timeout,
                allow_agent=not explicit,
                look_for_keys=not explicit,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            if ask is not None:
                # the check names both keys and says what to do (it must refuse: the key
                # differs from the one it expects)
                ask.decide(exc.key)
            raise Unavailable(
                f"ssh {self.target}: host key differs from the known one "
                f"({exc.key.get_name()} {exc.key.fingerprint}, expected "
                f"{exc.expected_key.fingerprint})"
            ) from exc
        except Unavailable:  # refused by the HostKeyCheck, before authenticating
            client.close()
            raise
        except paramiko.AuthenticationException as exc:
            client.close()
            raise Unavailable(f"ssh {self.target}: authentication failed: {exc}") from exc
        except paramiko.SSHException as exc:
            transport = client.get_transport()
            banner = transport.remote_version if transport is not None else ""
            client.close()
            # RejectPolicy's message is "Server '[host]:port' not found in known_hosts"; a
            # host that accepts TCP and stays silent ends in "No existing session"
            reason = str(exc) if banner else (
                f"no SSH banner within {self._connect_timeout:g}s ({exc})")
            raise Unavailable(f"ssh {self.target}: {reason}") from exc
        except (OSError, EOFError) as exc:
            client.close()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if isinstance(exc, socket.timeout | TimeoutError):
                reason = f"no answer within {self._connect_timeout:g}s"
            raise Unavailable(f"ssh {self.target}: cannot connect: {reason}") from exc
        transport = client.get_transport()
        if transport is not None and ask is not None and not ask.asked:
            try:  # equal to expected(): paramiko accepted it without asking the check
                ask.decide(transport.get_remote_server_key())
            except Unavailable:
                client.close()
                raise
        if transport is not None and self._keepalive:
            transport.set_keepalive(self._keepalive)
        return client

    def _transport(self, *, fresh: bool = False) -> paramiko.Transport:
        with self._lock:
            client = self._client
            transport = client.get_transport() if client is not None else None
            if fresh or transport is None or not transport.is_active():
                if client is not None:
                    client.close()
                self._client = None
                client = self._new_client()
                self._client = client
                transport = client.get_transport()
            assert transport is not None
            return transport

    def _open(self, kind: str, *args: object) -> paramiko.Channel:
        """Open a channel, reconnecting once when the kept connection turns out dead."""
        for attempt in (1, 2):
            transport = self._transport(fresh=attempt == 2)
            try:
                if kind == "session":
                    return transport.open_session(timeout=self._connect_timeout)
                return transport.open_channel(kind, *args, timeout=self._connect_timeout)
            except paramiko.ChannelException:
                raise  # the server answered and refused: reconnecting will not help
            except (paramiko.SSHException, OSError, EOFError) as exc:
                if attempt == 2:
                    raise Unavailable(f"ssh {self.target}: cannot open a channel: {exc}") from exc
                log.info("ssh %s: reconnecting after %s", self.target, exc)
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
            self._client = None

    # -- HostShell -------------------------------------------------------------------

    def run(
        self, argv: Sequence[str], *, input: bytes | None = None, timeout: float | None = None
    ) -> CommandResult:
        words = _validate(argv)
        timeout = self._command_timeout if timeout is None else timeout
        command = shlex.join(words)
        try:
            chan = self._open("session")
        except paramiko.ChannelException as exc:
            raise Unavailable(f"ssh {self.target}: session refused: {exc}") from exc
        try:
            return self._exec(chan, command, words[0], input, timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise Unavailable(f"ssh {self.target}: {words[0]} interrupted: {exc}") from exc
        finally:
            chan.close()

    def _exec(
        self,
        chan: paramiko.Channel,
        command: str,
        program: str,
        input: bytes | None,
        timeout: float,
    ) -> CommandResult:
        deadline = time.monotonic() + timeout
        chan.settimeout(timeout)
        chan.exec_command(command)
        if input:
            chan.sendall(input)
        chan.shutdown_write()
        out: list[bytes] = []
        err: list[bytes] = []
        # Drain stdout and stderr together (a full stderr window would stall stdout); the
        # channel's fileno turns readable on data on either stream and on EOF/close.
        while True:
            while chan.recv_ready():
                out.append(chan.recv(_READ_CHUNK))
            while chan.recv_stderr_ready():
                err.append(chan.recv_stderr(_READ_CHUNK))
            at_end = chan.eof_received or chan.closed
            if at_end and not chan.recv_ready() and not chan.recv_stderr_ready():
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(f"ssh {self.target}: {program} timed out after {timeout:g}s")
            select.select([chan], [], [], remaining)
        # the exit status may trail the EOF by a packet
        if not chan.status_event.wait(max(deadline - time.monotonic(), 0.001)):
            raise Unavailable(f"ssh {self.target}: {program} timed out after {timeout:g}s")
        rc = chan.recv_exit_status()
        stderr = _decode(b"".join(err))
        if rc == RC_NOT_FOUND and not stderr:
            stderr = f"{program}: not found"
        return CommandResult(rc, _decode(b"".join(out)), stderr)

    def open_tunnel(self, host: str, port: int) -> paramiko.Channel:
        """A direct-tcpip channel to `host:port` as seen from the cell (e.g. a VNC server
        bound to the cell's loopback). The caller owns the channel and closes it.
        Raises `Unavailable` when the cell or the target cannot be reached."""
        try:
            return self._open("direct-tcpip", (host, port), ("127.0.0.1", 0))
        except paramiko.ChannelException as exc:
            raise Unavailable(
                f"ssh {self.target}: tunnel to {host}:{port} refused: {exc.text or exc.code}"
            ) from exc
