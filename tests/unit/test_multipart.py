"""The streaming multipart parser (api/multipart.py): same result however the body is cut
into chunks, content that looks almost like a boundary kept intact, malformed bodies
refused with a reason, and agreement with Tornado's buffering parser on random bodies."""

from __future__ import annotations

import mmap
import os
import random

import pytest
import tornado.httputil

from api.multipart import (
    MultipartError,
    MultipartParser,
    PartData,
    PartEnd,
    PartStart,
    parse_boundary,
    parse_disposition,
)

BOUNDARY = b"----nanoBoundary7MA4YWxkTrZu0gW"


def encode(fields: list[tuple[str, str | None, bytes]], boundary: bytes = BOUNDARY,
           *, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    out = [preamble]
    for name, filename, content in fields:
        disp = f'form-data; name="{name}"'
        if filename is not None:
            disp += f'; filename="{filename}"'
        out.append(b"--" + boundary + b"\r\n")
        out.append(f"Content-Disposition: {disp}\r\n".encode())
        if filename is not None:
            out.append(b"Content-Type: application/octet-stream\r\n")
        out.append(b"\r\n" + content + b"\r\n")
    out.append(b"--" + boundary + b"--\r\n" + epilogue)
    return b"".join(out)


def parse(body: bytes, cuts: list[int] | None = None, boundary: bytes = BOUNDARY, *,
          window: str = "") -> list[tuple[str, str | None, bytes]]:
    """Feed `body` cut at `cuts` and reassemble the parts. With `window` ("bytearray" or
    "mmap"), each piece is fed as a window of one reused buffer of that type (as the
    upload handler reads), which is scribbled over after each feed: the parser must keep
    nothing of it. With "in place", the pieces are successive windows of one buffer that
    holds the whole body, fed with `held_in_place` (as the handler reads within one of
    its buffers)."""
    parser = MultipartParser(boundary)
    events: list = []
    last = 0
    scratch = mmap.mmap(-1, len(body) + 16) if window == "mmap" else bytearray(len(body) + 16)
    if window == "in place":  # one buffer holds the body; the windows follow each other
        scratch = mmap.mmap(-1, len(body) + 1)
        scratch[:len(body)] = body
    for cut in [*(cuts or []), len(body)]:
        if window == "in place":
            fed = parser.feed(scratch, last, cut, held_in_place=True)
            for event in fed:
                if isinstance(event, PartData) and event.at >= 0:
                    assert bytes(event.data) == scratch[event.at:event.at + len(event.data)]
            events += fed
        elif window:
            offset = 3 + last % 5
            scratch[offset:offset + cut - last] = body[last:cut]
            fed = parser.feed(scratch, offset, offset + cut - last)
            events += [PartData(bytes(e.data)) if isinstance(e, PartData) else e for e in fed]
            scratch[:] = b"\r\n--" * (len(scratch) // 4) + b"\0" * (len(scratch) % 4)
        else:
            events += parser.feed(body[last:cut])
        last = cut
    parser.close()
    parts: list[tuple[str, str | None, bytes]] = []
    current: list[bytes] | None = None
    for event in events:
        if isinstance(event, PartStart):
            assert current is None
            current = []
            start = event
        elif isinstance(event, PartData):
            assert current is not None
            current.append(event.data)
        else:
            assert isinstance(event, PartEnd) and current is not None
            parts.append((start.name, start.filename, b"".join(current)))
            current = None
    assert current is None
    return parts


FIELDS = [
    ("checksum", None, b"0123456789abcdef0123456789abcdef01234567"),
    ("image", "disk.qcow2", b"QFI\xfb" + bytes(range(256)) * 3 + b"\r\n--" + BOUNDARY[:10]),
    ("note", None, b""),
]


def test_whole_body_in_one_chunk():
    assert parse(encode(FIELDS)) == FIELDS


@pytest.mark.parametrize("window", ["", "bytearray", "mmap", "in place"])
def test_every_two_chunk_split_gives_the_same_parts(window):
    body = encode(FIELDS)
    for cut in range(len(body) + 1):
        assert parse(body, [cut], window=window) == FIELDS, cut


@pytest.mark.parametrize("window", ["", "bytearray", "mmap", "in place"])
def test_byte_by_byte(window):
    body = encode(FIELDS)
    assert parse(body, list(range(1, len(body))), window=window) == FIELDS


@pytest.mark.parametrize("window", ["", "bytearray", "mmap", "in place"])
def test_content_with_boundary_prefixes_is_kept(window):
    tricky = b"\r\n--" + BOUNDARY[:-1] + b"\r\n-" + b"\r\n\r\n--" + b"\r" * 50 + b"--"
    fields = [("image", "x.iso", tricky), ("checksum", None, b"\r\n")]
    body = encode(fields)
    for cut in range(len(body) + 1):
        assert parse(body, [cut], window=window) == fields


def test_preamble_epilogue_and_transport_padding():
    body = encode(FIELDS, preamble=b"this is a preamble\r\n", epilogue=b"trailing junk")
    assert parse(body) == FIELDS
    padded = encode(FIELDS).replace(b"--" + BOUNDARY + b"\r\n", b"--" + BOUNDARY + b"  \t\r\n")
    assert parse(padded) == FIELDS


def test_first_boundary_at_very_start_and_after_a_crlf():
    assert parse(b"\r\n" + encode(FIELDS)) == FIELDS


def test_held_in_place_gives_one_view_per_window():
    """Within one buffer, what a window held back comes out with the next one: content
    arrives as one view per window, each starting where the previous one ended."""
    body = encode([("image", "x.iso", os.urandom(100_000))])
    buf = mmap.mmap(-1, len(body))
    buf[:] = body
    parser = MultipartParser(BOUNDARY)
    spans = []
    first = 0
    for start in range(0, len(body), 7_000):
        for event in parser.feed(buf, start, min(len(body), start + 7_000), held_in_place=True):
            if isinstance(event, PartData):
                if start < 14_000:  # the parser's own leading CRLF: copies, then the tail
                    first += len(event.data)
                    continue
                assert event.at >= 0
                spans.append((event.at, event.at + len(event.data)))
    assert parser.done
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert first + spans[-1][1] - spans[0][0] == 100_000
    with pytest.raises(ValueError):
        other = MultipartParser(BOUNDARY)
        other.feed(body, 0, 200)
        other.feed(body, 200, 400)
        other.feed(bytes(len(body)), 400, 500, held_in_place=True)


def test_part_data_leaves_while_streaming_and_memory_stays_bounded():
    parser = MultipartParser(BOUNDARY)
    head = encode([("image", "big.iso", b"")]).split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    events = parser.feed(head)
    assert [type(e) for e in events] == [PartStart]
    chunk = os.urandom(65536)
    delivered = 0
    for _ in range(64):
        for event in parser.feed(chunk):
            assert isinstance(event, PartData)
            delivered += len(event.data)
        assert len(parser._buf) < len(BOUNDARY) + 8  # only a possible delimiter prefix
    assert delivered > 64 * 65536 - len(BOUNDARY) - 8
    assert not parser.done


def test_truncated_body_is_refused_on_close():
    body = encode(FIELDS)
    for cut in (0, 10, len(body) // 2, len(body) - 5):
        parser = MultipartParser(BOUNDARY)
        parser.feed(body[:cut])
        with pytest.raises(MultipartError, match="without its closing boundary"):
            parser.close()


def test_missing_disposition_and_bad_header_lines():
    body = b"--" + BOUNDARY + b"\r\nContent-Type: text/plain\r\n\r\nx\r\n--" + BOUNDARY + b"--"
    with pytest.raises(MultipartError, match="no Content-Disposition"):
        parse(body)
    body = b"--" + BOUNDARY + b"\r\nnot a header\r\n\r\nx\r\n--" + BOUNDARY + b"--"
    with pytest.raises(MultipartError, match="malformed part header"):
        parse(body)
    body = b"--" + BOUNDARY + b"\r\nContent-Disposition: attachment\r\n\r\nx\r\n--" + BOUNDARY
    with pytest.raises(MultipartError, match="expected form-data"):
        parse(body + b"--")


def test_garbage_after_boundary_is_refused():
    body = b"--" + BOUNDARY + b"XYZ\r\nContent-Disposition: form-data; name=a\r\n\r\n\r\n--"
    with pytest.raises(MultipartError, match="boundary line"):
        parse(body + BOUNDARY + b"--")


def test_limits_on_header_size_and_part_count():
    huge = b"--" + BOUNDARY + b"\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n"
    with pytest.raises(MultipartError, match="headers exceed"):
        MultipartParser(BOUNDARY).feed(huge)
    many = encode([("f", None, b"1")] * 40)
    with pytest.raises(MultipartError, match="more than 32 parts"):
        parse(many)


def test_filenames_are_reported_as_sent_never_interpreted():
    body = encode([("image", "../../etc/passwd", b"x")])
    assert parse(body) == [("image", "../../etc/passwd", b"x")]
    name, filename = parse_disposition(
        "form-data; name=\"image\"; filename=\"a.iso\"; filename*=UTF-8''%E2%82%AC%20rates.iso"
    )
    assert (name, filename) == ("image", "€ rates.iso")
    assert parse_disposition('form-data; name="checksum"') == ("checksum", None)
    with pytest.raises(MultipartError, match="no name"):
        parse_disposition("form-data; filename=x")


def test_parse_boundary():
    assert parse_boundary("multipart/form-data; boundary=abc") == b"abc"
    assert parse_boundary('multipart/form-data; boundary="a b:c"') == b"a b:c"
    assert parse_boundary("Multipart/Form-Data; charset=utf-8; boundary=XyZ") == b"XyZ"
    for bad in ("", "application/json", "multipart/mixed; boundary=a",
                "multipart/form-data", "multipart/form-data; boundary=" + "a" * 71):
        with pytest.raises(MultipartError):
            parse_boundary(bad)


@pytest.mark.parametrize("window", ["", "bytearray", "mmap", "in place"])
@pytest.mark.parametrize("seed", range(30))
def test_agrees_with_tornados_buffering_parser(seed, window):
    rng = random.Random(seed)
    boundary = "".join(rng.choice("abcXYZ0129-_") for _ in range(rng.randint(1, 40)))
    fields = []
    for i in range(rng.randint(1, 5)):
        alphabet = [b"\r", b"\n", b"-", boundary.encode()[:3], bytes([rng.randrange(256)])]
        content = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
        filename = f"f{i}.bin" if rng.random() < 0.5 else None
        fields.append((f"field{i}", filename, content))
    body = encode(fields, boundary.encode())
    cuts = sorted(rng.sample(range(len(body) + 1), k=min(len(body), rng.randint(0, 20))))
    ours = parse(body, cuts, boundary.encode(), window=window)
    assert ours == fields
    args: dict = {}
    files: dict = {}
    tornado.httputil.parse_multipart_form_data(boundary.encode(), body, args, files)
    for name, filename, content in ours:
        if filename is None:
            assert args[name] == [content]
        else:
            assert files[name][0].body == content and files[name][0].filename == filename
