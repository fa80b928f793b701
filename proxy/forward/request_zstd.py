"""zstd request bodies: forwarded as sent, decompressed only to be inspected, never past the bound.

Ollama decompresses ``Content-Encoding: zstd`` request bodies on its ``/v1`` POST routes (spec §8.7, §12;
capped at 20 MiB) and reads every other body as it is. ollamon forwards the compressed bytes untouched; the
copy it kept for inspection is inflated here, on the writer's worker thread (``Capture.build``), and only up
to ``server.max_inspect_bytes`` of output: a small body that inflates to gigabytes (a zstd bomb) stops at the
bound and is recorded without its request facts. The decoder's window is capped too, so a frame cannot ask
for a large buffer before producing a byte.
"""

from __future__ import annotations

import zstandard

__all__ = ["MAX_WINDOW_BYTES", "Inflated", "inflate", "is_zstd"]

# Above Ollama's own 20 MiB body cap, so any frame of a body Ollama takes fits; zstd's default limit is 128 MiB.
MAX_WINDOW_BYTES = 32 << 20
_READ = 256 << 10


def is_zstd(endpoint: str, content_encoding: str | None) -> bool:
    """Whether Ollama decompresses this body: ``Content-Encoding: zstd`` on a ``/v1`` route."""
    return (
        content_encoding is not None
        and content_encoding.strip().lower() == "zstd"
        and endpoint.startswith("/v1/")
    )


class Inflated:
    """The outcome of ``inflate``: the body, or why there is none (``error``)."""

    __slots__ = ("body", "error")

    def __init__(self, body: bytes | None, error: str | None) -> None:
        self.body = body
        self.error = error


def inflate(data: bytes, limit: int) -> Inflated:
    """Decompress ``data`` (one or more zstd frames) if it yields at most ``limit`` bytes; never raises.

    Two passes keep memory within ``limit``: the first only counts the output, a read at a time, and stops
    as soon as it passes the bound, whatever the frames claim about their size; the second, run only when
    the total is known to fit, keeps the bytes and checks that every frame is complete (Ollama refuses a
    truncated one; a streaming read would just stop short).
    """
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_BYTES)
    try:
        total = 0
        with dctx.stream_reader(data, read_across_frames=True) as reader:
            while chunk := reader.read(min(_READ, limit + 1 - total)):
                total += len(chunk)
                if total > limit:
                    return Inflated(
                        None,
                        f"zstd body inflates past server.max_inspect_bytes ({limit} bytes): not inspected",
                    )
        out = bytearray()
        rest = data
        while rest:
            frame = dctx.decompressobj()
            out += frame.decompress(rest)
            if not frame.eof:
                return Inflated(None, "zstd body ends inside a frame: not inspected")
            rest = frame.unused_data
    except zstandard.ZstdError as exc:
        return Inflated(None, f"zstd body could not be decompressed: {str(exc)[:200]}")
    return Inflated(bytes(out), None)
