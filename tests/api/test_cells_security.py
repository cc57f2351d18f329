"""No command execution or file access through cell settings (state/cell_transport.py).

Each refused form is sent through the API as a client would (POST and PUT of /cells/) and
must answer 400 naming the field, and leave nothing behind: no cell, no changed spec or
generation, no log entry. Accepted forms come back as the URI nanod built itself. Cells
stored in a refused form (by an older nanod, or a test cell on a nanod with test cells off)
are never contacted: the reconciler records why, and a `qemu+ext` command that would leave
a file when run leaves none.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from state.models import Cell
from tests.api.identity_helpers import log_contents
from tests.api.test_compute import until
from tests.conftest import reconciling
from tests.helpers.testdriver import write_test_cell


@pytest.fixture
def test_cells() -> bool:
    """Whether this test's nanod accepts test driver cells (parametrize to turn them off)."""
    return True


@pytest.fixture
def reconcile() -> bool:
    """Whether this test's nanod runs its reconciler (parametrize to turn it on)."""
    return False


@pytest.fixture
def settings(settings, tmp_path, test_cells, reconcile):
    settings["ssh"]["key_dir"] = str(tmp_path / "keys")
    settings["allow_test_cells"] = test_cells
    return reconciling(settings) if reconcile else settings


@pytest.fixture
def keys(settings):
    return settings["ssh"]["key_dir"]


async def refused(api, method: str, name: str, body: dict, field: str) -> str:
    """`body` is refused with 400 naming `field`, and the cell is as it was (or absent)."""
    before = Cell.get_or_none(Cell.name == name)
    reply = await api.call(method, f"/cells/{name}", body)
    assert (reply.status, reply.code, reply.data) == (200, 400, None), (body, reply)
    assert reply.message.startswith(f"{field}: "), (body, reply.message)
    after = Cell.get_or_none(Cell.name == name)
    if before is None:
        assert after is None, body
        assert (await api.call("GET", f"/cells/{name}")).code == 404
    else:
        assert (after.spec, after.generation) == (before.spec, before.generation), body
    return reply.message


@pytest.mark.gen_test
async def test_libvirt_uri_takes_no_command_socket_or_option(api, keys):
    ssh = {"user": "root", "key_file": f"{keys}/id"}
    cases = [
        # programs, sockets and files of the caller's choosing
        ("qemu+ext:///system?command=/usr/bin/touch", "(command)"),
        ("qemu+ext:///system", "scheme 'qemu+ext' is not accepted"),
        ("qemu+unix:///system?socket=/tmp/evil.sock", "(socket)"),
        ("qemu+unix:///system", "scheme 'qemu+unix' is not accepted"),
        ("qemu:///system?socket=/run/other.sock", "(socket)"),
        ("qemu+ssh://root@192.0.2.5/system?command=/tmp/x", "(command)"),
        ("qemu+ssh://root@192.0.2.5/system?netcat=/tmp/nc", "(netcat)"),
        ("qemu+ssh://root@192.0.2.5/system?keyfile=/etc/shadow", "(keyfile)"),
        ("qemu+ssh://root@192.0.2.5/system?no_verify=1", "(no_verify)"),
        ("qemu+tls://192.0.2.5/system?no_verify=1&pkipath=/tmp", "(no_verify, pkipath)"),
        ("qemu+ssh://root@192.0.2.5/system?no_tty=1", "(no_tty)"),  # even a harmless one
        ("qemu+ssh://root@192.0.2.5/system#frag", "query parameters and fragments"),
        # other transports and drivers
        ("qemu+tcp://192.0.2.5/system", "scheme 'qemu+tcp' is not accepted"),
        ("qemu+libssh2://root@192.0.2.5/system", "scheme 'qemu+libssh2' is not accepted"),
        ("qemu://192.0.2.5/system", "'qemu://192.0.2.5/system': of the local qemu URIs"),
        ("qemu:///session", "'qemu:///session': of the local qemu URIs"),
        ("lxc:///", "scheme 'lxc' is not accepted"),
        ("QEMU:///system", "scheme 'QEMU' is not accepted"),
        ("/var/run/libvirt/libvirt-sock", "'/var/run/libvirt/libvirt-sock' is not a libvirt URI"),
        # remote URIs nanod would build differently
        ("qemu+ssh://root@192.0.2.5/session", "'qemu+ssh://root@192.0.2.5/session' must name"),
        ("qemu+ssh://root@192.0.2.6/system", "host '192.0.2.6' differs from address"),
        ("qemu+ssh://admin@192.0.2.5/system", "user 'admin' differs from ssh.user 'root'"),
        ("qemu+ssh://root@192.0.2.5:2222/system", "port 2222 differs from ssh.port 22"),
        ("qemu+ssh://-oProxyCommand=x@192.0.2.5/system", "'-oProxyCommand=x' is not a user"),
        ("qemu+ssh://root@-oProxyCommand=x/system", "host '-oProxyCommand=x' is not"),
        ("qemu+tls://root@192.0.2.5/system", "qemu+tls takes no user name"),
    ]
    for uri, says in cases:
        message = await refused(api, "POST", "c", {"address": "192.0.2.5", "ssh": ssh,
                                                   "libvirt_uri": uri}, "libvirt_uri")
        assert says in message, (uri, message)
    # what a qemu+ssh or qemu+tls URI needs, and what a local one cannot have
    message = await refused(api, "POST", "c", {"address": "192.0.2.5",
                                               "libvirt_uri": "qemu+ssh://192.0.2.5/system"},
                            "ssh")
    assert "ssh: is required for a qemu+ssh cell" in message
    await refused(api, "POST", "c", {"address": "192.0.2.5",
                                     "libvirt_uri": "qemu+tls://192.0.2.5/system"}, "ssh")
    await refused(api, "POST", "c", {"address": "192.0.2.5", "ssh": ssh,
                                     "libvirt_uri": "qemu:///system"}, "libvirt_uri")
    assert not any("cell c" in entry for entry in await log_contents(api))

    # a registered cell is not changed by any of them
    await api.ok("POST", "/cells/c", {"address": "192.0.2.5", "ssh": ssh})
    for uri, _ in cases:
        await refused(api, "PUT", "c", {"libvirt_uri": uri}, "libvirt_uri")
    assert [e for e in await log_contents(api) if e.endswith("cell c")] == [
        "admin registered cell c"], await log_contents(api)


@pytest.mark.gen_test
async def test_user_address_and_key_file_cannot_change_the_uri(api, keys, tmp_path):
    ok_ssh = {"user": "root", "key_file": f"{keys}/id"}
    for user in ("root?command=/x", "a&b", "a/b", "a b", "root@evil", "-oProxyCommand=x",
                 "a:b", "", "x" * 33):
        body = {"address": "192.0.2.5", "ssh": {**ok_ssh, "user": user}}
        if user == "":  # the schema's minLength
            reply = await api.call("POST", "/cells/c", body)
            assert reply.code == 400 and "ssh.user" in reply.message, reply
            continue
        await refused(api, "POST", "c", body, "ssh.user")
    for address in ("host?command=/x", "a&b", "a/b", "a b", "-oProxyCommand=x", "h:22",
                    "fe80::1%eth0", "[::1]", "root@h", "h..example", "é.example"):
        await refused(api, "POST", "c", {"address": address, "ssh": ok_ssh}, "address")
        # a local cell's address reaches no URI, but it is an address all the same
        await refused(api, "POST", "c", {"address": address}, "address")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.makedirs(keys, exist_ok=True)
    os.symlink(outside, f"{keys}/escape")
    for key_file, says in [
        (f"{keys}/id?command=/x", "must be an absolute path"),
        (f"{keys}/a&b", "must be an absolute path"),
        (f"{keys}/a b", "must be an absolute path"),
        (f"{keys}/a%20b", "must be an absolute path"),
        ("keys/id", "must be an absolute path"),
        (f"{keys}/../outside/id", "must be an absolute path"),
        (f"{keys}//id", "must be an absolute path"),
        (f"{keys}/", "must be an absolute path"),
        ("/etc/shadow", "is outside the key directory"),
        (f"{keys}-other/id", "is outside the key directory"),
        (f"{keys}/escape/id", "is outside the key directory"),  # a symlink out of it
    ]:
        message = await refused(api, "POST", "c", {"address": "192.0.2.5",
                                                   "ssh": {**ok_ssh, "key_file": key_file}},
                                "ssh.key_file")
        assert says in message, (key_file, message)
    # the same through PUT of a registered cell
    await api.ok("POST", "/cells/c", {"address": "192.0.2.5", "ssh": ok_ssh})
    await refused(api, "PUT", "c", {"ssh": {**ok_ssh, "user": "a&b"}}, "ssh.user")
    await refused(api, "PUT", "c", {"address": "a b"}, "address")
    await refused(api, "PUT", "c", {"ssh": {**ok_ssh, "key_file": "/root/.ssh/id_rsa"}},
                  "ssh.key_file")


@pytest.mark.gen_test
async def test_accepted_forms_are_built_by_nanod(api, keys, tmp_path):
    ssh = {"user": "nano-ops", "port": 2222, "key_file": f"{keys}/cell_ed25519"}
    cases = [
        ("a", {"address": "cell-1.example.net", "ssh": ssh},
         f"qemu+ssh://nano-ops@cell-1.example.net:2222/system?keyfile={keys}/cell_ed25519"
         "&no_tty=1"),
        ("b", {"address": "cell-1.example.net", "ssh": ssh,
               "libvirt_uri": "qemu+ssh://nano-ops@cell-1.example.net:2222/system"},
         f"qemu+ssh://nano-ops@cell-1.example.net:2222/system?keyfile={keys}/cell_ed25519"
         "&no_tty=1"),
        ("c", {"address": "2001:db8::10", "ssh": {"password": "Secret-pw1"}},
         "qemu+ssh://root@[2001:db8::10]:22/system?no_tty=1"),
        ("d", {"address": "192.0.2.7", "ssh": ssh,
               "libvirt_uri": "qemu+tls://192.0.2.7/system"},
         "qemu+tls://192.0.2.7:16514/system"),
        ("e", {"address": "192.0.2.7", "ssh": ssh,
               "libvirt_uri": "qemu+tls://192.0.2.7:16600/system"},
         "qemu+tls://192.0.2.7:16600/system"),
        ("f", {}, "qemu:///system"),
        ("g", {"libvirt_uri": "qemu:///system"}, "qemu:///system"),
        ("h", {"libvirt_uri": f"test://{tmp_path}/cell-h.xml"}, f"test://{tmp_path}/cell-h.xml"),
    ]
    for name, body, uri in cases:
        await api.ok("POST", f"/cells/{name}", body)
        assert (await api.ok("GET", f"/cells/{name}"))["libvirt_uri"] == uri, name


@pytest.mark.gen_test
async def test_test_cells_take_an_absolute_xml_path(api, tmp_path):
    for uri in ("test:///etc/passwd", "test:///rel/path", "test://rel/path.xml",
                "test:///default", "test:///tmp/../etc/x.xml", "test:///tmp/a b.xml",
                "test:///tmp/x.xml?y=1", f"test://{tmp_path}/cell.XML"):
        await refused(api, "POST", "t", {"libvirt_uri": uri}, "libvirt_uri")
    message = await refused(api, "POST", "t", {"libvirt_uri": f"test://{tmp_path}/t.xml",
                                               "ssh": {"password": "Secret-pw1"},
                                               "address": "192.0.2.9"}, "ssh")
    assert "test driver cell is simulated on this host" in message


@pytest.mark.parametrize("test_cells", [False])
@pytest.mark.gen_test
async def test_test_cells_are_refused_unless_enabled(api, tmp_path):
    cell = write_test_cell(tmp_path / "cell.xml", cpus=2, memory_kib=1 << 20)
    message = await refused(api, "POST", "t", {"libvirt_uri": cell.uri}, "libvirt_uri")
    assert message == ("libvirt_uri: test driver cells (test:///...) are disabled on this "
                       "nanod (they are for tests and benchmarks): start it with "
                       "--allow-test-cells or set allow_test_cells: true")
    await refused(api, "POST", "t", {"libvirt_uri": "test:///etc/passwd"}, "libvirt_uri")
    await api.ok("POST", "/cells/t", {"libvirt_uri": "qemu:///system"})
    await refused(api, "PUT", "t", {"libvirt_uri": cell.uri}, "libvirt_uri")


# -- cells stored in a refused form ------------------------------------------------------------


@pytest.fixture
def marker_program(tmp_path):
    """A program that leaves a file when run: what `qemu+ext` would make nanod run."""
    marker = tmp_path / "ran"
    program = tmp_path / "program"
    program.write_text(f"#!/bin/sh\ntouch {marker}\nexec sleep 5\n")
    program.chmod(0o755)
    return program, marker


@pytest.fixture
def stored(settings, tmp_path, marker_program):
    """Rows written as an older nanod (or a nanod with test cells on) left them, before
    this nanod starts: nothing here passes today's checks."""
    from nanod.server import open_store
    from state.db import close_database

    program, _ = marker_program
    open_store(settings)
    cell = write_test_cell(tmp_path / "sim.xml", cpus=2, memory_kib=1 << 20)
    specs = {
        "ext": {"libvirt_uri": f"qemu+ext:///system?command={program}", "address": "127.0.0.1"},
        "sock": {"libvirt_uri": "qemu+unix:///system?socket=/nonexistent/sock",
                 "address": "127.0.0.1"},
        "file": {"libvirt_uri": "test:///etc/passwd", "address": "127.0.0.1"},
        "keyout": {"address": "127.0.0.1", "ssh": {"user": "root", "port": 22,
                                                   "key_file": "/root/.ssh/id_rsa"}},
        "sim": {"libvirt_uri": cell.uri, "address": "127.0.0.1"},  # fine, when enabled
    }
    for name, spec in specs.items():
        Cell.create(name=name, spec={**spec, "virt_type": "qemu",
                                     "storage_path": str(tmp_path / f"img-{name}")})
    close_database()
    return cell


@pytest.mark.parametrize("reconcile", [True])
@pytest.mark.parametrize("test_cells", [True, False])
@pytest.mark.gen_test(timeout=60)
async def test_cells_stored_in_a_refused_form_are_never_contacted(
        stored, api, marker_program, test_cells):
    _, marker = marker_program
    refused_cells = {"ext": "libvirt_uri", "sock": "libvirt_uri", "file": "libvirt_uri",
                     "keyout": "ssh.key_file"}
    if not test_cells:
        refused_cells["sim"] = "libvirt_uri"

    async def all_probed():
        records = {r["name"]: r for r in await api.ok("GET", "/cells/")}
        done = all(records[n]["status"]["observed_generation"] >= records[n]["generation"]
                   for n in records)
        return records if done else None

    records = await until(all_probed, timeout=30, what="every stored cell probed")
    for name, field in refused_cells.items():
        status = records[name]["status"]
        conditions = {c["type"]: c for c in status["conditions"]}
        reachable = conditions["CellReachable"]
        assert (reachable["status"], reachable["reason"]) == (False, "TransportRefused"), name
        assert reachable["message"].startswith(
            "nanod does not connect to this cell as it is registered: " f"{field}: "), name
        assert conditions["Ready"]["reason"] == "TransportRefused"
        assert (records[name]["alive"], status["phase"]) == (False, "offline")
        assert status["last_error"] == reachable["message"]
        assert records[name]["libvirt_uri"] == ""
    if test_cells:
        assert records["sim"]["alive"] is True
    await asyncio.sleep(1)  # had anything run the program, its file would be there by now
    assert not marker.exists()

    # a refused cell is mended by a PUT that passes today's checks, and then reached
    if test_cells:
        await api.ok("PUT", "/cells/file", {"libvirt_uri": stored.uri})

        async def mended():
            rec = await api.ok("GET", "/cells/file")
            return rec if rec["alive"] else None

        rec = await until(mended, timeout=20, what="the mended cell reached")
        assert rec["libvirt_uri"] == stored.uri
    assert not marker.exists()
