"""An incremental multipart/form-data parser (RFC 7578 over RFC 2046) for streamed uploads.

Used by the image file upload handlers (`api/images.py`): Tornado hands the request body
over in chunks (`@stream_request_body`), each chunk goes to `MultipartParser.feed`, which
returns the events found so far. Part data leaves the parser as soon as it is known not to
be part of a boundary, so memory stays bounded by the chunk size plus one boundary,
whatever the size of the file. Tornado's own `parse_body_arguments` needs the whole body in
memory, which is why this exists.

Pure: no I/O, no Tornado. Malformed input raises `MultipartError` with a message that says
what was wrong.
"""

from __future__ import annotations

import mmap
import re
from dataclasses import dataclass, field
from email.message import Message
from email.utils import collapse_rfc2231_value
from enum import Enum

MAX_HEADER_BYTES = 16 * 1024
"""Bytes of one part's header block; more is refused (no legitimate form needs it)."""
MAX_PARTS = 32
"""Parts in one body; more is refused."""

_CRLF = b"\r\n"
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# RFC 2046 boundary characters (bchars), 1-70 long, not ending in a space.
_BOUNDARY = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")


class MultipartError(ValueError):
    """The body is not the multipart/form-data it claims to be."""


@dataclass(frozen=True)
class PartStart:
    """A part begins. `filename` is None for plain fields (no filename parameter)."""

    name: str
    filename: str | None
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PartData:
    """Some bytes of the current part's content, in order. Usually a view into the chunk
    given to `feed` (no copy), starting at index `at` of it (-1: a copy the parser made);
    use it, or copy it, before the chunk changes."""

    data: bytes | memoryview
    at: int = -1


@dataclass(frozen=True)
class PartEnd:
    """The current part is complete."""


Event = PartStart | PartData | PartEnd


class _State(Enum):
    PREAMBLE = "preamble"
    AFTER_BOUNDARY = "after boundary"
    HEADERS = "headers"
    BODY = "body"
    DONE = "done"


def parse_boundary(content_type: str) -> bytes:
    """The boundary of a `multipart/form-data; boundary=...` Content-Type header."""
    msg = Message()
    msg["Content-Type"] = content_type or ""
    if msg.get_content_type() != "multipart/form-data":
        shown = (content_type or "none").split(";")[0].strip() or "none"
        raise MultipartError(
            f"Content-Type must be multipart/form-data with the file in field 'image', "
            f"got {shown!r}"
        )
    boundary = msg.get_param("boundary")
    if not isinstance(boundary, str) or not _BOUNDARY.match(boundary):
        raise MultipartError(
            "multipart/form-data needs a boundary parameter of 1-70 characters"
        )
    return boundary.encode("ascii")


def parse_disposition(value: str) -> tuple[str, str | None]:
    """(name, filename) of a `Content-Disposition: form-data; name=...` header value.

    The filename is returned as sent (RFC 5987 `filename*` preferred); callers must never
    use it for a path."""
    msg = Message()
    msg["Content-Disposition"] = value
    if msg.get_content_disposition() != "form-data":
        raise MultipartError(f"part has Content-Disposition {value!r}: expected form-data")
    params = msg.get_params(header="Content-Disposition") or []
    name = next((v for k, v in params if k == "name" and isinstance(v, str)), "")
    if not name:
        raise MultipartError("a part's Content-Disposition has no name parameter")
    plain = [v for k, v in params if k == "filename" and isinstance(v, str)]
    starred = [v for k, v in params if k == "filename" and isinstance(v, tuple)]
    filename: str | None = None
    if starred:  # RFC 6266: filename* wins over filename
        filename = collapse_rfc2231_value(starred[0], errors="replace")
    elif plain:
        filename = plain[0]
    return name, filename


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    text = block.decode("utf-8", errors="replace")
    last = ""
    for line in text.split("\r\n"):
        if not line:
            continue
        if line[0] in " \t" and last:  # obsolete folding
            headers[last] += " " + line.strip()
            continue
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep or not _TOKEN.match(key):
            raise MultipartError(f"malformed part header line {line[:80]!r}")
        last = key.lower()
        headers[last] = value.strip()
    return headers


class MultipartParser:
    """Feed chunks of a multipart/form-data body; get `PartStart`/`PartData`/`PartEnd`.

    >>> p = MultipartParser(b"b")
    >>> events = p.feed(b'--b\\r\\nContent-Disposition: form-data; name="x"\\r\\n\\r\\n1\\r\\n--b--')
    >>> p.close()

    `close()` raises if the closing boundary never came (a truncated body)."""

    def __init__(self, boundary: bytes, *, max_header_bytes: int = MAX_HEADER_BYTES,
                 max_parts: int = MAX_PARTS) -> None:
        if not boundary:
            raise MultipartError("empty multipart boundary")
        # A CRLF is put before the body so the first boundary looks like every other one.
        self._delimiter = _CRLF + b"--" + boundary
        self._buf = _CRLF
        self._held_from_chunk = False  # _buf is the end of the last window fed
        self._state = _State.PREAMBLE
        self._max_header_bytes = max_header_bytes
        self._max_parts = max_parts
        self.parts = 0

    @property
    def done(self) -> bool:
        """The closing boundary was seen; anything after it is ignored (epilogue)."""
        return self._state is _State.DONE

    @property
    def withheld(self) -> int:
        """Bytes received but not yet given out: a possible start of a delimiter."""
        return len(self._buf)

    def feed(self, chunk: bytes | bytearray | mmap.mmap, start: int = 0,
             end: int | None = None, *, held_in_place: bool = False) -> list[Event]:
        """Parse `chunk[start:end]`, the next bytes of the body. `chunk` is bytes, a
        bytearray or an mmap (something with `find`); a window lets a reader that fills
        one big buffer piece by piece parse each piece in place. Part data comes back as
        views into `chunk`: the caller keeps `chunk` unchanged until it is done with
        them.

        `held_in_place` says the bytes held back from the previous call (`withheld`) are
        still in `chunk`, right before `start` (the previous window of the same buffer):
        they are then given out as part of one view with what follows them."""
        if self._state is _State.DONE:
            return []
        end = len(chunk) if end is None else end
        events: list[Event] = []
        delim = self._delimiter
        buf, pos = chunk, start
        if self._buf and held_in_place and self._held_from_chunk:
            if start < len(self._buf) or chunk[start - len(self._buf):start] != self._buf:
                raise ValueError("held_in_place: the held-back bytes are not before start")
            pos, self._buf = start - len(self._buf), b""
        if self._buf:
            tail = self._buf
            # In a part's content the carried tail is short (< one delimiter): when no
            # delimiter can start in it, it is content and the chunk is scanned in place,
            # without copying it behind the tail.
            if (self._state is _State.BODY and end - start >= len(delim)
                    and (tail + chunk[start:start + len(delim) - 1]).find(delim) < 0):
                events.append(PartData(tail))
            else:
                buf, pos, end = tail + chunk[start:end], 0, len(tail) + end - start
        view = memoryview(buf)
        keep = len(delim) + 1  # enough to recognise a split delimiter plus "--" or CRLF
        while True:
            state = self._state
            if state is _State.PREAMBLE:
                found = buf.find(delim, pos, end)
                if found < 0:
                    pos = max(pos, end - keep)
                    break
                pos = found + len(delim)
                self._state = _State.AFTER_BOUNDARY
            elif state is _State.AFTER_BOUNDARY:
                # "--" closes the body; otherwise optional transport padding, then CRLF.
                if end - pos < 2:
                    break
                if buf[pos:pos + 2] == b"--":
                    self._state = _State.DONE
                    pos = end
                    break
                eol = buf.find(_CRLF, pos, min(end, pos + 256))
                if eol < 0:
                    if end - pos >= 256:
                        raise MultipartError("malformed multipart boundary line")
                    break
                if buf[pos:eol].strip(b" \t"):
                    raise MultipartError("malformed multipart boundary line")
                pos = eol + 2
                self._state = _State.HEADERS
            elif state is _State.HEADERS:
                if buf[pos:pos + 2] == _CRLF:  # a part without headers
                    header_end, block = pos + 2, b""
                else:
                    found = buf.find(_CRLF + _CRLF, pos,
                                     min(end, pos + self._max_header_bytes + 4))
                    if found < 0:
                        if end - pos > self._max_header_bytes:
                            raise MultipartError(
                                f"a part's headers exceed {self._max_header_bytes} bytes"
                            )
                        break
                    header_end, block = found + 4, bytes(buf[pos:found])
                events.append(self._start(_parse_headers(block)))
                pos = header_end
                self._state = _State.BODY
            elif state is _State.BODY:
                found = buf.find(delim, pos, end)
                if found < 0:
                    # Everything but a possible delimiter prefix at the end is content.
                    safe = end - len(delim) + 1
                    if safe > pos:
                        events.append(PartData(view[pos:safe], pos if buf is chunk else -1))
                        pos = safe
                    break
                if found > pos:
                    events.append(PartData(view[pos:found], pos if buf is chunk else -1))
                events.append(PartEnd())
                pos = found + len(delim)
                self._state = _State.AFTER_BOUNDARY
            else:  # DONE
                pos = end
                break
        self._buf = bytes(buf[pos:end])
        self._held_from_chunk = buf is chunk
        return events

    def close(self) -> None:
        """The body ended: raise unless the closing boundary was seen."""
        if self._state is not _State.DONE:
            where = {
                _State.PREAMBLE: "before the first part",
                _State.AFTER_BOUNDARY: "after a boundary",
                _State.HEADERS: "in a part's headers",
                _State.BODY: "in a part's content",
            }[self._state]
            raise MultipartError(f"the multipart body ended {where}, without its closing boundary")

    def _start(self, headers: dict[str, str]) -> PartStart:
        self.parts += 1
        if self.parts > self._max_parts:
            raise MultipartError(f"more than {self._max_parts} parts in one body")
        disposition = headers.get("content-disposition")
        if not disposition:
            raise MultipartError("a part has no Content-Disposition header")
        name, filename = parse_disposition(disposition)
        return PartStart(
            name=name,
            filename=filename,
            content_type=headers.get("content-type", "text/plain"),
            headers=headers,
        )
