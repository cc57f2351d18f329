"""The CLI's display of the event stream (nanod/watch.py): a block redrawn in place on a
terminal, plain lines elsewhere, and the one-line description of an event."""

from __future__ import annotations

import io

from nanod.watch import Display, describe


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_block_is_redrawn_in_place_and_lines_are_for_pipes():
    term = Terminal()
    shown = Display(term)
    shown.block(["waiting: 0/2 converged", "  Guest/web: not ready: Creating"])
    shown.line("not on a terminal")
    shown.block(["waiting: 2/2 converged"])
    # the second block moves up over the two lines of the first and clears them
    assert term.getvalue() == ("waiting: 0/2 converged\n  Guest/web: not ready: Creating\n"
                               "\x1b[2F\x1b[Jwaiting: 2/2 converged\n")
    pipe = io.StringIO()
    plain = Display(pipe)
    plain.block(["waiting: 0/2 converged"])
    plain.line("2026-12-07T11:00:00.000Z Guest/web status: phase running")
    assert pipe.getvalue() == "2026-12-07T11:00:00.000Z Guest/web status: phase running\n"


def test_describe_says_who_what_and_why():
    changed = {"time": "T", "kind": "Guest", "name": "web", "type": "changed",
               "actor": "alice", "payload": {"generation": 3, "deleting": False}}
    assert describe(changed) == "T Guest/web changed by alice: generation 3"
    status = {"time": "T", "kind": "Guest", "name": "web", "type": "status", "actor": "nanod",
              "payload": {"phase": "creating", "generation": 3, "observed_generation": 2,
                          "conditions": [{"type": "Ready", "status": False,
                                          "reason": "Creating", "message": ""}],
                          "last_error": "disk copy failed"}}
    assert describe(status) == ("T Guest/web status: phase creating, observed 2/3, "
                                "Ready=False (Creating), error: disk copy failed")
    step = {"time": "T", "kind": "Migration", "name": "m1", "type": "progress",
            "actor": "nanod", "payload": {"name": "web", "phase": "copying", "percent": 40}}
    assert describe(step) == "T Migration/m1 progress: web: copying 40%"
