"""The audit log's one writer: every change made through the API leaves an entry (who,
what, from where), appended by a single thread in batches, so that no request writes to
the database on the IOLoop and audit entries never queue for the write lock one by one.

`NanoHandler.on_finish` hands the entry over (`add`, which never waits, except after nanod
began to stop: then it writes at once); `GET /logs/` calls `flush` first, so a client reads
every entry of the changes it saw answered; nanod's shutdown (`close`) writes the last ones.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Protocol

from state.identity import LogLine

log = logging.getLogger("nano.api.audit")


class LogSink(Protocol):
    def add_logs(self, lines: list[LogLine]) -> list[str]: ...


class AuditWriter:
    """A queue of entries and the thread that appends them (at most `batch` per
    transaction). Started by the first entry; `close` drains and stops it."""

    batch = 200

    def __init__(self, sink: LogSink) -> None:
        self._sink = sink
        self._queue: queue.SimpleQueue[LogLine | threading.Event | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False

    def add(self, content: str, *, user: str, address: str, resource: str,
            request_id: str = "") -> None:
        """Append an entry soon (never waits; never a secret in `content`); `request_id`
        is the X-Request-Id of the request that made the change."""
        line = LogLine(content, user, address, resource, request_id)
        if self._closed:  # a request that ends while nanod stops: written at once
            try:
                self._sink.add_logs([line])
            except Exception:
                log.exception("cannot write an audit log entry at shutdown")
            return
        self._ensure_thread()
        self._queue.put(line)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every entry added before this call is written (blocks: call it off
        the IOLoop)."""
        if self._thread is None:
            return
        done = threading.Event()
        self._queue.put(done)
        if not done.wait(timeout):
            raise TimeoutError(f"audit entries not written within {timeout:.0f} s")

    def close(self) -> None:
        """Write what is queued and stop the thread."""
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()

    def _ensure_thread(self) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="api-audit",
                                                    daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        stop = False
        while not stop:
            items = [self._queue.get()]
            while len(items) < self.batch:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            lines = [item for item in items if isinstance(item, LogLine)]
            if lines:
                try:
                    self._sink.add_logs(lines)
                except Exception:  # an audit failure must not stop later entries
                    log.exception("cannot write %d audit log entries", len(lines))
            for item in items:
                if isinstance(item, threading.Event):
                    item.set()
                elif item is None:
                    stop = True
