"""``ollamon db migrate --from sqlite:PATH --to postgresql://...``: move a SQLite history into PostgreSQL.

The copying is storage's (storage/postgres/from_sqlite.py: chunks, merged rollups, progress kept in the
target so a re-run resumes); this module parses the arguments, draws the progress on stderr and turns
Ctrl-C into a clean stop after the chunk being written.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from proxy.cli.source import CliError, command
from proxy.cli.terminal import format_table, visible
from storage.errors import StorageError
from storage.postgres.errors import PgOpenError, redact
from storage.postgres.from_sqlite import MigrateError, Progress, TableState, migrate

__all__ = ["Bar", "cmd_db_migrate", "register"]

_INTERRUPTED = 130  # as a shell reports a command ended by SIGINT


def _fmt_s(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Bar:
    """Per-table progress on ``stream``: redrawn in place on a terminal, else a line every ``every_s``."""

    def __init__(self, stream: TextIO, *, tty: bool | None = None, every_s: float = 5.0) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.every_s = every_s
        self._last: dict[str, float] = {}

    def line(self, s: TableState) -> str:
        elapsed = max(time.monotonic() - s.started, 1e-6)
        rate = s.copied / elapsed
        left = s.total - s.done
        eta = "done" if s.finished or left <= 0 else (f"ETA {_fmt_s(left / rate)}" if rate > 0 else "ETA ?")
        share = s.done / s.total if s.total else 1.0
        filled = int(share * 20)
        bar = "#" * filled + "." * (20 - filled)
        return f"{s.table:<18} [{bar}] {s.done:>11,}/{s.total:,} {rate:>9,.0f} rows/s {eta}"

    def __call__(self, s: TableState) -> None:
        now = time.monotonic()
        if self.tty:
            self.stream.write(f"\r{self.line(s)}\x1b[K" + ("\n" if s.finished else ""))
            self.stream.flush()
            return
        last = self._last.setdefault(s.table, now)  # a table's first line comes after every_s, or at its end
        if s.finished or now - last >= self.every_s:
            self._last[s.table] = now
            print(self.line(s), file=self.stream, flush=True)

    def end_line(self) -> None:
        """Leave the line being redrawn (a stop in the middle of a table)."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _source(value: str) -> Path:
    path = value.removeprefix("sqlite:")
    if path.startswith("//"):  # sqlite:///abs/path, as SQLAlchemy writes it
        path = path[2:]
    if not path:
        raise CliError("--from: expected sqlite:PATH (a SQLite database file)", 2)
    return Path(path)


def _target(value: str) -> str:
    if not value.startswith(("postgresql://", "postgres://")):
        raise CliError(f"--to: expected a postgresql:// URL, not {redact(value)!r}", 2)
    return value


async def _main(args: argparse.Namespace, path: Path, url: str, bar: Bar) -> Progress:
    stop = {"asked": False}
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def on_sigint() -> None:
        if stop["asked"] and task is not None:  # a second Ctrl-C: the chunk's transaction rolls back
            task.cancel()
            return
        stop["asked"] = True
        bar.end_line()
        print("ollamon: stopping after the chunk being written (Ctrl-C again to abandon it)", file=sys.stderr)

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        return await migrate(
            path, url, chunk=args.chunk, dry_run=args.dry_run, on_chunk=None if args.dry_run else bar,
            should_stop=lambda: stop["asked"],
        )  # fmt: skip
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def cmd_db_migrate(args: argparse.Namespace) -> int:
    path, url = _source(args.source), _target(args.target)
    if args.chunk < 1:
        raise CliError(f"--chunk: must be at least 1, not {args.chunk}", 2)
    bar = Bar(sys.stderr)
    started = time.monotonic()
    try:
        result = asyncio.run(_main(args, path, url, bar))
    except MigrateError as exc:
        if exc.bad_input:
            raise CliError(str(exc), 2) from exc
        raise CliError(f"migration failed: {exc} (what was copied stays; the same command resumes)") from exc
    except PgOpenError as exc:
        raise CliError(f"--to: {exc}") from exc
    except StorageError as exc:
        raise CliError(f"migration failed: {exc} (what was copied stays; the same command resumes)") from exc
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("ollamon: abandoned; run the same command again to resume", file=sys.stderr)
        return _INTERRUPTED
    where = f"{visible(str(path))} -> {redact(url)}"
    if args.dry_run:
        rows = [[t.table, t.total - t.done, t.done] for t in result.tables.values()]
        print(format_table(["table", "to copy", "copied before"], rows))
        left = sum(t.total - t.done for t in result.tables.values())
        print(f"dry run: {left:,} rows to copy from {where}; nothing written")
        return 0
    took = time.monotonic() - started
    if result.stopped:
        bar.end_line()
        print(
            f"ollamon: stopped after {result.copied:,} rows; run the same command again to resume",
            file=sys.stderr,
        )
        return _INTERRUPTED
    note = (
        f"; not copied (no such table in PostgreSQL): {', '.join(result.skipped)}" if result.skipped else ""
    )
    print(
        f"migrated {result.copied:,} rows in {len(result.tables)} tables from {where} in {took:.1f} s "
        f"({result.copied / max(took, 1e-6):,.0f} rows/s){note}"
    )
    return 0


def register(dbsub: Any) -> None:
    """Add ``migrate`` to the ``ollamon db`` subcommands."""
    p = dbsub.add_parser(
        "migrate", help="copy a SQLite database's history into PostgreSQL (resumable, merges rollups)"
    )
    p.add_argument("--from", dest="source", required=True, metavar="sqlite:PATH", help="the SQLite file")
    p.add_argument("--to", dest="target", required=True, metavar="URL", help="postgresql://user@host/db")
    p.add_argument("--chunk", type=int, default=5000, help="rows per transaction (default 5000)")
    p.add_argument("--dry-run", action="store_true", help="only count the rows to copy; write nothing")
    p.set_defaults(func=command(cmd_db_migrate))
