"""Operators' YAML manifests: load and validate documents, plan them against a running nanod
per kind (nanod/kinds.py), apply the plan, wait for convergence, and report drift.

Called by nanod/client_cli.py (`nanod apply|delete|get|export|drift`). A manifest file holds
YAML documents `{kind, name, state: present|absent, spec}`; `${VAR}` and `${VAR:-default}`
in any string are replaced from the environment before validation. Plans are values: a
document's plan is a list of `reconciler.contract.Action` (one per changed field, or one
create/delete), `changed = bool(actions)`, and a diff is their before/after.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TextIO

import yaml

import specs
from nanod.client import ApiError, NanoClient
from nanod.kinds import ADAPTERS, ORDER, ApplyContext, Effect, Found, ManifestError, adapter
from nanod.watch import Display, EventStream, describe
from reconciler.contract import READY, Action, Key, Verb, get_condition

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SECRET = ("password", "secret", "token", "private")


@dataclass(frozen=True)
class Document:
    """One manifest document, validated, with where it came from."""

    kind: str
    name: str
    state: str
    spec: Mapping[str, Any]
    source: str  # "path#N", N counting documents of the file from 1
    base_dir: Path

    @property
    def label(self) -> str:
        scope = adapter(self.kind).scoped_by
        if scope and self.spec.get(scope):
            return f"{self.kind}/{self.spec[scope]}/{self.name}"
        return f"{self.kind}/{self.name}"


class InvalidManifests(Exception):
    """Every problem found while loading; nothing was changed."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# -- loading ----------------------------------------------------------------------------------


def manifest_files(paths: Iterable[str | Path]) -> list[Path]:
    """The YAML files named, directories expanded (recursively, sorted)."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out.extend(sorted(q for q in path.rglob("*") if q.suffix in (".yaml", ".yml")
                              and q.is_file()))
        else:
            out.append(path)
    return out


def substitute(value: Any, environ: Mapping[str, str], missing: list[str]) -> Any:
    """`value` with ${VAR} / ${VAR:-default} replaced in every string; names of unset
    variables without a default are added to `missing`."""
    if isinstance(value, str):
        def one(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in environ:
                return environ[name]
            if default is None:
                missing.append(name)
                return match.group(0)
            return default
        return _VAR.sub(one, value)
    if isinstance(value, dict):
        return {substitute(k, environ, missing): substitute(v, environ, missing)
                for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, environ, missing) for v in value]
    return value


def load(paths: Sequence[str | Path], *, environ: Mapping[str, str] | None = None
         ) -> list[Document]:
    """Every document of the files, validated against specs/kinds; raises InvalidManifests
    naming file, document and field of every problem before anything is applied."""
    env = os.environ if environ is None else environ
    problems: list[str] = []
    docs: list[Document] = []
    seen: dict[tuple[str, str, str], str] = {}
    files = manifest_files(paths)
    if not files:
        raise InvalidManifests([f"{', '.join(map(str, paths))}: no manifest files (*.yaml)"])
    for path in files:
        try:
            raw_docs = list(yaml.safe_load_all(path.read_text()))
        except OSError as exc:
            problems.append(f"{path}: cannot read: {exc.strerror or exc}")
            continue
        except yaml.YAMLError as exc:
            problems.append(f"{path}: not valid YAML: {exc}")
            continue
        for index, raw in enumerate(raw_docs, start=1):
            where = f"{path}#{index}"
            if raw is None:
                continue
            doc, errors = _document(raw, where, path.parent.resolve(), env)
            if errors:
                problems.extend(errors)
                continue
            assert doc is not None
            scope = adapter(doc.kind).scoped_by
            key = (doc.kind, str(doc.spec.get(scope, "")) if scope else "", doc.name)
            if key in seen:
                problems.append(f"{where} ({doc.label}): defined twice (first in {seen[key]})")
                continue
            seen[key] = where
            docs.append(doc)
    if problems:
        raise InvalidManifests(problems)
    return docs


def _document(raw: Any, where: str, base: Path, env: Mapping[str, str]
              ) -> tuple[Document | None, list[str]]:
    if not isinstance(raw, dict):
        return None, [f"{where}: a document must be a mapping {{kind, name, state, spec}}"]
    missing: list[str] = []
    raw = substitute(raw, env, missing)
    kind, name = raw.get("kind"), raw.get("name")
    label = f"{where} ({kind}/{name})" if kind and name else where
    if missing:
        return None, [f"{label}: environment variable(s) {', '.join(sorted(set(missing)))} "
                      "not set (write ${VAR:-default} for a default)"]
    if kind not in ADAPTERS:
        return None, [f"{label}: kind: {kind!r} is not a manifest kind; kinds: "
                      f"{', '.join(ORDER)}"]
    state = raw.get("state", "present")
    checked = dict(raw)
    if state == "present":
        checked.setdefault("spec", {})
    elif isinstance(raw.get("spec"), dict):  # an absent resource needs only its scope
        checked.pop("spec")
    try:
        errors = specs.validate_kind(kind, checked)
    except KeyError as exc:
        return None, [f"{label}: cannot validate: {exc.args[0]}"]
    if errors:
        return None, [f"{label}: {e}" for e in errors]
    spec = dict(raw.get("spec") or {})
    scope = ADAPTERS[kind].scoped_by
    if scope and not spec.get(scope):
        return None, [f"{label}: spec.{scope}: is required (it scopes the name)"]
    return Document(kind, name, state, spec, where, base), []


# -- planning -----------------------------------------------------------------------------------


class Outcome(StrEnum):
    OK = "ok"
    CHANGED = "changed"
    FAILED = "failed"


@dataclass(frozen=True)
class Planned:
    """A document's plan: the actions (one per changed field, or one create/delete)."""

    doc: Document
    actions: tuple[Action, ...] = ()
    found: Found | None = None
    error: str = ""

    @property
    def outcome(self) -> Outcome:
        if self.error:
            return Outcome.FAILED
        return Outcome.CHANGED if self.actions else Outcome.OK


def effect_of(action: Action) -> Effect:
    return Effect(action.reason.split(":", 1)[0]) if action.reason else Effect.LIVE


def ordered(docs: Sequence[Document]) -> list[Document]:
    """Present documents in creation order, then absent ones in reverse order."""
    rank = {k: i for i, k in enumerate(ORDER)}
    present = [d for d in docs if d.state == "present"]
    absent = [d for d in docs if d.state == "absent"]
    return (sorted(present, key=lambda d: rank[d.kind])
            + sorted(absent, key=lambda d: -rank[d.kind]))


class Planner:
    """Plans documents against one nanod, caching which kinds it serves and which
    referenced resources exist."""

    def __init__(self, client: NanoClient, docs: Sequence[Document], *,
                 wait_seconds: float = 0.0) -> None:
        self.client = client
        self.present = {(d.kind, d.name) for d in docs if d.state == "present"}
        self.wait_seconds = wait_seconds
        self._available: dict[str, bool] = {}
        self._exists: dict[tuple[str, str], bool] = {}
        self.notes: list[str] = []

    def note(self, ctx: ApplyContext) -> None:
        """Keep what an adapter said should follow later (printed after the lines)."""
        self.notes.extend(ctx.notes)

    def context(self, doc: Document) -> ApplyContext:
        return ApplyContext(base_dir=doc.base_dir, wait_seconds=self.wait_seconds)

    def available(self, kind: str) -> bool:
        if kind not in self._available:
            self._available[kind] = ADAPTERS[kind].available(self.client)
        return self._available[kind]

    def exists(self, kind: str, name: str) -> bool:
        if (kind, name) in self.present:
            return True
        if (kind, name) not in self._exists:
            found = self.available(kind) and ADAPTERS[kind].read(self.client, name, {})
            self._exists[(kind, name)] = bool(found)
        return self._exists[(kind, name)]

    def plan(self, doc: Document) -> Planned:
        kind = adapter(doc.kind)
        if not self.available(doc.kind):
            return Planned(doc, error=f"this nanod does not serve {doc.kind} yet (no route "
                                      f"{kind.probe})")
        key = Key(doc.kind, doc.name)
        try:
            found = kind.read(self.client, doc.name, doc.spec)
            if doc.state == "absent":
                if found is None:
                    return Planned(doc)
                return Planned(doc, (Action(Verb.DELETE, key, dict(found.spec), None,
                                            reason=f"{Effect.DESTRUCTIVE}: delete"),), found)
            for ref in kind.references(doc.spec):
                if not self.exists(ref.kind, ref.name):
                    return Planned(doc, error=f"spec.{ref.field}: no {ref.kind} named "
                                              f"{ref.name!r} on the server or in these manifests")
            want = kind.want(doc.spec, self.context(doc))
            if found is None:
                return Planned(doc, (Action(Verb.CREATE, key, None, want),))
            actions = []
            fields = kind.changed(want, found.spec)
            effects = kind.classify_changes(self.client, found, want, fields) if fields else {}
            for name in fields:
                before, after = found.spec.get(name), want[name]
                effect, note = effects[name]
                verb = Verb.REPLACE if effect is Effect.REPLACE else Verb.UPDATE
                actions.append(Action(verb, key, {name: before}, {name: after},
                                      reason=note if note and effect is Effect.LIVE else
                                      f"{effect}: {note}" if note else str(effect),
                                      live=effect is Effect.LIVE, effect=effect))
            return Planned(doc, tuple(actions), found)
        except (ApiError, ManifestError) as exc:
            return Planned(doc, error=str(exc))


# -- applying -------------------------------------------------------------------------------------


@dataclass
class Report:
    items: list[tuple[Planned, Outcome, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for _, o, _ in self.items if o is outcome)

    def recap(self) -> str:
        return " ".join(f"{o.value}={self.count(o)}" for o in Outcome)


def execute(client: NanoClient, planner: Planner, planned: Planned) -> tuple[Outcome, str]:
    """Carry out one document's plan; the outcome and what was done."""
    doc, kind = planned.doc, adapter(planned.doc.kind)
    ctx = planner.context(doc)
    verbs = {a.verb for a in planned.actions}
    # the generation the plan read: the update or delete is refused if it changed since
    ctx.if_match = planned.found.etag if planned.found is not None else ""
    try:
        if Verb.DELETE in verbs:
            assert planned.found is not None
            try:
                kind.delete(client, doc.name, planned.found, ctx)
            except ApiError as exc:
                if exc.code != 404:
                    raise
                return Outcome.OK, "already gone"
            return Outcome.CHANGED, "deleted"
        if Verb.CREATE in verbs:
            try:
                kind.create(client, doc.name, doc.spec, ctx)
                planner.note(ctx)
                return Outcome.CHANGED, "created"
            except ApiError as exc:
                if exc.code != 409:
                    raise
            # Someone created it meanwhile (a concurrent apply): compare with what is there.
            again = planner.plan(doc)
            if again.error or not again.actions:
                return again.outcome, again.error or "created concurrently"
            planned = again
            assert again.found is not None
            ctx.if_match = again.found.etag
        fields = [name for a in planned.actions for name in (a.after or {})]
        assert planned.found is not None
        kind.update(client, doc.name, planned.found, doc.spec, fields, ctx)
        planner.note(ctx)
        return Outcome.CHANGED, "updated " + ", ".join(fields)
    except (ApiError, ManifestError) as exc:
        return Outcome.FAILED, str(exc)


def shown(name: str, value: Any) -> str:
    if any(m in name.lower() for m in _SECRET):
        return "(sensitive)"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {shown(k, v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(shown(name, v) for v in value) + "]"
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)


def diff_lines(planned: Planned) -> list[str]:
    """Field-level before -> after of a plan, each change classified."""
    out = []
    for action in planned.actions:
        if action.verb is Verb.CREATE:
            out.extend(f"    + {k}: {shown(k, v)}" for k, v in (action.after or {}).items())
        elif action.verb is Verb.DELETE:
            out.append(f"    - {planned.doc.label}  [{action.reason}]")
        else:
            for name, before, after in action.changes():
                out.append(f"    ~ {name}: {shown(name, before)} -> {shown(name, after)}"
                           f"  [{action.reason}]")
    return out


def apply(client: NanoClient, docs: Sequence[Document], *, check: bool = False,
          diff: bool = False, wait_seconds: float = 0.0, out: TextIO = sys.stdout) -> Report:
    """Plan and (unless `check`) apply every document in dependency order, printing one
    line per document and, with `diff`, its field changes."""
    planner = Planner(client, docs, wait_seconds=wait_seconds)
    report = Report()
    width = max((len(d.label) for d in docs), default=0)
    for doc in ordered(docs):
        planned = planner.plan(doc)
        if planned.error:
            outcome, what = Outcome.FAILED, planned.error
        elif not planned.actions:
            outcome, what = Outcome.OK, ""
        elif check:
            outcome = Outcome.CHANGED
            verb = planned.actions[0].verb
            fields = [n for a in planned.actions for n in (a.after or {})]
            what = ("would create" if verb is Verb.CREATE else "would delete"
                    if verb is Verb.DELETE else "would update " + ", ".join(fields))
            effects = {n: a.effect for a in planned.actions for n in (a.after or {})
                       if a.effect is not None}
            refused = "" if verb is Verb.DELETE else adapter(doc.kind).refusal(
                None if verb is Verb.CREATE else planned.found, doc.spec, fields, effects)
            if refused:
                outcome, what = Outcome.FAILED, refused
        else:
            outcome, what = execute(client, planner, planned)
        report.items.append((planned, outcome, what))
        if outcome is Outcome.FAILED:
            what = f"{what} [{doc.source}]"
        line = f"{outcome.value:<8}{doc.label:<{width}}  {what}"
        print(line.rstrip(), file=out)
        if diff and planned.actions and (check or outcome is not Outcome.FAILED):
            for text in diff_lines(planned):
                print(text, file=out)
    report.notes = list(planner.notes)
    for note in report.notes:
        print(f"note: {note}", file=out)
    print(report.recap(), file=out)
    return report


# -- status: wait and drift ----------------------------------------------------------------------


@dataclass(frozen=True)
class StatusItem:
    kind: str
    name: str
    scope: str
    data: Mapping[str, Any]

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.scope + '/' if self.scope else ''}{self.name}"

    @property
    def watched(self) -> bool | None:
        return self.data.get("watched")

    def problems(self) -> list[str]:
        """Why this resource is not converged (empty when it is)."""
        data, out = self.data, []
        conditions = data.get("conditions") or []
        drifted = get_condition(conditions, "Drifted")
        if drifted and drifted.status:
            out.append(f"drifted: {drifted.message or drifted.reason}")
        if data.get("observed_generation", 0) < data.get("generation", 0):
            out.append(f"generation {data['generation']} not yet observed (observed "
                       f"{data['observed_generation']}, phase {data.get('phase')})")
        ready = get_condition(conditions, READY)
        if ready is not None and not ready.status:
            out.append(f"not ready: {ready.reason}"
                       + (f": {ready.message}" if ready.message else ""))
        if data.get("deleting"):
            out.append("being deleted")
        if out and data.get("last_error") and all(data["last_error"] not in o for o in out):
            out.append(f"last error: {data['last_error']}")
        return out


def statuses(client: NanoClient) -> list[StatusItem]:
    rows = client.ok("GET", "/resource_status/") or []
    return [StatusItem(r["kind"], r["name"], r.get("pool", ""), r) for r in rows]


def drift(client: NanoClient) -> tuple[list[tuple[StatusItem, list[str]]], list[StatusItem]]:
    """(resources whose observed state differs from desired, with how) and the resources
    not checked because no reconciler watches their kind."""
    drifting, unwatched = [], []
    for item in statuses(client):
        if item.watched is False:
            unwatched.append(item)
            continue
        problems = item.problems()
        if problems:
            drifting.append((item, problems))
    return drifting, unwatched


def _pending(client: NanoClient, targets: Sequence[Document]
             ) -> tuple[list[str], list[str]]:
    """(what is not converged yet, each with why; what no reconciler watches)."""
    by_key = {(s.kind, s.scope, s.name): s for s in statuses(client)}
    pending: list[str] = []
    skipped: list[str] = []
    for doc in targets:
        scope = adapter(doc.kind).scoped_by
        item = by_key.get((adapter(doc.kind).status_kind or "",
                           str(doc.spec.get(scope, "")) if scope else "", doc.name))
        if doc.state == "absent":
            if item is not None and item.watched is not False:
                pending.append(f"{doc.label}: still there ({item.data.get('phase')})")
            continue
        if item is None:
            pending.append(f"{doc.label}: no status yet")
        elif item.watched is False:
            skipped.append(doc.label)
        elif item.problems():
            pending.append(f"{doc.label}: {'; '.join(item.problems())}")
    return pending, skipped


RESYNC_SECONDS = 15.0
"""While following the event stream, the status is read again after this long without an
event of ours: a safety net for a change no event describes (the stream is the trigger)."""


def wait(client: NanoClient, docs: Sequence[Document], seconds: float, *,
         out: TextIO = sys.stdout, clock: Callable[[], float] = time.monotonic) -> bool:
    """Wait until every applied resource that a reconciler watches is converged (present:
    generation observed and Ready; absent: gone). The status (/resource_status/) is read
    once and again whenever the event stream (nanod/watch.py) brings an event of one of
    them; a nanod without the stream is polled. On a terminal the resources still
    converging are shown with why, elsewhere each event is a line; then a final line.
    Returns whether all converged in time."""
    targets = [d for d in docs if adapter(d.kind).status_kind]
    deadline = clock() + seconds
    display = Display(out)
    started = clock()
    kinds = {adapter(d.kind).status_kind or "" for d in targets}
    names = {d.name for d in targets}
    # opened before the first read: every change after that read comes as an event
    stream = EventStream.open(client, kinds=kinds, names=names) if targets else None
    pause = 0.2  # without a stream: look early, then every 1 s
    try:
        while True:
            pending, skipped = _pending(client, targets)
            done = len(targets) - len(pending) - len(skipped)
            display.block([f"waiting: {done}/{len(targets) - len(skipped)} converged",
                           *(f"  {line}" for line in pending)])
            if not pending or clock() >= deadline:
                break
            if stream is None or stream.closed:
                time.sleep(min(pause, max(deadline - clock(), 0)))
                pause = min(1.0, pause * 1.5)
                continue
            event = stream.next(min(RESYNC_SECONDS, deadline - clock()))
            for item in ([event] if event else []) + stream.drain():
                display.line(describe(item))
    finally:
        if stream is not None:
            stream.close()
    display.block([])
    elapsed = clock() - started
    if skipped:
        print(f"not waited for (no reconciler watches their kind): {', '.join(skipped)}",
              file=out)
    if pending:
        print(f"not converged after {elapsed:.0f} s:", file=out)
        for line in pending:
            print(f"    {line}", file=out)
        return False
    print(f"converged: {done} resource(s) in {elapsed:.0f} s", file=out)
    return True


# -- export -----------------------------------------------------------------------------------


def spec_fields(kind: str) -> set[str]:
    """The fields a manifest `spec` of `kind` may carry (its own and those of an API schema
    it reuses whole by $ref)."""
    spec = specs.kind_schema(kind)["properties"]["spec"]
    fields = set(spec.get("properties") or {})
    ref = spec.get("$ref", "")
    if ref.startswith(specs.KIND_REF_PREFIX) and "#" not in ref:
        fields |= set(specs.schema(ref[len(specs.KIND_REF_PREFIX):]).get("properties") or {})
    return fields


def export_documents(client: NanoClient, kinds: Sequence[str] | None = None, *,
                     skipped: list[str] | None = None) -> list[dict]:
    """The current desired state as manifest documents that apply back unchanged. Kinds
    this nanod does not serve, or whose schema cannot be built, are left out (and said in
    `skipped`)."""
    out: list[dict] = []
    for kind in kinds or ORDER:
        ad = adapter(kind)
        try:
            allowed = spec_fields(kind)
        except KeyError as exc:
            if skipped is not None:
                skipped.append(f"{kind}: {exc.args[0]}")
            continue
        if not ad.available(client):
            if skipped is not None:
                skipped.append(f"{kind}: this nanod does not serve it (no route {ad.probe})")
            continue
        for name, found in ad.listing(client):
            spec = {k: v for k, v in ad.export(found).items() if k in allowed}
            out.append({"kind": kind, "name": name, "spec": spec})
    return out


def dump(documents: Sequence[Mapping[str, Any]]) -> str:
    return yaml.safe_dump_all([dict(d) for d in documents], sort_keys=False,
                              default_flow_style=False, explicit_start=True)
