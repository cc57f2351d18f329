"""Manifests without a server: loading and validation (file, document and field named),
${VAR} substitution, ordering, given-keys comparison, field classification, diff text,
client configuration precedence, and every example validating against specs/kinds."""

from __future__ import annotations

from pathlib import Path

import pytest

import specs
from nanod import manifests
from nanod.client import ClientConfig, Reply
from nanod.kinds import ADAPTERS, ORDER, ApplyContext, Effect, Found, ManifestError, matches
from reconciler.contract import Action, Key, Verb

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_ENV = {"NANO_EXAMPLE_DIR": "/tmp/nano-example"}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(paths, environ=None) -> list[str]:
    with pytest.raises(manifests.InvalidManifests) as info:
        manifests.load(paths, environ=environ or {})
    return info.value.problems


def test_every_kind_has_an_adapter_and_a_schema():
    assert set(ORDER) == set(ADAPTERS) == set(specs.kinds())


@pytest.mark.parametrize("kind", ORDER)
def test_kind_schema_compiles_with_the_api_schemas_it_reuses(kind):
    missing = [n for n in specs.kind_api_schemas(kind) if n not in specs._documents()]
    assert not missing, f"{kind}: API schema(s) {missing} are not in specs/api"
    schema = specs.kind_schema(kind)
    assert schema["properties"]["kind"] == {"const": kind}
    assert specs.validate_kind(kind, {"kind": kind, "name": "x"}) == []
    assert specs.validate_kind(kind, {"kind": kind}) == ["name: is required"]
    # The reused API schema is in force on the spec: an unknown field is named.
    problems = specs.validate_kind(kind, {"kind": kind, "name": "x", "spec": {"colour": 1}})
    assert any(p.startswith("spec: ") and "'colour' was unexpected" in p for p in problems), \
        problems


def test_load_reads_documents_with_defaults_and_sources(tmp_path):
    path = write(tmp_path, "a.yaml", "kind: ComputePool\nname: p1\nspec: {failover: false}\n"
                 "---\n---\nkind: Role\nname: r\nstate: absent\n")
    docs = manifests.load([tmp_path], environ={})
    assert [(d.kind, d.name, d.state) for d in docs] == [
        ("ComputePool", "p1", "present"), ("Role", "r", "absent")]
    assert docs[0].source == f"{path}#1" and docs[1].source == f"{path}#3"
    assert docs[0].base_dir == tmp_path.resolve()


def test_invalid_documents_name_file_document_and_field(tmp_path):
    write(tmp_path, "a.yaml", "kind: ComputePool\nname: p1\nspec: {failover: 'yes'}\n---\n"
          "kind: Cell\nname: c1\nspec: {virt_type: xen, colour: red}\n")
    write(tmp_path, "b.yaml", "kind: Nonsense\nname: n\n---\n- not a mapping\n")
    found = problems_of([tmp_path])
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert f"{a}#1 (ComputePool/p1): spec.failover: must be of type boolean, got str" in found
    assert any(p.startswith(f"{a}#2 (Cell/c1): spec: Additional properties") and "colour" in p
               for p in found)
    assert f"{a}#2 (Cell/c1): spec.virt_type: 'xen' is not one of 'kvm', 'qemu'" in found
    assert any(p.startswith(f"{b}#1 (Nonsense/n): kind: 'Nonsense' is not a manifest kind")
               for p in found)
    assert f"{b}#2: a document must be a mapping {{kind, name, state, spec}}" in found


def test_required_fields_state_and_scope(tmp_path):
    write(tmp_path, "a.yaml", "kind: StoragePool\nname: s\n---\nkind: Role\nname: r\n"
          "state: gone\nspec: {menu: []}\n---\nkind: Guest\nname: g\nstate: absent\n")
    found = problems_of([tmp_path])
    path = tmp_path / "a.yaml"
    assert f"{path}#1 (StoragePool/s): spec.type: is required" in found
    assert f"{path}#2 (Role/r): state: 'gone' is not one of 'present', 'absent'" in found
    assert f"{path}#3 (Guest/g): spec.pool: is required (it scopes the name)" in found


def test_duplicates_are_refused_but_guests_are_scoped_by_pool(tmp_path):
    guest = "kind: Guest\nname: g\nstate: absent\nspec: {{pool: {pool}}}\n"
    write(tmp_path, "a.yaml", "kind: Role\nname: r\nspec: {menu: []}\n---\n"
          + guest.format(pool="p1") + "---\n" + guest.format(pool="p2"))
    write(tmp_path, "b.yaml", "kind: Role\nname: r\nspec: {menu: [user]}\n")
    found = problems_of([tmp_path])
    assert found == [f"{tmp_path / 'b.yaml'}#1 (Role/r): defined twice (first in "
                     f"{tmp_path / 'a.yaml'}#1)"]


def test_environment_substitution(tmp_path):
    write(tmp_path, "a.yaml", "kind: Cell\nname: ${CELL:-c1}\nspec:\n"
          "  libvirt_uri: test://${DIR}/cell.xml\n  storage_path: ${DIR}/img\n")
    docs = manifests.load([tmp_path], environ={"DIR": "/srv/x"})
    assert docs[0].name == "c1"
    assert docs[0].spec == {"libvirt_uri": "test:///srv/x/cell.xml", "storage_path": "/srv/x/img"}
    found = problems_of([tmp_path], environ={})
    assert found == [f"{tmp_path / 'a.yaml'}#1 (Cell/c1): environment variable(s) DIR not set "
                     "(write ${VAR:-default} for a default)"]


def test_yaml_errors_and_empty_paths(tmp_path):
    write(tmp_path, "bad.yaml", "kind: [unclosed\n")
    assert problems_of([tmp_path])[0].startswith(f"{tmp_path / 'bad.yaml'}: not valid YAML")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no manifest files" in problems_of([empty])[0]


def test_ordered_creates_dependencies_first_and_deletes_them_last():
    def doc(kind, name, state="present"):
        spec = {"pool": "p"} if kind == "Guest" else {}
        return manifests.Document(kind, name, state, spec, "f#1", Path("."))

    docs = [doc("Guest", "g"), doc("Cell", "c"), doc("ComputePool", "p"), doc("Role", "r"),
            doc("ComputePool", "old", "absent"), doc("Guest", "gone", "absent"),
            doc("Cell", "c2", "absent")]
    assert [d.name for d in manifests.ordered(docs)] == ["r", "p", "c", "g", "gone", "c2", "old"]


def test_matches_compares_given_keys_only():
    assert matches({"a": 1}, {"a": 1, "b": 2})
    assert not matches({"a": 1, "b": 3}, {"a": 1, "b": 2})
    assert matches([{"to_port": 22}], [{"to_port": 22, "interface": 0}])
    assert not matches([1, 2], [2, 1])
    assert matches([1, 2], [2, 1], unordered=True)
    assert not matches([1, 2], [1, 2, 3], unordered=True)
    assert not matches(True, 1) and matches(1, 1.0) and not matches("", None)


class FakeGuestApi:
    """What the Guest adapter calls on one guest "g"; with `follows`, the guest is observed
    at once in the power state last asked for (an instant reconciler). Its dry runs
    (`POST /guests/g/plan`) answer `plan` (field -> effect, "live" when not named): what the
    server's planner says is tested in tests/api/test_guests_plan.py, not here."""

    def __init__(self, running: bool, follows: bool = True,
                 plan: dict[str, str] | None = None) -> None:
        self.running, self.follows, self.calls = running, follows, []
        self.plan = plan or {}

    def call(self, method, path, body=None):
        return Reply(200, 0, "", {"created": True, "running": self.running})

    def ok(self, method, path, body=None):
        if path.endswith("/plan"):
            return {"fields": {f: {"effect": self.plan.get(f, "live"), "reason": ""}
                               for f in body}}
        if method != "GET":
            self.calls.append(f"{method} {path}")
        if path == "/media_images/":
            return [{"id": "m1", "name": "iso"}]
        if path == "/batch/stop_guest/":
            self.running = self.running and not self.follows
            return {"id": "t1"}
        if path == "/batch/stop_guest/t1":
            return [{"id": "g", "status": "stopping"}]
        if (method, path) == ("POST", "/instances/g"):
            self.running = self.running or self.follows
        return None


def test_guest_power_orders_snapshots_and_media():
    """Snapshots are taken of stopped guests, media goes into running ones."""
    guest, wait = ADAPTERS["Guest"], ApplyContext(wait_seconds=5)
    fields = ["media", "power", "snapshots"]
    api = FakeGuestApi(running=False)
    guest.update(api, "g", Found("g", {"power": "stopped", "media": None, "snapshots": []}),
                 {"power": "running", "media": "iso", "snapshots": ["s1"]}, fields, wait)
    assert api.calls == ["POST /instances/g/snapshots/", "POST /instances/g",
                         "POST /instances/g/media"]
    api = FakeGuestApi(running=True)
    guest.update(api, "g", Found("g", {"power": "running", "media": "iso", "snapshots": ["s0"]}),
                 {"power": "stopped", "media": None, "snapshots": ["s1"]}, fields, wait)
    assert api.calls == ["DELETE /instances/g/media", "POST /batch/stop_guest/",
                         "POST /instances/g/snapshots/", "DELETE /instances/g/snapshots/s0"]
    # without --wait, what needs the new power state follows at the next apply
    api, now = FakeGuestApi(running=True, follows=False), ApplyContext()
    guest.update(api, "g", Found("g", {"power": "running", "snapshots": []}),
                 {"power": "stopped", "snapshots": ["s1"]}, ["power", "snapshots"], now)
    assert api.calls == ["POST /batch/stop_guest/"]
    assert now.notes == ["Guest/g: snapshots follow once the guest is stopped: apply again "
                         "(or use --wait)"]


def test_a_new_guest_with_media_must_run():
    """A new guest (a replacement too) is created stopped; media goes into running guests
    only: refused before anything is created or deleted."""
    guest, api = ADAPTERS["Guest"], FakeGuestApi(running=False, plan={"disks": "replaces"})
    spec = {"pool": "p", "cores": 1, "memory": 1, "disks": [1], "media": "iso"}
    with pytest.raises(ManifestError, match="needs power: running"):
        guest.create(api, "g", spec, ApplyContext())
    with pytest.raises(ManifestError, match="needs power: running"):
        guest.update(api, "g", Found("g", {"disks": [1]}), {**spec, "disks": [1, 1]},
                     ["disks"], ApplyContext())
    assert api.calls == []
    # --check foresees both refusals; a change in place, or power: running, is not refused
    assert "needs power: running" in guest.refusal(None, spec, [], {})
    assert "needs power: running" in guest.refusal(
        Found("g", {"disks": [1]}), {**spec, "disks": [1, 1]}, ["disks"],
        {"disks": Effect.REPLACE})
    assert guest.refusal(Found("g", {"disks": [1]}), {**spec, "disks": [2]}, ["disks"],
                         {"disks": Effect.LIVE}) == ""
    assert guest.refusal(None, {**spec, "power": "running"}, [], {}) == ""


def test_address_pool_range_removal_is_destructive():
    pool = ADAPTERS["AddressPool"]
    r1 = {"type": "internal", "start": "10.0.0.10", "end": "10.0.0.20", "netmask": "255.0.0.0"}
    r2 = {**r1, "start": "10.0.1.10", "end": "10.0.1.20"}
    assert pool.classify("ranges", [r1], [r1, r2])[0] is Effect.LIVE
    effect, note = pool.classify("ranges", [r1, r2], [r1])
    assert effect is Effect.DESTRUCTIVE and "10.0.1.10-10.0.1.20" in note
    assert pool.classify("ranges", [r1], [{**r1, "end": "10.0.0.30"}])[0] is Effect.DESTRUCTIVE


def test_write_only_fields_are_never_compared():
    user, cell = ADAPTERS["User"], ADAPTERS["Cell"]
    ctx = manifests.ApplyContext()
    assert user.want({"nick": "n", "password": "Secret-1x"}, ctx) == {"nick": "n"}
    want = cell.want({"ssh": {"user": "root", "password": "pw"}}, ctx)
    assert want == {"ssh": {"user": "root"}, "pool": ""}


def test_diff_lines_show_classified_changes_and_hide_secrets():
    doc = manifests.Document("Guest", "g", "present", {"pool": "p"}, "f#1", Path("."))
    key = Key("Guest", "g")
    planned = manifests.Planned(doc, (
        Action(Verb.UPDATE, key, {"cores": 1}, {"cores": 2}, reason="needs restart"),
        Action(Verb.UPDATE, key, {"disks": [10]}, {"disks": [5]},
               reason="destructive: disk shrink"),
    ))
    assert manifests.diff_lines(planned) == [
        "    ~ cores: 1 -> 2  [needs restart]",
        "    ~ disks: [10] -> [5]  [destructive: disk shrink]",
    ]
    created = manifests.Planned(doc, (Action(Verb.CREATE, key, None,
                                             {"cloud_init": {"admin_secret": "x"}}),))
    assert manifests.diff_lines(created) == ["    + cloud_init: {admin_secret: (sensitive)}"]


def test_client_config_precedence(tmp_path):
    conf = write(tmp_path, "client.yaml", "url: http://file:1\nuser: fileuser\npassword: fp\n")
    env = {"NANO_CLIENT_CONFIG": str(conf)}
    assert ClientConfig.resolve(environ=env) == ClientConfig("http://file:1", "fileuser", "fp",
                                                             str(conf))
    env.update(NANO_URL="http://env:2/", NANO_USER="envuser")
    got = ClientConfig.resolve(environ=env)
    assert (got.url, got.user, got.password) == ("http://env:2", "envuser", "fp")
    got = ClientConfig.resolve(url="http://flag:3", user="u", password="p", environ=env)
    assert (got.url, got.user, got.password, got.source) == ("http://flag:3", "u", "p", "flags")
    assert ClientConfig.resolve(environ={"HOME": str(tmp_path)}).url == "http://127.0.0.1:5870"


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").iterdir()
                                           if p.is_dir()))
def test_every_example_validates(example):
    docs = manifests.load([ROOT / "examples" / example], environ=EXAMPLE_ENV)
    assert docs and all(d.state == "present" for d in docs)
