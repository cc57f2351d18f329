"""The import rules of ARCHITECTURE.md §2, checked on the source instead of by memory:
`api` never imports drivers, libvirt or paramiko; only `reconciler/drivers` imports libvirt
and paramiko; only `state` imports peewee; planners and renderers import no I/O library."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IO_LIBRARIES = {"libvirt", "paramiko", "peewee", "playhouse", "tornado", "subprocess", "socket"}
PURE_MODULES = ["reconciler/contract.py", "reconciler/guest_xml.py", "reconciler/cloudinit.py",
                "reconciler/bootsector.py",
                "reconciler/guest_plan.py",
                "state/rules.py", "state/placement.py",
                "reconciler/firewall.py"]


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def top(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_api_never_imports_drivers_or_hypervisor_libraries():
    for path in sources("api"):
        names = imports(path)
        assert not {n for n in names if n.startswith("reconciler.drivers")}, path
        assert not top(names) & {"libvirt", "paramiko", "peewee", "playhouse"}, path


def test_only_drivers_import_libvirt_and_paramiko():
    for package in ("api", "state", "nanod", "specs", "reconciler"):
        for path in sources(package):
            if "reconciler/drivers" in str(path):
                continue
            assert not top(imports(path)) & {"libvirt", "paramiko"}, path


def test_only_state_imports_peewee():
    for package in ("api", "nanod", "specs", "reconciler"):
        for path in sources(package):
            assert not top(imports(path)) & {"peewee", "playhouse"}, path


def test_planners_and_renderers_import_no_io_library():
    for rel in PURE_MODULES:
        path = ROOT / rel
        if path.exists():
            assert not top(imports(path)) & IO_LIBRARIES, path


def test_state_imports_neither_api_nor_reconciler():
    for path in sources("state"):
        assert not top(imports(path)) & {"api", "reconciler", "nanod"}, path
