"""A nanod that cannot import one of its parts stops with the error; it never runs without
its reconcilers or without its client commands.

Each test runs the real `nanod` console script in a subprocess in which one import really
fails: a `sitecustomize.py` placed first on PYTHONPATH puts a finder ahead of the normal ones
that raises ImportError for one module (`reconciler.kinds` or `nanod.client_cli`), as a
syntax error or a missing dependency in that module or below it would. The process must exit
non-zero and its output must carry the import error's message.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import NANOD, free_port

BROKEN = "broken on purpose by tests/e2e/test_import_errors.py"


def _breaking(tmp_path: Path, module: str) -> dict[str, str]:
    """The environment of a nanod in which `import MODULE` raises ImportError."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "sitecustomize.py").write_text(
        "import sys\n\n"
        "class _Broken:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name == {module!r}:\n"
        f"            raise ImportError({BROKEN!r})\n"
        "        return None\n\n"
        "sys.meta_path.insert(0, _Broken())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANO_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shadow), env.get("PYTHONPATH")) if p)
    env["HOME"] = str(tmp_path)  # no client file of the machine's user is read
    return env


def _run(args: list[str], env: dict[str, str], timeout: float = 30) -> tuple[int, str]:
    """Run `nanod ARGS`; a nanod still running after `timeout` seconds (one that swallowed
    the error and went on serving) is killed by pid and fails the test."""
    proc = subprocess.Popen([NANOD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"nanod {' '.join(args)} kept running despite the import error:\n"
                    f"{out}\n{err}")
    return proc.returncode, out + err


@pytest.mark.parametrize("command", ["serve", "reconcile"])
def test_nanod_stops_when_the_reconcilers_cannot_be_imported(tmp_path: Path,
                                                             command: str) -> None:
    env = _breaking(tmp_path, "reconciler.kinds")
    data = str(tmp_path / "data")
    args = {"serve": ["serve", "--data-dir", data, "--listen", f"127.0.0.1:{free_port()}"],
            "reconcile": ["reconcile", "--once", "--data-dir", data]}[command]
    code, output = _run(args, env)
    assert code != 0, output
    assert "ImportError" in output and BROKEN in output, output
    assert "serving http" not in output and "nothing to reconcile" not in output, output


def test_nanod_stops_when_the_client_commands_cannot_be_imported(tmp_path: Path) -> None:
    # `--help` exits 0 when the parser builds; it must not build without the client commands.
    code, output = _run(["--help"], _breaking(tmp_path, "nanod.client_cli"))
    assert code != 0, output
    assert "ImportError" in output and BROKEN in output, output
