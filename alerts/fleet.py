"""What the alert lease holder sees of a fleet's requests: its own batches, plus the other instances' rows.

With several instances on one database, only the holder of the alert lease evaluates (storage/lease.py),
but its windows must count every instance's requests. Its own arrive at once through the writer's listener
(``AlertEngine.offer``); the others' it reads from the shared store every interval: the requests that
started since the previous read, less ``overlap_s``, because a request is recorded when it ends and is
stamped with its start (a request up to ``overlap_s`` long, plus the other writer's flush delay, is seen).
A request read twice, or read after being offered, is counted once: ids seen are remembered for as long as
a read can return them again.
"""

from __future__ import annotations

from collections.abc import Iterable

from alerts.store import AlertStore
from storage.records import InferenceRecord

__all__ = ["OVERLAP_S", "FleetFeed"]

# How far before the previous read each read starts: the longest request another instance's row is still
# counted for (ollamon records a request when it ends, stamped with its start).
OVERLAP_S = 300.0


class FleetFeed:
    """De-duplicates by request id what ``offer`` and the store reads bring; ``reset`` at each new tenure."""

    def __init__(self, store: AlertStore, *, horizon_s: float, overlap_s: float = OVERLAP_S) -> None:
        self.store = store
        self.horizon_s = horizon_s
        self.overlap_s = overlap_s
        self.watermark: float | None = None  # the start of the previous read (Unix seconds)
        self._seen: dict[str, float] = {}  # request id -> when it was counted
        self.read_rows = 0  # rows the store returned (figures for health and tests)
        self.counted = 0  # of which were new

    def reset(self, now: float) -> None:
        """Forget everything: a new tenure starts with a full restore up to ``now``."""
        self._seen.clear()
        self.watermark = now

    def remember(self, request_id: str, at: float) -> bool:
        """Count ``request_id`` now: False when it was already counted (an empty id always counts)."""
        if not request_id:
            return True
        if request_id in self._seen:
            return False
        self._seen[request_id] = at
        return True

    def fresh(self, records: Iterable[object], at: float) -> list[InferenceRecord]:
        """The inference records of an offered batch not counted yet, now remembered."""
        return [r for r in records if isinstance(r, InferenceRecord) and self.remember(r.request_id, at)]

    async def poll(self, now: float) -> list[tuple[float, InferenceRecord]]:
        """Rows stored since the previous read (less the overlap) not counted yet, with their finish time;
        raises ``AlertStoreError`` (the watermark then stays, so the next read covers this one's rows)."""
        since = (now if self.watermark is None else self.watermark) - self.overlap_s
        rows = await self.store.requests_started_since(since)
        self.watermark = now
        self.read_rows += len(rows)
        out = [
            (at, rec) for at, rec in rows if at >= now - self.horizon_s and self.remember(rec.request_id, at)
        ]
        self.counted += len(out)
        self._prune(now)
        return out

    def _prune(self, now: float) -> None:
        # A read returns rows started since (previous read - overlap); a row's count time is at or after
        # its start, so what was counted before that (with a wide margin) cannot come back.
        oldest = now - 2 * self.overlap_s - self.horizon_s
        if len(self._seen) > 1024 and min(self._seen.values()) < oldest:
            self._seen = {k: v for k, v in self._seen.items() if v >= oldest}

    def stats(self) -> dict[str, int]:
        return {"read_rows": self.read_rows, "counted": self.counted, "remembered": len(self._seen)}
