"""How nanod reaches a cell, checked field by field, and the libvirt URI nanod builds from
those fields itself; and the SSH host key a cell may pin.

Called by the store (`state/compute.py`) when a cell is registered or changed, so a refused
form is never stored, and by the reconciler (`reconciler/cells.py`) before it connects, so
a cell stored earlier in a form refused today is never contacted.

nanod runs as root on the management node, and libvirt's URI is a small command language:
`qemu+ext:///system?command=/any/program` runs a program, `socket=`/`netcat=`/`keyfile=`
name local files, `no_verify=1` trusts any server, `test:///path` reads a file. So a cell
is reached only in one of these ways, and no query parameter a user gives reaches libvirt:

- `qemu:///system`: this host's libvirtd (no `ssh`);
- `qemu+ssh://USER@ADDRESS:PORT/system`, built from `address` and `ssh` (user name,
  port, key file under the key directory); nanod adds `keyfile`, its known-hosts wrapper
  (`command`) and `no_tty` itself;
- `qemu+tls://ADDRESS[:PORT]/system`: libvirt's TLS with its own PKI, no options (host
  facts, firewall and consoles still go over `ssh`);
- `test:///ABSOLUTE/PATH.xml`: libvirt's test driver, only when test cells are enabled
  (setting `allow_test_cells: true` or `nanod serve --allow-test-cells`).

Every refusal is `Invalid` (400) naming the field and saying what is accepted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import os
import re
import struct
import urllib.parse
from dataclasses import dataclass
from typing import Any

from state.errors import Invalid

LOCAL_URI = "qemu:///system"
SSH_PORT = 22
TLS_PORT = 16514

_ACCEPTED = ("use qemu:///system (this host), qemu+ssh://USER@ADDRESS[:PORT]/system, "
             "qemu+tls://ADDRESS[:PORT]/system, or leave libvirt_uri out: nanod builds it "
             "from address and ssh")
# POSIX-style login names: no '@', '?', '&', '/', ':' or space can reach the URI
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\Z")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
_PATH_WORD = re.compile(r"[A-Za-z0-9._+@=,-]+\Z")
_REMOTE_URI = re.compile(
    r"(?:(?P<user>[^@/]*)@)?(?P<host>\[[^\]/]*\]|[^:/@\[\]]*)(?::(?P<port>[0-9]{1,5}))?"
    r"(?P<path>/.*)?\Z", re.S)
_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}\Z")
# what paramiko 5 and OpenSSH both verify; `ssh-dss` is gone from both
HOST_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                  "ecdsa-sha2-nistp521", "ssh-rsa")


@dataclass(frozen=True)
class CellRules:
    """What this nanod accepts of cell transports (settings `allow_test_cells` and
    `ssh.key_dir`). The default refuses test cells and every key file."""

    allow_test_cells: bool = False
    key_dir: str = ""  # absolute; "" = no key file is accepted

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> CellRules:
        return cls(allow_test_cells=bool(settings.get("allow_test_cells", False)),
                   key_dir=str((settings.get("ssh") or {}).get("key_dir") or ""))


@dataclass(frozen=True)
class HostKeyPin:
    """An SSH host key given in a cell's `ssh.host_key`: always its SHA256 fingerprint,
    the key itself when it was given whole."""

    fingerprint: str  # "SHA256:<43 base64 characters>", as ssh-keygen -l prints it
    key_type: str = ""  # e.g. "ssh-ed25519"; "" when only the fingerprint was given
    key_base64: str = ""


@dataclass(frozen=True)
class CellTransport:
    """A cell's checked way in; `uri()` is the only place a cell's libvirt URI is made."""

    kind: str  # local | ssh | tls | test
    host: str = ""  # the cell's address (ssh and tls)
    user: str = ""  # ssh
    ssh_port: int = 0  # nanod's own SSH (facts, firewall, consoles) and qemu+ssh
    key_file: str = ""
    host_key: HostKeyPin | None = None  # ssh.host_key, when given
    tls_port: int = 0  # qemu+tls
    path: str = ""  # test driver node file

    @property
    def remote(self) -> bool:
        return self.kind in ("ssh", "tls")

    def uri(self, *, ssh_command: str = "") -> str:
        """The libvirt URI; for SSH, `ssh_command` is nanod's ssh wrapper (known hosts,
        timeouts). Values are percent-encoded, though the checks leave nothing to encode."""
        if self.kind == "local":
            return LOCAL_URI
        if self.kind == "test":
            return f"test://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.kind == "tls":
            return f"qemu+tls://{host}:{self.tls_port}/system"
        query = [("keyfile", self.key_file)] if self.key_file else []
        if ssh_command:
            query.append(("command", ssh_command))
        query.append(("no_tty", "1"))
        encoded = urllib.parse.urlencode(query, quote_via=urllib.parse.quote, safe="/")
        return f"qemu+ssh://{self.user}@{host}:{self.ssh_port}/system?{encoded}"


def fingerprint(key_base64: str) -> str:
    """The SHA256 fingerprint of a public key blob (base64), as `ssh-keygen -l` prints it."""
    digest = hashlib.sha256(base64.b64decode(key_base64)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def parse_host_key(text: str) -> HostKeyPin:
    """`ssh.host_key`: a public key (`TYPE BASE64 [comment]`, as in
    /etc/ssh/ssh_host_ed25519_key.pub, or a line of `ssh-keyscan`, host first) or its
    SHA256 fingerprint (`ssh-keygen -lf FILE`). Raises `Invalid` naming the field."""
    words = text.split()
    if len(words) == 1 and _FINGERPRINT.match(words[0]):
        return HostKeyPin(words[0])
    if words and words[0] not in HOST_KEY_TYPES and len(words) >= 3:
        words = words[1:]  # a known_hosts / ssh-keyscan line: host pattern first
    if len(words) < 2 or words[0] not in HOST_KEY_TYPES:
        raise Invalid("ssh.host_key: give the cell's public host key (e.g. the contents of "
                      "/etc/ssh/ssh_host_ed25519_key.pub on the cell) or its SHA256 "
                      "fingerprint (ssh-keygen -lf that file: SHA256:...); key types: "
                      f"{', '.join(HOST_KEY_TYPES)}")
    key_type, blob64 = words[0], words[1]
    try:
        fields = _wire_fields(base64.b64decode(blob64, validate=True))
        embedded = fields[0].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError, ValueError, IndexError):
        raise Invalid(f"ssh.host_key: the {key_type} key is not valid base64 key data") from None
    if embedded != key_type:
        raise Invalid(f"ssh.host_key: the key data is a {embedded!r} key, not {key_type!r}")
    complete = (len(fields[1]) == 32 and len(fields) == 2 if key_type == "ssh-ed25519" else
                len(fields) == 3 and (key_type == "ssh-rsa" or
                                      fields[1] == key_type.rsplit("-", 1)[1].encode()))
    if not complete:
        raise Invalid(f"ssh.host_key: the {key_type} key is not valid base64 key data "
                      "(incomplete)")
    return HostKeyPin(fingerprint(blob64), key_type, blob64)


def _wire_fields(blob: bytes) -> list[bytes]:
    """The length-prefixed fields of an SSH public key blob (RFC 4253 §6.6), which must
    use it up exactly."""
    fields, at = [], 0
    while at < len(blob):
        (length,) = struct.unpack(">I", blob[at:at + 4])
        if at + 4 + length > len(blob):
            raise ValueError("truncated")
        fields.append(blob[at + 4:at + 4 + length])
        at += 4 + length
    return fields


def check_address(value: Any) -> str:
    """A host name or an IP address (no zone id, no port, nothing else)."""
    if isinstance(value, str) and value and "%" not in value:
        try:
            ipaddress.ip_address(value)
            return value
        except ValueError:
            if len(value) <= 253 and _HOST_NAME.match(value):
                return value
    raise Invalid(f"address: {value!r} is not a host name or an IP address: send e.g. "
                  "\"cell-1.example.net\", \"192.0.2.10\" or \"2001:db8::10\"")


def check_user(value: Any, field: str = "ssh.user") -> str:
    if isinstance(value, str) and _USER.match(value):
        return value
    raise Invalid(f"{field}: {value!r} is not a user name: a letter or '_' first, then "
                  "letters, digits, '_', '.', '-' (at most 32)")


def check_port(value: Any, field: str = "ssh.port") -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    raise Invalid(f"{field}: {value!r} is not a port number (1-65535)")


def check_path(field: str, value: Any, *, suffix: str = "") -> str:
    """An absolute, normalized path of plain words: no '..', '.', '//', spaces, '?', '&',
    '%' or quotes, so it reads the same in a URI, a shell and a log."""
    parts = value.split("/") if isinstance(value, str) else []
    if (len(parts) < 2 or parts[0] != "" or not all(_PATH_WORD.match(p) for p in parts[1:])
            or any(p in (".", "..") for p in parts) or not value.endswith(suffix)):
        what = f"an absolute path ending in {suffix!r}" if suffix else "an absolute path"
        raise Invalid(f"{field}: {value!r} must be {what}, made of letters, digits and "
                      "'._+@=,-' between single slashes (no '..', spaces, '?', '&' or '%')")
    return value


def check_key_file(value: Any, key_dir: str) -> str:
    """A private key path inside the configured key directory (symlinks resolved too)."""
    path = check_path("ssh.key_file", value)
    if not key_dir:
        raise Invalid("ssh.key_file: this nanod accepts no key files: set ssh.key_dir in its "
                      "settings to the directory holding the cells' private keys")
    inside = path.startswith(key_dir.rstrip("/") + "/")
    real_dir = os.path.realpath(key_dir)
    if not inside or not os.path.realpath(path).startswith(real_dir.rstrip("/") + "/"):
        raise Invalid(f"ssh.key_file: {path!r} is outside the key directory {key_dir} "
                      "(setting ssh.key_dir): put the cell's private key there and name it "
                      "by that path")
    return path


def _query_refusal(uri: str) -> Invalid:
    query = uri.split("?", 1)[1].split("#", 1)[0] if "?" in uri else ""
    names = sorted({name for name, _ in urllib.parse.parse_qsl(query, keep_blank_values=True)})
    which = f" ({', '.join(names)})" if names else ""
    return Invalid(f"libvirt_uri: query parameters and fragments are not accepted{which}: "
                   "nanod sets the transport's options itself (key file from ssh.key_file, "
                   "host key checking, timeouts); send the URI without '?...'")


def _parse_uri(uri: str, rules: CellRules) -> tuple[str, str, str, int]:
    """(kind, user, host, port) of a given libvirt_uri; for test cells, host is the path."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise Invalid(f"libvirt_uri: {uri!r} is not a libvirt URI: {_ACCEPTED}")
    if scheme == "test" and not rules.allow_test_cells:
        raise Invalid("libvirt_uri: test driver cells (test:///...) are disabled on this "
                      "nanod (they are for tests and benchmarks): start it with "
                      "--allow-test-cells or set allow_test_cells: true")
    if "?" in uri or "#" in uri:
        raise _query_refusal(uri)
    if scheme == "test":
        return "test", "", check_path("libvirt_uri", rest, suffix=".xml"), 0
    if scheme == "qemu":
        if uri != LOCAL_URI:
            raise Invalid(f"libvirt_uri: {uri!r}: of the local qemu URIs only {LOCAL_URI} is "
                          f"accepted; {_ACCEPTED}")
        return "local", "", "", 0
    if scheme not in ("qemu+ssh", "qemu+tls"):
        raise Invalid(f"libvirt_uri: scheme {scheme!r} is not accepted: {_ACCEPTED}")
    match = _REMOTE_URI.match(rest)
    if match is None or match["path"] != "/system" or not match["host"]:
        raise Invalid(f"libvirt_uri: {uri!r} must name a host and the path /system, "
                      f"e.g. {scheme}://192.0.2.10/system")
    host = match["host"].strip("[]")
    try:
        check_address(host)
    except Invalid:
        raise Invalid(f"libvirt_uri: host {host!r} is not a host name or an IP address") \
            from None
    user = match["user"]
    if user is not None:
        if scheme == "qemu+tls":
            raise Invalid("libvirt_uri: qemu+tls takes no user name (TLS authenticates by "
                          "certificate)")
        check_user(user, "libvirt_uri")
    port = check_port(int(match["port"]), "libvirt_uri") if match["port"] else 0
    return scheme.split("+")[1], user or "", host, port


def cell_transport(spec: dict[str, Any], rules: CellRules) -> CellTransport:
    """Check a cell spec's way in (`libvirt_uri`, `address`, `ssh`) against `rules`;
    raises `Invalid` naming the first field refused."""
    uri = spec.get("libvirt_uri") or ""
    ssh = spec.get("ssh") or {}
    address = check_address(spec.get("address", ""))
    if not isinstance(uri, str):
        raise Invalid(f"libvirt_uri: {uri!r} is not a string")
    if uri:
        kind, uri_user, uri_host, uri_port = _parse_uri(uri, rules)
    else:
        kind, uri_user, uri_host, uri_port = ("ssh" if ssh else "local"), "", "", 0
    if kind == "test":
        if ssh:
            raise Invalid("ssh: a test driver cell is simulated on this host: leave ssh out")
        return CellTransport("test", path=uri_host)
    if kind == "local":
        if ssh:
            raise Invalid(f"libvirt_uri: {LOCAL_URI} is this host's libvirtd, but ssh makes "
                          "the cell remote: leave libvirt_uri out (nanod then builds "
                          "qemu+ssh://USER@ADDRESS:PORT/system) or leave ssh out")
        return CellTransport("local")
    if not ssh:
        raise Invalid(f"ssh: is required for a qemu+{kind} cell: nanod reads host facts, "
                      "applies the firewall and opens consoles over SSH; give ssh.key_file "
                      "(or ssh.password)")
    if uri_host and uri_host != address:
        raise Invalid(f"libvirt_uri: host {uri_host!r} differs from address {address!r}: "
                      "send the same host in both, or leave libvirt_uri out")
    user = check_user(ssh.get("user", "root"))
    port = check_port(ssh.get("port", SSH_PORT))
    if kind == "ssh" and uri_user and uri_user != user:
        raise Invalid(f"libvirt_uri: user {uri_user!r} differs from ssh.user {user!r}")
    if kind == "ssh" and uri_port and uri_port != port:
        raise Invalid(f"libvirt_uri: port {uri_port} differs from ssh.port {port}")
    key_file = check_key_file(ssh["key_file"], rules.key_dir) if ssh.get("key_file") else ""
    host_key = parse_host_key(ssh["host_key"]) if ssh.get("host_key") else None
    return CellTransport(kind, host=address, user=user, ssh_port=port, key_file=key_file,
                         host_key=host_key,
                         tls_port=(uri_port or TLS_PORT) if kind == "tls" else 0)
