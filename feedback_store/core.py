"""The store's plumbing: one DuckDB connection under one write lock, a read cursor per thread, strictly increasing
timestamps, and the input checks every part shares."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

import duckdb

from feedback_store.dialect import PgConnection, dialect_for, is_postgres, lock_key, redact
from feedback_store.errors import (
    CorruptStore,
    InvalidInput,
    ReadOnlyStore,
    SchemaError,
    StorageFull,
    StoreError,
    StoreLocked,
    StoreWriteError,
)
from feedback_store.schema import SCHEMA_VERSION, file_version, migrate

BASE = "base"

# writable stores open per file in this process: DuckDB shares one database between them, so the rows another
# store writes are invisible to this one's rating cache; with two or more open, nobody trusts the cache
_WRITERS: dict[str, int] = {}
_WRITERS_LOCK = threading.Lock()
MAX_ID = 256


def utcnow() -> datetime:
    """Naive UTC, the form every TIMESTAMP column holds."""
    return datetime.now(UTC).replace(tzinfo=None)


def _new_id() -> str:
    return uuid.uuid4().hex


def _naive_utc(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo is not None else t


def _check_str(name: str, value: Any, max_len: int = MAX_ID, *, optional: bool = False,
               error: type[StoreError] = InvalidInput) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        raise error(f"{name} must be a non-empty string, got {value!r}")
    if len(value) > max_len:
        raise error(f"{name} is longer than {max_len} characters")


# what the OS says when a write does not fit: ENOSPC (disk full), EFBIG (file-size limit), EDQUOT (quota)
_FULL = ("no space left on device", "file too large", "disk quota exceeded", "not enough space")


def write_error(path: Path, e: duckdb.Error) -> StoreWriteError:
    """The typed error for a failed write, so the caller can tell the user what happened ("disk full")."""
    text = str(e)
    if any(s in text.lower() for s in _FULL):
        return StorageFull(f"the disk holding the feedback database ({path}) is full: nothing was saved "
                           f"({text.splitlines()[0]})")
    return StoreWriteError(f"the feedback database ({path}) could not be written: {type(e).__name__}: "
                           f"{text.splitlines()[0] if text else ''}")


def damaged(e: duckdb.Error) -> bool:
    """Whether DuckDB's error says the file itself is unreadable (bad header, checksum, short read)."""
    text = str(e).lower()
    return any(s in text for s in ("not a valid duckdb database file", "corrupt database file", "checksum",
                                   "could not read enough bytes"))


def read_every_block(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Read every column of every table (DuckDB verifies each block's checksum on read), so damage anywhere in
    the file shows now, as one clear error, instead of later in whichever query touches it; row counts per table."""
    tables = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = "
                                        "current_database() ORDER BY 1").fetchall()]
    counts = {}
    for t in tables:
        cols = [r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = ? "
                                          "AND database_name = current_database()", [t]).fetchall()]
        reads = ", ".join(f'max(length("{c}"::VARCHAR))' for c in cols)
        counts[t] = con.execute(f'SELECT count(*), {reads} FROM "{t}"').fetchone()[0]
    return counts


def rollback(conn: duckdb.DuckDBPyConnection) -> None:
    """ROLLBACK after a failure; a failed COMMIT has already ended the transaction, and its error is the one
    that matters, so "no transaction is active" here must never replace it."""
    try:
        conn.execute("ROLLBACK")
    except Exception:
        pass


class StoreCore:
    """The connection, its lock and the per-thread read cursors that every part of FeedbackStore goes through.

    `path`: a DuckDB file, or a `postgresql://` URL (dialect.py): then several processes may write at once."""

    def __init__(self, path: str | Path, deployment: str = "default", *, read_only: bool = False,
                 clock: Callable[[], datetime] = utcnow, backup_dir: str | Path | None = None,
                 verify: bool = False):
        _check_str("deployment", deployment)
        self._dialect = dialect_for(path)
        self._errors = self._dialect.errors
        if is_postgres(path):
            self._open_postgres(str(path), deployment, read_only, clock)
            return
        self.path = Path(path)
        self.deployment = deployment
        self.read_only = read_only
        self._clock = clock
        self._last_ts = datetime.min
        self._backup_dir = backup_dir     # named in the error when the file turns out damaged
        if read_only and not self.path.exists():
            raise StoreError(f"no feedback database at {self.path}")
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.IOException as e:
            if "lock" in str(e).lower():
                raise StoreLocked(f"{self.path} is in use by another process (is the kto-loop app running?); "
                                  "DuckDB allows one process to open it for writing") from None
            if damaged(e):
                raise self._corrupt(e) from None
            raise StoreError(f"cannot open {self.path}: {e}") from None
        except duckdb.Error as e:
            if damaged(e):
                raise self._corrupt(e) from None
            raise StoreError(f"cannot open {self.path}: {e}") from None
        self._lock = threading.Lock()          # guards self._conn: every write, and cursor creation
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self._closed = False
        try:
            if verify:       # the app at start-up: a damaged file stops it here, with the way back in the message
                read_every_block(self._conn)
            if read_only:
                self._check_version()
            else:
                self.migrated_from, _ = migrate(self._conn, self._now)
                # only this process writes the file: a run still 'running' was cut off by a crash or restart
                self._close_cut_off_runs()
        except BaseException as e:
            self._conn.close()
            if isinstance(e, duckdb.Error) and damaged(e):
                raise self._corrupt(e) from None
            raise
        self._key = str(self.path.resolve())
        if not read_only:
            with _WRITERS_LOCK:
                _WRITERS[self._key] = _WRITERS.get(self._key, 0) + 1

    def _check_version(self) -> None:
        """A read-only store cannot migrate: its schema must be this code's."""
        version = file_version(self._conn)
        if version != SCHEMA_VERSION:
            raise SchemaError(f"{self.path} has schema version {version}, this code needs "
                              f"{SCHEMA_VERSION}; open it once read-write (start the app) to upgrade")

    def _open_postgres(self, url: str, deployment: str, read_only: bool, clock: Callable[[], datetime]) -> None:
        """The same store on a PostgreSQL database: no file, no cross-process cache, migrations one at a time."""
        self.path = redact(url)        # named in messages: never the password
        self.deployment, self.read_only, self._clock = deployment, read_only, clock
        self._last_ts = datetime.min
        self._backup_dir = None
        try:
            self._conn = PgConnection(url, read_only)
        except self._errors as e:
            raise StoreError(f"cannot connect to {self.path}: {str(e).strip().splitlines()[0]}") from None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._cursors = []
        self._closed = False
        self._key = None
        try:
            if read_only:
                self._check_version()
            else:
                with self._dialect.migrating(self._conn):
                    self.migrated_from, _ = migrate(self._conn, self._now, ddl=self._dialect.ddl)
                self._close_cut_off_runs()
        except BaseException:
            self._conn.close()
            raise

    def _close_cut_off_runs(self, conn: Any = None, why: str = "the app stopped during the run") -> int:
        """A run still 'running' at start-up was cut off by a crash or restart (on PostgreSQL: unless another live
        process holds it); how many were closed. `conn`: another connection than the store's own, which holds the
        locks of this process's open runs (so they would pass as nobody's); the leader lease passes its own."""
        return int((conn or self._conn).execute(
            "UPDATE runs SET status = 'failed', finished_at = ?, error = ? WHERE status = 'running' "
            f"AND deployment = ?{self._dialect.unheld_run}",
            [self._now(), f"interrupted: {why}", self.deployment]).fetchone()[0])

    def _corrupt(self, e: duckdb.Error) -> CorruptStore:
        from feedback_store.backup import corrupt_message, default_backup_dir
        d = Path(self._backup_dir) if self._backup_dir is not None else default_backup_dir(self.path)
        return CorruptStore(corrupt_message(self.path, str(e).splitlines()[0], d))

    def _db_error(self, e: duckdb.Error) -> StoreError:
        """The typed error for a failed statement: a damaged file, a full disk, or another refused write."""
        return self._corrupt(e) if damaged(e) and self._dialect.single_writer else write_error(self.path, e)

    def _now(self) -> datetime:
        """Strictly increasing per store, so creation order is also time order."""
        t = _naive_utc(self._clock())
        if t <= self._last_ts:
            t = self._last_ts + timedelta(microseconds=1)
        self._last_ts = t
        return t

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        cur = getattr(self._local, "cursor", None)
        if cur is None:
            if self._closed:
                raise StoreError("the feedback store is closed")
            with self._lock:
                cur = self._conn.cursor()
                self._cursors.append(cur)
            self._local.cursor = cur
        return cur

    def _read(self, sql: str, params: list | None = None) -> list[tuple]:
        try:
            return self._cursor().execute(sql, params or []).fetchall()
        except self._errors as e:
            raise (self._corrupt(e) if damaged(e) and self._dialect.single_writer else e) from None

    def _read_dicts(self, sql: str, params: list | None = None) -> list[dict]:
        try:
            cur = self._cursor().execute(sql, params or [])
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        except self._errors as e:
            raise (self._corrupt(e) if damaged(e) and self._dialect.single_writer else e) from None

    @contextmanager
    def _tx(self, *locks: str) -> Iterator[duckdb.DuckDBPyConnection]:
        """One write transaction on the shared connection: all of it commits or none of it does. `locks`: names
        that writers in other processes must not hold at the same time (a check-then-insert), on PostgreSQL."""
        if self.read_only:
            raise ReadOnlyStore(f"{self.path} is open read-only")
        with self._lock:
            if self._closed:
                raise StoreError("the feedback store is closed")
            self._conn.execute("BEGIN TRANSACTION")
            try:
                self._dialect.lock(self._conn, [lock_key(self.deployment, k) for k in locks])
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException as e:
                rollback(self._conn)
                if isinstance(e, self._errors):
                    raise self._db_error(e) from e
                raise

    def close(self) -> None:
        """Closes the read cursors and the file; a second call does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self.read_only and self._key is not None:
                with _WRITERS_LOCK:
                    _WRITERS[self._key] -= 1
            pending = list(self._cursors)
            deadline = time.monotonic() + 5.0
            while True:
                for cur in list(pending):
                    try:
                        cur.close()
                        pending.remove(cur)
                    except self._errors:  # a reader thread is mid-query at shutdown: stop it, then close again
                        cur.interrupt()
                try:
                    self._conn.close()
                    return
                except self._errors:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def schema_version(self) -> int:
        return int(self._read("SELECT max(version) FROM schema_version")[0][0])
