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
from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from multidict import CIMultiDict

from proxy.content.tap import ContentTap
from proxy.forward.calibration import Calibration
from proxy.forward.capture import Capture, Failure, ModelObserver
from proxy.forward.conversations import Conversations
from proxy.forward.headers import client_ip, request_id_from, response_headers, upstream_headers
from proxy.forward.request_facts import inspect_request
from proxy.forward.request_zstd import is_zstd
from proxy.forward.streams import INSTRUMENTED, make_parser
from proxy.forward.transparent import TransparentResponse
from proxy.forward.upstream_client import (
    ClientStalled,
    ResponseHead,
    UpstreamClosed,
    UpstreamExchange,
    UpstreamPool,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.resources.energy import EnergyMeter
from proxy.upstream_url import Upstream
from proxy.usage.cost import Pricing
from proxy.usage.gate import Gate, model_of
from proxy.usage.identity import Caller, Refusal
from storage.records import ErrorRecord, iso_utc
from storage.writer import Writer

if TYPE_CHECKING:
    from proxy.forward.routed import Routed
    from proxy.upstreams import HostPool

__all__ = ["Forwarder", "TransparentResponse"]

logger = logging.getLogger(__name__)

_perf = time.perf_counter
# Bodies up to this size are read whole and sent in one write upstream; bigger ones are streamed through
# (an instrumented route keeps an inspection copy, bounded per request and in total).
_SMALL_BODY = 64 << 10
# Inspected bodies bigger than this are parsed on the request path (once, after forwarding) so the
# queued record does not hold megabytes of base64 images. A zstd body is the exception: it is inflated
# only on the writer's thread (proxy/forward/request_zstd.py), so its compressed copy goes with the record.
_DEFER_PARSE_LIMIT = 256 << 10
# Stop reading the upstream while this much is waiting in the client's socket buffer: with the
# connection cap this bounds what slow clients can make ollamon hold (docs/reliability.md).
_HIGH_WATER = 256 << 10


@dataclass(frozen=True, slots=True)
class _Settings:
    upstream: Upstream
    trusted: tuple[object, ...]
    user_id_header: str
    max_inspect_bytes: int
    store_text: bool
    idle_timeout_s: float
    client_stall_timeout_s: float


class Forwarder:
    """Holds what every forwarded request needs: the upstream, its connection pool and the writer."""

    def __init__(
        self,
        *,
        upstream: Upstream,
        pool: UpstreamPool,
        writer: Writer,
        trusted: tuple[object, ...] = (),
        user_id_header: str = "X-User-Id",
        max_inspect_bytes: int = 16 << 20,
        store_text: bool = False,
        idle_timeout_s: float = 600.0,
        client_stall_timeout_s: float = 60.0,
        max_inspect_total_bytes: int = 128 << 20,
        hosts: HostPool | None = None,
        conns: dict[str, UpstreamPool] | None = None,
    ) -> None:
        """``pool`` serves ``upstream``; with ``hosts`` of several (upstreams.hosts) requests are routed
        among them instead, each host's connections in ``conns`` by host name (proxy/forward/routed.py)."""
        self.pool = pool
        self.writer = writer
        self.s = _Settings(
            upstream,
            trusted,
            user_id_header,
            max_inspect_bytes,
            store_text,
            idle_timeout_s,
            client_stall_timeout_s,
        )
        self.in_flight = 0
        # Captures of the instrumented requests in flight (proxy/forward/live.py reads it, off the path).
        self.live: set[Capture] = set()
        # Inspection copies of streamed request bodies, all requests together, may not pass this.
        self.inspect_budget = max_inspect_total_bytes
        self.inspect_held = 0
        self.inspect_skipped = 0  # bodies forwarded without inspection because the budget was spent
        # Set by begin_shutdown(): from then on a cut stream is ollamon's doing, not the client's.
        self.shutting_down = False
        # Set by the resource sidecars when they run (proxy/api/system.py): both stay off the request path
        # but for the meter's begin/end (a few float operations) on instrumented requests.
        self.energy: EnergyMeter | None = None
        self.models: ModelObserver | None = None
        # Token-estimate calibration per model, learned and applied in Capture.build (writer thread).
        self.calibration = Calibration()
        # Identity, access and rate limits (proxy/api/auth.py sets it); None or inactive: not consulted.
        self.gate: Gate | None = None
        # Usage prices (proxy/api/usage.py sets them); each record is charged in Capture.build.
        self.pricing: Pricing | None = None
        # Set by proxy/api/content.py when content.enabled: hands the record's text to the analyzer.
        self.content: ContentTap | None = None
        # Conversation tracking (proxy/api/conversations.py sets it when on); applied in Capture.build.
        self.conversations: Conversations | None = None
        # Several hosts: requests go through Routed. One: the path below, unchanged, and every record names
        # the host (its upstreams name, host:port by default).
        self.conns: dict[str, UpstreamPool] = conns or {}
        self.routed: Routed | None = None
        self.upstream_name: str | None = None
        if hosts is not None and not hosts.single:
            from proxy.forward.routed import Routed  # imports this module: only needed with several hosts

            self.routed = Routed(self, hosts, self.conns)
        else:
            self.upstream_name = (
                hosts.hosts[0].name if hosts is not None else upstream.host_header + upstream.base_path
            )
            self.conns = {self.upstream_name: pool}

    def stats(self) -> dict[str, int]:
        """Counters for /ollamon/health: upstream connection reuse and the inspection budget."""
        pools = self.conns.values()
        return {
            "in_flight": self.in_flight,
            "upstream_connects": sum(p.connects for p in pools),
            "upstream_idle": sum(p.idle for p in pools),
            "stale_connections": sum(p.stale for p in pools),
            "replays": sum(p.replays for p in pools),
            "inspect_held_bytes": self.inspect_held,
            "inspect_skipped": self.inspect_skipped,
        }

    def begin_shutdown(self) -> None:
        """The server is shutting down: streams cut from now on are recorded as cut by shutdown."""
        self.shutting_down = True

    def _cancelled(self, cap: Capture | None) -> None:
        """The handler is being cancelled: by the client leaving, or by ollamon's own shutdown."""
        if cap is None or cap.failure is not None:
            return
        if self.shutting_down:
            cap.failure = Failure("shutdown", "ollamon: request cut by shutdown after the grace period")
        else:
            cap.cancelled = True

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
            cap.upstream = self.upstream_name
            cap.models = self.models
            cap.calibration = self.calibration
            cap.pricing = self.pricing
            cap.content = self.content
            cap.content_encoding = request.headers.get("Content-Encoding")
            cap.content_type = request.headers.get("Content-Type")
            traceparent = request.headers.get("traceparent")
            if traceparent is not None:
                # Kept as sent (and forwarded unchanged): an export parses it off the path.
                cap.trace_headers = {"traceparent": traceparent}
                tracestate = request.headers.getall("tracestate", ())
                if tracestate:
                    cap.trace_headers["tracestate"] = ",".join(tracestate)
            cap.inspect_limit = s.max_inspect_bytes
            if self.conversations is not None:
                cap.conversations = self.conversations
                cap.conversation_header = request.headers.get(self.conversations.header)
        meter = self.energy if cap is not None else None
        headers = upstream_headers(
            raw,
            host_header=s.upstream.host_header,
            peer=peer,
            scheme=request.scheme,
            request_id=request_id,
            trusted=s.trusted,  # type: ignore[arg-type]
        )
        self.in_flight += 1
        if cap is not None:
            self.live.add(cap)
        span = meter.begin() if meter is not None else None
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
                self.live.discard(cap)
                if cap.admission is not None and self.gate is not None:
                    self.gate.release_soon(cap.admission)
                if cap.t_end is None:
                    cap.t_end = _perf()
                if meter is not None and span is not None:
                    meter.end(span)
                    cap.energy = span
                self.writer.submit(cap)

    async def _forward(
        self, request: web.Request, headers: CIMultiDict[str], request_id: str, cap: Capture | None
    ) -> web.StreamResponse:
        s = self.s
        path = request.rel_url.raw_path
        target = request.rel_url.raw_path_qs if request.rel_url.raw_query_string else path
        target = s.upstream.base_path + target
        gate = self.gate
        caller: Caller | None = None
        if gate is not None and gate.active:
            who = gate.identify(request.headers.get("Authorization"))
            if isinstance(who, Refusal):
                return self._refuse(who, request_id, cap, path, None, request.headers.get(s.user_id_header))
            caller = who
            if cap is not None and who.key_id is not None:
                cap.api_key_id, cap.team, cap.user_id = who.key_id, who.team, who.user_id
            if gate.strips_key:
                headers.popall("Authorization", None)
        # A key limited to some models needs the model: its bodies are read whole up to the inspect limit.
        whole = s.max_inspect_bytes if caller is not None and caller.models else _SMALL_BODY
        data = await self._body(request, cap, whole)
        if gate is not None and caller is not None:
            small = data if isinstance(data, bytes) else None
            model = model_of(small) if gate.needs_model(caller) else None
            verdict = await gate.admit(
                caller, model, path=path, inference=cap is not None, has_body=request.body_exists
            )
            if isinstance(verdict, Refusal):
                return self._refuse(
                    verdict, request_id, cap, path, caller, request.headers.get(s.user_id_header)
                )
            if cap is not None:
                cap.admission = verdict
        length = request.content_length if isinstance(data, AsyncIterator) else None
        if self.routed is not None:
            return await self.routed.forward(request, headers, request_id, cap, data, length)
        if cap is not None:
            cap.t_sent = _perf()
        try:
            ex, head = await self.pool.exchange(
                request.method, target, list(headers.items()), data, length=length
            )
        except asyncio.CancelledError:
            self._cancelled(cap)
            raise
        except UpstreamUnreachable as exc:
            return self._own_error(
                502,
                f"ollamon: upstream {s.upstream} unreachable: {exc}",
                "upstream_unreachable",
                request_id,
                cap,
                path,
                upstream=self.upstream_name,
            )
        except UpstreamTimeout:
            return self._own_error(
                504,
                f"ollamon: no response from upstream {s.upstream} within {s.idle_timeout_s:g} s",
                "upstream_timeout",
                request_id,
                cap,
                path,
                upstream=self.upstream_name,
            )
        except UpstreamClosed as exc:
            return self._own_error(
                502,
                f"ollamon: upstream {s.upstream} failed before answering: {exc}",
                "upstream_closed",
                request_id,
                cap,
                path,
                upstream=self.upstream_name,
            )
        try:
            resp = await self._relay(request, ex, head, request_id, cap)
        except BaseException:
            ex.abort()
            raise
        ex.release()
        return resp

    async def _body(
        self, request: web.Request, cap: Capture | None, whole: int = _SMALL_BODY
    ) -> bytes | AsyncIterator[bytes] | None:
        if not request.body_exists:
            return None
        length = request.content_length
        if length is not None and length <= whole:
            # Small bodies go upstream in one write. From the stream, like big ones: aiohttp's
            # client_max_size (request.read()) must never decide what reaches Ollama.
            body = await request.content.readexactly(length) if length else b""
            if cap is not None:
                cap.bytes_in = len(body)
                cap.body = body
            return body
        return self._stream_body(request, cap)

    async def _stream_body(self, request: web.Request, cap: Capture | None) -> AsyncIterator[bytes]:
        """Pass the body through in pieces; an instrumented route keeps a copy up to the inspect limits.

        The copy counts against ``inspect_budget`` (all requests together) while it is held, so stalled
        uploads cannot pile up copies: past the budget a body is forwarded without inspection.
        """
        keep: bytearray | None = bytearray() if cap is not None else None
        limit = self.s.max_inspect_bytes
        total = 0
        held = 0
        try:
            async for chunk in request.content.iter_any():
                total += len(chunk)
                if keep is not None:
                    n = len(chunk)
                    if len(keep) + n <= limit and self.inspect_held + n <= self.inspect_budget:
                        keep += chunk
                        held += n
                        self.inspect_held += n
                    else:
                        if len(keep) + n <= limit:
                            self.inspect_skipped += 1
                        self.inspect_held -= held
                        held = 0
                        keep = None
                yield chunk
            if cap is not None:
                cap.bytes_in = total
                if keep is not None:
                    if len(keep) > _DEFER_PARSE_LIMIT and not is_zstd(cap.endpoint, cap.content_encoding):
                        cap.body_facts = inspect_request(cap.flavor, bytes(keep), cap.content_type)
                    else:
                        cap.body = bytes(keep)
        finally:
            self.inspect_held -= held
            if cap is not None and not cap.bytes_in:
                cap.bytes_in = total

    async def _relay(
        self,
        request: web.Request,
        ex: UpstreamExchange,
        head: ResponseHead,
        request_id: str,
        cap: Capture | None,
        ending: list[str] | None = None,
    ) -> web.StreamResponse:
        """Relay the answer; a relay that did not run to its end appends why to ``ending`` (when given)."""
        upstream_headers_ci = CIMultiDict(head.headers)
        resp = TransparentResponse(
            status=head.status,
            reason=head.reason or None,
            headers=response_headers(head.headers, request_id),
            had_content_type="Content-Type" in upstream_headers_ci,
        )
        length = upstream_headers_ci.get("Content-Length")
        if length is not None and "Transfer-Encoding" not in upstream_headers_ci and length.isdigit():
            resp.content_length = int(length)
        feed = None
        times: list[float] | None = None
        if cap is not None:
            cap.t_headers = _perf()
            cap.status = head.status
            cap.parser = make_parser(cap.flavor, upstream_headers_ci.get("Content-Type"))
            feed = cap.parser.feed
            times = cap.content_times
        sent = 0
        transport = request.transport
        try:
            await resp.prepare(request)
            framed = resp.headers.get("Transfer-Encoding") == "chunked"
            writer = resp._payload_writer  # aiohttp's own drain (waits while the socket is paused)
            assert transport is not None and writer is not None

            def sink(data: bytes) -> bool:
                # Runs inside the upstream socket's data_received: write through, then look.
                nonlocal sent
                if transport.is_closing():
                    return False  # the client left; handler cancellation aborts the upstream
                if framed:
                    transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
                else:
                    transport.write(data)
                sent += len(data)
                if feed is not None:
                    n = feed(data)
                    if n and times is not None:
                        now = _perf()
                        times.extend([now] * n)
                return transport.get_write_buffer_size() > _HIGH_WATER

            await ex.stream(sink, writer.drain, self.s.client_stall_timeout_s)
            await resp.write_eof()
        except asyncio.CancelledError:
            self._cancelled(cap)
            raise
        except ClientStalled as exc:
            self._abort(request, cap, "client_stalled", f"ollamon: cut a client that stopped reading: {exc}")
            ex.abort()
            if ending is not None:
                ending.append("client_stalled")
        except UpstreamTimeout:
            if ending is not None:
                ending.append("upstream_timeout")
            self._abort(
                request,
                cap,
                "upstream_timeout",
                f"ollamon: upstream {self.s.upstream} sent nothing for {self.s.idle_timeout_s:g} s",
            )
            ex.abort()
        except UpstreamClosed as exc:
            self._abort(request, cap, "upstream_closed", f"ollamon: upstream stream broke off: {exc}")
            ex.abort()
            if ending is not None:
                ending.append("upstream_closed")
        except ConnectionResetError:
            if cap is not None:
                cap.cancelled = True
            ex.abort()
            if ending is not None:
                ending.append("client_gone")
        except Exception as exc:
            logger.exception("internal error relaying %s", request.rel_url.raw_path)
            self._abort(request, cap, "internal", f"ollamon internal error: {exc!r}")
            if cap is not None and cap.failure is not None:
                cap.failure.severity = "critical"
                cap.failure.stack_trace = traceback.format_exc()
            ex.abort()
            if ending is not None:
                ending.append("internal")
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
        self,
        status: int,
        message: str,
        error_type: str,
        request_id: str,
        cap: Capture | None,
        path: str,
        *,
        upstream: str | None = None,
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
                    upstream=upstream,
                )
            )
        return web.Response(
            status=status,
            body=orjson.dumps({"error": message}),
            content_type="application/json",
            headers={"X-Request-Id": request_id},
        )

    def _refuse(
        self,
        r: Refusal,
        request_id: str,
        cap: Capture | None,
        path: str,
        caller: Caller | None,
        user_id: str | None,
    ) -> web.Response:
        """Answer the gate's refusal (401/403/429) in Ollama's shape and record it, without the key."""
        if cap is not None:
            cap.status = r.status
            cap.failure = Failure(r.error_type, r.message, "warning")
        else:
            self.writer.submit(
                ErrorRecord(
                    timestamp=iso_utc(time.time()),
                    request_id=request_id,
                    error_type=r.error_type,
                    error_message=r.message,
                    endpoint=path,
                    user_id=caller.user_id if caller is not None and caller.key_id else user_id,
                    severity="warning",
                    api_key_id=caller.key_id if caller is not None else None,
                    team=caller.team if caller is not None else None,
                )
            )
        headers = {"X-Request-Id": request_id}
        headers.update(r.headers)
        return web.Response(
            status=r.status,
            body=orjson.dumps({"error": r.message}),
            content_type="application/json",
            headers=headers,
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
