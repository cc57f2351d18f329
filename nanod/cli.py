"""The `nanod` command line: serve, init, reconcile, and the manifest commands.

Entry point of the console script `nanod` (setup.cfg). Server-side commands (serve, init,
reconcile) open the store directly; client commands (apply, get, delete, export, drift)
talk to a running nanod over the REST API.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys
from typing import Any

from nanod import __version__, config


def _server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML settings file (flags override it)")
    parser.add_argument("--data-dir", dest="data_dir", help="directory for the database, "
                        "images and logs (default /var/lib/nano)")
    parser.add_argument("--database", help="database URL: sqlite:///PATH or postgresql://...")


def _test_cells_flag(parser: argparse.ArgumentParser) -> None:
    # default None: absent leaves the config file's allow_test_cells as it is
    parser.add_argument("--allow-test-cells", dest="allow_test_cells", action="store_true",
                        default=None, help="accept cells on libvirt's test driver "
                        "(test:///PATH.xml): for tests and benchmarks only (setting "
                        "allow_test_cells: true)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanod", description="Nano management daemon")
    parser.add_argument("--version", action="version", version=f"nanod {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the API and the reconciler")
    _server_flags(serve)
    serve.add_argument("--listen", help="HOST:PORT to serve on (default 127.0.0.1:5870)")
    _test_cells_flag(serve)

    init = sub.add_parser("init", help="create the first administrator")
    _server_flags(init)
    init.add_argument("--user", required=True)
    init.add_argument("--password", help="the password (default: $NANO_ADMIN_PASSWORD, or asked)")
    init.add_argument("--group", default="admin")
    init.add_argument("--role", default="super")
    init.add_argument("--no-local-cell", dest="local_cell", action="store_false",
                      help="do not register this host as cell 'local' in compute pool 'default'")
    init.add_argument("--virt-type", choices=["auto", "kvm", "qemu"], default="auto",
                      help="virtualization of the local cell (auto: kvm only when a KVM guest "
                      "really runs code on this host, tried with a boot sector; else qemu)")

    rec = sub.add_parser("reconcile", help="run the reconciler")
    _server_flags(rec)
    rec.add_argument("--once", action="store_true", required=True,
                     help="one pass over every resource; print what it did")
    _test_cells_flag(rec)

    # The client commands are part of nanod: if they cannot be imported, nanod is broken
    # and says so (the ImportError propagates) rather than running without them.
    from nanod import client_cli

    client_cli.add_commands(sub)
    return parser


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {
        "data_dir": getattr(args, "data_dir", None),
        "database": getattr(args, "database", None),
        "listen": getattr(args, "listen", None),
        "allow_test_cells": getattr(args, "allow_test_cells", None),
    }
    return config.load(getattr(args, "config", None), overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from nanod.server import Server, setup_logging

    settings = _settings(args)
    setup_logging(settings)
    host, port = config.parse_listen(settings["listen"])
    server = Server(settings)

    async def main() -> None:
        bound = server.listen(host, port)
        # an unclaimed nanod says how to claim it once, when it writes its setup token
        logging.getLogger("nano").info(
            "nanod %s serving http://%s:%d/api/v1 (data in %s)", __version__, host, bound,
            settings["data_dir"])
        await server.serve_forever()

    asyncio.run(main())
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from nanod.server import open_store
    from state.errors import NanoError

    settings = _settings(args)
    password = args.password or os.environ.get("NANO_ADMIN_PASSWORD")
    if not password:
        if not sys.stdin.isatty():
            print("nanod init: give --password, set NANO_ADMIN_PASSWORD, or run on a terminal",
                  file=sys.stderr)
            return 2
        password = getpass.getpass(f"password for {args.user}: ")
    store = open_store(settings)
    try:
        store.init_system(args.user, password, group=args.group, role=args.role)
    except NanoError as exc:
        print(f"nanod init: {exc.message}", file=sys.stderr)
        return 1
    store.add_log(f"{args.user} initialized the system (nanod init)", user=args.user,
                  resource="/system/")
    print(f"created administrator {args.user} (group {args.group}, role {args.role})")
    if args.local_cell:
        virt = args.virt_type
        if virt == "auto":
            from reconciler.drivers.kvmprobe import choose_virt_type

            print("probing KVM: booting a test guest under kvm on qemu:///system ...",
                  flush=True)
            virt, why = choose_virt_type("qemu:///system")
            print(f"virt_type {virt}: {why}")
        done = store.bootstrap_local_cell(virt_type=virt)
        print(done)
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from nanod.server import build_controller, open_store, setup_logging

    settings = _settings(args)
    setup_logging(settings, to_file=False)
    store = open_store(settings)
    controller = build_controller(store, settings)
    if controller is None:
        print("nothing to reconcile: the reconciler is disabled")
        return 0
    failed = 0
    for key, outcome in controller.run_once():
        if isinstance(outcome, Exception):
            failed += 1
            print(f"{key}: failed: {outcome}")
        else:
            print(f"{key}: {outcome.summary()}")
    return 1 if failed else 0


COMMANDS = {"serve": cmd_serve, "init": cmd_init, "reconcile": cmd_reconcile}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    handler = COMMANDS.get(args.command) or getattr(args, "func", None)
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
