"""nanod's settings: defaults, a YAML config file, then command-line flags on top.

Called by the CLI (nanod/cli.py) before anything opens; everything else receives the
resulting plain dict.
"""

from __future__ import annotations

import copy
import os
import re
import secrets
import socket
from typing import Any

import yaml

from reconciler.failover import check_fencing
from reconciler.naming import check_prefix
from state.cell_transport import check_path
from state.errors import Invalid
from state.identity import PASSWORD_HASH_DEFAULTS, check_password_hash
from state.placement import overcommit_from

DEFAULTS: dict[str, Any] = {
    "listen": "127.0.0.1:5870",
    "data_dir": "/var/lib/nano",
    "database": "",  # "" = sqlite file under data_dir
    "session_timeout": 180,
    "cors_origins": [],
    "log_level": "info",
    "limits": {"max_cores": 24, "max_memory": 32, "max_disk": 64},
    # placement's ratios: vCPUs per host core, guest memory/disk bytes per host byte; a
    # cell's own `overcommit` field overrides them (state/placement.py)
    "overcommit": {"cpu": 4, "memory": 1.0, "disk": 1.0},
    # libvirt_timeout_seconds: how long a worker waits for one libvirt call before the cell
    # counts as not answering (streams and image copies have no limit); long_workers:
    # threads for long work (image streams, volume copies, compaction, clones) apart from
    # the `workers` that status and power changes need (reconciler/longwork.py);
    # migration_bandwidth_mib: MiB/s a live migration may use (memory and copied disks),
    # 0 = as fast as the network goes
    "reconciler": {"enabled": True, "workers": 4, "resync_seconds": 30, "offline_after": 3,
                   "libvirt_timeout_seconds": 30, "long_workers": 2,
                   "migration_bandwidth_mib": 0},
    "images": {"max_upload_bytes": 64 << 30, "upload_idle_seconds": 60},
    # abuse limits (api/base.py): bytes of a JSON body (uploads: images.max_upload_bytes),
    # threads that hash passwords, failed-login records kept by the throttle, threads the
    # routes' database calls run in (never the IOLoop)
    "api": {"max_json_bytes": 1 << 20, "password_workers": 2, "login_throttle_entries": 10000,
            "store_workers": 8},
    # the argon2id cost of password hashes (state/identity.py): passes, memory in KiB and
    # lanes; never below OWASP's least (2, 19456, 1). A stored hash of another cost is made
    # again at its user's next login, so raising it upgrades every active account
    "password_hash": dict(PASSWORD_HASH_DEFAULTS),
    # the event stream (state/events.py, GET /api/v1/events): events older than
    # max_age_seconds or beyond the newest max_count are trimmed; the API reads new ones
    # every poll_seconds (one query for all its clients)
    "events": {"max_age_seconds": 86400, "max_count": 100000, "poll_seconds": 0.5},
    # The prefix of everything nanod makes on its cells (reconciler/naming.py): domains,
    # volumes, storage pools, networks, bridges, nft tables. Two nanods sharing a host
    # (e.g. the test suite's beside scripts/setup's) need different ones.
    "names": {"prefix": "nano"},
    # libvirt's test driver cells (test:///PATH.xml) are for tests and benchmarks only: a
    # production nanod refuses them (state/cell_transport.py); `nanod serve
    # --allow-test-cells` sets this too
    "allow_test_cells": False,
    # nanod's SSH to its cells (paramiko) and libvirt's ssh (its wrapper): where the cells'
    # private keys must live ("" = DATA_DIR/keys), how long a connection may take to be
    # established and a command to answer, and whether the host key a cell presents at first
    # contact is pinned (else every cell needs ssh.host_key)
    "ssh": {"key_dir": "", "connect_timeout": 10, "command_timeout": 60,
            "trust_on_first_use": True},
    # fenced failover (reconciler/failover.py): the command that powers a lost cell off
    # (an argv list run on this node, `{cell}` and `{address}` replaced; exit 0 = fenced)
    # per cell name, or `default` for the others; nothing starts a lost cell's guests
    # elsewhere until its fence succeeded
    "fencing": {"commands": {}, "default": [], "timeout_seconds": 60},
    # GET /metrics (Prometheus text, api/metrics.py): when set, a scrape must send
    # `Authorization: Bearer <metrics_token>`; "" = anyone who reaches `listen` reads them
    "metrics_token": "",
    # a directory of static files served at / (a browser app such as the original Nano
    # portal: api/webroot.py), with index.html for any other path outside /api; "" = none
    "web_root": "",
    # several nanods on one PostgreSQL store (state/leases.py, reconciler/leases.py): each
    # replica reconciles the cells it holds a lease on. id: this replica's name ("" = the
    # one kept in DATA_DIR/replica-id, made at first start); address: where people reach its
    # API (GET /api/v1/replicas shows it; "" = the listen address); a lease lives
    # lease_ttl_seconds unless renewed, and is renewed every renew_seconds
    "replicas": {"id": "", "address": "", "lease_ttl_seconds": 10, "renew_seconds": 3},
    # where image files live ("" = DATA_DIR/images); replicas share one directory (NFS in
    # production) so that any of them uploads, downloads and sends every image
    "image_dir": "",
}


def merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load(path: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Defaults < file < flags. Unknown keys in the file are an error, with their names."""
    settings = copy.deepcopy(DEFAULTS)
    if path:
        try:
            with open(path) as fh:
                data = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise SystemExit(f"nanod: cannot read config {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise SystemExit(f"nanod: config {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise SystemExit(f"nanod: config {path} must be a mapping of settings")
        unknown = sorted(set(data) - set(DEFAULTS))
        if unknown:
            raise SystemExit(
                f"nanod: config {path}: unknown setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(DEFAULTS))}"
            )
        settings = merge(settings, data)
    settings = merge(settings, {k: v for k, v in overrides.items() if v not in (None, "")})
    settings["data_dir"] = os.path.abspath(settings["data_dir"])
    try:
        overcommit_from(settings["overcommit"], "overcommit")
    except ValueError as exc:
        raise SystemExit(f"nanod: config {path or '(defaults)'}: {exc}") from None
    _check_cell_access(settings)
    settings["web_root"] = check_web_root(settings["web_root"])
    problem = check_fencing(settings["fencing"])
    if problem:
        raise SystemExit(f"nanod: {problem}")
    if not isinstance(settings["metrics_token"], str):
        raise SystemExit("nanod: metrics_token must be a string (quote it in the YAML), not "
                         f"{settings['metrics_token']!r}")
    _check_replicas(settings)
    try:
        settings["password_hash"] = check_password_hash(settings["password_hash"])
    except ValueError as exc:
        raise SystemExit(f"nanod: {exc}") from None
    names = settings["names"]
    if not isinstance(names, dict) or set(names) != {"prefix"}:
        raise SystemExit(f"nanod: names must be {{prefix: PREFIX}}, not {names!r}")
    try:
        check_prefix(names["prefix"])
    except ValueError as exc:
        raise SystemExit(f"nanod: {exc}") from None
    return settings


REPLICA_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$")


def _check_replicas(settings: dict[str, Any]) -> None:
    """`replicas` and `image_dir`: known keys and sound values, or exit naming them; an
    empty image_dir becomes DATA_DIR/images (an empty id is resolved by `replica_id` when
    nanod serves)."""
    conf = settings["replicas"]
    if not isinstance(conf, dict) or set(conf) - set(DEFAULTS["replicas"]):
        raise SystemExit(f"nanod: replicas takes the keys {', '.join(DEFAULTS['replicas'])}, "
                         f"not {conf!r}")
    for key in ("lease_ttl_seconds", "renew_seconds"):
        value = conf[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise SystemExit(f"nanod: replicas.{key} must be a number of seconds > 0, not "
                             f"{value!r}")
    if conf["renew_seconds"] * 2 > conf["lease_ttl_seconds"]:
        raise SystemExit("nanod: replicas.renew_seconds must be at most half of "
                         "replicas.lease_ttl_seconds, or one late renewal loses every lease "
                         f"(now {conf['renew_seconds']} and {conf['lease_ttl_seconds']})")
    if not isinstance(conf["address"], str):
        raise SystemExit(f"nanod: replicas.address must be a string, not {conf['address']!r}")
    if conf["id"] is None:
        conf["id"] = ""
    if not isinstance(conf["id"], str) or (conf["id"] and not REPLICA_ID.match(conf["id"])):
        raise SystemExit(f"nanod: replicas.id {conf['id']!r} must be 1-63 letters, digits, "
                         "'.', '_', ':' or '-', starting with a letter or digit")
    image_dir = settings["image_dir"]
    if not isinstance(image_dir, str):
        raise SystemExit(f"nanod: image_dir must be the path of a directory, not {image_dir!r}")
    settings["image_dir"] = os.path.abspath(image_dir or os.path.join(settings["data_dir"],
                                                                      "images"))


def replica_id(settings: dict[str, Any]) -> str:
    """This replica's id: `replicas.id`, or else the one in DATA_DIR/replica-id, written
    at the first start: the host's name and a random suffix, so that two data directories
    on one host differ, and a restart keeps its name (and takes its own leases back at
    once, state/leases.py)."""
    if settings["replicas"]["id"]:
        return str(settings["replicas"]["id"])
    data_dir = settings["data_dir"]
    path = os.path.join(data_dir, "replica-id")
    try:
        with open(path) as fh:
            kept = fh.read().strip()
        if kept:
            return kept
    except FileNotFoundError:
        pass
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40].strip("-.") or "nanod"
    made = f"{host}-{secrets.token_hex(3)}"
    os.makedirs(data_dir, exist_ok=True)
    with open(path, "w") as fh:
        fh.write(made + "\n")
    return made


def _check_cell_access(settings: dict[str, Any]) -> None:
    """`allow_test_cells` and `ssh`: known keys and sound values, or exit naming them; an
    empty key_dir becomes DATA_DIR/keys."""
    if not isinstance(settings["allow_test_cells"], bool):
        raise SystemExit(f"nanod: allow_test_cells must be true or false, not "
                         f"{settings['allow_test_cells']!r}")
    ssh = settings["ssh"]
    if not isinstance(ssh, dict) or set(ssh) - set(DEFAULTS["ssh"]):
        raise SystemExit(f"nanod: ssh takes the keys {', '.join(DEFAULTS['ssh'])}, not "
                         f"{ssh!r}")
    for key in ("connect_timeout", "command_timeout"):
        value = ssh[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise SystemExit(f"nanod: ssh.{key} must be a number of seconds > 0, not {value!r}")
    if not isinstance(ssh["trust_on_first_use"], bool):
        raise SystemExit("nanod: ssh.trust_on_first_use must be true or false")
    key_dir = ssh["key_dir"] or os.path.join(settings["data_dir"], "keys")
    try:  # key files are named by paths under it, checked the same way
        ssh["key_dir"] = check_path("ssh.key_dir", key_dir.rstrip("/") if
                                    isinstance(key_dir, str) else key_dir)
    except Invalid as exc:
        raise SystemExit(f"nanod: {exc.message}") from None


def check_web_root(value: Any) -> str:
    """`web_root`: "" (none), or a directory nanod can read with an index.html in it,
    returned absolute; anything else exits naming the setting. A link stays a link: it is
    resolved at each request (api/webroot.py), so pointing it at a new build deploys it."""
    if value in ("", None):
        return ""
    if not isinstance(value, str):
        raise SystemExit(f"nanod: web_root must be the path of a directory, not {value!r}")
    path = os.path.abspath(value)
    if not os.path.isdir(path):
        raise SystemExit(f"nanod: web_root {value!r} is not a directory: give the directory "
                         "that holds the app's index.html, or \"\" for none")
    if not os.access(path, os.R_OK | os.X_OK):
        raise SystemExit(f"nanod: web_root {value!r} is not readable by this nanod (uid "
                         f"{os.geteuid()}): make it and its files readable, e.g. chmod a+rX")
    index = os.path.join(path, "index.html")
    if not os.path.isfile(index) or not os.access(index, os.R_OK):
        raise SystemExit(f"nanod: web_root {value!r} has no readable index.html, which every "
                         "path outside /api without a file of its own is answered with")
    return path


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"nanod: --listen {value!r} must be HOST:PORT, e.g. 127.0.0.1:5870")
    return host.strip("[]") or "0.0.0.0", int(port)
