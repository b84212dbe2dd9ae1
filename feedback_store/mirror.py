"""A read-only DuckDB copy of a PostgreSQL store's ratings, runs and adapters, for the console's aggregates: DuckDB
scans those columns 7-16x faster at 1 M ratings (docs/experiments/2026-12-06-store-duckdb-vs-postgres.md), and
PostgreSQL is read once per refresh interval instead of on every console refresh of every open browser."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from feedback_store.store import FeedbackStore

log = logging.getLogger(__name__)

# what the dashboard reads: every column of these tables of the deployment (conversations, answers and the audit
# trail stay on PostgreSQL: the console's reading lists query them there, a page at a time)
TABLES = ("ratings", "runs", "adapters", "adapter_events")
MAX_LINE = 256 * 2**20     # the longest row the copy reads (DuckDB's CSV reader needs a bound)


def _columns(duck: Any, table: str) -> list[tuple[str, str]]:
    return duck.execute("SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = ? "
                        "AND database_name = current_database() ORDER BY column_index", [table]).fetchall()


def build(source: FeedbackStore, path: Path, timeout_s: float = 300.0) -> int:
    """Write `path`, a DuckDB file with the store's schema holding `TABLES` of the source's deployment as of one
    moment (one REPEATABLE READ transaction on PostgreSQL); returns the ratings copied. A table read that waits
    or runs longer than `timeout_s` (a lock held by someone else) fails it."""
    if source._dialect.name != "postgres":
        raise ValueError("a dashboard copy is made of a PostgreSQL store")
    path.unlink(missing_ok=True)
    target = FeedbackStore(path, source.deployment)     # the same migrations: the same schema as this code's
    try:
        duck = target._conn
        with source._dialect.snapshot_reader(source._conn.url, timeout_s) as copy_out:
            for table in TABLES:
                cols = _columns(duck, table)
                csv = path.with_suffix(f".{table}.csv")
                try:
                    copy_out(f"SELECT {', '.join(c for c, _ in cols)} FROM {table} WHERE deployment = {{}}",
                             [source.deployment], csv)
                    types = "{" + ", ".join(f"'{c}': '{t}'" for c, t in cols) + "}"
                    # PostgreSQL's CSV: NULL is an empty unquoted field, '' a quoted one; ISO timestamps; t/f. A
                    # run's metrics may be one long line (DuckDB's default limit is 2 MB)
                    duck.execute(f"INSERT INTO {table} SELECT * FROM read_csv(?, header = false, auto_detect = false,"
                                 f" columns = {types}, quote = '\"', escape = '\"', allow_quoted_nulls = false,"
                                 f" max_line_size = {MAX_LINE})", [str(csv)])
                finally:
                    csv.unlink(missing_ok=True)
        return int(duck.execute("SELECT count(*) FROM ratings").fetchone()[0])
    finally:
        target.close()


@dataclass(frozen=True)
class Copy:
    store: FeedbackStore     # read-only
    as_of: float             # time.time() when the copy began: nothing newer is in it
    seconds: float           # how long it took
    ratings: int


class DashboardCopy:
    """The store the console aggregates from: a DuckDB copy no older than `max_age_s` once a copy exists (refreshed
    in the background when a read finds it stale, so no reader waits on PostgreSQL), and the source itself before
    the first copy, or when copying fails for longer than 4 × `max_age_s`; a failed copy is retried an interval
    later, not on every read."""

    def __init__(self, source: FeedbackStore, folder: Path, max_age_s: float,
                 clock: Callable[[], float] = time.time):
        """`folder`: this object's own (its files are replaced and deleted); see own_folder."""
        self.source, self.folder, self.max_age_s, self._clock = source, Path(folder), max_age_s, clock
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob("dashboard-*.duckdb*"):
            old.unlink(missing_ok=True)
        self._lock = threading.Lock()
        self._current: Copy | None = None
        self._previous: Copy | None = None    # kept open one round: a reader may still be in it
        self._building: threading.Thread | None = None
        self._n = 0
        self.last_error: str | None = None
        self._failed_at: float | None = None
        self._closed = False

    @classmethod
    def own_folder(cls, source: FeedbackStore, parent: Path, max_age_s: float) -> DashboardCopy:
        """One in a new folder under `parent`, removed on close: app processes sharing a data directory each keep
        their own copy; the folders of processes that died without closing, untouched for a day, are removed."""
        parent.mkdir(parents=True, exist_ok=True)
        for old in parent.glob("copy-*"):
            files = list(old.iterdir()) if old.is_dir() else []
            if max((f.stat().st_mtime for f in files), default=old.stat().st_mtime) < time.time() - 86_400:
                shutil.rmtree(old, ignore_errors=True)
        return cls(source, Path(tempfile.mkdtemp(prefix="copy-", dir=parent)), max_age_s)

    def store(self) -> FeedbackStore:
        """The copy to read now (the source's share caps applied), starting a refresh if it is stale."""
        cur = self._current
        now = self._clock()
        retry = self._failed_at is None or now - self._failed_at >= self.max_age_s   # a failure waits an interval
        if (cur is None or now - cur.as_of >= self.max_age_s) and retry:
            self.refresh(wait=False)
        if cur is None or now - cur.as_of >= 4 * self.max_age_s:
            return self.source
        cur.store.set_share_caps(self.source.max_user_share, self.source.max_addr_share)
        return cur.store

    def as_of(self) -> float | None:
        """When the copy being read was taken (None: the console reads the source itself)."""
        cur = self._current
        return None if cur is None or self._clock() - cur.as_of >= 4 * self.max_age_s else cur.as_of

    def refresh(self, wait: bool = True) -> None:
        """Start a copy unless one is under way; `wait`: until it is done (its error, if any, raised)."""
        with self._lock:
            if self._closed:
                return
            if self._building is None or not self._building.is_alive():
                self._building = threading.Thread(target=self._build, name="dashboard-copy", daemon=True)
                self._building.start()
            worker = self._building
        if wait:
            worker.join()
            if self.last_error:
                raise RuntimeError(self.last_error)

    def _build(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._n += 1
        path = self.folder / f"dashboard-{self._n}.duckdb"
        t0, started = time.perf_counter(), self._clock()
        try:
            n = build(self.source, path, timeout_s=max(60.0, 10 * self.max_age_s))
            fresh = Copy(FeedbackStore(path, self.source.deployment, read_only=True), started,
                         round(time.perf_counter() - t0, 3), n)
        except Exception as e:    # the console keeps its last copy (or the source): a failed copy is only logged
            self.last_error, self._failed_at = f"{type(e).__name__}: {e}", self._clock()
            log.warning("dashboard copy of the feedback store failed: %s", self.last_error)
            path.unlink(missing_ok=True)
            return
        self.last_error = self._failed_at = None
        with self._lock:
            if self._closed:
                stale = fresh
            else:
                stale, self._previous, self._current = self._previous, self._current, fresh
        if stale is not None:
            stale.store.close()
            stale.store.path.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            worker, copies = self._building, [c for c in (self._current, self._previous) if c is not None]
            self._current = self._previous = None
        if worker is not None:
            worker.join(timeout=60)
        for c in copies:
            c.store.close()
            c.store.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.folder.rmdir()      # empty unless someone else put files there
