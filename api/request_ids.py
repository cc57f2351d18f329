"""Request ids: every API reply carries `X-Request-Id`, and what the request causes names it
(the access log line, its audit entry, the reconciles its writes trigger).

`NanoHandler.prepare` calls `adopt` with the client's header; the id is kept in a context
variable for the request's task and copied into the store lane with each call
(`NanoHandler.stored`), so code that runs for the request (the composition root's
`enqueue`, log records) reads it with `current()` without passing it along.
"""

from __future__ import annotations

import contextvars
import re
import uuid

HEADER = "X-Request-Id"
MAX_LENGTH = 64
"""Longest id taken from a client; a longer one is replaced, not cut (a cut id would
name another request)."""

_SANE = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_LENGTH}}}")
# Letters, digits and . _ : - only: the id goes into log lines and the audit log, where a
# space, a newline or a quote from a client could forge or split an entry.

_current: contextvars.ContextVar[str] = contextvars.ContextVar("nano_request_id", default="")


def adopt(given: str | None) -> str:
    """The id of this request: the client's `given` one when sane, else a fresh one; it
    becomes `current()` in this context."""
    rid = given if given and _SANE.fullmatch(given) else uuid.uuid4().hex
    _current.set(rid)
    return rid


def current() -> str:
    """The id of the request this code runs for, "" outside any request."""
    return _current.get()
