"""The request path with several Ollama hosts (docs/upstreams.md): route, retry once, merge, fan out.

The forwarder calls ``Routed.forward`` only when ``upstreams.hosts`` lists more than one host; with one
upstream this module is never entered and the single-upstream path runs as it always has. Here:

* ``GET``/``HEAD`` of ``/api/tags``, ``/api/ps``, ``/v1/models`` answer the union of every host's list;
* management calls (pull, push, create, copy, delete, blobs) go where ``upstreams.management`` says, never
  retried; with several targets every host gets the call and the client one combined answer;
* everything else goes to the host ``HostPool`` picks for the model, retried once on another host when it
  failed before any byte reached the client (proxy/upstreams/retry.py), relayed by the forwarder's own
  ``_relay`` (byte-faithful), and the host released with the outcome.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol
from urllib.parse import unquote

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from proxy.forward.capture import Capture
from proxy.forward.headers import response_headers
from proxy.forward.transparent import TransparentResponse
from proxy.forward.upstream_client import (
    ResponseHead,
    UpstreamClosed,
    UpstreamExchange,
    UpstreamPool,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.upstreams import (
    RETRY_STATUSES,
    UNION_PATHS,
    FailedBeforeFirstByte,
    Host,
    HostAnswer,
    HostPool,
    NoUpstreamError,
    Outcome,
    combined,
    fan_out,
    final_line,
    is_management,
    outcome_for_status,
    send_with_retry,
)
from proxy.usage.gate import model_of
from storage.records import ErrorRecord, iso_utc
from storage.tasks import spawn

__all__ = ["Routed"]

logger = logging.getLogger(__name__)

Body = bytes | AsyncIterator[bytes] | None
Answer = tuple[UpstreamExchange, ResponseHead]
# How the relay ended, as _relay reports it: the host cut or went silent (its failure), or not its doing.
UPSTREAM_ENDINGS = frozenset({"upstream_timeout", "upstream_closed"})
_JSON = "application/json; charset=utf-8"  # Ollama's own Content-Type for JSON answers
_MODEL_PATH = "/v1/models/"
_MAX_ANSWER = 8 << 20  # a management call's non-streamed answer, read whole before the others are combined


class _Forwarder(Protocol):
    """What Routed uses of proxy/forward/handler.py's Forwarder (which imports this module)."""

    s: Any
    writer: Any

    def _cancelled(self, cap: Capture | None) -> None: ...

    async def _relay(
        self,
        request: web.Request,
        ex: UpstreamExchange,
        head: ResponseHead,
        request_id: str,
        cap: Capture | None,
        ending: list[str] | None = None,
    ) -> web.StreamResponse: ...

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
    ) -> web.Response: ...


class Routed:
    """Several hosts: the pool that chooses and one keep-alive connection pool per host (by name)."""

    def __init__(self, fw: _Forwarder, hosts: HostPool, conns: dict[str, UpstreamPool]) -> None:
        self.fw = fw
        self.hosts = hosts
        self.conns = conns

    async def forward(
        self,
        request: web.Request,
        headers: CIMultiDict[str],
        request_id: str,
        cap: Capture | None,
        data: Body,
        length: int | None,
    ) -> web.StreamResponse:
        method = request.method
        path = request.rel_url.raw_path
        if method in ("GET", "HEAD") and path in UNION_PATHS:
            return await self._union(request, path, request_id)
        management = is_management(method, path)
        if management:
            targets = self.hosts.management_targets()
            try:
                if len(targets) > 1 and (data is None or isinstance(data, bytes)):
                    return await self._fan_out(request, headers, request_id, targets, data or b"")
                if len(targets) > 1:
                    # A streamed upload (a big blob) is not held in memory, so it can go to one host only.
                    logger.warning(
                        "%s %s: body streamed through, sent to %s only (not to every host)",
                        method,
                        path,
                        targets[0].name,
                    )
                return await self._send(request, headers, request_id, cap, data, length, targets[0])
            finally:
                self.hosts.poke()
        return await self._send(request, headers, request_id, cap, data, length, None)

    async def _send(
        self,
        request: web.Request,
        headers: CIMultiDict[str],
        request_id: str,
        cap: Capture | None,
        data: Body,
        length: int | None,
        only: Host | None,
    ) -> web.StreamResponse:
        """Route (or send to ``only``, never retried), relay, release the host with the outcome."""
        fw, pool = self.fw, self.hosts
        method = request.method
        rel = request.rel_url.raw_path_qs if request.rel_url.raw_query_string else request.rel_url.raw_path
        failed: list[tuple[str, Host, Exception]] = []  # the last attempt's own failure, for the answer

        async def send(host: Host) -> Answer:
            headers["Host"] = host.upstream.host_header
            if cap is not None:
                cap.upstream = host.name
                cap.t_sent = time.perf_counter()
            try:
                ex, head = await self.conns[host.name].exchange(
                    method, host.upstream.base_path + rel, list(headers.items()), data, length=length
                )
            except (UpstreamUnreachable, UpstreamTimeout, UpstreamClosed) as exc:
                failed.append((_kind(exc), host, exc))
                raise FailedBeforeFirstByte(f"{host.name}: {exc}") from exc
            if head.status in RETRY_STATUSES:
                failed.clear()
                raise FailedBeforeFirstByte(
                    f"{host.name}: HTTP {head.status}",
                    status=head.status,
                    answer=(ex, head),
                    dispose=ex.abort,
                )
            return ex, head

        model = model_of(data) if isinstance(data, bytes) else None
        if model is None and request.rel_url.raw_path.startswith(_MODEL_PATH):
            model = unquote(request.rel_url.raw_path[len(_MODEL_PATH) :])  # GET /v1/models/{model}
        try:
            if only is None:
                replayable = data is None or isinstance(data, bytes)
                host, (ex, head) = await send_with_retry(pool, model, send, replayable=replayable)
            else:
                host = only
                host.begin(pool.clock())
                try:
                    ex, head = await send(host)
                except FailedBeforeFirstByte:
                    pool.release(host, Outcome.FAILURE)
                    raise
                except BaseException:
                    pool.release(host, Outcome.NEUTRAL)
                    raise
        except asyncio.CancelledError:
            fw._cancelled(cap)
            raise
        except NoUpstreamError as exc:
            path = request.rel_url.raw_path
            return fw._own_error(502, f"ollamon: {exc}", "no_upstream", request_id, cap, path)
        except FailedBeforeFirstByte as exc:
            if exc.answer is not None:  # the host's own 5xx, no retry possible: relay it as it is
                ex, head = exc.answer
                return await self._relay(request, ex, head, request_id, cap, None)
            return self._failure(request, request_id, cap, failed)
        return await self._relay(request, ex, head, request_id, cap, host)

    async def _relay(
        self,
        request: web.Request,
        ex: UpstreamExchange,
        head: ResponseHead,
        request_id: str,
        cap: Capture | None,
        host: Host | None,
    ) -> web.StreamResponse:
        """The forwarder's relay; then ``host`` (None: already released) is released with the outcome."""
        outcome = Outcome.NEUTRAL  # cancelled (client gone, shutdown) or an internal error
        ending: list[str] = []
        try:
            resp = await self.fw._relay(request, ex, head, request_id, cap, ending)
            if not ending:
                outcome = outcome_for_status(head.status)
            elif ending[0] in UPSTREAM_ENDINGS:
                outcome = Outcome.FAILURE
        except BaseException:
            ex.abort()
            raise
        finally:
            if host is not None:
                self.hosts.release(host, outcome)
        ex.release()
        return resp

    def _failure(
        self,
        request: web.Request,
        request_id: str,
        cap: Capture | None,
        failed: list[tuple[str, Host, Exception]],
    ) -> web.Response:
        """Today's own 502/504 for the last attempt's failure, naming its host."""
        path = request.rel_url.raw_path
        if not failed:  # cannot happen: a FailedBeforeFirstByte without an answer records its cause
            message = "ollamon: no upstream answered"
            return self.fw._own_error(502, message, "no_upstream", request_id, cap, path)
        kind, host, exc = failed[-1]
        if kind == "upstream_timeout":
            idle = self.fw.s.idle_timeout_s
            status, message = 504, f"ollamon: no response from upstream {host.upstream} within {idle:g} s"
        elif kind == "upstream_unreachable":
            status, message = 502, f"ollamon: upstream {host.upstream} unreachable: {exc}"
        else:
            status, message = 502, f"ollamon: upstream {host.upstream} failed before answering: {exc}"
        return self.fw._own_error(status, message, kind, request_id, cap, path, upstream=host.name)

    async def _union(self, request: web.Request, path: str, request_id: str) -> web.StreamResponse:
        """/api/tags, /api/ps, /v1/models: every host's list merged (proxy/upstreams/unions.py)."""
        status, body = await self.hosts.union(path)
        if status != 200:
            self.fw.writer.submit(
                ErrorRecord(
                    timestamp=iso_utc(time.time()),
                    request_id=request_id,
                    error_type="no_upstream",
                    error_message=orjson.loads(body).get("error", ""),
                    endpoint=path,
                )
            )
        return await self._answer(request, status, body, request_id)

    async def _answer(
        self, request: web.Request, status: int, body: bytes, request_id: str, ctype: str = _JSON
    ) -> web.StreamResponse:
        """An answer of ollamon's making in Ollama's shape: no Server header, as Ollama sends none."""
        headers = response_headers((("Content-Type", ctype),), request_id)
        resp = TransparentResponse(status=status, reason=None, headers=headers, had_content_type=True)
        resp.content_length = len(body)
        await resp.prepare(request)
        if request.method != "HEAD":
            await resp.write(body)
        await resp.write_eof()
        return resp

    async def _fan_out(
        self,
        request: web.Request,
        headers: CIMultiDict[str],
        request_id: str,
        targets: list[Host],
        data: bytes,
    ) -> web.StreamResponse:
        """A management call to every target at once, one answer for the client (proxy/upstreams/fanout.py):
        the first target's progress stream relayed live, its last line held until the others are done."""
        path = request.rel_url.raw_path
        rel = request.rel_url.raw_path_qs if request.rel_url.raw_query_string else path
        sent = {k: v for k, v in headers.items() if k.lower() != "host"}
        idle = self.fw.s.idle_timeout_s
        now = self.hosts.clock()
        for h in targets:
            h.begin(now)
        lead = targets[0]
        answers: dict[str, HostAnswer] = {}
        others = spawn(
            fan_out(self.hosts.session, targets[1:], request.method, rel, data, sent, idle_timeout_s=idle),
            name="management-fan-out",
        )
        try:
            return await self._lead(request, lead, rel, data, sent, request_id, others, answers)
        finally:
            if not others.done():  # the client left (Ollama stops a pull then) or the lead cut its stream
                others.cancel()
            elif not others.cancelled():
                answers.update((a.host.name, a) for a in others.result())
            for h in targets:
                a = answers.get(h.name)
                if a is None:
                    outcome = Outcome.NEUTRAL
                else:
                    outcome = Outcome.FAILURE if a.status is None else outcome_for_status(a.status)
                self.hosts.release(h, outcome)

    async def _lead(
        self,
        request: web.Request,
        lead: Host,
        rel: str,
        data: bytes,
        sent: dict[str, str],
        request_id: str,
        others: asyncio.Task[list[HostAnswer]],
        answers: dict[str, HostAnswer],
    ) -> web.StreamResponse:
        idle = self.fw.s.idle_timeout_s
        up = lead.upstream
        try:
            async with self.hosts.session.request(
                request.method,
                up.url_for(rel, ""),
                data=data,
                headers={**sent, "Host": up.host_header},
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=idle, sock_read=idle),
                allow_redirects=False,
            ) as r:
                if r.status == 200 and "ndjson" in r.headers.get("Content-Type", ""):
                    return await self._progress(request, r, lead, request_id, others, answers)
                answers[lead.name] = HostAnswer(lead, r.status, await _read_bounded(r))
        except (aiohttp.ClientError, TimeoutError) as exc:
            answers[lead.name] = HostAnswer(lead, None, failure=f"{type(exc).__name__}: {exc}".rstrip(": "))
        rest = await others
        status, body = combined([answers[lead.name], *rest])
        return await self._answer(request, status, body, request_id)

    async def _progress(
        self,
        request: web.Request,
        r: aiohttp.ClientResponse,
        lead: Host,
        request_id: str,
        others: asyncio.Task[list[HostAnswer]],
        answers: dict[str, HostAnswer],
    ) -> web.StreamResponse:
        """Relay the lead's NDJSON progress as it comes, all but its last line; that one waits for the rest."""
        raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in r.raw_headers]
        keep = [(k, v) for k, v in raw if k.lower() not in ("content-length", "transfer-encoding")]
        resp = TransparentResponse(
            status=r.status,
            reason=r.reason,
            headers=response_headers(keep, request_id),
            had_content_type=True,
        )
        await resp.prepare(request)
        buf = bytearray()
        try:
            async for chunk in r.content.iter_any():
                buf += chunk
                end = buf.rfind(b"\n")
                start = buf.rfind(b"\n", 0, end) if end > 0 else -1
                if start >= 0:  # everything before the last complete line goes out now
                    await resp.write(bytes(buf[: start + 1]))
                    del buf[: start + 1]
        except (aiohttp.ClientError, TimeoutError) as exc:
            answers[lead.name] = HostAnswer(lead, None, failure=str(exc))
            logger.warning(
                "%s %s: %s cut its progress stream: %s", request.method, r.url.path, lead.name, exc
            )
            if request.transport is not None:
                request.transport.abort()  # a truncated stream must not look complete
            return resp
        last = bytes(buf)
        answers[lead.name] = HostAnswer(lead, 200, last)
        await resp.write(final_line(last, await others))
        await resp.write_eof()
        return resp


async def _read_bounded(r: aiohttp.ClientResponse) -> bytes:
    """The whole answer, its tail kept past ``_MAX_ANSWER`` (the final line is what matters)."""
    got = bytearray()
    async for chunk in r.content.iter_chunked(1 << 16):
        got += chunk
        if len(got) > _MAX_ANSWER:
            del got[: len(got) - _MAX_ANSWER]
    return bytes(got)


def _kind(exc: Exception) -> str:
    """The error_type of a failure before the response head (docs/metrics.md)."""
    if isinstance(exc, UpstreamUnreachable):
        return "upstream_unreachable"
    if isinstance(exc, UpstreamTimeout):
        return "upstream_timeout"
    return "upstream_closed"
