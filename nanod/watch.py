"""The CLI's side of the event stream (`GET /api/v1/events` as Server-Sent Events, see
api/events.py): `nanod apply --wait` re-reads the status when the stream says a resource it
waits for changed, instead of polling, and `nanod get -w` follows a kind's events.

Also the display both share: on a terminal a block of lines redrawn in place (what is
still converging and why), elsewhere plain lines, one per event.

Called by nanod/manifests.py (`wait`) and nanod/client_cli.py (`cmd_get`).
"""

from __future__ import annotations

import http.client
import json
import queue
import shutil
import threading
from collections.abc import Iterable
from typing import Any, TextIO
from urllib.parse import urlencode

from nanod.client import NanoClient


class EventStream:
    """One SSE connection: a thread reads it line by line and queues the events, so the
    caller can wait for the next one with a timeout (a socket read that times out may
    leave the buffered reader in an undefined state; a thread never needs one)."""

    def __init__(self, conn: http.client.HTTPConnection,
                 response: http.client.HTTPResponse) -> None:
        self._conn, self._response = conn, response
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self.closed = False
        threading.Thread(target=self._read, name="nano-events", daemon=True).start()

    @classmethod
    def open(cls, client: NanoClient, *, kinds: Iterable[str] = (), names: Iterable[str] = (),
             since: int | None = None) -> EventStream | None:
        """The stream of events after `since` (None: from now) of `kinds` and `names`, or
        None when this nanod has no event stream (an older one: the caller polls)."""
        query: dict[str, Any] = {}
        if kinds:
            query["kind"] = ",".join(sorted(set(kinds)))
        if names:
            query["name"] = ",".join(sorted(set(names)))
        if since is not None:
            query["since"] = since
        path = "/events/" + ("?" + urlencode(query) if query else "")
        opened = client.open_stream(path, {"Accept": "text/event-stream"})
        if opened is None:
            return None
        return cls(*opened)

    def _read(self) -> None:
        data: list[str] = []
        try:
            for raw in self._response:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line.startswith("data: "):
                    data.append(line[6:])
                elif not line and data:
                    self._queue.put(json.loads("\n".join(data)))
                    data = []
        except Exception:  # noqa: BLE001
            # the connection ended: by `close` (http.client then fails in several ways
            # half way through a read), by nanod, or with a line that is no event; the
            # caller sees None and falls back to reading the status
            pass
        finally:
            self.closed = True
            self._queue.put(None)

    def next(self, timeout: float) -> dict[str, Any] | None:
        """The next event, or None after `timeout` seconds without one (or at the end)."""
        try:
            return self._queue.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None

    def drain(self) -> list[dict[str, Any]]:
        """The events already received, without waiting."""
        out = []
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                return out
            if event is None:
                self._queue.put(None)
                return out
            out.append(event)

    def close(self) -> None:
        NanoClient.close_stream(self._conn)


def describe(event: dict[str, Any]) -> str:
    """One plain line for an event: when, what, who and the gist of its payload."""
    payload = event.get("payload") or {}
    bits = []
    if event.get("type") == "progress":  # one guest's step: its own phase and percent
        percent = payload.get("percent", payload.get("progress"))
        bits.append(f"{payload.get('name')}: {payload.get('phase')} {percent}%")
        payload = {}
    if "phase" in payload:
        bits.append(f"phase {payload['phase']}")
    if "observed_generation" in payload:
        bits.append(f"observed {payload['observed_generation']}/{payload.get('generation')}")
    elif "generation" in payload:
        bits.append(f"generation {payload['generation']}")
    for cond in payload.get("conditions") or []:
        if not cond.get("status"):
            bits.append(f"{cond['type']}=False ({cond.get('reason') or cond.get('message')})")
    if payload.get("last_error"):
        bits.append(f"error: {payload['last_error']}")
    if event.get("type") == "lifecycle":
        bits.append(f"{payload.get('event')} on {payload.get('cell')}")
    if event.get("type") == "expired":
        bits.append(str(payload.get("message", "")))
    who = f" by {event['actor']}" if event.get("actor") and event.get("type") in (
        "created", "changed", "deleting") else ""
    return (f"{event.get('time', '')} {event.get('kind')}/{event.get('name')} "
            f"{event.get('type')}{who}" + (": " + ", ".join(bits) if bits else "")).strip()


class Display:
    """A block of lines redrawn in place on a terminal; plain lines elsewhere."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._drawn = 0

    def block(self, lines: list[str]) -> None:
        """Show `lines` in place of the previous block (terminal only)."""
        if not self.tty:
            return
        if self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
        # one screen line each (a wrapped line would throw the redraw's count off)
        width = max(shutil.get_terminal_size().columns - 1, 20)
        self.out.write("".join(line[:width] + "\n" for line in lines))
        self.out.flush()
        self._drawn = len(lines)

    def line(self, text: str) -> None:
        """A line that stays (elsewhere than a terminal: the only output while waiting)."""
        if self.tty:
            return
        self.out.write(text + "\n")
        self.out.flush()

