"""Who may claim a fresh nanod (the first `POST /system/` makes the first administrator):
a client on the management node itself (a loopback peer, not relayed by a proxy), or
anyone with the one-time setup token `nanod serve` writes to DATA_DIR/setup-token (mode
0600) and to its log. The token is spent once the administrator exists; `nanod init`
needs none.

The remote cases are real: `nanod serve` runs in a network namespace of its own with an
address of its own (10.231.250.1), and the client connects to that address from inside
the namespace, so nanod sees a non-loopback peer on the socket. nanod does not read
X-Real-IP or X-Forwarded-For (its HTTP server runs without `xheaders`): a test sends them
to show they neither help nor spoof.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.setup_token import FILE_NAME, HEADER, SetupToken
from tests.conftest import ADMIN, ADMIN_PASSWORD, write_nanod_config
from tests.helpers.netns import Lab, netns_unusable

INIT = {"user": ADMIN, "password": ADMIN_PASSWORD}


def token_file(settings: dict[str, Any]) -> Path:
    return Path(settings["data_dir"]) / FILE_NAME


# -- in this process: loopback, a proxy on loopback, the token's file and log line ------------


@pytest.mark.gen_test(timeout=30)
async def test_a_fresh_nanod_writes_its_setup_token_and_loopback_claims_it(
        bare_api, settings, caplog):
    path = token_file(settings)
    token = path.read_text().strip()
    assert len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # the log says where the token is and which header carries it, never the token
    logged = [r.getMessage() for r in caplog.get_records("setup") if r.name == "nano"]
    assert any(HEADER in line and str(path) in line for line in logged), logged
    assert not any(token in line for line in caplog.text.splitlines())

    # the management node itself needs no token
    await bare_api.ok("POST", "/system/", INIT)
    assert (await bare_api.ok("GET", "/system/"))["ready"] is True
    assert not path.exists()  # spent
    late = await bare_api.call("POST", "/system/", {**INIT, "user": "late"},
                               headers={HEADER: token})
    assert late.code == 403 and "already initialized" in late.message


@pytest.mark.gen_test(timeout=30)
async def test_a_request_relayed_by_a_proxy_on_loopback_needs_the_token(bare_api, settings):
    token = token_file(settings).read_text().strip()
    for relayed in ({"X-Forwarded-For": "203.0.113.9"}, {"X-Real-IP": "127.0.0.1"},
                    {"Forwarded": "for=203.0.113.9"}):
        refused = await bare_api.call("POST", "/system/", INIT, headers=relayed)
        assert refused.code == 403 and f"no {HEADER} header" in refused.message, refused
        wrong = await bare_api.call("POST", "/system/", INIT,
                                    headers={**relayed, HEADER: token[::-1]})
        assert wrong.code == 403 and f"a wrong {HEADER} header" in wrong.message, wrong
    assert (await bare_api.ok("GET", "/system/"))["ready"] is False
    await bare_api.ok("POST", "/system/", INIT,
                      headers={"X-Forwarded-For": "203.0.113.9", HEADER: token})
    assert (await bare_api.ok("GET", "/system/"))["ready"] is True
    assert not token_file(settings).exists()


def test_a_ready_system_gets_no_token_and_a_stale_file_goes(tmp_path):
    path = tmp_path / FILE_NAME
    path.write_text("left by an earlier start\n")
    token = SetupToken.issue(str(tmp_path), ready=True)
    assert token.value is None and not path.exists()
    fresh = SetupToken.issue(str(tmp_path), ready=False)
    again = SetupToken.issue(str(tmp_path), ready=False)  # a restart: a new token
    assert fresh.value != again.value and path.read_text().strip() == again.value


# -- nanod serve in a network namespace: a real remote peer ----------------------------------

REMOTE = "10.231.250.1"
PORT = 5870  # the namespace's own port space: nothing else listens there

SERVE = "import sys; from nanod.cli import main; sys.exit(main(sys.argv[1:]))"

CLIENT = r"""
import json, sys, time, urllib.error, urllib.request
spec = json.loads(sys.argv[1])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
data = None if spec.get("body") is None else json.dumps(spec["body"]).encode()
request = urllib.request.Request(spec["url"], data=data, method=spec["method"],
                                 headers={"Content-Type": "application/json",
                                          **spec.get("headers", {})})
deadline = time.monotonic() + 30
while True:
    try:
        with opener.open(request, timeout=10) as reply:
            print(reply.read().decode())
            break
    except urllib.error.HTTPError:
        raise
    except (urllib.error.URLError, ConnectionError):  # nanod is still starting
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
"""


class NamespacedNanod:
    """`nanod serve` on 0.0.0.0:5870 inside namespace `ns` (which also has REMOTE)."""

    def __init__(self, lab: Lab, data: Path, config: Path) -> None:
        self.lab, self.data, self.config = lab, data, config
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = self.lab.spawn(self.lab.cell, SERVE, "serve", "--config", str(self.config),
                                   "--data-dir", str(self.data), "--listen", f"0.0.0.0:{PORT}")

    def stop(self) -> None:
        assert self.proc is not None
        self.lab.stop(self.proc)  # SIGTERM by pid, then reaped
        self.lab.processes.remove(self.proc)
        self.proc = None

    def call(self, host: str, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> dict[str, Any]:
        spec = {"url": f"http://{host}:{PORT}/api/v1{path}", "method": method, "body": body,
                "headers": headers or {}}
        done = self.lab.run(self.lab.cell, [sys.executable, "-c", CLIENT, json.dumps(spec)],
                            check=False)
        if not done.ok:
            log = (self.data / "nanod.log").read_text() if (self.data / "nanod.log").exists() \
                else ""
            raise AssertionError(f"{method} {path} via {host}: {done.stderr}\n{log}")
        return json.loads(done.stdout)


@pytest.fixture
def lab() -> Iterator[Lab]:
    why = netns_unusable()
    if why:
        pytest.skip(f"a remote client needs its own network namespace: {why}")
    with Lab() as made:
        # a veth pair, both ends in the namespace (no dummy module on every kernel)
        for argv in (["ip", "link", "add", "nano0", "type", "veth", "peer", "name", "nano1"],
                     ["ip", "addr", "add", f"{REMOTE}/24", "dev", "nano0"],
                     ["ip", "link", "set", "nano1", "up"],
                     ["ip", "link", "set", "nano0", "up"]):
            made.run(made.cell, argv)
        yield made


def test_a_remote_client_claims_a_fresh_nanod_only_with_the_setup_token(lab, tmp_path):
    data = tmp_path / "data"
    config = write_nanod_config(tmp_path / "nanod.yaml", {"reconciler": {"enabled": False}})
    nanod = NamespacedNanod(lab, data, config)
    nanod.start()
    assert nanod.call(REMOTE, "GET", "/system/")["data"]["ready"] is False  # GET is public
    token = (data / FILE_NAME).read_text().strip()
    assert stat.S_IMODE((data / FILE_NAME).stat().st_mode) == 0o600
    logged = (data / "nanod.log").read_text()
    assert str(data / FILE_NAME) in logged and token not in logged  # where, never what

    # from 10.231.250.1: no token, a wrong one, spoofed client addresses: all refused
    for headers in ({}, {HEADER: "not-the-token"}, {"X-Real-IP": "127.0.0.1"},
                    {"X-Forwarded-For": "127.0.0.1"}):
        reply = nanod.call(REMOTE, "POST", "/system/", INIT, headers)
        assert reply["error_code"] == 403, (headers, reply)
        assert f"from {REMOTE}" in reply["message"] and HEADER in reply["message"], reply
    assert nanod.call(REMOTE, "GET", "/system/")["data"]["ready"] is False
    # nothing leaks the token to the refused caller
    assert all(token not in json.dumps(nanod.call(REMOTE, "POST", "/system/", INIT, h))
               for h in ({}, {HEADER: token[:-1]}))

    claimed = nanod.call(REMOTE, "POST", "/system/", INIT, {HEADER: token})
    assert claimed["error_code"] == 0, claimed
    assert not (data / FILE_NAME).exists()
    again = nanod.call(REMOTE, "POST", "/system/", {**INIT, "user": "second"}, {HEADER: token})
    assert again["error_code"] == 403 and "already initialized" in again["message"]
    login = nanod.call(REMOTE, "POST", "/sessions/", {**INIT, "nonce": "n"})
    assert login["error_code"] == 0 and login["data"]["address"] == REMOTE

    # a restart with an administrator: no token, none logged
    nanod.stop()
    logged = (data / "nanod.log").read_text()
    nanod.start()
    assert nanod.call(REMOTE, "GET", "/system/")["data"]["ready"] is True
    assert not (data / FILE_NAME).exists()
    assert HEADER not in (data / "nanod.log").read_text()[len(logged):]
    nanod.stop()


def test_loopback_claims_a_fresh_nanod_and_nanod_init_needs_no_token(lab, tmp_path):
    config = write_nanod_config(tmp_path / "nanod.yaml", {"reconciler": {"enabled": False}})
    data = tmp_path / "data"
    nanod = NamespacedNanod(lab, data, config)
    nanod.start()
    assert nanod.call("127.0.0.1", "POST", "/system/", INIT)["error_code"] == 0
    assert not (data / FILE_NAME).exists()
    nanod.stop()

    # `nanod init` (local, no server) and then serve: nothing to claim, no token
    initialized = tmp_path / "initialized"
    done = subprocess.run(
        [sys.executable, "-m", "nanod", "init", "--data-dir", str(initialized), "--user",
         ADMIN, "--no-local-cell"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "NANO_ADMIN_PASSWORD": ADMIN_PASSWORD})
    assert done.returncode == 0, done.stderr
    served = NamespacedNanod(lab, initialized, config)
    served.start()
    assert served.call(REMOTE, "GET", "/system/")["data"]["ready"] is True
    assert not (initialized / FILE_NAME).exists()
    refused = served.call(REMOTE, "POST", "/system/", {**INIT, "user": "late"})
    assert refused["error_code"] == 403 and "already initialized" in refused["message"]
    served.stop()
