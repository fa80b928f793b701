"""The upstream side of the hot path: a small HTTP/1.1 client built on asyncio protocols.

Why not aiohttp's client: every body chunk would cross a StreamReader, an ``async for`` step and the
server's writer coroutine, which made a naive aiohttp proxy add ~20 ms of TTFT at 64 concurrent streams
on two cores. Here the upstream socket's ``data_received`` hands the de-chunked body of each read straight
to a synchronous sink (which writes it to the client's transport and shows it to the parser): no task
switch, no await. The chunks of one read go to the sink as one piece (joined only when there are several),
so a burst costs one client write and one client wake-up, not one per chunk, and no byte waits for a later
read (docs/benchmarks.md, "Where the time goes").

    pool = UpstreamPool(upstream, connect_timeout_s=10, idle_timeout_s=600)
    ex, head = await pool.exchange("POST", "/api/chat", headers, body)  # connect or reuse, send, head
    await ex.stream(sink, drain)          # body -> sink(bytes) until complete; sink returns "backed up"
    ex.release()  /  ex.abort()

The rules it keeps (each has a case in tests/hostile/test_relay_conformance.py):

- **Framing is ours.** The request's framing headers are written here from what is really sent: a
  ``Content-Length`` for a known body, ``chunked`` for a stream, ``Content-Length: 0`` for a bodyless
  POST/PUT/PATCH. Callers pass headers without ``Content-Length`` / ``Transfer-Encoding``.
- **A response ends exactly where HTTP/1.1 says** (llhttp decides: length, chunks, or the close). Any byte
  after it, a second response, or a body after a HEAD answer, poisons the connection: it is closed, never
  reused, and nothing of it reaches a client. Trailers are dropped, never promoted to headers. Interim
  ``1xx`` answers are skipped; a ``101`` is refused (ollamon relays no upgrades). A response without
  length or chunking ends at the upstream's close. Status line and headers are capped at 64 KiB.
- **No replay of what may have run.** A pooled connection is checked for a close (or stray bytes) before
  it is written to; a request that still dies on it before any answer is sent again only when its
  method is safe (GET, HEAD, OPTIONS) and it has no body, since a POST that reached Ollama may have
  started a generation (or a delete, or a pull).
- **Only upstream silence times out.** While reading is paused because the client is slow, the idle
  clock stands still; the client gets ``stall_timeout_s`` to take its bytes (``ClientStalled``). An
  upstream that closes during such a pause is noticed within a quarter of a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import httptools

from proxy.upstream_url import Upstream

__all__ = [
    "MAX_RESPONSE_HEAD",
    "SAFE_METHODS",
    "ClientStalled",
    "ResponseHead",
    "UpstreamClosed",
    "UpstreamExchange",
    "UpstreamPool",
    "UpstreamTimeout",
    "UpstreamUnreachable",
]

# Status line plus headers of one upstream response, like the request side's limits.
MAX_RESPONSE_HEAD = 64 << 10
# Methods whose request may be sent twice (RFC 9110 §9.2.1 safe methods; DELETE is idempotent but a
# second /api/delete answers 404 where the first said 200).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_BODYLESS_NEEDS_LENGTH = frozenset({"POST", "PUT", "PATCH"})
# How often a paused exchange looks at the upstream socket for a hang-up.
_HANGUP_POLL_S = 0.25
_POLL_GONE = select.POLLHUP | select.POLLERR | select.POLLRDHUP | select.POLLNVAL
# Body pieces that arrived before the sink was attached are joined into one write up to this size (past it,
# the copy would cost more than the writes it saves).
_JOIN_LIMIT = 64 << 10


class UpstreamUnreachable(Exception):
    """Could not connect (refused, no route, DNS, connect timeout)."""


class UpstreamTimeout(Exception):
    """The upstream sent nothing for the idle timeout."""


class UpstreamClosed(Exception):
    """The upstream closed the connection (or sent garbage) before the answer was complete."""


class ClientStalled(Exception):
    """The client took none of the bytes waiting for it for the stall timeout."""


class _StopParsing(Exception):
    """Raised inside an llhttp callback to stop at once (bytes after the response, a refused answer)."""


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: str
    headers: list[tuple[str, str]]  # raw names and values, in order


def _fd_state(transport: asyncio.Transport | None) -> int:
    """poll() events pending on the transport's socket now (0 when nothing is pending)."""
    if transport is None:
        return select.POLLNVAL
    sock = transport.get_extra_info("socket")
    if sock is None:
        return select.POLLNVAL
    try:
        fd = sock.fileno()
    except OSError:
        return select.POLLNVAL
    if fd < 0:
        return select.POLLNVAL
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLRDHUP)
    events = poller.poll(0)
    return events[0][1] if events else 0


class _Conn(asyncio.Protocol):
    """One upstream connection; serves one exchange at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.ex: UpstreamExchange | None = None
        self._drain: asyncio.Future[None] | None = None
        self._paused_writing = False

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        ex = self.ex
        if ex is None or ex.complete:  # bytes nobody asked for: the connection is unusable
            self.abort()
            return
        ex.last_rx = self.loop.time()
        try:
            ex.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            ex.fail(UpstreamClosed("upstream answered 101 Switching Protocols; ollamon relays no upgrades"))
            self.abort()
        except httptools.HttpParserError as exc:
            if not ex.complete:
                cause = exc.__context__ if isinstance(exc.__context__, _StopParsing) else exc
                ex.fail(UpstreamClosed(f"malformed response from upstream: {cause}"))
            self.abort()  # bytes after a complete response poison the connection
        finally:
            # What this read held goes out in one piece (also the good bytes before a bad one, as before).
            if ex.batch:
                try:
                    ex.flush()
                except Exception as exc:  # the sink's bug: the handler records it as ollamon's own error
                    ex.sink_failed(exc)
                    self.abort()

    def eof_received(self) -> bool:
        ex = self.ex
        if ex is not None:
            ex.upstream_eof()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.ex is not None and not self.ex.complete:
            reason = f": {exc}" if exc else ""
            self.ex.fail(UpstreamClosed(f"upstream closed the connection early{reason}"))
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- helpers ---------------------------------------------------------------------------------
    async def drain(self) -> None:
        if self._paused_writing and not self.closed:
            self._drain = self.loop.create_future()
            await self._drain

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def usable(self) -> bool:
        """An idle connection can take a request: open, no close or stray bytes pending from the peer."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        return _fd_state(self.transport) == 0


class UpstreamExchange:
    """One request and its response on one connection."""

    def __init__(self, conn: _Conn, method: str, idle_timeout_s: float) -> None:
        self.conn = conn
        self.loop = conn.loop
        self.head_only = method == "HEAD"
        self.idle_timeout_s = idle_timeout_s
        self.parser = httptools.HttpResponseParser(self)
        self.last_rx = self.loop.time()
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self._reason = ""
        self._headers: list[tuple[str, str]] = []
        self._head_size = 0
        self._began = False  # a message (interim or final) has started
        self._interim = False  # the message being parsed is a 1xx
        self._head_done = False  # the final response's head is in
        self._until_close = False  # neither a length nor chunks: the body ends at the upstream's close
        self._head: asyncio.Future[ResponseHead] = self.loop.create_future()
        self._wake: asyncio.Future[None] | None = None  # set when the body ends, fails or needs a drain
        self._paused = False
        self._hangup = False  # the upstream closed while we were paused: read on to the end
        self._sink: Callable[[bytes], bool] | None = None
        self._early: list[bytes] = []  # body bytes that arrived before a sink was attached
        # Body pieces of the socket read being parsed: handed to the sink together once the read is parsed,
        # so a read holding several chunks costs one client write (and one wake-up of the client), not one each.
        self.batch: list[bytes] = []
        self._got_bytes = False
        self._timer: asyncio.TimerHandle | None = None
        self._arm_timer(idle_timeout_s)

    # -- llhttp callbacks ------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._began:  # a second response on one request: smuggled or desynced
            raise _StopParsing("a second response after the first")
        self._began = True

    def on_status(self, status: bytes) -> None:
        self._got_bytes = True
        self._grow_head(len(status))
        self._reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:
            return  # a chunked trailer: dropped, never promoted to a header
        self._grow_head(len(name) + len(value) + 4)
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status == 101:
            raise _StopParsing("101 Switching Protocols")
        if 100 <= status < 200:  # interim answer: wait for the real one
            self._interim = True
            self._headers = []
            self._reason = ""
            self._head_size = 0
            return
        self._head_done = True
        names = {n.lower(): v for n, v in self._headers}
        chunked = names.get("transfer-encoding", "").lower().rstrip().endswith("chunked")
        self._until_close = not chunked and "content-length" not in names
        if not self._head.done():
            self._head.set_result(ResponseHead(status, self._reason, self._headers))
        if self.head_only or status in (204, 304):  # no body follows, whatever the headers say
            self._until_close = False
            self.keep_alive = self.parser.should_keep_alive()
            self._finish()

    def on_body(self, body: bytes) -> None:
        if self.complete:  # a body after a HEAD answer, or bytes past the end
            raise _StopParsing("body bytes after the response was complete")
        if self._sink is None:
            self._early.append(body)
        else:
            self.batch.append(body)  # _Conn.data_received flushes it when this read is parsed

    def flush(self) -> None:
        """Hand the body pieces of the read just parsed to the sink, as one piece."""
        batch, self.batch = self.batch, []
        sink = self._sink
        if sink is not None and sink(batch[0] if len(batch) == 1 else b"".join(batch)) and not self._hangup:
            self._pause()  # the client's socket is backed up: stop reading

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            self._began = False
            return
        if self.complete:
            return
        # llhttp answers should_keep_alive() reliably only inside the callbacks.
        self.keep_alive = self.parser.should_keep_alive()
        self._finish()

    def _grow_head(self, n: int) -> None:
        self._head_size += n
        if self._head_size > MAX_RESPONSE_HEAD:
            raise _StopParsing(f"response head larger than {MAX_RESPONSE_HEAD} bytes")

    def upstream_eof(self) -> None:
        """The upstream closed its side: the end of a close-delimited body, else a failure (later)."""
        if self._head_done and self._until_close and not self.complete and self.error is None:
            self.keep_alive = False
            self._finish()

    # -- state -----------------------------------------------------------------------------------
    def _finish(self) -> None:
        if self.complete:
            return
        self.complete = True
        self._cancel_timer()
        self._wakeup()

    def fail(self, exc: Exception) -> None:
        if self.complete or self.error is not None:
            return
        self.error = exc
        self._cancel_timer()
        if not self._head.done():
            self._head.set_exception(exc)
            self._head.exception()  # retrieved here; head() re-raises it to the caller
        self._wakeup()

    def sink_failed(self, exc: Exception) -> None:
        """The sink raised (ollamon's bug): stream() re-raises it, even when the response was complete."""
        if self.error is None:
            self.error = exc
        self._cancel_timer()
        if not self._head.done():
            self._head.set_exception(exc)
            self._head.exception()
        self._wakeup()

    def _arm_timer(self, delay: float) -> None:
        self._timer = self.loop.call_later(delay, self._check_idle)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_idle(self) -> None:
        # Rescheduled lazily: data_received only stores a timestamp, the timer looks at it.
        now = self.loop.time()
        if self._paused:  # we stopped reading, the upstream is not silent: its clock stands still
            self.last_rx = now
        silent = now - self.last_rx
        if silent >= self.idle_timeout_s:
            self._timer = None
            self.fail(UpstreamTimeout(f"upstream sent nothing for {self.idle_timeout_s:g} s"))
            self.conn.abort()
        else:
            self._arm_timer(self.idle_timeout_s - silent)

    # -- the caller's side -----------------------------------------------------------------------
    def _wakeup(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _pause(self) -> None:
        if not self._paused and self.conn.transport is not None and not self.conn.closed:
            self._paused = True
            self.conn.transport.pause_reading()
            self._wakeup()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self.last_rx = self.loop.time()
            if self.conn.transport is not None and not self.conn.closed:
                self.conn.transport.resume_reading()

    async def head(self) -> ResponseHead:
        return await self._head

    async def stream(
        self,
        sink: Callable[[bytes], bool],
        drain: Callable[[], Awaitable[None]],
        stall_timeout_s: float | None = None,
    ) -> None:
        """Push the body to ``sink`` as it arrives, synchronously from the socket callback.

        ``sink`` returns True when the client's socket is backed up; reading then pauses until
        ``drain()`` returns. Raises UpstreamTimeout / UpstreamClosed if the body does not complete, and
        ClientStalled when a drain takes longer than ``stall_timeout_s``.
        """
        self._sink = sink
        early, self._early = self._early, []
        if 1 < len(early) and sum(map(len, early)) <= _JOIN_LIMIT:
            early = [b"".join(early)]  # small pieces that came with the head: one client write
        for piece in early:
            if sink(piece):
                self._pause()
        while not self.complete and self.error is None:
            if self._paused:
                await self._wait_for_client(drain, stall_timeout_s)
                continue
            self._wake = self.loop.create_future()
            await self._wake
        if self.error is not None:
            raise self.error

    async def _wait_for_client(
        self, drain: Callable[[], Awaitable[None]], stall_timeout_s: float | None
    ) -> None:
        """Wait for the client to take its bytes, watching the upstream meanwhile."""
        drained = asyncio.ensure_future(drain())
        self._wake = self.loop.create_future()
        deadline = None if stall_timeout_s is None else self.loop.time() + stall_timeout_s
        try:
            while not drained.done() and not self._wake.done():
                left = (
                    _HANGUP_POLL_S if deadline is None else min(_HANGUP_POLL_S, deadline - self.loop.time())
                )
                if left <= 0:
                    raise ClientStalled(f"the client took no bytes for {stall_timeout_s:g} s")
                await asyncio.wait((drained, self._wake), timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if not drained.done() and not self._hangup and _fd_state(self.conn.transport) & _POLL_GONE:
                    # The upstream hung up while we held it off: read what it sent up to its close,
                    # without pausing again, so the end (complete or cut) is seen now.
                    self._hangup = True
                    self._resume()
        finally:
            if not drained.done():
                drained.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await drained
        if drained.done() and not drained.cancelled():
            drained.result()  # a client that went away raises here
        self._resume()

    def release(self) -> None:
        """Done with the connection: back to the pool if the answer was complete and keep-alive."""
        self._cancel_timer()
        conn = self.conn
        conn.ex = None
        if self.complete and self.error is None and self.keep_alive and not conn.closed:
            conn.pool.give_back(conn)
        else:
            conn.abort()

    def abort(self) -> None:
        """Drop the connection now (the client left, or the answer is unusable): Ollama sees it close."""
        self._cancel_timer()
        self.conn.ex = None
        self.conn.abort()

    @property
    def got_bytes(self) -> bool:
        return self._got_bytes


Body = bytes | AsyncIterator[bytes] | None


class UpstreamPool:
    """Keep-alive connections to one upstream."""

    def __init__(
        self,
        upstream: Upstream,
        *,
        connect_timeout_s: float = 10.0,
        idle_timeout_s: float = 600.0,
        max_idle: int = 256,
    ) -> None:
        self.upstream = upstream
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_idle = max_idle
        self._idle: deque[_Conn] = deque()
        self._ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if upstream.scheme == "https" else None
        )
        self._closed = False
        self.connects = 0  # connections opened so far (reuse shows as requests > connects)
        self.stale = 0  # pooled connections found closed (or with stray bytes) before a request
        self.replays = 0  # safe requests sent again after a pooled connection died under them

    @property
    def idle(self) -> int:
        """Connections waiting in the pool for the next request."""
        return len(self._idle)

    def give_back(self, conn: _Conn) -> None:
        if self._closed or len(self._idle) >= self.max_idle:
            conn.abort()
            return
        self._idle.append(conn)

    def forget(self, conn: _Conn) -> None:
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        host = self.upstream.host
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, proto = await loop.create_connection(
                    lambda: _Conn(self),
                    host,
                    self.upstream.port,
                    ssl=self._ssl,
                    server_hostname=host if self._ssl is not None else None,
                )
        except TimeoutError as exc:
            raise UpstreamUnreachable(f"connect timed out after {self.connect_timeout_s:g} s") from exc
        except OSError as exc:
            raise UpstreamUnreachable(exc.strerror or str(exc)) from exc
        self.connects += 1
        return proto

    async def exchange(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: Body,
        *,
        length: int | None = None,
    ) -> tuple[UpstreamExchange, ResponseHead]:
        """Send the request (``target`` is the encoded path and query) and wait for the response head.

        ``headers`` carry no framing: it is written here. A streamed ``body`` goes with
        ``Content-Length: length`` when the length is known, else chunked.
        """
        conn = self._take_idle()
        if conn is not None:
            ex = await self._start(conn, method, target, headers, body, length)
            try:
                return ex, await ex.head()
            except UpstreamClosed:
                ex.abort()
                if method not in SAFE_METHODS or body is not None or ex.got_bytes:
                    raise
                self.replays += 1
            except BaseException:
                ex.abort()  # a cancelled wait (the client left) must close what Ollama is working on
                raise
        conn = await self._connect()
        ex = await self._start(conn, method, target, headers, body, length)
        try:
            return ex, await ex.head()
        except BaseException:
            ex.abort()
            raise

    def _take_idle(self) -> _Conn | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                return conn
            self.stale += 1
            conn.abort()
        return None

    async def _start(
        self,
        conn: _Conn,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: Body,
        length: int | None,
    ) -> UpstreamExchange:
        ex = UpstreamExchange(conn, method, self.idle_timeout_s)
        conn.ex = ex
        try:
            await self._send(conn, method, target, headers, body, length)
        except BaseException:
            ex.abort()
            raise
        return ex

    async def _send(
        self,
        conn: _Conn,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: Body,
        length: int | None,
    ) -> None:
        lines = [f"{method} {target} HTTP/1.1\r\n", *(f"{k}: {v}\r\n" for k, v in headers)]
        chunked = False
        if isinstance(body, bytes | bytearray):
            lines.append(f"Content-Length: {len(body)}\r\n")
        elif body is not None:
            if length is not None:
                lines.append(f"Content-Length: {length}\r\n")
            else:
                chunked = True
                lines.append("Transfer-Encoding: chunked\r\n")
        elif method in _BODYLESS_NEEDS_LENGTH:
            lines.append("Content-Length: 0\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        transport = conn.transport
        assert transport is not None
        if isinstance(body, bytes | bytearray):
            transport.writelines((head, body))
            return
        transport.write(head)
        if body is None:
            return
        ex = conn.ex
        sent = 0
        async for piece in body:
            if conn.closed:
                return
            if ex is not None:
                ex.last_rx = conn.loop.time()  # the idle clock starts when the upload ends
            if chunked:
                if piece:
                    transport.writelines((b"%x\r\n" % len(piece), piece, b"\r\n"))
            else:
                if length is not None and sent + len(piece) > length:
                    piece = piece[: length - sent]  # never more than the length we announced
                transport.write(piece)
            sent += len(piece)
            await conn.drain()
        if chunked and not conn.closed:
            transport.write(b"0\r\n\r\n")
        elif length is not None and sent != length:
            conn.abort()  # the client's body ended short: what Ollama got is not a whole request
        if ex is not None:
            ex.last_rx = conn.loop.time()

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().abort()
