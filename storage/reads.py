"""Every read of the database, by name: the one door the API, the CLI and the alert engine read through.

``Reads(where)`` reads the SQLite file at ``where`` or, for a ``postgresql://`` URL, the PostgreSQL database.
On SQLite it opens a fresh read-only connection per call (WAL lets it read beside the writer; a long summary
holds no lock the writer waits for) and closes it after; on PostgreSQL it borrows a connection from a small
pool (storage/postgres/sync_conn.py, which also lets the same SQL run there). The methods are synchronous,
so the CLI calls them directly and the event loop calls them on a worker thread (``asyncio.to_thread``). The
queries themselves live in storage/queries.py, storage/browse.py, storage/alerts.py and
storage/system_reads.py, written once for both backends; here they get their connection and their errors:
any database error becomes ``StoreReadError`` naming the file or the (password-less) URL, so no caller needs
to know which database it is (docs/storage.md, "The storage interface").
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from storage import alerts as alert_sql
from storage import browse, content_reads, conversation_reads, queries, system_reads
from storage.errors import StoreReadError
from storage.postgres.db_stats import db_stats as pg_db_stats
from storage.postgres.errors import redact
from storage.postgres.sync_conn import PgSource, ReadErrors
from storage.queries import Filters

__all__ = ["Reads", "is_postgres_url"]

T = TypeVar("T")


def is_postgres_url(where: str | Path) -> bool:
    """True for a ``postgresql://`` (or ``postgres://``) URL, False for a path or ``sqlite:PATH``."""
    return isinstance(where, str) and where.startswith(("postgresql://", "postgres://"))


def _describe(exc: BaseException) -> str:
    # PostgreSQL's PgReadError already names the driver's error; sqlite3's is named here.
    return str(exc) if isinstance(exc, ReadErrors) else f"{type(exc).__name__}: {exc}"


class Reads:
    """Named read queries over the SQLite file or PostgreSQL database at ``where``."""

    def __init__(self, where: str | Path, *, busy_timeout_ms: int = 5000) -> None:
        self.busy_timeout_ms = busy_timeout_ms
        self._pg_url: str | None = None
        if is_postgres_url(where):
            self._pg_url = str(where)
            self.path: Path | str = redact(self._pg_url)
        else:
            text = str(where)
            self.path = Path(text.removeprefix("sqlite:") if text.startswith("sqlite:") else where)

    @property
    def postgres(self) -> bool:
        return self._pg_url is not None

    def _connect(self) -> sqlite3.Connection:
        # as_uri() escapes what a path may hold ('?', '#', '%', spaces); mode=ro never creates the file.
        uri = Path(self.path).resolve().as_uri() + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout_ms / 1000, check_same_thread=False)
        conn.execute("PRAGMA query_only=ON")
        return conn

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """A connection for one call; errors while opening or using it become ``StoreReadError``."""
        if self._pg_url is not None:
            # Looked up on every call: the source of a closed store's URL is made anew, not reused closed.
            with PgSource.for_url(self._pg_url).connection() as pg:
                try:
                    yield pg
                except ReadErrors as exc:
                    raise StoreReadError(f"{self.path}: {_describe(exc)}") from exc
            return
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            raise StoreReadError(f"{self.path}: cannot open the database: {exc}") from exc
        try:
            yield conn
        except sqlite3.Error as exc:
            raise StoreReadError(f"{self.path}: {_describe(exc)}") from exc
        finally:
            conn.close()

    def _call(self, fn: Callable[[Any], T]) -> T:
        with self._connection() as conn:
            return fn(conn)

    # -- conversations and content (storage/conversation_reads.py, storage/content_reads.py) -------

    def conversations(
        self, since: float, until: float, model: str | None = None, limit: int = 100
    ) -> dict[str, Any]:
        """Conversations active in [since, until), newest first, with the cache-reuse estimate per model."""
        return self._call(
            lambda c: {
                "conversations": conversation_reads.list_conversations(c, since, until, model, limit),
                "cache_reuse_by_model": conversation_reads.cache_reuse_by_model(c, since, until),
            }
        )

    def conversation(self, conversation_id: str) -> dict[str, Any] | None:
        """One conversation's turns in order, or None."""
        return self._call(lambda c: conversation_reads.conversation(c, conversation_id))

    def content_summary(self, since: float, until: float, by: str | None = None) -> dict[str, Any]:
        """Content-analysis rates over [since, until), overall or per model/key/user."""
        return self._call(lambda c: content_reads.content_summary(c, since, until, by))

    # -- analytics (storage/queries.py) ----------------------------------------------------------

    def summary(
        self,
        since: float,
        until: float,
        filters: Filters | None = None,
        *,
        exact: bool | None = None,
        per_model: bool = True,
        by: str | None = None,
    ) -> dict[str, Any]:
        """Figures over [since, until), overall and per model, or per ``by`` (``queries.summary``)."""
        return self._call(
            lambda c: queries.summary(c, since, until, filters, exact=exact, per_model=per_model, by=by)
        )

    def timeseries(
        self,
        since: float,
        until: float,
        bucket: str,
        metrics: Sequence[str],
        filters: Filters | None = None,
        *,
        exact: bool = False,
    ) -> dict[str, Any]:
        """Figures per bucket (``queries.timeseries``)."""
        return self._call(
            lambda c: queries.timeseries(c, since, until, bucket, metrics, filters, exact=exact)
        )

    # -- rows (storage/browse.py) ----------------------------------------------------------------

    def recent_requests(self, q: browse.RequestQuery) -> dict[str, Any]:
        """A page of requests, newest first, with the next page's cursor."""
        return self._call(lambda c: browse.recent_requests(c, q))

    def request_detail(self, request_id: str) -> dict[str, Any] | None:
        """One request with its errors and stored text; None when unknown."""
        return self._call(lambda c: browse.request_detail(c, request_id))

    def errors(self, since: float, until: float, model: str | None = None, limit: int = 50) -> dict[str, Any]:
        """Errors in the window, grouped, and the newest ones."""
        return self._call(lambda c: browse.errors(c, since, until, model, limit))

    def db_stats(self) -> dict[str, Any]:
        """Rows per table, file and WAL size, pages, oldest/newest records, last retention run."""
        if self._pg_url is not None:
            return self._call(lambda c: pg_db_stats(c, str(self.path)))
        return self._call(lambda c: browse.db_stats(c, Path(self.path)))

    @contextmanager
    def export_rows(self, table: str, since: float, until: float) -> Iterator[Iterator[Sequence[Any]]]:
        """``with reads.export_rows(t, since, until) as rows``: the column names, then every row of ``table``
        in the window in insertion order, read in chunks (constant memory). ``QueryError("table")`` when
        ``table`` is not a table with a timestamp column."""
        with self._connection() as conn:
            rows = system_reads.export_rows(conn, table, since, until)
            errors = ReadErrors if self._pg_url is not None else (sqlite3.Error,)

            def guarded() -> Iterator[Sequence[Any]]:
                try:
                    yield from rows
                except errors as exc:
                    raise StoreReadError(f"{self.path}: {_describe(exc)}") from exc

            try:
                yield guarded()
            finally:
                close = getattr(rows, "close", None)  # a generator: ends PostgreSQL's cursor transaction now,
                if close is not None:  # while the connection is still ours, not at garbage collection
                    close()

    # -- resources (storage/system_reads.py) -----------------------------------------------------

    def system_history(self, since_iso: str) -> list[dict[str, Any]]:
        """Stored system samples since ``since_iso``, oldest first, each with its ``gpus`` rows."""
        return self._call(lambda c: system_reads.system_history(c, since_iso))

    def latest_system(self) -> dict[str, Any] | None:
        """The newest system sample with the newest GPU rows (``gpus``); None when there is none."""
        return self._call(system_reads.latest_system)

    # -- alerts (storage/alerts.py) --------------------------------------------------------------

    def alerts(self, state: str = "all", limit: int = 100) -> list[dict[str, Any]]:
        """Alerts in ``state`` (firing, pending, resolved, open, all), newest first."""
        return self._call(lambda c: alert_sql.list_alerts(c, state, limit))

    def alert(self, alert_id: int) -> dict[str, Any] | None:
        """One alert with its transitions."""
        return self._call(lambda c: alert_sql.get_alert(c, alert_id))

    def open_alerts(self) -> list[dict[str, Any]]:
        """Pending and firing alerts, oldest first."""
        return self._call(alert_sql.open_alerts)

    def last_announced(self) -> dict[tuple[str, str], str]:
        """When each (rule, fingerprint) was last announced firing."""
        return self._call(alert_sql.last_announced)

    def requests_since(self, since_iso: str) -> list[dict[str, Any]]:
        """The fields the alert windows need of every request started since ``since_iso``."""
        return self._call(lambda c: alert_sql.requests_since(c, since_iso))
