"""A raw-socket HTTP/1.1 upstream for hostile-input tests: it answers with exactly the bytes a test scripts.

Requests are parsed the way a real server parses them (llhttp, as Go's server would frame them: by
Content-Length or chunks), so a smuggled second request in a body shows up as a second request here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httptools

__all__ = ["Conn", "RawUpstream", "Request"]


@dataclass
class Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


class _Parser:
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.done: list[Request] = []
        self._cur: Request | None = None
        self._url = b""

    def on_message_begin(self) -> None:
        self._cur = Request("", "", [])
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._cur is not None
        self._cur.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        assert self._cur is not None
        self._cur.method = self.parser.get_method().decode()
        self._cur.target = self._url.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        assert self._cur is not None
        self._cur.body += body

    def on_message_complete(self) -> None:
        assert self._cur is not None
        self.done.append(self._cur)
        self._cur = None


@dataclass
class Conn:
    """One accepted connection: read whole requests, write raw bytes."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    upstream: RawUpstream
    raw: bytearray = field(default_factory=bytearray)
    _parser: _Parser = field(default_factory=_Parser)

    async def request(self) -> Request:
        """The next complete request on this connection (raises IncompleteReadError at EOF)."""
        while not self._parser.done:
            data = await self.reader.read(65536)
            if not data:
                raise asyncio.IncompleteReadError(bytes(self.raw), None)
            self.raw += data
            self._parser.parser.feed_data(data)
        req = self._parser.done.pop(0)
        self.upstream.requests.append(req)
        return req

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def closed_by_peer(self) -> None:
        """Wait until the proxy closes (or resets) this connection; anything else it sends is discarded."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass


Handler = Callable[[Conn], Awaitable[None]]


class RawUpstream:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.connections = 0
        self.conns: list[Conn] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, handler: Handler) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            conn = Conn(reader, writer, self)
            self.conns.append(conn)
            try:
                await handler(conn)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for c in self.conns:
                c.writer.close()
            await self._server.wait_closed()
