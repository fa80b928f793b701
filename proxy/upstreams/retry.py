"""The retry rule, in one place.

**A request that failed before any byte reached the client is retried once, on another host; a stream is
never retried after its first byte.** In detail, a second attempt is made only when all of these hold:

* this was the first attempt (at most one retry per request);
* no byte of the response has been written to the client (status line included);
* the request body can be sent again: ollamon holds all of it in memory (bodies streamed through without
  being kept cannot be replayed);
* it is not a management call (pull, push, create, copy, delete, blobs: management.py);
* the host failed: a connect error, a timeout or reset before the response head, or a response status in
  ``RETRY_STATUSES`` read before anything went to the client;
* another host may take it (``exclude`` the failed one; with one host there is none, so a pool of one
  behaves exactly as a single upstream).

A 4xx is the client's own answer and is passed on; a stream cut after its first byte is recorded as cut.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from proxy.upstreams.errors import NoUpstreamError
from proxy.upstreams.host import Host, Outcome

if TYPE_CHECKING:
    from proxy.upstreams.pool import HostPool

__all__ = ["RETRY_STATUSES", "FailedBeforeFirstByte", "may_retry", "outcome_for_status", "send_with_retry"]

T = TypeVar("T")

# Ollama's own failures: runner error, cloud proxy failure, "server busy" (OLLAMA_MAX_QUEUE), gateway timeout.
RETRY_STATUSES = frozenset({500, 502, 503, 504})


class FailedBeforeFirstByte(Exception):
    """Raised by a ``send`` function: the host failed and nothing has reached the client yet.

    ``status`` is the host's answer when it answered (a 5xx), None for a connect error or timeout.
    ``answer`` carries that unread answer (e.g. the exchange and its head) so that, when no retry is
    possible, the caller relays the host's own bytes as it does today; ``dispose`` frees it when a retry
    makes it moot."""

    def __init__(
        self,
        reason: str,
        *,
        status: int | None = None,
        answer: Any = None,
        dispose: Callable[[], None] | None = None,
    ) -> None:
        self.reason = reason
        self.status = status
        self.answer = answer
        self.dispose = dispose
        super().__init__(reason)


def may_retry(
    *,
    attempt: int,
    client_bytes: int,
    replayable: bool,
    management: bool,
    status: int | None = None,
) -> bool:
    """The rule above for one failure; ``status`` None means no response head was read at all."""
    if attempt != 1 or client_bytes or not replayable or management:
        return False
    return status is None or status in RETRY_STATUSES


def outcome_for_status(status: int) -> Outcome:
    """A response head's verdict on the host's health: 5xx is a failure, anything else an answer."""
    return Outcome.FAILURE if status >= 500 else Outcome.OK


async def send_with_retry(
    pool: HostPool,
    model: str | None,
    send: Callable[[Host], Awaitable[T]],
    *,
    replayable: bool,
    management: bool = False,
) -> tuple[Host, T]:
    """Acquire a host and ``await send(host)``; on FailedBeforeFirstByte release it as failed and, when the
    rule allows, try once more on another host.

    ``send`` returns once the response may start flowing to the client. The returned host stays acquired:
    the caller releases it with ``pool.release(host, outcome)`` when the response has ended. If the last
    attempt fails, its FailedBeforeFirstByte propagates (the caller answers the client as today)."""
    host = pool.acquire(model)
    try:
        return host, await send(host)
    except FailedBeforeFirstByte as first:
        pool.release(host, Outcome.FAILURE)
        if not pool.settings.retry or not may_retry(
            attempt=1, client_bytes=0, replayable=replayable, management=management, status=first.status
        ):
            raise
        try:
            second = pool.acquire(model, exclude=(host,))
        except NoUpstreamError:
            raise first from None
        if first.dispose is not None:
            first.dispose()
        try:
            return second, await send(second)
        except FailedBeforeFirstByte:
            pool.release(second, Outcome.FAILURE)
            raise
        except BaseException:
            pool.release(second, Outcome.NEUTRAL)
            raise
    except BaseException:
        pool.release(host, Outcome.NEUTRAL)
        raise
