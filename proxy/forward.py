"""The catch-all handler: forward any request to the upstream and stream the answer back untouched.

Bytes pass through as they arrive: each upstream read is written to the client at once, then (on
instrumented routes) shown to a pure parser that only scans it. The record is handed to the writer in a
``finally`` that also runs when the client goes away, and closing the upstream response there is what
tells Ollama to stop generating.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp import web

from storage.records import ErrorRecord, iso_utc
from storage.writer import Writer

from .capture import Capture, Failure
from .headers import client_ip, request_id_from, response_headers, upstream_headers
from .inspect import inspect_request
from .streams import INSTRUMENTED, make_parser
from .upstream import Upstream

__all__ = ["Forwarder", "TransparentResponse"]

logger = logging.getLogger(__name__)

_perf = time.perf_counter
# Bodies up to this size are read whole and sent with their Content-Length even on routes that are not
# inspected: one write upstream instead of a generator.
_SMALL_BODY = 64 << 10
# Inspected bodies bigger than this are parsed on the request path (once, after forwarding) so the
# queued record does not hold megabytes of base64 images.
_DEFER_PARSE_LIMIT = 256 << 10
_SKIP_AUTO = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


class TransparentResponse(web.StreamResponse):
    """A StreamResponse that adds no headers of its own (no ``Server``, no default ``Content-Type``)."""

    def __init__(self, *, status: int, reason: str | None, headers: object, had_content_type: bool) -> None:
        super().__init__(status=status, reason=reason, headers=headers)  # type: ignore[arg-type]
        self._had_content_type = had_content_type

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self._headers.popall("Server", None)
        if not self._had_content_type:
            self._headers.popall("Content-Type", None)


@dataclass(frozen=True, slots=True)
class _Settings:
    upstream: Upstream
    trusted: tuple[object, ...]
    user_id_header: str
    max_inspect_bytes: int
    store_text: bool
    idle_timeout_s: float


class Forwarder:
    """Holds what every forwarded request needs: the upstream, the client session and the writer."""

    def __init__(
        self,
        *,
        upstream: Upstream,
        session: aiohttp.ClientSession,
        writer: Writer,
        trusted: tuple[object, ...] = (),
        user_id_header: str = "X-User-Id",
        max_inspect_bytes: int = 16 << 20,
        store_text: bool = False,
        idle_timeout_s: float = 600.0,
    ) -> None:
        self.session = session
        self.writer = writer
        self.s = _Settings(upstream, trusted, user_id_header, max_inspect_bytes, store_text, idle_timeout_s)
        self.in_flight = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        arrival = _perf()
        arrival_wall = time.time()
        s = self.s
        raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        request_id = request_id_from(request.headers.get("X-Request-Id"))
        peer = request.remote
        path = request.rel_url.raw_path
        flavor = INSTRUMENTED.get(path) if request.method == "POST" else None
        cap: Capture | None = None
        if flavor is not None:
            cap = Capture(
                endpoint=path,
                flavor=flavor,
                request_id=request_id,
                arrival=arrival,
                arrival_wall=arrival_wall,
                client_addr=client_ip(peer, raw, s.trusted),  # type: ignore[arg-type]
                user_agent=request.headers.get("User-Agent"),
                user_id=request.headers.get(s.user_id_header),
                store_text=s.store_text,
            )
        headers = upstream_headers(
            raw,
            host_header=s.upstream.host_header,
            peer=peer,
            scheme=request.scheme,
            request_id=request_id,
            trusted=s.trusted,  # type: ignore[arg-type]
        )
        self.in_flight += 1
        try:
            return await self._forward(request, headers, request_id, cap)
        except Exception as exc:
            # A bug of ollamon's before any byte went out: answer in Ollama's error shape, keep the stack.
            logger.exception("internal error forwarding %s %s", request.method, path)
            message = f"ollamon internal error: {type(exc).__name__}: {exc}"
            if cap is not None:
                cap.status = 500
                cap.failure = Failure("internal", message, "critical", traceback.format_exc())
            else:
                self.internal_error(exc, request_id, path)
            return web.Response(
                status=500,
                body=orjson.dumps({"error": message}),
                content_type="application/json",
                headers={"X-Request-Id": request_id},
            )
        finally:
            self.in_flight -= 1
            if cap is not None:
                if cap.t_end is None:
                    cap.t_end = _perf()
                self.writer.submit(cap)

    async def _forward(
        self, request: web.Request, headers: object, request_id: str, cap: Capture | None
    ) -> web.StreamResponse:
        s = self.s
        url = s.upstream.url_for(request.rel_url.raw_path, request.rel_url.raw_query_string)
        data = await self._body(request, cap)
        if cap is not None:
            cap.t_sent = _perf()
        try:
            upstream = await self.session.request(
                request.method,
                url,
                headers=headers,  # type: ignore[arg-type]
                data=data,
                allow_redirects=False,
                skip_auto_headers=_SKIP_AUTO,
            )
        except asyncio.CancelledError:
            if cap is not None:
                cap.cancelled = True
            raise
        except aiohttp.ConnectionTimeoutError as exc:
            return self._own_error(
                502,
                f"ollamon: upstream {s.upstream} unreachable: connect timed out ({exc})",
                "upstream_unreachable",
                request_id,
                cap,
                request.rel_url.raw_path,
            )
        except TimeoutError:
            return self._own_error(
                504,
                f"ollamon: no response from upstream {s.upstream} within {s.idle_timeout_s:g} s",
                "upstream_timeout",
                request_id,
                cap,
                request.rel_url.raw_path,
            )
        except aiohttp.ClientError as exc:
            return self._own_error(
                502,
                f"ollamon: upstream {s.upstream} unreachable: {exc}",
                "upstream_unreachable",
                request_id,
                cap,
                request.rel_url.raw_path,
            )
        try:
            return await self._relay(request, upstream, request_id, cap)
        finally:
            upstream.close()

    async def _body(self, request: web.Request, cap: Capture | None) -> bytes | AsyncIterator[bytes] | None:
        if not request.body_exists:
            return None
        length = request.content_length
        if length is not None and length <= (self.s.max_inspect_bytes if cap is not None else _SMALL_BODY):
            body = await request.read()
            if cap is not None:
                cap.bytes_in = len(body)
                if len(body) > _DEFER_PARSE_LIMIT:
                    cap.body_facts = inspect_request(cap.flavor, body)
                else:
                    cap.body = body
            return body
        return self._stream_body(request, cap)

    async def _stream_body(self, request: web.Request, cap: Capture | None) -> AsyncIterator[bytes]:
        """Pass the body through in pieces; an instrumented route keeps a copy up to the inspect limit."""
        keep: bytearray | None = bytearray() if cap is not None else None
        limit = self.s.max_inspect_bytes
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
            if keep is not None:
                if len(keep) + len(chunk) <= limit:
                    keep += chunk
                else:
                    keep = None
            yield chunk
        if cap is not None:
            cap.bytes_in = total
            if keep is not None:
                cap.body_facts = inspect_request(cap.flavor, bytes(keep))

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        request_id: str,
        cap: Capture | None,
    ) -> web.StreamResponse:
        raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in upstream.raw_headers]
        resp = TransparentResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=response_headers(raw, request_id),
            had_content_type="Content-Type" in upstream.headers,
        )
        if upstream.content_length is not None and "Transfer-Encoding" not in upstream.headers:
            resp.content_length = upstream.content_length
        feed = None
        if cap is not None:
            cap.t_headers = _perf()
            cap.status = upstream.status
            cap.parser = make_parser(cap.flavor, upstream.headers.get("Content-Type"))
            feed = cap.parser.feed
        times = cap.content_times if cap is not None else None
        sent = 0
        try:
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                try:
                    await resp.write(chunk)
                except ConnectionResetError:
                    # The client went away mid-stream (handler cancellation usually notices first).
                    if cap is not None:
                        cap.cancelled = True
                    return resp
                sent += len(chunk)
                if feed is not None:
                    n = feed(chunk)
                    if n and times is not None:
                        now = _perf()
                        times.extend([now] * n)
            await resp.write_eof()
        except asyncio.CancelledError:
            if cap is not None:
                cap.cancelled = True
            raise
        except TimeoutError:
            self._abort(
                request,
                cap,
                "upstream_timeout",
                f"ollamon: upstream {self.s.upstream} sent nothing for {self.s.idle_timeout_s:g} s",
            )
        except aiohttp.ClientError as exc:
            self._abort(request, cap, "upstream_closed", f"ollamon: upstream stream broke off: {exc!r}")
        except Exception as exc:
            logger.exception("internal error relaying %s", request.rel_url.raw_path)
            self._abort(request, cap, "internal", f"ollamon internal error: {exc!r}")
            if cap is not None and cap.failure is not None:
                cap.failure.severity = "critical"
                cap.failure.stack_trace = traceback.format_exc()
        finally:
            if cap is not None:
                cap.t_end = _perf()
                cap.bytes_out = sent
        return resp

    def _abort(self, request: web.Request, cap: Capture | None, error_type: str, message: str) -> None:
        """Signal truncation to the client the only honest way: drop the connection (no clean chunk end)."""
        logger.warning("%s %s: %s", request.method, request.rel_url.raw_path, message)
        if cap is not None:
            cap.failure = Failure(error_type, message)
        if request.transport is not None:
            request.transport.abort()

    def _own_error(
        self, status: int, message: str, error_type: str, request_id: str, cap: Capture | None, path: str
    ) -> web.Response:
        logger.warning("%s", message)
        if cap is not None:
            cap.status = status
            cap.failure = Failure(error_type, message)
        else:
            self.writer.submit(
                ErrorRecord(
                    timestamp=iso_utc(time.time()),
                    request_id=request_id,
                    error_type=error_type,
                    error_message=message,
                    endpoint=path,
                    severity="error",
                )
            )
        return web.Response(
            status=status,
            body=orjson.dumps({"error": message}),
            content_type="application/json",
            headers={"X-Request-Id": request_id},
        )

    def internal_error(self, exc: BaseException, request_id: str, path: str) -> None:
        """Record one of ollamon's own exceptions (with its stack) in error_metrics."""
        self.writer.submit(
            ErrorRecord(
                timestamp=iso_utc(time.time()),
                request_id=request_id,
                error_type="internal",
                error_message=f"{type(exc).__name__}: {exc}",
                stack_trace="".join(traceback.format_exception(exc)),
                endpoint=path,
                severity="critical",
            )
        )
