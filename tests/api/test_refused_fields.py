"""Requests the store refuses before anything is stored: a cell with ssh but no address,
a malformed `ssh.host_key`, and `failover: true` on a compute pool without shared storage
(nothing could start its guests elsewhere).

The reconciler is disabled here (the `api` fixture's settings): nothing connects to the
addresses these tests register; what a refused request would have stored is read back
through the API and the store. Cell transports themselves: tests/api/test_cells_security.py.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess

import pytest

from state.models import Cell, ComputePool
from tests.api.identity_helpers import log_contents


@pytest.fixture
def settings(settings, tmp_path):
    settings["ssh"]["key_dir"] = str(tmp_path / "keys")  # key files must live there
    return settings


@pytest.fixture
def key(settings):
    return {"user": "root", "key_file": f"{settings['ssh']['key_dir']}/id_ed25519"}


async def assert_no_cell(api, name: str) -> None:
    gone = await api.call("GET", f"/cells/{name}")
    assert gone.code == 404, gone
    assert name not in [c["name"] for c in await api.ok("GET", "/cells/")]


@pytest.mark.gen_test
async def test_a_cell_with_ssh_needs_its_address(api, key):
    for name, body, reason in [
        ("r1", {"ssh": key}, "because ssh is given"),
        ("r2", {"ssh": key, "address": ""}, "because ssh is given"),
        ("r3", {"libvirt_uri": "qemu+ssh://root@host.example/system"},
         "because libvirt_uri 'qemu+ssh://root@host.example/system' is not local"),
    ]:
        reply = await api.call("POST", f"/cells/{name}", body)
        assert (reply.status, reply.code, reply.data) == (200, 400, None), reply
        assert reply.message.startswith(f"address: is required {reason}: send the cell's "
                                         "host name or IP address"), reply.message
        await assert_no_cell(api, name)

    # a local cell (no ssh) defaults its address; `ssh: {}` is no ssh
    await api.ok("POST", "/cells/local1", {"libvirt_uri": "qemu:///system"})
    await api.ok("POST", "/cells/local2", {"ssh": {}})
    for name in ("local1", "local2"):
        assert (await api.ok("GET", f"/cells/{name}"))["address"] == "127.0.0.1"

    # giving a local cell ssh settings needs the address in the same request: its stored
    # address is the local default, not the host meant
    before = Cell.get(Cell.name == "local1")
    reply = await api.call("PUT", "/cells/local1", {"ssh": key})
    assert reply.code == 400 and reply.message.startswith(
        "address: is required to give cell 'local1' ssh settings"), reply.message
    after = Cell.get(Cell.name == "local1")
    assert (after.spec, after.generation) == (before.spec, before.generation)
    assert "ssh" not in after.spec

    # and libvirt_uri "" (else it stays qemu:///system, this host's libvirtd: refused with
    # ssh, tests/api/test_cells_security.py), so nanod builds qemu+ssh from the fields
    await api.ok("PUT", "/cells/local1", {"ssh": key, "address": "192.0.2.10",
                                          "libvirt_uri": ""})
    record = await api.ok("GET", "/cells/local1")
    assert record["address"] == "192.0.2.10"
    assert record["libvirt_uri"] == (f"qemu+ssh://root@192.0.2.10:22/system?keyfile="
                                     f"{key['key_file']}&no_tty=1")
    assert record["spec"]["ssh"] == {**key, "port": 22}
    # once it has ssh, other changes keep its address
    await api.ok("PUT", "/cells/local1", {"virt_type": "qemu"})
    assert (await api.ok("GET", "/cells/local1"))["address"] == "192.0.2.10"


def public_key(tmp_path, name="host") -> tuple[str, str]:
    """A fresh ed25519 public key line (`ssh-ed25519 BASE64 comment`) and its SHA256
    fingerprint as `ssh-keygen -l` prints it (the expected value, computed by ssh-keygen)."""
    path = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "c", "-f", str(path)],
                   check=True)
    line = (tmp_path / f"{name}.pub").read_text().strip()
    printed = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", f"{path}.pub"],
                             check=True, capture_output=True, text=True).stdout.split()[1]
    blob = base64.b64decode(line.split()[1])
    assert printed == "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode(
        ).rstrip("=")
    return line, printed


@pytest.mark.gen_test
async def test_a_host_key_is_a_public_key_or_its_fingerprint(api, key, tmp_path):
    line, printed = public_key(tmp_path)
    other, other_printed = public_key(tmp_path, "other")
    for name, host_key in [("k1", line), ("k2", printed), ("k3", f"[192.0.2.11]:22 {line}")]:
        await api.ok("POST", f"/cells/{name}", {"address": "192.0.2.11",
                                                "ssh": {**key, "host_key": host_key}})
        assert (await api.ok("GET", f"/cells/{name}"))["spec"]["ssh"]["host_key"] == host_key

    blob = line.split()[1]
    for bad, says in [
        ("ssh-ed25519 AAAAC3Nz...", "the ssh-ed25519 key is not valid base64 key data"),
        (f"ssh-rsa {blob}", "the key data is a 'ssh-ed25519' key, not 'ssh-rsa'"),
        ("MD5:12:34:56", "give the cell's public host key"),
        ("SHA256:tooshort", "give the cell's public host key"),
        ("ssh-dss AAAAB3NzaC1kc3M=", "give the cell's public host key"),
    ]:
        reply = await api.call("POST", "/cells/bad", {"address": "192.0.2.11",
                                                      "ssh": {**key, "host_key": bad}})
        assert (reply.code, reply.data) == (400, None), reply
        assert reply.message.startswith(f"ssh.host_key: {says}"), reply.message
        await assert_no_cell(api, "bad")

    # re-pinning is a PUT of the ssh object with the new key; a bad one changes nothing
    before = Cell.get(Cell.name == "k1")
    reply = await api.call("PUT", "/cells/k1", {"ssh": {**key, "host_key": "nonsense"}})
    assert reply.code == 400 and reply.message.startswith("ssh.host_key:"), reply
    after = Cell.get(Cell.name == "k1")
    assert (after.spec, after.generation) == (before.spec, before.generation)
    await api.ok("PUT", "/cells/k1", {"ssh": {**key, "host_key": other}})
    after = Cell.get(Cell.name == "k1")
    assert after.spec["ssh"]["host_key"] == other
    assert after.generation == before.generation + 1
    # the log says which key is pinned now (a security event), and when none is given
    await api.ok("PUT", "/cells/k1", {"ssh": key})
    assert (await log_contents(api))[:2] == [
        "admin modified cell k1; ssh.host_key removed (the key pinned in known_hosts stays)",
        f"admin modified cell k1; ssh.host_key now {other_printed}"]


@pytest.mark.gen_test
async def test_failover_needs_shared_storage(api):
    await api.ok("POST", "/storage_pools/nfs1", {"type": "nfs", "host": "nfs.example",
                                                 "target": "/export/nano"})
    refused = ("failover: true needs shared storage: give the pool a storage pool (storage: "
               "NAME) whose disks every cell reaches, or send failover: false")
    reply = await api.call("POST", "/compute_pools/f1", {"failover": True})
    assert (reply.code, reply.message) == (400, refused)
    assert (await api.call("GET", "/compute_pools/f1")).code == 404

    # with shared storage it is stored, and it is what it says
    await api.ok("POST", "/compute_pools/f1", {"storage": "nfs1", "failover": True})
    assert (await api.ok("GET", "/compute_pools/f1"))["failover"] is True
    await api.ok("POST", "/compute_pools/f2", {})
    assert (await api.ok("GET", "/compute_pools/f2"))["failover"] is False

    # taking the storage away from a failover pool is refused, nothing changes
    before = ComputePool.get(ComputePool.name == "f1")
    reply = await api.call("PUT", "/compute_pools/f1", {"storage": ""})
    assert (reply.code, reply.message) == (400, refused)
    after = ComputePool.get(ComputePool.name == "f1")
    assert (after.storage, after.failover, after.generation) == (
        before.storage, before.failover, before.generation)
    await api.ok("PUT", "/compute_pools/f1", {"storage": "", "failover": False})
    assert (await api.ok("GET", "/compute_pools/f1"))["storage"] == ""
