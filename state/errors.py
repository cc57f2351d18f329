"""Errors shared by every layer: each carries the Nano `error_code` it maps to.

The API turns them into envelopes (`api/base.py`), the reconciler records their message in
status, drivers translate third-party errors into them at the edge.
"""

from __future__ import annotations


class NanoError(Exception):
    """Base of our errors; `code` is the envelope's error_code (COMPATIBILITY.md)."""

    code = 500

    def __init__(self, message: str, *, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class Invalid(NanoError):
    code = 400


class Unauthorized(NanoError):
    code = 401


class Forbidden(NanoError):
    code = 403


class NotFound(NanoError):
    code = 404


class Conflict(NanoError):
    code = 409


class Busy(NanoError):
    code = 422


class Internal(NanoError):
    code = 500


class Unavailable(NanoError):
    """A cell or another dependency cannot be reached right now (retried by the reconciler)."""

    code = 503


Transient = Unavailable


class Permanent(NanoError):
    """Will not succeed by retrying; shown in status until the spec changes."""

    code = 500
