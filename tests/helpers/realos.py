"""A real guest OS for the tests and the benchmark: the Debian 12 image that
scripts/build-guest-image builds (cached outside the checkout), a nanod process driven
through its API with a synchronous client, SSH into guests with paramiko, and small
TCP servers and clients on either side.

Nothing here mocks: the image is a real Debian, nanod is `.venv/bin/nanod serve`, SSH is
paramiko against the guest's own sshd.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-guest-image"
NANOD = str(Path(sys.executable).with_name("nanod"))
GiB = 1 << 30
MiB = 1 << 20
BOUNDARY = "nano-realos-boundary"


def guest_image() -> tuple[Path | None, str]:
    """(path of the Debian guest image, "") or (None, the capability this machine lacks
    to build it). A cached image is reused; otherwise scripts/build-guest-image builds it
    (about 2-3 minutes). NANO_GUEST_IMAGE names a ready image instead. A build that fails
    raises RuntimeError with its error: that is a fault, not a missing capability."""
    given = os.environ.get("NANO_GUEST_IMAGE")
    if given:
        return (Path(given), "") if Path(given).is_file() else (
            None, f"NANO_GUEST_IMAGE={given} is not a file")
    if os.geteuid() != 0:
        return None, "building the guest image needs root (mmdebstrap, mount)"
    if shutil.which("mmdebstrap") is None:
        return None, "mmdebstrap is not installed: run scripts/install-deps"
    done = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=900)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines or not Path(lines[-1]).is_file():
        raise RuntimeError(f"scripts/build-guest-image failed: {done.stderr.strip()[-800:]}")
    return Path(lines[-1]), ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait(check: Any, timeout: float, what: str, every: float = 0.5) -> Any:
    """`check()` until it returns something true; AssertionError naming `what` after
    `timeout` seconds (with the last exception `check` raised, if any)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except (OSError, EOFError) as exc:  # not up yet: connection refused, reset
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                                 + (f" (last error: {last})" if last else ""))
        time.sleep(every)


# -- nanod, through its API --------------------------------------------------------------


@dataclass
class Nano:
    """A client of one nanod on 127.0.0.1:`port`, logged in once `login` ran."""

    port: int
    session: str = ""
    credentials: tuple[str, str] | None = None

    def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
             content_type: str = "application/json", timeout: float = 60) -> dict[str, Any]:
        """One request; a session that expired (nanod's 180 s timeout: the portal keeps
        it alive, tests that wait for boots outlive it) is renewed by logging in again."""
        doc = self._call(method, path, body, raw, content_type, timeout)
        if doc.get("error_code") == 401 and self.credentials and path != "/sessions/":
            self.login(*self.credentials)
            doc = self._call(method, path, body, raw, content_type, timeout)
        return doc

    def _call(self, method: str, path: str, body: Any, raw: bytes | None, content_type: str,
              timeout: float) -> dict[str, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is None and method in ("POST", "PUT", "DELETE"):
            data = b"{}"
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/v1{path}", data=data,
                                     method=method, headers={"Content-Type": content_type,
                                                             "Nano-Session": self.session})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                doc = json.loads(resp.read() or b"{}")
                doc["status"] = resp.status
        except urllib.error.HTTPError as exc:
            doc = json.loads(exc.read() or b"{}")
            doc["status"] = exc.code
        return doc

    def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        doc = self.call(method, path, body, **kw)
        assert doc.get("error_code") == 0, f"{method} {path}: {doc}"
        return doc.get("data")

    def login(self, user: str, password: str) -> None:
        self.session = self.ok("POST", "/sessions/", {"user": user, "password": password,
                                                      "nonce": "n"})["session"]
        self.credentials = (user, password)

    def upload_disk_image(self, name: str, path: Path) -> str:
        """A disk image `name` made and its file uploaded (with its SHA-1): its id."""
        image_id = self.ok("POST", "/disk_images/", {"name": name, "description":
                                                     "Debian 12 (scripts/build-guest-image)",
                                                     "tags": ["linux", "debian"]})["id"]
        self.upload(f"/disk_images/{image_id}/file/", path.name, path.read_bytes(),
                    checksum=True)
        return image_id

    def upload_media_image(self, name: str, filename: str, data: bytes) -> str:
        media_id = self.ok("POST", "/media_images/", {"name": name})["id"]
        self.upload(f"/media_images/{media_id}/file/", filename, data)
        return media_id

    def upload(self, path: str, filename: str, data: bytes, *, checksum: bool = False) -> None:
        parts = [f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; "
                 f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                 .encode(), data, b"\r\n"]
        if checksum:
            parts.append(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"checksum\""
                         f"\r\n\r\n{hashlib.sha1(data).hexdigest()}\r\n".encode())
        parts.append(f"--{BOUNDARY}--\r\n".encode())
        self.ok("POST", path, raw=b"".join(parts), timeout=600,
                content_type=f"multipart/form-data; boundary={BOUNDARY}")

    def created(self, guest_id: str, timeout: float = 300) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            doc = self.call("GET", f"/guests/{guest_id}")
            data = doc.get("data") or {}
            if data.get("error"):
                raise AssertionError(f"creating guest {guest_id} failed: {data['error']}")
            return data if doc["status"] == 200 and data.get("created") else None

        return wait(check, timeout, f"guest {guest_id} created")

    def running(self, guest_id: str, want: bool, timeout: float = 90) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            data = self.ok("GET", f"/instances/{guest_id}")
            return data if data["running"] is want else None

        return wait(check, timeout, f"guest {guest_id} running={want}")

    def converged(self, guest_id: str, timeout: float = 120) -> dict[str, Any]:
        """The guest's reconcile status once the reconciler worked from its last change
        (`GET /resource_status/`: observed_generation == generation)."""
        def check() -> dict[str, Any] | None:
            for item in self.ok("GET", "/resource_status/"):
                if item["kind"] == "Guest" and item["id"] == guest_id:
                    done = item["observed_generation"] >= item["generation"]
                    return item if done else None
            raise AssertionError(f"guest {guest_id} is not in /resource_status/")

        return wait(check, timeout, f"guest {guest_id} converged")

    def delete_guest(self, guest_id: str, timeout: float = 90) -> None:
        self.call("DELETE", f"/guests/{guest_id}", {"force": True})
        wait(lambda: self.call("GET", f"/guests/{guest_id}").get("error_code") == 404,
             timeout, f"guest {guest_id} deleted")


def serve_nanod(data: Path, port: int, config: Path, log: Path) -> subprocess.Popen[bytes]:
    """`nanod serve` on 127.0.0.1:`port`, its output in `log`, once it answers."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([NANOD, "serve", "--data-dir", str(data), "--listen",
                                 f"127.0.0.1:{port}", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/system/",
                                            timeout=1), 30, "nanod answering", every=0.1)
    except AssertionError:
        proc.kill()
        proc.wait()
        raise
    return proc


def stop_process(proc: subprocess.Popen[Any], timeout: float = 20) -> None:
    """SIGTERM to the process we started (by its pid), SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- inside the guest --------------------------------------------------------------------


@dataclass
class Ssh:
    """A paramiko SSH session to a guest, logged in with a password."""

    host: str
    user: str
    password: str
    client: Any = field(default=None, repr=False)

    def __enter__(self) -> Ssh:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def run(self, command: str, timeout: float = 60, check: bool = True) -> str:
        """`command` run by the guest's shell: its stdout (stripped); AssertionError with
        stderr when it fails and `check`."""
        _in, out, err = self.client.exec_command(command, timeout=timeout)
        text = out.read().decode(errors="replace")  # the channel's timeout bounds this
        if not out.channel.status_event.wait(timeout):
            raise TimeoutError(f"{command!r} did not end in {timeout:.0f} s")
        rc = out.channel.recv_exit_status()
        if check:
            assert rc == 0, f"{command!r} exited {rc}: {err.read().decode(errors='replace')}"
        return text.strip()

    def sudo(self, command: str, **kw: Any) -> str:
        quoted = command.replace("'", "'\\''")
        return self.run(f"sudo -n sh -c '{quoted}'", **kw)


class AuthRefused(Exception):
    """The guest's sshd answered and refused the credentials."""


def ssh_login(host: str, user: str, password: str, timeout: float = 10) -> Ssh:
    """A logged-in session; AuthRefused when sshd refuses the password, OSError (or
    paramiko's SSHException, an OSError here) while sshd is not up."""
    import paramiko

    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # a fresh guest's key
    try:
        client.connect(host, username=user, password=password, timeout=timeout,
                       banner_timeout=timeout, auth_timeout=timeout, allow_agent=False,
                       look_for_keys=False)
    except paramiko.AuthenticationException as exc:
        client.close()
        raise AuthRefused(str(exc)) from exc
    except (paramiko.SSHException, EOFError) as exc:
        client.close()
        raise OSError(f"sshd not ready: {exc}") from exc
    return Ssh(host, user, password, client)


def ssh_ready(host: str, user: str, password: str, timeout: float) -> Ssh:
    """Logged in as soon as the guest lets `user` in (cloud-init sets the password late in
    the first boot: refusals before are retried too)."""
    def attempt() -> Ssh | None:
        try:
            return ssh_login(host, user, password)
        except AuthRefused:
            return None

    return wait(attempt, timeout, f"SSH login of {user}@{host}", every=1.0)


def logs_in(host: str, user: str, password: str) -> bool:
    """True when sshd lets `user` in with `password`, False when it refuses."""
    try:
        ssh_login(host, user, password).close()
    except AuthRefused:
        return False
    return True


GUEST_SERVER = r"""
import socket, sys, threading
port = int(sys.argv[1])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port)); srv.listen(8)
def talk(c):
    c.sendall(b"hello %d\n" % port)
    f = c.makefile("rb")
    for line in f:
        c.sendall(b"echo " + line)
while True:
    c, _ = srv.accept()
    threading.Thread(target=talk, args=(c,), daemon=True).start()
"""


def start_guest_server(ssh: Ssh, port: int) -> None:
    """A TCP server in the guest on `port`: greets `hello <port>`, echoes lines back."""
    ssh.run(f"cat > /tmp/srv{port}.py <<'EOF'\n{GUEST_SERVER}\nEOF\n"
            f"nohup python3 /tmp/srv{port}.py {port} >/dev/null 2>&1 </dev/null &")
    wait(lambda: str(port) in ssh.run("ss -Htln"), 20, f"guest server on {port}")


CLIENT = r"""
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[3]))
    s.settimeout(float(sys.argv[3]))
    f = s.makefile("rb")
    print(f.readline().decode().strip(), flush=True)
except ConnectionRefusedError:
    print("refused", flush=True); sys.exit()
except OSError:
    print("timeout", flush=True); sys.exit()
for line in sys.stdin:
    try:
        s.sendall(line.encode())
        print(f.readline().decode().strip() or "closed", flush=True)
    except OSError as exc:
        print("broken", exc, flush=True)
"""


class TcpClient:
    """A long-lived TCP connection from namespace `ns` (None: this host) to address:port,
    held by a python3 child: `greeting` is what the server said first ('refused',
    'timeout' when none), `say(line)` what it answers to a line."""

    def __init__(self, ns: str | None, address: str, port: int, timeout: float = 5.0):
        where = ["ip", "netns", "exec", ns] if ns else []
        self.proc = subprocess.Popen([*where, "python3", "-c", CLIENT, address, str(port),
                                      str(timeout)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.greeting = self.proc.stdout.readline().strip()

    def say(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def tcp_greeting(ns: str | None, address: str, port: int, timeout: float = 3.0) -> str:
    client = TcpClient(ns, address, port, timeout)
    client.close()
    return client.greeting
