"""A strict, bounded ``multipart/form-data`` reader for request bodies ollamon inspects, and WAV headers.

``/v1/audio/transcriptions`` is the one route whose body is multipart (spec §1). The body it reads is the
bounded inspection copy (at most ``server.max_inspect_bytes``), already complete in memory, so the reader
works on offsets into it: every step is a ``bytes.find`` from the last position (linear time, no
backtracking), part headers are capped, so are the number of parts and the text kept per field. Anything
out of shape (no boundary, a header block that never ends, no closing delimiter) gives ``MultipartError``
with a short reason, never a crash or a hang; the request is forwarded whatever this says.

Python's ``email``/``cgi`` parsers are not used: they buffer and backtrack on hostile input.
``wav_seconds`` reads a RIFF/WAVE header (``fmt `` and ``data`` chunk sizes) and nothing of the samples.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

__all__ = [
    "FilePart",
    "Form",
    "MultipartError",
    "boundary_of",
    "parse_form",
    "wav_seconds",
]

MAX_PARTS = 64
MAX_HEADER_BYTES = 8 << 10  # one part's header block
MAX_FIELD_CHARS = 4096  # text kept per ordinary field (model names, prompts are shorter in practice)
_MAX_BOUNDARY = 70  # RFC 2046 §5.1.1
_BCHARS = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(rf';[ \t]*({_TOKEN})[ \t]*=[ \t]*("(?:[^"\\]|\\.)*"|[^;]*)')
_QUOTED = re.compile(r"\\(.)")
_WAV_LINEAR = frozenset({1, 3, 6, 7, 0xFFFE})  # PCM, IEEE float, A-law, mu-law, extensible: fixed frames
_MAX_CHUNKS = 64


class MultipartError(ValueError):
    """The body is not well-formed multipart for the boundary given; the message says where."""


@dataclass(slots=True)
class FilePart:
    """A part with a ``filename``: where its content lies in the body, never a copy of it."""

    name: str
    filename: str
    content_type: str | None
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(slots=True)
class Form:
    """Ordinary fields (first value wins, as Go's ``FormValue``) and file parts in body order."""

    fields: dict[str, str] = field(default_factory=dict)
    files: list[FilePart] = field(default_factory=list)
    parts: int = 0


def _params(value: str) -> tuple[str, dict[str, str]]:
    """``type; a=b; c="d"`` → (``type`` lower-cased, {a: b, c: d}); parameter names lower-cased."""
    head, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for match in _PARAM.finditer(";" + rest):
        raw = match.group(2).strip()
        if raw.startswith('"'):
            raw = _QUOTED.sub(r"\1", raw[1:-1])
        params.setdefault(match.group(1).lower(), raw)
    return head.strip().lower(), params


def boundary_of(content_type: str | None) -> str:
    """The boundary of a ``multipart/form-data`` Content-Type; ``MultipartError`` when there is none."""
    if not content_type:
        raise MultipartError("no Content-Type: not multipart")
    if len(content_type) > 1024:
        raise MultipartError("Content-Type header too long")
    media, params = _params(content_type)
    if media != "multipart/form-data":
        raise MultipartError(f"Content-Type is {media[:64]!r}, not multipart/form-data")
    boundary = params.get("boundary")
    if not boundary:
        raise MultipartError("multipart Content-Type without a boundary")
    if len(boundary) > _MAX_BOUNDARY or _BCHARS.fullmatch(boundary) is None:
        raise MultipartError("multipart boundary is not a valid RFC 2046 boundary")
    return boundary


def _headers(block: bytes) -> tuple[str | None, str | None, str | None]:
    """(name, filename, content type) from one part's header block."""
    disposition: str | None = None
    content_type: str | None = None
    for line in block.split(b"\r\n"):
        key, sep, value = line.partition(b":")
        if not sep:
            raise MultipartError("part header line without a colon")
        key_text = key.strip().lower()
        if key_text == b"content-disposition":
            disposition = value.decode("utf-8", "replace")
        elif key_text == b"content-type":
            content_type = value.decode("latin-1").strip()
    if disposition is None:
        raise MultipartError("part without Content-Disposition")
    kind, params = _params(disposition)
    if kind != "form-data":
        raise MultipartError("part disposition is not form-data")
    # An RFC 2231 ``filename*`` alone still makes the part a file, as Go's ``FileName`` reads it.
    filename = params.get("filename", params.get("filename*"))
    return params.get("name"), filename, content_type


def parse_form(body: bytes, boundary: str) -> Form:
    """Read every part of ``body``; strict about framing, bounded in work and in what it keeps."""
    dash = b"--" + boundary.encode("ascii")
    delimiter = b"\r\n" + dash
    if body.startswith(dash):
        pos = len(dash)
    else:
        at = body.find(delimiter)  # a preamble may precede the first boundary
        if at < 0:
            raise MultipartError("no opening boundary")
        pos = at + len(delimiter)
    form = Form()
    while True:
        after = body[pos : pos + 2]
        if after == b"--":
            return form
        # transport padding (spaces, tabs) may follow a boundary line
        while body[pos : pos + 1] in (b" ", b"\t"):
            pos += 1
        if body[pos : pos + 2] != b"\r\n":
            raise MultipartError("boundary line not followed by CRLF or '--'")
        pos += 2
        form.parts += 1
        if form.parts > MAX_PARTS:
            raise MultipartError(f"more than {MAX_PARTS} parts")
        if body.startswith(b"\r\n", pos):
            block, content = b"", pos + 2
        else:
            end = body.find(b"\r\n\r\n", pos, pos + MAX_HEADER_BYTES + 4)
            if end < 0:
                raise MultipartError(f"part headers unterminated or over {MAX_HEADER_BYTES} bytes")
            block, content = body[pos:end], end + 4
        close = body.find(delimiter, content)
        if close < 0:
            raise MultipartError("no closing boundary")
        name, filename, content_type = _headers(block) if block else (None, None, None)
        if name is not None:
            if filename is not None:
                form.files.append(FilePart(name, filename, content_type, content, close))
            elif name not in form.fields:
                piece = body[content : min(close, content + 4 * MAX_FIELD_CHARS)]
                form.fields[name] = piece.decode("utf-8", "replace")[:MAX_FIELD_CHARS]
        pos = close + len(delimiter)


def wav_seconds(data: bytes | memoryview) -> float | None:
    """Playing time of a RIFF/WAVE file from its ``fmt `` and ``data`` chunks; None if it is not one.

    Frames = data bytes / block align, seconds = frames / sample rate, for the fixed-frame encodings (PCM,
    float, A-law, mu-law, extensible). A ``data`` size larger than the bytes present (streaming writers put
    0xFFFFFFFF there) counts the bytes present. Compressed WAV (ADPCM, MP3-in-WAV) gives None.
    """
    view = memoryview(data)
    if len(view) < 12 or bytes(view[0:4]) != b"RIFF" or bytes(view[8:12]) != b"WAVE":
        return None
    pos = 12
    fmt: tuple[int, int, int, int, int, int] | None = None
    for _ in range(_MAX_CHUNKS):
        if pos + 8 > len(view):
            return None
        chunk_id = bytes(view[pos : pos + 4])
        (size,) = struct.unpack_from("<I", view, pos + 4)
        body = pos + 8
        if chunk_id == b"fmt ":
            if size < 16 or body + 16 > len(view):
                return None
            fmt = struct.unpack_from("<HHIIHH", view, body)
        elif chunk_id == b"data":
            if fmt is None:
                return None
            audio_format, channels, rate, _, block_align, bits = fmt
            if audio_format not in _WAV_LINEAR or channels < 1 or rate < 1 or bits < 1:
                return None
            if block_align < 1:
                block_align = channels * ((bits + 7) // 8)
            present = len(view) - body
            size = present if size == 0xFFFFFFFF else min(size, present)
            return (size // block_align) / rate
        pos = body + size + (size & 1)
    return None
