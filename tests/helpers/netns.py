"""Network namespaces as a stand-in cell with guests and clients (ARCHITECTURE.md §5).

`Lab` builds, inside namespaces only it creates:
- a "cell" namespace holding Linux bridges (like libvirt's, with the gateway address on
  the bridge) and one end of each veth pair (the guests' "taps");
- one namespace per "guest", the other veth ends carrying the guest's MAC and address;
- "client" namespaces plugged into the same bridges.
Addresses are private test ranges (10.231.x.0/24) that exist only inside these namespaces.
`NetnsShell` is a `HostShell` running commands inside a namespace (`ip netns exec NS ...`),
so `NftFirewall(lab.shell())` manages the cell namespace's own ruleset, never the host's.
`serve` starts small Python TCP/UDP echo servers in a namespace and `probe` tries TCP,
UDP and ICMP from one, reporting "open", "refused" (RST or ICMP unreachable) or "timeout".

Everything is torn down by `Lab.close()`: processes it started (by pid), then its
namespaces (which takes the veths and bridges with them).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from reconciler.drivers.shell import RC_NOT_FOUND, CommandResult, LocalShell

PYTHON = sys.executable


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def netns_unusable() -> str:
    """'' when this process may create network namespaces, else why not."""
    if os.geteuid() != 0:
        return "network namespace tests need root"
    name = f"nanochk{os.getpid()}"
    try:
        _ip("netns", "add", name)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _ip("netns", "del", name)
    except RuntimeError as exc:
        return f"cannot delete a network namespace: {exc}"
    return ""


class NetnsShell:
    """`HostShell` that runs each argv inside network namespace `ns` (no shell strings).

    A program missing inside the namespace gives `RC_NOT_FOUND`, as `LocalShell` does."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.target = f"netns {ns}"
        self._local = LocalShell()

    def run(
        self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 30
    ) -> CommandResult:
        if isinstance(argv, str | bytes) or not argv:
            raise ValueError("argv must be a non-empty list of words")
        result = self._local.run(
            ["ip", "netns", "exec", self.ns, *argv], input=input, timeout=timeout
        )
        if (
            result.rc == 255
            and result.stderr.startswith("exec of ")
            and ("No such file" in result.stderr)
        ):
            return CommandResult(RC_NOT_FOUND, result.stdout, result.stderr)
        return result

    def close(self) -> None:
        """Nothing to release."""


@dataclass(frozen=True)
class Host:
    """A guest or client: its namespace, MAC, and per bridge its address and the name of
    its veth end in the cell namespace (the guest's "tap")."""

    name: str
    ns: str
    mac: str
    addresses: dict[str, str]
    taps: dict[str, str]

    @property
    def address(self) -> str:
        """Its address on the first bridge it was plugged into."""
        return next(iter(self.addresses.values()))


_SERVER = r"""
import socket, sys, threading
tcp = [int(p) for p in sys.argv[1].split(",") if p]
udp = [int(p) for p in sys.argv[2].split(",") if p]
def serve_tcp(sock):
    while True:
        conn, _ = sock.accept()
        try:
            conn.sendall(b"hello\n")
        finally:
            conn.close()
def serve_udp(sock):
    while True:
        data, peer = sock.recvfrom(2048)
        sock.sendto(data, peer)
for port in tcp:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(64)
    threading.Thread(target=serve_tcp, args=(s,), daemon=True).start()
for port in udp:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    threading.Thread(target=serve_udp, args=(s,), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

_PROBE = r"""
import json, os, socket, struct, sys, time
checks, timeout = json.loads(sys.argv[1]), float(sys.argv[2])
def csum(data):
    if len(data) % 2: data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF); total += total >> 16
    return ~total & 0xFFFF
def tcp(host, port):
    s = socket.socket(); s.settimeout(timeout)
    try:
        s.connect((host, port)); s.recv(16); return "open"
    except ConnectionRefusedError: return "refused"
    except (socket.timeout, TimeoutError): return "timeout"
    except OSError as e: return "error %s" % e
    finally: s.close()
def udp(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(timeout)
    try:
        s.connect((host, port)); s.send(b"probe")
        return "open" if s.recv(64) == b"probe" else "garbled"
    except ConnectionRefusedError: return "refused"
    except (socket.timeout, TimeoutError): return "timeout"
    except OSError as e: return "error %s" % e
    finally: s.close()
def icmp(host, seq):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = (os.getpid() + seq) & 0xFFFF
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"nano-probe"
    packet = body[:2] + struct.pack("!H", csum(body)) + body[4:]
    try:
        s.sendto(packet, (host, 0))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0: return "timeout"
            s.settimeout(left)
            try: data, peer = s.recvfrom(4096)
            except (socket.timeout, TimeoutError): return "timeout"
            msg = data[(data[0] & 0x0F) * 4:]
            kind = msg[0]
            if kind == 0 and peer[0] == host and struct.unpack("!H", msg[4:6])[0] == ident:
                return "open"
            if kind == 3:
                inner = msg[8:]
                dst = socket.inet_ntoa(inner[16:20])
                echo = inner[(inner[0] & 0x0F) * 4:]
                if dst == host and len(echo) >= 6 and struct.unpack("!H", echo[4:6])[0] == ident:
                    return "refused"
    finally:
        s.close()
out = []
for n, (proto, host, port) in enumerate(checks):
    out.append(tcp(host, port) if proto == "tcp" else udp(host, port) if proto == "udp"
               else icmp(host, n + 1))
print(json.dumps(out), flush=True)
"""


@dataclass
class Lab:
    """A cell namespace with bridges, guests and clients. Use as a context manager or
    call `close()`; everything it made is removed there."""

    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000}{uuid.uuid4().hex[:4]}")
    namespaces: list[str] = field(default_factory=list)
    bridges: dict[str, str] = field(default_factory=dict)
    hosts: list[Host] = field(default_factory=list)
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cell = self._namespace("cell")
        # bridged IP traffic through the inet hooks (br_netfilter), in this namespace only
        for knob in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables"):
            path = f"/proc/sys/net/bridge/{knob}"
            self.run(self.cell, ["sh", "-c", 'test ! -e "$1" || echo 1 > "$1"', "sh", path])
        self.run(self.cell, ["ip", "link", "set", "lo", "up"])

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _namespace(self, role: str) -> str:
        name = f"nano{self.tag}-{role}"
        _ip("netns", "add", name)
        self.namespaces.append(name)
        return name

    def run(self, ns: str, argv: Sequence[str], *, check: bool = True) -> CommandResult:
        result = NetnsShell(ns).run(argv)
        if check and not result.ok:
            raise RuntimeError(f"{ns}: {' '.join(argv)}: {result.stderr.strip()}")
        return result

    def shell(self) -> NetnsShell:
        """A `HostShell` inside the cell namespace."""
        return NetnsShell(self.cell)

    def add_bridge(self, name: str, address: str) -> str:
        """A bridge in the cell with `address` (CIDR) on it, like libvirt's gateway."""
        self.run(self.cell, ["ip", "link", "add", name, "type", "bridge"])
        self.run(self.cell, ["ip", "addr", "add", address, "dev", name])
        self.run(self.cell, ["ip", "link", "set", name, "up"])
        self.bridges[name] = address
        return name

    def add_host(self, name: str, mac: str, addresses: dict[str, str]) -> Host:
        """A namespace with one NIC per bridge in `addresses` ({bridge: "10.231.0.11/24"}),
        all with `mac`; the cell-side ends are named `<name><n>` (at most 15 characters)."""
        ns = self._namespace(name)
        self.run(ns, ["ip", "link", "set", "lo", "up"])
        taps: dict[str, str] = {}
        plain: dict[str, str] = {}
        for index, (bridge, cidr) in enumerate(addresses.items()):
            tap, inner = f"{name[:12]}{index}", f"eth{index}"
            self.run(
                self.cell,
                ["ip", "link", "add", tap, "type", "veth", "peer", "name", inner, "netns", ns],
            )
            self.run(self.cell, ["ip", "link", "set", tap, "master", bridge])
            self.run(self.cell, ["ip", "link", "set", tap, "up"])
            self.run(ns, ["ip", "link", "set", inner, "address", mac])
            self.run(ns, ["ip", "addr", "add", cidr, "dev", inner])
            self.run(ns, ["ip", "link", "set", inner, "up"])
            taps[bridge] = tap
            plain[bridge] = cidr.split("/")[0]
        host = Host(name, ns, mac, plain, taps)
        self.hosts.append(host)
        return host

    def spawn(self, ns: str, code: str, *args: str) -> subprocess.Popen[str]:
        """Run Python `code` inside `ns` (`ip netns exec` execs it: the pid is Python's)."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, PYTHON, "-c", code, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.processes.append(proc)
        return proc

    def serve(self, host: Host, *, tcp: Iterable[int] = (), udp: Iterable[int] = ()) -> None:
        """TCP servers (say hello) and UDP echo servers on all of `host`'s addresses."""
        proc = self.spawn(host.ns, _SERVER, ",".join(map(str, tcp)), ",".join(map(str, udp)))
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        line = proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            error = (
                proc.stderr.read() if proc.stderr is not None and proc.poll() is not None else ""
            )
            self.stop(proc)
            raise RuntimeError(f"server in {host.ns} did not start: {error}")

    def probe(
        self, host: Host, checks: Sequence[tuple[str, str, int]], *, timeout: float = 2.0
    ) -> list[str]:
        """From `host`, try each (protocol, address, port): "tcp"/"udp"/"icmp" (port ignored
        for icmp). One outcome per check: "open", "refused" or "timeout"."""
        done = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                host.ns,
                PYTHON,
                "-c",
                _PROBE,
                json.dumps(list(checks)),
                str(timeout),
            ],
            capture_output=True,
            text=True,
            timeout=timeout * len(checks) + 30,
        )
        if done.returncode:
            raise RuntimeError(f"probe from {host.ns} failed: {done.stderr.strip()}")
        return list(json.loads(done.stdout))

    def stop(self, proc: subprocess.Popen[str]) -> None:
        """End one process we started (by its pid) and reap it."""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    def close(self) -> None:
        """Stop our processes, then delete our namespaces (veths and bridges go with them).
        Idempotent."""
        while self.processes:
            self.stop(self.processes.pop())
        errors: list[str] = []
        while self.namespaces:
            name = self.namespaces.pop()
            for _attempt in range(3):
                done = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
                if done.returncode == 0 or "No such file" in done.stderr:
                    break
                time.sleep(0.2)
            else:
                errors.append(f"{name}: {done.stderr.strip()}")
        if errors:
            raise RuntimeError(f"could not delete namespaces: {errors}")
