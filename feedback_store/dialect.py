"""The two engines the store runs on: the embedded DuckDB file (one writing process) and PostgreSQL (several app
processes writing at once). The modules issue one SQL text for both, in DuckDB's spelling (`?` placeholders);
what differs (connecting, placeholders, DDL type names, cross-process locks, Arrow reads) lives here."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import duckdb
import pyarrow as pa

from feedback_store.errors import StoreError

PG_SCHEMES = ("postgresql://", "postgres://")


def _psycopg() -> Any:
    """psycopg, or the one-line way to get it (it is an extra: the DuckDB store does not need it)."""
    try:
        import psycopg
    except ImportError:
        raise StoreError("a postgresql:// store needs psycopg 3: pip install 'kto-loop[postgres]'") from None
    return psycopg


def is_postgres(location: str | Path) -> bool:
    """Whether a store location is a PostgreSQL URL (else it is a DuckDB file path)."""
    return isinstance(location, str) and location.startswith(PG_SCHEMES)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def lock_key(*parts: str) -> int:
    """A signed 64-bit advisory-lock key for a tuple of strings: the first 8 bytes of their md5, which SQL can
    compute too (_SQL_RUN_KEY), so Python and PostgreSQL name the same lock."""
    digest = hashlib.md5("\x1f".join(parts).encode()).digest()[:8]
    return int.from_bytes(digest, "big", signed=True)


_SQL_RUN_KEY = "('x' || substr(md5('run' || chr(31) || id), 1, 16))::bit(64)::bigint"


class DuckDialect:
    """DuckDB: one process writes the file, so the in-process write lock is the only lock there is."""

    name = "duckdb"
    single_writer = True      # caches of rating rows and the start-up cleanup of cut-off runs rely on it
    errors: tuple[type[BaseException], ...] = (duckdb.Error,)
    rowid = "rowid"           # a row's physical id, cached so a change needs no read
    unheld_run = ""           # SQL: a 'running' run at start-up was cut off (no other process runs one)

    def ddl(self, stmt: str) -> str:
        return stmt

    def lock(self, conn: Any, keys: list[int]) -> None:
        """Nothing to do: the store's own lock already serializes every writer of the file."""

    @contextmanager
    def migrating(self, conn: Any) -> Iterator[None]:
        """Nothing to do: DuckDB lets one process open the file for writing."""
        yield

    def hold_run(self, conn: Any, run_id: str) -> None:
        """Nothing to do: a run still 'running' when the file is opened was cut off (only this process writes)."""

    def release_run(self, conn: Any, run_id: str) -> None:
        """See hold_run."""


class _PgResult:
    """A psycopg cursor read the way the modules read DuckDB results: a statement without rows (UPDATE) yields
    one row with its row count, as DuckDB's does."""

    def __init__(self, cur: Any):
        self._cur = cur
        self.description = cur.description

    def fetchone(self) -> tuple | None:
        return self._cur.fetchone() if self.description is not None else (self._cur.rowcount,)

    def fetchall(self) -> list[tuple]:
        return self._cur.fetchall() if self.description is not None else [(self._cur.rowcount,)]


class _PgRelation:
    """What DuckDB's conn.sql(...) gives the modules: a query whose result is read as one Arrow table."""

    def __init__(self, result: _PgResult):
        self._result = result

    def to_arrow_table(self) -> pa.Table:
        desc, rows = self._result.description, self._result.fetchall()
        cols = list(zip(*rows, strict=True)) if rows else [()] * len(desc)
        return pa.table({d.name: pa.array(list(col), _ARROW_TYPES.get(d.type_code))
                         for d, col in zip(desc, cols, strict=True)})


# psycopg type OIDs → the Arrow types DuckDB gives the same columns, so both engines' snapshots are identical
_ARROW_TYPES = {16: pa.bool_(), 20: pa.int64(), 21: pa.int64(), 23: pa.int64(), 25: pa.string(),
                701: pa.float64(), 1043: pa.string(), 1114: pa.timestamp("us")}
_SQL_TYPES = {pa.string(): "VARCHAR", pa.large_string(): "VARCHAR", pa.bool_(): "BOOLEAN", pa.int64(): "BIGINT",
              pa.float64(): "DOUBLE PRECISION", pa.timestamp("us"): "TIMESTAMP"}
_DOUBLE = re.compile(r"\bDOUBLE\b(?!\s+PRECISION)")
# DuckDB-only functions the shared SQL uses, in PostgreSQL's spelling
_REWRITES = ((re.compile(r"list_contains\(\?, (\w+)\)"), r"\1 = ANY(?)"),)


class PgConnection:
    """One autocommit psycopg connection with DuckDB's calling convention: execute(sql with `?`, params);
    transactions are the modules' own BEGIN/COMMIT statements; cursor() opens another connection (a reader).

    `reconnect=False`: a dropped connection raises instead of being replaced, for a connection whose session
    state is the point (the leader lease, lease.py: a silent new session would hold no lock). `connect_args`:
    extra libpq parameters (keepalives, application_name)."""

    def __init__(self, url: str, read_only: bool = False, *, reconnect: bool = True,
                 connect_args: dict[str, Any] | None = None):
        self._pg = _psycopg()
        self.url, self.read_only = url, read_only
        self.reconnect, self.connect_args = reconnect, dict(connect_args or {})
        self._in_tx = False
        self.session_locks: set[int] = set()     # advisory locks this connection holds (open runs)
        self._c = self._connect()

    def _connect(self) -> Any:
        extra = {"options": "-c default_transaction_read_only=on"} if self.read_only else {}
        conn = self._pg.connect(self.url, autocommit=True, **extra, **self.connect_args)
        for key in sorted(self.session_locks):    # a replaced connection takes its predecessor's locks again
            conn.execute("SELECT pg_advisory_lock(%s)", [key])
        return conn

    def execute(self, sql: str, params: list | tuple | None = None) -> _PgResult:
        for pattern, repl in _REWRITES:
            sql = pattern.sub(repl, sql)
        args = None
        if params:
            sql, args = sql.replace("%", "%%").replace("?", "%s"), list(params)
        verb = sql.lstrip()[:8].upper()
        if verb.startswith(("COMMIT", "ROLLBACK")):
            self._in_tx = False
        # the server restarted or dropped the connection: a BEGIN or a read outside a transaction has done nothing
        # yet and is retried once on a new connection; within a transaction the error goes to the caller
        retry = self.reconnect and not self._in_tx and verb.startswith(("BEGIN", "SELECT"))
        if retry and self._c.broken:
            self._c = self._connect()
        try:
            cur = self._c.cursor()
            cur.execute(sql, args)
        except self._pg.OperationalError:
            if not (retry and self._c.broken):
                raise
            self._c = self._connect()
            cur = self._c.cursor()
            cur.execute(sql, args)
        if verb.startswith("BEGIN"):
            self._in_tx = True
        return _PgResult(cur)

    def sql(self, sql: str, params: list | None = None) -> _PgRelation:
        return _PgRelation(self.execute(sql, params))

    def register(self, name: str, table: pa.Table) -> None:
        """DuckDB scans an Arrow table by name; here it becomes a temporary table of this connection."""
        cols = ", ".join(f'"{f.name}" {_SQL_TYPES[f.type]}' for f in table.schema)
        self.execute(f'CREATE TEMP TABLE "{name}" ({cols})')
        if table.num_rows:
            sel = ", ".join(f"unnest(?::{_SQL_TYPES[f.type]}[])" for f in table.schema)
            self.execute(f'INSERT INTO "{name}" SELECT {sel}', [c.to_pylist() for c in table.columns])

    def unregister(self, name: str) -> None:
        try:
            self.execute(f'DROP TABLE IF EXISTS "{name}"')
        except Exception:    # the transaction failed: its rollback removes the table, and its error is the one
            pass

    def cursor(self) -> PgConnection:
        return PgConnection(self.url, self.read_only)

    def interrupt(self) -> None:
        self._c.cancel_safe()

    def close(self) -> None:
        self._c.close()


class PgDialect(DuckDialect):
    """PostgreSQL: several processes write at once; advisory locks on the keys a transaction changes stand in for
    the single writer, and nothing is cached across transactions."""

    name = "postgres"
    single_writer = False
    rowid = "NULL::BIGINT"     # rows are found by their key (its index), never by a cached physical id
    unheld_run = f" AND pg_try_advisory_xact_lock({_SQL_RUN_KEY})"   # else another live process runs it

    def __init__(self) -> None:
        self.errors = (_psycopg().Error,)

    def ddl(self, stmt: str) -> str:
        return _DOUBLE.sub("DOUBLE PRECISION", stmt)

    def lock(self, conn: Any, keys: list[int]) -> None:
        """Transaction-scoped advisory locks, taken in key order so two writers never wait on each other in a
        circle; the rows behind them may not exist yet (a first rating), which row locks could not cover."""
        if keys:
            conn.execute("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(?::BIGINT[]) AS k",
                         [sorted(set(keys))])

    @contextmanager
    def migrating(self, conn: Any) -> Iterator[None]:
        """Processes starting together upgrade the schema one at a time (the next finds it done)."""
        conn.execute("SELECT pg_advisory_lock(?)", [lock_key("migrate")])
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(?)", [lock_key("migrate")])

    def hold_run(self, conn: Any, run_id: str) -> None:
        """A session lock while the run is open: the start-up cleanup of another process skips it, and it is
        released by finish_run or when this process's connection ends (a crash)."""
        conn.execute("SELECT pg_advisory_lock(?)", [lock_key("run", run_id)])
        conn.session_locks.add(lock_key("run", run_id))

    def release_run(self, conn: Any, run_id: str) -> None:
        conn.execute("SELECT pg_advisory_unlock(?)", [lock_key("run", run_id)])
        conn.session_locks.discard(lock_key("run", run_id))

    @contextmanager
    def snapshot_reader(self, url: str, timeout_s: float = 300.0) -> Iterator[Callable[[str, list, Path], None]]:
        """copy_out(select with {} placeholders, params, csv_path) on a connection of its own, every call in one
        REPEATABLE READ transaction (so the tables agree with each other): COPY ... TO STDOUT, streamed to the file.
        A statement running longer than `timeout_s` is cancelled by the server (a wedged copy ends)."""
        pg = _psycopg()
        with pg.connect(url, autocommit=True) as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            conn.execute("SET LOCAL DateStyle = 'ISO, YMD'")
            conn.execute(f"SET LOCAL statement_timeout = {max(1, int(timeout_s * 1000))}")

            def copy_out(select: str, params: list, path: Path) -> None:
                from psycopg import sql

                query = sql.SQL(select).format(*[sql.Literal(p) for p in params]) if params else sql.SQL(select)
                with conn.cursor().copy(sql.SQL("COPY ({}) TO STDOUT (FORMAT csv)").format(query)) as cp, \
                        open(path, "wb") as f:
                    for block in cp:
                        f.write(block)

            yield copy_out
            conn.execute("ROLLBACK")    # read only: nothing to commit (an error closes the connection instead)


def dialect_for(location: str | Path) -> DuckDialect:
    return PgDialect() if is_postgres(location) else DuckDialect()
