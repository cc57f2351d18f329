"""`nanod serve` on a PostgreSQL URL without psycopg2 installed (state/db.py `_need_driver`):
one line on stderr naming the extra to install, a failing exit status, no traceback.

The driver is hidden from a real `nanod` process by a `psycopg2` module first on its
PYTHONPATH that fails to import, as a missing package does: peewee then has no driver
(`peewee.psycopg2` is None). Nothing listens at the URL; the check comes before any
connection.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

NANOD = str(Path(sys.executable).with_name("nanod"))
ROOT = Path(__file__).resolve().parents[2]


def test_serve_without_psycopg2_says_what_to_install_in_one_line(tmp_path):
    hidden = tmp_path / "no-driver"
    hidden.mkdir()
    (hidden / "psycopg2.py").write_text(
        'raise ImportError("No module named psycopg2 (hidden by the test)")\n')
    path = os.pathsep.join(p for p in (str(hidden), str(ROOT), os.environ.get("PYTHONPATH"))
                           if p)
    run = subprocess.run(
        [NANOD, "serve", "--database", "postgresql://nano:secret@127.0.0.1:9/nano",
         "--data-dir", str(tmp_path / "data"), "--listen", "127.0.0.1:0"],
        env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert "pip install 'nano-reconciler[postgresql]'" in lines[0]
    assert lines[0].startswith("nanod: ") and "psycopg2" in lines[0]
    assert "Traceback" not in run.stderr + run.stdout
