"""A TCP fault proxy for tests: sits between two endpoints and misbehaves on command.

    async with FaultProxy(upstream_port) as fp:   # listens on 127.0.0.1:fp.port
        proxy = await make_proxy(fp.url)           # ollamon -> fp -> emulator (or Redis, or anything)
        fp.latency_s = 0.05                        # every chunk, both ways, arrives 50 ms late
        fp.stall()                                 # hold every byte, keep every socket open
        fp.blackhole()                             # swallow every byte; new connections go nowhere
        fp.reset()                                 # RST every connection, and each new one on accept
        fp.truncate_after(300)                     # cut each connection after 300 more upstream bytes
        fp.pass_through()                          # back to normal (held bytes flow on)

Modes apply to live connections and new ones alike:

* ``pass_through``: bytes flow (after ``latency_s``); an end (FIN) or reset on one side is passed on.
* ``stall``: nothing is forwarded, not even an end or a reset, and nothing more is read, so the sender
  backs up; ``pass_through()`` releases what was held, in order. A peer that resets us while we are
  stalled is seen only once the stall ends.
* ``blackhole``: bytes, ends and resets are read and dropped; a connection accepted now is never
  connected upstream, and stays so whatever the mode later becomes. Like a host behind a firewall that
  drops packets: the caller waits for its own timeouts.
* ``reset``: every live connection is aborted with RST (``SO_LINGER`` 0) on both sides, and each
  connection accepted while in this mode is reset at once. A dead host, as the caller sees it.

``latency_s`` is a delay line, not a throttle: each chunk leaves ``latency_s`` after it arrived, so a
fast stream keeps its rate and only shifts. ``truncate_after(n, how)`` lets ``n`` more bytes from the
upstream through on each connection (counted per connection from the call, or from connect for new
ones), then cuts both sides: ``how="reset"`` (RST) or ``"close"`` (FIN, a clean-looking TCP end).

When the upstream cannot be reached, the client's connection is reset. Counters: ``connections``
(accepted), ``active``, ``bytes_up`` (client -> upstream, forwarded), ``bytes_down`` (upstream -> client,
forwarded), ``bytes_dropped`` (blackholed) and ``resets`` (connections we reset).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

__all__ = ["FaultProxy", "Mode"]

_READ = 64 << 10
_QUEUE = 256  # chunks in flight per direction before we stop reading (backpressure to the sender)


class Mode(enum.Enum):
    PASS = "pass"
    STALL = "stall"
    BLACKHOLE = "blackhole"
    RESET = "reset"


class _End(enum.Enum):
    EOF = "eof"  # the sender closed its side (FIN)
    ERROR = "error"  # the sender reset us, or the socket broke


Item = bytes | _End


def rst(writer: asyncio.StreamWriter) -> None:
    """Abort ``writer``'s connection with a TCP RST, not a FIN: ``SO_LINGER`` on, timeout 0."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Conn:
    """One client connection and (unless blackholed at accept) its upstream twin."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    down_limit: int | None = None  # cut once bytes_down reaches this
    cut_how: Literal["reset", "close"] = "reset"
    cut: bool = False

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.upstream) if w is not None]


class FaultProxy:
    """A loopback TCP proxy to ``upstream_host:upstream_port`` whose faults tests switch at run time."""

    def __init__(
        self, upstream_port: int, upstream_host: str = "127.0.0.1", *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.upstream_host, self.upstream_port = upstream_host, upstream_port
        self.host, self.port = host, port
        self.latency_s = 0.0
        self.connections = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.bytes_dropped = 0
        self.resets = 0
        self._mode = Mode.PASS
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._truncate: tuple[int, Literal["reset", "close"]] | None = None
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    # -- life ------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (for an HTTP upstream)."""
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def active(self) -> int:
        return len(self._conns)

    @property
    def mode(self) -> Mode:
        return self._mode

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        """Stop listening, reset every connection and wait for their handlers to finish."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for conn in list(self._conns):
            self._reset_conn(conn)
        # Blackholed or stalled connections would wait forever: end their handlers outright.
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.wait(handlers, timeout=5)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- faults ----------------------------------------------------------------------------------
    def pass_through(self) -> None:
        self._mode = Mode.PASS
        self._flowing.set()

    def stall(self) -> None:
        self._mode = Mode.STALL
        self._flowing.clear()

    def blackhole(self) -> None:
        self._mode = Mode.BLACKHOLE
        self._flowing.set()  # held chunks move on, to be dropped

    def reset(self) -> None:
        """RST every live connection now, and every new one until the mode changes."""
        self._mode = Mode.RESET
        self._flowing.set()
        for conn in list(self._conns):
            self._reset_conn(conn)

    def truncate_after(self, n_bytes: int | None, how: Literal["reset", "close"] = "reset") -> None:
        """Cut each connection after ``n_bytes`` more bytes from the upstream; None turns it off."""
        self._truncate = None if n_bytes is None else (n_bytes, how)
        for conn in self._conns:
            conn.down_limit = None if n_bytes is None else conn.bytes_down + n_bytes
            conn.cut_how = how

    async def wait_for(self, predicate: Callable[[], bool], within_s: float = 10.0) -> None:
        """Poll ``predicate`` (e.g. ``lambda: fp.bytes_down > 500``) until true, or fail the test."""
        deadline = time.monotonic() + within_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"fault proxy: condition not met within {within_s} s")
            await asyncio.sleep(0.005)

    # -- the plumbing ----------------------------------------------------------------------------
    def _reset_conn(self, conn: _Conn) -> None:
        if conn.cut:
            return
        conn.cut = True
        self.resets += 1
        for w in conn.writers():
            rst(w)

    def _close_conn(self, conn: _Conn) -> None:
        if conn.cut:
            return
        conn.cut = True
        for w in conn.writers():
            w.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        conn = _Conn(client=writer)
        if self._truncate is not None:
            conn.down_limit, conn.cut_how = self._truncate
        self._conns.add(conn)
        try:
            await self._serve(conn, reader)
        except Exception:  # a broken socket in any step: make sure both sides know
            self._reset_conn(conn)
        finally:
            for w in conn.writers():
                w.transport.abort()  # no-op when already closed; frees the fd either way
            self._conns.discard(conn)
            self._handlers.discard(task)

    async def _serve(self, conn: _Conn, client_reader: asyncio.StreamReader) -> None:
        if self._mode is Mode.RESET:
            self._reset_conn(conn)
            return
        if self._mode is Mode.BLACKHOLE:
            while isinstance(data := await _read(client_reader), bytes):
                self.bytes_dropped += len(data)
            await asyncio.Event().wait()  # a blackhole never answers, not even with a close
        try:
            up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:
            self._reset_conn(conn)  # a dead upstream looks dead to the client too
            return
        conn.upstream = up_writer
        if conn.cut:  # reset() landed while we were connecting
            rst(up_writer)
            return
        await asyncio.gather(
            self._direction(conn, client_reader, up_writer, up=True),
            self._direction(conn, up_reader, conn.client, up=False),
        )

    async def _direction(
        self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        """One direction: a reader feeding a delay line, a sender applying the mode at send time."""
        line: asyncio.Queue[tuple[float, Item]] = asyncio.Queue(_QUEUE)

        async def fill() -> None:
            while True:
                item = await _read(reader)
                await line.put((time.monotonic() + self.latency_s, item))
                if isinstance(item, _End):
                    return

        async def send() -> None:
            while True:
                due, item = await line.get()
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._flowing.wait()
                if self._mode is Mode.BLACKHOLE:
                    if isinstance(item, bytes):
                        self.bytes_dropped += len(item)
                    continue  # an end or a reset goes unnoticed too: the caller waits for its timeouts
                if conn.cut:
                    return
                if item is _End.EOF:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return
                if item is _End.ERROR:
                    self._reset_conn(conn)
                    return
                assert isinstance(item, bytes)
                if not await self._send(conn, writer, item, up):
                    return

        await _until_sent(fill(), send())

    async def _send(self, conn: _Conn, writer: asyncio.StreamWriter, data: bytes, up: bool) -> bool:
        """Forward ``data``; False once the connection is done for (cut, or the peer gone)."""
        cut_after = False
        if not up and conn.down_limit is not None:
            allowed = conn.down_limit - conn.bytes_down
            if len(data) >= allowed:
                data, cut_after = data[: max(allowed, 0)], True
        try:
            if data:
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            self._reset_conn(conn)
            return False
        if up:
            conn.bytes_up += len(data)
            self.bytes_up += len(data)
        else:
            conn.bytes_down += len(data)
            self.bytes_down += len(data)
        if cut_after:
            if conn.cut_how == "close":
                self._close_conn(conn)
            else:
                self._reset_conn(conn)
            return False
        return True


async def _read(reader: asyncio.StreamReader) -> Item:
    try:
        data = await reader.read(_READ)
    except (ConnectionError, OSError):
        return _End.ERROR
    return data if data else _End.EOF


async def _until_sent(fill: Awaitable[None], send: Awaitable[None]) -> None:
    """Run both halves of a direction until the sender is done (the filler may be blocked on a full line)."""
    tasks = [asyncio.ensure_future(fill), asyncio.ensure_future(send)]
    try:
        await tasks[1]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
