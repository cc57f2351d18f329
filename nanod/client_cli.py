"""The client commands of `nanod`: apply, delete, get, export, drift. They talk to a running
nanod over the REST API (nanod/client.py); nanod/cli.py adds them with `add_commands`.

Exit codes: 0 success; 1 a resource failed, did not converge in time, or drifts; 2 the
manifests are invalid (nothing was changed) or the client cannot work (no server, no
credentials).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from nanod import manifests
from nanod.client import ApiError, ClientConfig, ClientError, NanoClient
from nanod.kinds import ORDER, ManifestError, adapter
from nanod.watch import Display, EventStream, describe


def _client_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection (else $NANO_URL/$NANO_USER/$NANO_PASSWORD, "
                                      "else ~/.config/nano/client.yaml or $NANO_CLIENT_CONFIG)")
    group.add_argument("--url", help="nanod's address (default http://127.0.0.1:5870)")
    group.add_argument("--user", help="user name to log in as")
    group.add_argument("--password", help="password (prefer the environment or client file)")


def _files_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--filename", dest="files", action="append", required=True,
                        metavar="FILE|DIR", help="manifest file or directory (repeatable)")
    parser.add_argument("--check", action="store_true",
                        help="change nothing: report what would change")
    parser.add_argument("--diff", action="store_true",
                        help="show field-level before -> after, each change classified")
    parser.add_argument("--wait", nargs="?", type=float, const=300.0, default=0.0,
                        metavar="SECONDS", help="wait until the reconciler reports the "
                        "resources converged (default 300 s)")


def add_commands(sub: Any) -> None:
    apply = sub.add_parser("apply", help="apply YAML manifests to a running nanod")
    _files_flags(apply)
    _client_flags(apply)
    apply.set_defaults(func=cmd_apply)

    delete = sub.add_parser("delete", help="delete the resources of YAML manifests")
    _files_flags(delete)
    _client_flags(delete)
    delete.set_defaults(func=cmd_delete)

    get = sub.add_parser("get", help="show resources of a kind with their status")
    get.add_argument("kind", metavar="KIND", help=f"one of {', '.join(ORDER)}")
    get.add_argument("name", nargs="?", metavar="NAME")
    get.add_argument("-o", "--output", choices=["table", "yaml", "json"], default="table")
    get.add_argument("-w", "--watch", nargs="?", type=float, const=0.0, default=None,
                     metavar="SECONDS",
                     help="then follow their events (for SECONDS; without: until Ctrl-C): "
                          "on a terminal the table is redrawn, elsewhere one line per event")
    _client_flags(get)
    get.set_defaults(func=cmd_get)

    export = sub.add_parser("export", help="print the current desired state as manifests")
    export.add_argument("kind", nargs="?", metavar="KIND", help="only this kind")
    _client_flags(export)
    export.set_defaults(func=cmd_export)

    drift = sub.add_parser("drift", help="resources whose observed state differs from desired")
    _client_flags(drift)
    drift.set_defaults(func=cmd_drift)


def _connect(args: argparse.Namespace) -> NanoClient:
    return NanoClient(ClientConfig.resolve(url=args.url, user=args.user,
                                           password=args.password))


def _kind(text: str) -> str:
    for kind in ORDER:
        if text.lower() in (kind.lower(), kind.lower() + "s"):
            return kind
    raise ManifestError(f"{text!r} is not a kind; kinds: {', '.join(ORDER)}")


def _guarded(run: Any) -> Any:
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except manifests.InvalidManifests as exc:
            print("invalid manifests, nothing was changed:", file=sys.stderr)
            for problem in exc.problems:
                print(f"  {problem}", file=sys.stderr)
            return 2
        except (ClientError, ManifestError, ApiError) as exc:
            print(f"nanod {args.command}: {exc}", file=sys.stderr)
            return 2
    wrapper.__name__ = run.__name__
    return wrapper


def _apply(args: argparse.Namespace, *, absent: bool) -> int:
    docs = manifests.load(args.files)
    if absent:
        docs = [manifests.Document(d.kind, d.name, "absent", d.spec, d.source, d.base_dir)
                for d in docs]
    client = _connect(args)
    report = manifests.apply(client, docs, check=args.check, diff=args.diff,
                             wait_seconds=args.wait)
    converged = True
    if args.wait and not args.check:
        converged = manifests.wait(client, docs, args.wait)
    return 1 if report.count(manifests.Outcome.FAILED) or not converged else 0


@_guarded
def cmd_apply(args: argparse.Namespace) -> int:
    return _apply(args, absent=False)


@_guarded
def cmd_delete(args: argparse.Namespace) -> int:
    return _apply(args, absent=True)


def _status_index(client: NanoClient) -> dict[tuple[str, str, str], manifests.StatusItem]:
    # An error of the status route fails `get` (exit 2, naming it): a table that silently
    # shows "-" for every status would read as "not reconciled".
    return {(s.kind, s.scope, s.name): s for s in manifests.statuses(client)}


@_guarded
def cmd_get(args: argparse.Namespace) -> int:
    kind = _kind(args.kind)
    client = _connect(args)
    ad = adapter(kind)
    if not ad.available(client):
        print(f"nanod get: this nanod does not serve {kind} yet (no route {ad.probe})",
              file=sys.stderr)
        return 1
    if args.watch is not None and not ad.status_kind:
        print(f"nanod get: {kind} has no status, so no events to follow", file=sys.stderr)
        return 1
    stream = None
    if args.watch is not None:  # opened first: no change after the listing is missed
        stream = EventStream.open(client, kinds=[ad.status_kind or ""],
                                  names=[args.name] if args.name else ())
        if stream is None:
            print("nanod get: this nanod has no event stream (GET /api/v1/events)",
                  file=sys.stderr)
            return 1
    docs = _documents(client, kind, args.name)
    if args.name and not docs:
        print(f"nanod get: no {kind} named {args.name!r}", file=sys.stderr)
        return 1
    display = Display(sys.stdout)
    if stream is not None and display.tty and args.output == "table":
        display.block(table(docs).splitlines())
    elif args.output == "json":
        print(json.dumps(docs, indent=2))
    elif args.output == "yaml":
        print(manifests.dump(docs), end="")
    else:
        print(table(docs))
    if stream is not None:
        return _follow(client, stream, display, kind, args)
    return 0


def _documents(client: NanoClient, kind: str, name: str | None) -> list[dict[str, Any]]:
    """`kind`'s resources (or the one named `name`) as documents with their status."""
    ad = adapter(kind)
    rows = [(n, f) for n, f in ad.listing(client) if name in (None, n)]
    index = _status_index(client) if ad.status_kind else {}
    docs = []
    for found_name, found in rows:
        scope = str(found.spec.get(ad.scoped_by, "")) if ad.scoped_by else ""
        item = index.get((ad.status_kind or "", scope, found_name))
        doc: dict[str, Any] = {"kind": kind, "name": found_name, "spec": ad.export(found)}
        if item is not None:
            doc["status"] = {k: item.data.get(k) for k in (
                "id", "phase", "generation", "observed_generation", "conditions",
                "last_error", "watched")}
        docs.append(doc)
    return docs


def _follow(client: NanoClient, stream: EventStream, display: Display, kind: str,
            args: argparse.Namespace) -> int:
    """`get -w`: each event redraws the table on a terminal, or is a line elsewhere; ends
    after `args.watch` seconds (0: never), at Ctrl-C, or when nanod ends the stream."""
    deadline = time.monotonic() + args.watch if args.watch else None
    try:
        while deadline is None or time.monotonic() < deadline:
            wait = 15.0 if deadline is None else min(15.0, deadline - time.monotonic())
            event = stream.next(wait)
            if event is None and stream.closed:
                print("nanod get: the event stream ended (nanod stopped?)", file=sys.stderr)
                return 1
            events = ([event] if event else []) + stream.drain()
            if not events:
                continue
            if display.tty and args.output == "table":
                display.block(table(_documents(client, kind, args.name)).splitlines())
            else:
                for item in events:
                    print(describe(item) if args.output == "table" else json.dumps(item),
                          flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        stream.close()
    return 0


def table(docs: list[dict[str, Any]]) -> str:
    """NAME, PHASE, READY, GEN (observed/desired) and the key condition messages."""
    head = ("NAME", "PHASE", "READY", "GEN", "CONDITIONS")
    lines = [head]
    for doc in docs:
        status = doc.get("status")
        if status is None:
            lines.append((doc["name"], "-", "-", "-", ""))
            continue
        conditions = status.get("conditions") or []
        ready = next((c for c in conditions if c.get("type") == "Ready"), None)
        shown = "; ".join(
            f"{c['type']}={'True' if c.get('status') else 'False'}"
            + (f" ({c['message']})" if c.get("message") and not c.get("status") else "")
            for c in conditions if c.get("type") != "Ready")
        if status.get("watched") is False:
            shown = (shown + "; " if shown else "") + "no reconciler watches this kind"
        lines.append((doc["name"], str(status.get("phase", "")),
                      "-" if ready is None else str(bool(ready.get("status"))),
                      f"{status.get('observed_generation')}/{status.get('generation')}",
                      shown))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True))
        + "  " + row[-1] for row in lines).rstrip()


@_guarded
def cmd_export(args: argparse.Namespace) -> int:
    kinds = [_kind(args.kind)] if args.kind else None
    client = _connect(args)
    skipped: list[str] = []
    print(manifests.dump(manifests.export_documents(client, kinds, skipped=skipped)), end="")
    for reason in skipped:
        print(f"nanod export: left out {reason}", file=sys.stderr)
    return 0


@_guarded
def cmd_drift(args: argparse.Namespace) -> int:
    client = _connect(args)
    drifting, unwatched = manifests.drift(client)
    for item, problems in drifting:
        print(f"{item.label}: {'; '.join(problems)}")
    if unwatched:
        kinds = sorted({i.kind for i in unwatched})
        print(f"not checked: {len(unwatched)} resource(s) of kinds no reconciler watches "
              f"({', '.join(kinds)})")
    print(f"drifted={len(drifting)}")
    return 1 if drifting else 0
