"""Fuzzing the whole API with schemathesis, from the OpenAPI document nanod serves.

A real `nanod serve` child (127.0.0.1, a free port, `--allow-test-cells`, a temp data dir,
SQLite) is claimed by an administrator whose user, group and role have random names, and
every operation of GET /api/v1/openapi.json (but that document's own route, which
schemathesis leaves out; tests/api/test_openapi.py checks it) is sent generated requests
(valid and invalid bodies, path and query values) with that administrator's Nano-Session
header. Asserted on
every reply: no HTTP 5xx; JSON replies are the envelope (exactly error_code, message,
data, with their types; data null on errors); no error_code 500 (bad input must be a 400
naming the field); and nanod still answers afterwards. Printed: requests sent, distinct
routes and operations exercised, and each failure with the request that caused it.

Bounded: NANO_FUZZ_EXAMPLES examples per operation (default 8) and NANO_FUZZ_SECONDS of
fuzzing in all (default 120; operations left when it runs out are printed as not
reached). A bigger run on demand:
`NANO_FUZZ_EXAMPLES=200 NANO_FUZZ_SECONDS=3600 pytest -s tests/api/test_fuzz.py`.

What keeps the run alive and nanod inside its temp dir:
- the administrator's user, group and role names are random: a generated DELETE or PUT
  cannot remove or weaken the session the run uses (there is no DELETE /system route);
- the session is kept alive (PUT /sessions/{id}) after each operation and at least every
  minute (DELETE /cells/{name} waits 10 s for a reconciler that is off), and the run
  stops with a failure naming the operation after which it no longer works;
- POST /sessions/ gets few examples: each failed login is throttled (api/base.py), so
  many would only measure the throttle;
- the reconciler is off (setting reconciler.enabled false): a generated cell (any
  libvirt URI or address) is stored, never connected to, and no storage path, network or
  guest is made on this host; nanod writes only its temp data dir (database, image files,
  logs). Image sync (PATCH) reads the data dir's own image directories.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.api.test_images import BOUNDARY, make_iso, make_qcow2, multipart
from tests.conftest import write_nanod_config
from tests.helpers.testdriver import write_test_cell

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis (the test extra) "
                                   "is not installed")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

NANOD = str(Path(sys.executable).with_name("nanod"))
EXAMPLES = int(os.environ.get("NANO_FUZZ_EXAMPLES", "8"))
SECONDS = float(os.environ.get("NANO_FUZZ_SECONDS", "120"))
FEW = {("POST", "/sessions")}  # throttled failed logins: see the module docstring
KEYS = {"error_code", "message", "data"}
KEEP_ALIVE = 60.0  # seconds between keep-alives of the session (it expires after 180)


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(url: str, method: str = "GET", body: Any = None, session: str = "", *,
         raw: bytes | None = None, ctype: str = "application/json") -> Any:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, method=method, data=data,
                                 headers={"Content-Type": ctype,
                                          **({"Nano-Session": session} if session else {})})
    with urllib.request.urlopen(req, timeout=30) as response:
        return json.loads(response.read())


def ok(url: str, method: str, body: Any = None, session: str = "", **kw: Any) -> Any:
    doc = call(url, method, body, session, **kw)
    assert doc["error_code"] == 0, (method, url, doc)
    return doc["data"]


def make_fixtures(url: str, session: str, tmp: Path) -> dict[str, str]:
    """Things of every kind the API can make without a reconciler, so that part of the
    fuzzing names real ones in its paths (random names only reach the 404s): a role,
    group, user (and a session of its own), compute pool, storage pool, cell (a test-driver
    file in the temp dir, never opened: the reconciler is off), address pool with a range,
    media and disk images with files, a template and a security policy group with a rule."""
    def do(method: str, path: str, body: Any = None, **kw: Any) -> Any:
        return ok(url + path, method, body, session, **kw)

    fx = {"role": "fz-role", "group": "fz-group", "user": "fz-user", "pool": "fz-pool",
          "storage": "fz-store", "cell": "fz-cell", "net": "fz-net", "start": "172.31.9.1"}
    do("POST", "/roles/fz-role", {"menu": ["log"]})
    do("POST", "/user_groups/fz-group", {"display": "Fuzz", "role": ["fz-role"]})
    do("POST", "/users/fz-user", {"password": "Fuzz-User-pw1"})
    do("POST", "/user_groups/fz-group/members/fz-user")
    fx["token"] = ok(url + "/sessions/", "POST", {"user": "fz-user",
                                                   "password": "Fuzz-User-pw1"})["session"]
    do("POST", "/compute_pools/fz-pool", {})
    do("POST", "/storage_pools/fz-store", {"type": "dir", "target": str(tmp / "shared")})
    cell = write_test_cell(tmp / "fz-cell.xml", cpus=2, memory_kib=1 << 20)
    do("POST", "/cells/fz-cell", {"libvirt_uri": cell.uri, "virt_type": "qemu",
                                  "storage_path": str(tmp / "cell-storage")})
    do("POST", "/address_pools/fz-net", {"gateway": "172.31.9.254", "dns": ["192.0.2.53"]})
    do("POST", "/address_pools/fz-net/internal/ranges/172.31.9.1",
       {"end": "172.31.9.9", "netmask": "255.255.255.0"})
    for kind, data in (("media", make_iso()), ("disk", make_qcow2(tmp))):
        fx[kind] = do("POST", f"/{kind}_images/", {"name": f"fz-{kind}"})["id"]
        do("POST", f"/{kind}_images/{fx[kind]}/file/",
           raw=multipart([("image", "f.bin", data)]),
           ctype=f"multipart/form-data; boundary={BOUNDARY}")
    fx["template"] = do("POST", "/templates/", {
        "name": "fz-t", "admin": "root", "operating_system": "linux", "disk": "scsi",
        "network": "virtio", "display": "vga", "control": "vnc", "usb": "", "tablet": ""})["id"]
    fx["policy"] = do("POST", "/security_policy_groups/", {"name": "fz-pg"})["id"]
    do("POST", f"/security_policy_groups/{fx['policy']}/rules",
       {"action": "accept", "protocol": "tcp", "to_port": 22})
    return fx


def pinned(path: str, fx: dict[str, str]) -> dict[str, str] | None:
    """Path parameters of `path` set to the fixtures' names, or None when some parameter
    has no fixture (the guests' routes: guests need cells the reconciler has probed)."""
    first = path.split("/")[1]
    known = {
        "roles": {"name": fx["role"]},
        "user_groups": {"name": fx["group"], "group": fx["group"], "user": fx["user"]},
        "users": {"name": fx["user"]},
        "sessions": {"token": fx["token"]},
        "compute_pools": {"name": fx["pool"]},
        "compute_pool_cells": {"pool": fx["pool"], "cell": fx["cell"]},
        "compute_pool_status": {"pool": fx["pool"]},
        "compute_cell_status": {"pool": fx["pool"], "cell": fx["cell"]},
        "instance_status": {"pool": fx["pool"], "cell": fx["cell"]},
        "storage_pools": {"name": fx["storage"]},
        "cells": {"name": fx["cell"]},
        "media_images": {"image_id": fx["media"]},
        "media_image_files": {"image_id": fx["media"]},
        "disk_images": {"image_id": fx["disk"]},
        "disk_image_files": {"image_id": fx["disk"]},
        "address_pools": {"name": fx["net"], "kind": "internal", "start": fx["start"]},
        "security_policy_groups": {"group_id": fx["policy"], "index": "0"},
        "templates": {"template_id": fx["template"]},
    }.get(first, {})
    names = re.findall(r"{([^}]+)}", path)
    if not names or any(n not in known for n in names):
        return None
    return {n: known[n] for n in names}


@pytest.fixture
def nanod(tmp_path):
    """A claimed nanod child: (base URL, administrator's session)."""
    data = tmp_path / "data"
    port = free_port()
    conf = write_nanod_config(tmp_path / "nanod.yaml", {"reconciler": {"enabled": False}})
    out = open(tmp_path / "nanod.out", "ab")
    proc = subprocess.Popen([NANOD, "serve", "--config", str(conf), "--data-dir", str(data),
                             "--listen", f"127.0.0.1:{port}", "--allow-test-cells"],
                            stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api/v1"
    try:
        for _ in range(300):
            assert proc.poll() is None, (tmp_path / "nanod.out").read_text()
            try:
                call(url + "/system/")
                break
            except OSError:
                time.sleep(0.1)
        tag = secrets.token_hex(6)
        user, password = f"fuzz-admin-{tag}", "Fuzz-" + secrets.token_hex(8)
        doc = call(url + "/system/", "POST", {"user": user, "password": password,
                                               "group": f"fuzz-group-{tag}",
                                               "role": f"fuzz-role-{tag}"})
        assert doc["error_code"] == 0, doc
        doc = call(url + "/sessions/", "POST", {"user": user, "password": password})
        assert doc["error_code"] == 0, doc
        yield url, doc["data"]["session"], tmp_path
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()


def problems(response: Any, download: bool) -> list[str]:
    """What is wrong with one reply, as sentences ([] when nothing)."""
    found = []
    if response.status_code >= 500:
        found.append(f"HTTP {response.status_code}")
    ctype = response.headers.get("Content-Type", [""])
    ctype = ctype[0] if isinstance(ctype, list) else ctype
    if download and not ctype.startswith("application/json"):
        return found
    try:
        doc = json.loads(response.content)
    except ValueError:
        return found + [f"not JSON ({ctype}): {response.content[:200]!r}"]
    if download is None:  # the OpenAPI document itself
        return found
    if not isinstance(doc, dict) or set(doc) != KEYS:
        return found + [f"not the envelope: {str(doc)[:300]}"]
    code, message = doc["error_code"], doc["message"]
    if not isinstance(code, int) or not isinstance(message, str):
        found.append(f"envelope types wrong: {str(doc)[:300]}")
    elif code and (doc["data"] is not None or not message):
        found.append(f"an error without message or with data: {str(doc)[:300]}")
    elif code == 500:
        found.append(f"error_code 500: {message}")
    return found


def test_fuzz_every_operation(nanod):
    url, session, tmp = nanod
    log = tmp / "nanod.out"
    fx = make_fixtures(url, session, tmp)
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    headers = {"Nano-Session": session}
    sent = 0
    exercised: set[str] = set()
    failures: list[str] = []
    left: list[str] = []
    start = kept_at = time.monotonic()

    def keep_alive() -> bool:
        return call(f"{url}/sessions/{session}", "PUT", {}, session=session)["error_code"] == 0

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= len(json.loads(urllib.request.urlopen(
        url + "/openapi.json").read())["paths"]), "operations missing from the document"
    for op in operations:
        label = f"{op.method.upper()} {op.path}"
        if time.monotonic() - start > SECONDS:
            left.append(label)
            continue
        declared = op.definition.raw["responses"]["2XX"]["content"]
        download = (None if "openapi.json" in op.path
                    else "application/octet-stream" in declared)
        examples = 3 if (op.method.upper(), op.path) in FEW else EXAMPLES
        real = pinned(op.path, fx)
        # valid and invalid requests, with generated path values and (where the path's
        # parameters have fixtures) with the fixtures' names
        passes = [(mode, params) for params in ([None] if real is None else [None, real])
                  for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
        for mode, params in passes:

            @settings(max_examples=max(1, examples // len(passes)), deadline=None,
                      database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode, path_parameters=params))
            def run(case: Any) -> None:
                nonlocal sent, kept_at
                response = case.call(base_url=url, headers=headers, timeout=60)
                sent += 1
                exercised.add(label)  # noqa: B023 - run() runs within this iteration
                found = problems(response, download)  # noqa: B023
                if time.monotonic() - kept_at > KEEP_ALIVE:  # a slow operation's many examples
                    kept_at = time.monotonic()
                    if not keep_alive():
                        found.append("the administrator's session stopped working")
                for problem in found:
                    request = case.as_curl_command()
                    failures.append(f"{label}: {problem}\n    request: {request}")  # noqa: B023

            try:
                run()
            except Unsatisfiable:
                pass  # nothing to make invalid (no body, parameters or query): positive only
            except Exception as exc:  # noqa: BLE001 - a generation problem is reported, not fatal
                failures.append(f"{label}: could not fuzz ({mode.value}): {exc!r}")
        # The session's keep-alive (it expires after session_timeout, 180 s, without one),
        # which also proves the operation just fuzzed left it working: past here every
        # reply would be a 401 and the run would fuzz nothing.
        kept_at = time.monotonic()
        if not keep_alive():
            failures.append(f"{label}: the administrator's session stopped working")
            break
    routes = {label.split(" ", 1)[1] for label in exercised}
    print(f"\nfuzz: {sent} requests; {len(routes)} distinct routes and {len(exercised)} of "
          f"{len(operations)} operations (route, method) exercised in "
          f"{time.monotonic() - start:.0f} s ({EXAMPLES} examples each)")
    if left:
        print(f"fuzz: time budget ({SECONDS:.0f} s) ran out; not reached: {', '.join(left)}")
    for failure in failures:
        print("FAIL", failure)
    # nanod still answers, and the administrator's session still works
    assert call(url + "/system/")["error_code"] == 0
    assert call(url + "/sessions/", session=session)["error_code"] == 0
    assert not failures, f"{len(failures)} failing replies (printed above); log: {log}"
