"""Ratings with group commit: one leader commits every queued rating in one transaction, since each DuckDB commit
fdatasyncs the WAL and would cap a process at a few hundred ratings a second.

rate() and rate_many() return after their COMMIT; rate_async() returns a Future resolved at it. As the file's only
writer, the store caches the ratings of recently used answers, so a batch of new ratings is one INSERT, no read.
Measured: docs/experiments/2026-11-23-feedback-store-throughput.md.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import duckdb

from feedback_store.core import _WRITERS, StoreCore, _check_str, _new_id, rollback
from feedback_store.dialect import lock_key
from feedback_store.errors import InvalidRating, ReadOnlyStore, StoreError, UnknownAnswer, WrongDeployment

RATING_VALUES = ("up", "down", None)
MAX_REASON, MAX_COMMENT = 200, 4000

_RATING_COLUMNS = tuple((n, "VARCHAR") for n in ("answer_id", "user_id", "id", "deployment", "adapter", "value",
                                                "reason", "comment")) + (("created_at", "TIMESTAMP"),
                                                                         ("updated_at", "TIMESTAMP"),
                                                                         ("audited", "BOOLEAN"),
                                                                         ("client_addr", "VARCHAR"))
_EVENT_COLUMNS = tuple((n, "VARCHAR") for n in ("id", "rating_id", "deployment", "answer_id", "user_id", "value",
                                               "reason", "comment")) + (("event_at", "TIMESTAMP"),
                                                                        ("client_addr", "VARCHAR"))


@dataclass(frozen=True)
class RateResult:
    """rating_id is stable per (user, answer); None when withdrawing a rating that never existed."""
    rating_id: str | None
    value: str | None
    changed: bool


@dataclass
class _Item:
    user_id: str
    answer_id: str
    value: str | None
    reason: str | None
    comment: str | None
    client_addr: str | None = None   # where the rating came from: the per-address share cap groups by it
    adapter: str = ""          # filled from the answer when the batch is validated


@dataclass
class _Pending:
    items: list[_Item]
    done: bool = False
    results: list[RateResult] = field(default_factory=list)
    error: BaseException | None = None
    future: Future | None = None   # rate_async: resolved after the commit (or the failure) of this request


class _StaleCache(Exception):
    """A cached row id no longer matched its row; the batch is rolled back and redone with a fresh read."""


class Ratings(StoreCore):
    """rate / rate_async / rate_many through the group-commit engine, and the rating caches it relies on."""

    gather_s = 0.002   # the longest a group-commit leader waits for more ratings (0: never wait)
    max_pending = 10_000   # rate_async blocks while this many ratings wait for a commit

    def __init__(self, *args: Any, answer_cache_size: int = 50_000, **kwargs: Any):
        self._queue: list[_Pending] = []       # ratings waiting for the next group commit
        mutex = threading.Lock()               # guards _queue, _leading, _last_released
        self._queue_cv = threading.Condition(mutex)     # followers sleep on it until their batch committed
        self._arrival_cv = threading.Condition(mutex)   # a gathering leader sleeps on it
        self._leading = False                  # a thread is committing a batch right now
        self._last_released = 0                # callers the last commit released (they often rate again)
        self._answers: OrderedDict[str, tuple[str, str]] = OrderedDict()   # id -> (deployment, adapter)
        self._answer_cache_size = answer_cache_size
        # answer id -> {user_id: [rating id, value, reason, comment, rowid or None, created_at, audited,
        # client_addr]}: every rating of that answer
        # (exact because this process is the only writer; changed only under self._lock, after a COMMIT)
        self._rated: OrderedDict[str, dict[str, list]] = OrderedDict()
        self._queued_items = 0                 # ratings in self._queue (rate_async blocks above max_pending)
        self._committer: threading.Thread | None = None
        self._inflight: list[_Pending] = []    # the batch being committed now
        self._stopping = False
        super().__init__(*args, **kwargs)

    def close(self) -> None:
        """Commits the ratings rate_async still has queued, then closes the file."""
        self.flush()
        with self._queue_cv:
            self._stopping = True
            self._arrival_cv.notify_all()
        if self._committer is not None:
            self._committer.join()
        with self._queue_cv:            # raced in after the flush: refused, never silently dropped
            for p in self._queue:
                if p.future is not None and not p.future.done():
                    p.future.set_exception(StoreError("the feedback store is closed"))
        super().close()

    def _remember_answer(self, ans_id: str, deployment: str, adapter: str) -> None:
        """Under self._lock. Answers never change, so the cache is never stale."""
        self._answers[ans_id] = (deployment, adapter)
        if len(self._answers) > self._answer_cache_size:
            self._answers.popitem(last=False)

    def _remember_ratings(self, ans_id: str, rows: dict[str, list]) -> None:
        """Under self._lock, after a COMMIT: `rows` is now every rating of the answer."""
        self._rated[ans_id] = rows
        self._rated.move_to_end(ans_id)
        if len(self._rated) > self._answer_cache_size:
            self._rated.popitem(last=False)

    def rate(self, user_id: str, answer_id: str, value: str | None, reason: str | None = None,
             comment: str | None = None, client_addr: str | None = None) -> RateResult:
        """Set the user's current rating of an answer ("up", "down", or None = withdraw). Idempotent: the same
        value again changes nothing (reason/comment None keep the stored ones). Durable when it returns.
        client_addr: the rater's network address, recorded with each change (None: unknown)."""
        return self._submit([self._item(user_id, answer_id, value, reason, comment, client_addr)])[0]

    def rate_many(self, items: Iterable[tuple | dict]) -> list[RateResult]:
        """Several ratings in one transaction (all or none), applied in order; items are (user_id, answer_id,
        value[, reason[, comment[, client_addr]]]) tuples or dicts with those keys."""
        parsed = [self._item(**it) if isinstance(it, dict) else self._item(*it) for it in items]
        return self._submit(parsed) if parsed else []

    @staticmethod
    def _item(user_id: str, answer_id: str, value: str | None, reason: str | None = None,
              comment: str | None = None, client_addr: str | None = None) -> _Item:
        _check_str("user_id", user_id, error=InvalidRating)
        if not isinstance(answer_id, str) or not answer_id:
            raise UnknownAnswer(f"unknown answer {answer_id!r}")
        if value not in RATING_VALUES or not (value is None or isinstance(value, str)):
            raise InvalidRating(f"rating value must be 'up', 'down' or None (withdraw), got {value!r}")
        _check_str("reason", reason, MAX_REASON, optional=True, error=InvalidRating)
        if comment is not None and (not isinstance(comment, str) or len(comment) > MAX_COMMENT):
            raise InvalidRating(f"comment must be a string of at most {MAX_COMMENT} characters")
        _check_str("client_addr", client_addr, optional=True, error=InvalidRating)
        return _Item(user_id, answer_id, value, reason, comment, client_addr)

    def rate_async(self, user_id: str, answer_id: str, value: str | None, reason: str | None = None,
                   comment: str | None = None, client_addr: str | None = None) -> Future:
        """rate() without waiting: returns a Future of the RateResult, resolved by a background committer only
        after the COMMIT that made the rating durable (or failed with the typed error rate() would raise). A
        malformed value raises here, at once. Ratings of one caller are applied in the order submitted. Blocks
        while more than max_pending ratings are queued, so a runaway producer cannot grow memory without bound."""
        item = self._item(user_id, answer_id, value, reason, comment, client_addr)
        if self.read_only:
            raise ReadOnlyStore(f"{self.path} is open read-only")
        pending = _Pending([item], future=Future())
        with self._queue_cv:
            if self._stopping or self._closed:
                raise StoreError("the feedback store is closed")
            while self._queued_items >= self.max_pending:
                self._queue_cv.wait()
            if self._committer is None:
                self._committer = threading.Thread(target=self._commit_loop, name="feedback-store-committer",
                                                   daemon=True)
                self._committer.start()
            self._queue.append(pending)
            self._queued_items += 1
            self._arrival_cv.notify_all()
        return pending.future

    def flush(self) -> None:
        """Wait until every rating queued so far (rate_async included) is committed or has failed."""
        with self._queue_cv:
            waiting = self._inflight + self._queue
        for p in waiting:
            if p.future is not None:
                try:
                    p.future.result()
                except BaseException:   # the caller sees the error on its own future
                    pass
            else:
                with self._queue_cv:
                    while not p.done:
                        self._queue_cv.wait()

    def _commit_loop(self) -> None:
        """The background leader for rate_async: whenever ratings wait and nobody is committing, commit them.
        No gather wait: while one batch commits, the producer keeps queueing, so the next batch is already big."""
        while True:
            with self._queue_cv:
                while (not self._queue or self._leading) and not self._stopping:
                    self._arrival_cv.wait()
                if not self._queue or self._leading:
                    if self._stopping:
                        return
                    continue
                self._leading = True
                batch = self._take_batch()
            self._lead(batch)

    def _take_batch(self) -> list[_Pending]:
        """Under self._queue_cv, as the leader."""
        batch, self._queue = self._queue, []
        self._inflight = batch
        self._queued_items = 0
        self._last_released = len(batch)
        return batch

    def _lead(self, batch: list[_Pending]) -> None:
        """Commit a batch as the leader, then wake everyone: followers to return, a next leader to start."""
        try:
            with self._lock:
                if self._closed:
                    raise StoreError("the feedback store is closed")
                self._commit_ratings(batch)
        except BaseException as e:
            for p in batch:
                if not p.done:
                    p.error, p.results, p.done = e, [], True
        finally:
            with self._queue_cv:
                self._leading = False
                self._inflight = []
                self._queue_cv.notify_all()
                self._arrival_cv.notify_all()
        for p in batch:
            if p.future is not None:
                if p.error is not None:
                    p.future.set_exception(p.error)
                else:
                    p.future.set_result(p.results[0])

    def _submit(self, items: list[_Item]) -> list[RateResult]:
        """Group commit, leader/follower: a caller queues its ratings; if no batch is being committed it becomes
        the leader and commits everything queued, else it sleeps until a leader has committed its ratings (or it
        is next to lead). Followers wait on the condition, not on the writer lock, so a finished rating returns
        at once instead of queueing behind the next batch's commit."""
        if self.read_only:
            raise ReadOnlyStore(f"{self.path} is open read-only")
        pending = _Pending(items)
        with self._queue_cv:
            self._queue.append(pending)
            self._queued_items += len(items)
            self._arrival_cv.notify_all()     # a gathering leader, or the rate_async committer
            while self._leading and not pending.done:
                self._queue_cv.wait()
            if not pending.done:
                self._leading = True
                # gather: the callers the last commit released are likely rating again right now; waiting a
                # moment for them doubles the batch (commit cost is per batch). A lone caller never waits.
                if self.gather_s > 0 and len(self._queue) < self._last_released:
                    deadline = time.monotonic() + self.gather_s
                    while len(self._queue) < self._last_released:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._arrival_cv.wait(left)
                batch = self._take_batch()
        if not pending.done:
            self._lead(batch)
        if pending.error is not None:
            raise pending.error
        return pending.results

    def _read_batch(self, batch: list[_Pending], use_cache: bool) -> tuple[
            dict[str, tuple[str, str]], dict[tuple[str, str], list], dict[str, dict[str, list]], bool]:
        """What a batch needs to know: (deployment, adapter) of its answers, and the current rows of every (answer,
        user) it rates, as {key: [id, value, reason, comment, rowid, created_at, audited, client_addr, None]} (the
        last field is set when the row changes); plus, per answer, every rating row it has (the batch's answers'
        rating cache after the commit). Answers whose ratings are all in memory need no read; the others take one
        statement that filters on one-column indexes (answers.id, ratings.answer_id), a lookup at any size
        (`answer_id = ? AND user_id = ?` would scan). A cached row written by this process has no rowid yet; an item
        on such a row makes its answer read again. As the file's only writer (under self._lock) the read needs no
        transaction: nothing can change the rows before this batch writes, and the UPDATE checks each rowid's key
        anyway. Without the cache (another writable store shares the file, or a retry) the read opens the batch's
        transaction first (returned True), so the rowids read are the rows the UPDATE will change."""
        keys = {(it.answer_id, it.user_id) for p in batch for it in p.items}
        answer_ids = sorted({a for a, _ in keys})
        # another writer (a PostgreSQL process, a second store on this file) may have deleted a cached answer
        # (forget, retention): then its row is read again, in the statement that reads the ratings anyway
        alone = self._dialect.single_writer and _WRITERS.get(self._key, 0) == 1
        infos = {a: self._answers[a] for a in answer_ids if alone and a in self._answers}
        misses = [a for a in answer_ids if a not in infos]
        use_cache = use_cache and self._dialect.single_writer and _WRITERS.get(self._key, 0) == 1
        known = {a: self._rated[a] for a in answer_ids if use_cache and a in self._rated}
        for a, u in keys:
            row = known.get(a, {}).get(u)
            if row is not None and row[4] is None:
                known.pop(a)
        to_read = [a for a in answer_ids if a not in known]
        full: dict[str, dict[str, list]] = {a: {u: list(r) for u, r in rows.items()} for a, rows in known.items()}
        in_tx = bool(to_read or misses) and not use_cache
        if to_read or misses:
            sql = f"""SELECT 1, answer_id, user_id, id, {self._dialect.rowid}, value, reason, comment, created_at,
                audited, client_addr FROM ratings WHERE answer_id IN (SELECT unnest(?::VARCHAR[]))"""
            params: list = [to_read]
            if misses:     # answers added by this process are cached (add_answer), so usually skipped
                sql = """SELECT 0, id, deployment, adapter, NULL::BIGINT, NULL, NULL, NULL, NULL::TIMESTAMP,
                    NULL::BOOLEAN, NULL FROM answers WHERE id IN (SELECT unnest(?::VARCHAR[])) UNION ALL """ + sql
                params.insert(0, misses)
            for a in to_read:
                full[a] = {}
            if in_tx:
                self._conn.execute("BEGIN TRANSACTION")
            try:
                if in_tx and not self._dialect.single_writer:   # PostgreSQL: other writers wait until COMMIT
                    self._dialect.lock(self._conn, [lock_key(a, u) for a, u in keys])
                rows = self._conn.execute(sql, params).fetchall()
            except BaseException:
                if in_tx:
                    rollback(self._conn)
                raise
            for kind, a, u, rid, rowid, v, r, cm, created_at, audited, addr in rows:
                if kind == 0:                        # a: answer id, u: deployment, rid: adapter
                    infos[a] = (u, rid)
                    self._remember_answer(a, u, rid)
                else:
                    full[a][u] = [rid, v, r, cm, rowid, created_at, audited, addr]
        state = {(a, u): [*full[a][u], None] for a, u in keys if u in full.get(a, {})}
        return infos, state, full, in_tx

    def _commit_ratings(self, batch: list[_Pending]) -> None:
        """Runs under self._lock. A bad request fails alone; the rest commit in one transaction."""
        try:
            self._commit_once(batch, use_cache=True)
        except _StaleCache:
            self._rated.clear()
            self._commit_once(batch, use_cache=False)

    def _commit_once(self, batch: list[_Pending], use_cache: bool) -> None:
        """A batch costs a fixed number of statements whatever its size. The items are applied in order in
        Python to the rows read (or cached), as sequential calls would apply them, and only the final row of
        each key is written. A batch of new ratings of cached answers is one INSERT (its own transaction: one
        WAL fsync); otherwise: read, insert new rows, update changed rows, append the audit, commit. A new
        rating writes no audit row: its creation event is implied by the row until its first change writes it
        (see schema migration 4)."""
        c = self._conn
        infos, state, full, in_tx = self._read_batch(batch, use_cache)
        good: list[_Pending] = []
        for p in batch:
            try:
                for it in p.items:
                    info = infos.get(it.answer_id)
                    if info is None:
                        raise UnknownAnswer(f"unknown answer {it.answer_id!r}")
                    if info[0] != self.deployment:
                        raise WrongDeployment(f"answer {it.answer_id!r} belongs to deployment {info[0]!r}, "
                                              f"not {self.deployment!r}")
                    it.adapter = info[1]
                good.append(p)
            except StoreError as e:
                p.error, p.done = e, True
        retry = False
        try:
            adapters = {(it.answer_id, it.user_id): it.adapter for p in good for it in p.items}
            created: set[tuple[str, str]] = set()       # rows new in this batch
            events: list[tuple] = []
            for p in good:
                p.results = []
                for it in p.items:
                    key = (it.answer_id, it.user_id)
                    cur = state.get(key)
                    if cur is None:
                        if it.value is None:               # withdrawing a rating that never existed
                            p.results.append(RateResult(None, None, False))
                            continue
                        now = self._now()
                        state[key] = [_new_id(), it.value, it.reason, it.comment, None, now, False, it.client_addr,
                                      now]
                        created.add(key)
                        p.results.append(RateResult(state[key][0], it.value, True))
                        continue                           # its creation event is implied by the row
                    before, before_addr = tuple(cur[1:4]), cur[7]
                    if cur[1] == it.value:                 # same thumb (or withdrawn again): only new text counts
                        new = (cur[2] if it.reason is None else it.reason,
                               cur[3] if it.comment is None else it.comment)
                        if it.value is None or new == (cur[2], cur[3]):
                            p.results.append(RateResult(cur[0], cur[1], False))
                            continue
                        now = self._now()
                        cur[2:4], cur[7:9] = new, [it.client_addr, now]
                    else:
                        now = self._now()
                        cur[1:4], cur[7:9] = (it.value, it.reason, it.comment), [it.client_addr, now]
                    if not cur[6]:                         # first change: write the implied creation event
                        events.append((cur[0], cur[0], self.deployment, it.answer_id, it.user_id, *before, cur[5],
                                       before_addr))
                        cur[6] = True
                    p.results.append(RateResult(cur[0], cur[1], True))
                    events.append((_new_id(), cur[0], self.deployment, it.answer_id, it.user_id, *cur[1:4], now,
                                   cur[7]))
            inserts, updates = [], []
            for (a, u), (rid, v, r, cm, rowid, created_at, audited, addr, updated) in state.items():
                if (a, u) in created:
                    inserts.append((a, u, rid, self.deployment, adapters[(a, u)], v, r, cm, created_at, updated,
                                    audited, addr))
                elif updated is not None:
                    updates.append((rowid, a, u, v, r, cm, updated, audited, addr))
            if (updates or events) and not in_tx:
                c.execute("BEGIN TRANSACTION")
                in_tx = True
            if inserts:               # alone (no read, no change): an autocommit statement, its own transaction
                self._insert_rows(c, "ratings", _RATING_COLUMNS, inserts)
            if updates:     # rowid finds the row; the key check catches a cached rowid that went stale
                by_rowid = "ratings.rowid = v.rid AND " if self._dialect.single_writer else ""
                n = c.execute(f"""UPDATE ratings SET value = v.value, reason = v.reason, comment = v.comment,
                    updated_at = v.updated_at, audited = v.audited, client_addr = v.addr FROM (SELECT
                    unnest(?::BIGINT[]) AS rid,
                    unnest(?::VARCHAR[]) AS a, unnest(?::VARCHAR[]) AS u, unnest(?::VARCHAR[]) AS value,
                    unnest(?::VARCHAR[]) AS reason, unnest(?::VARCHAR[]) AS comment,
                    unnest(?::TIMESTAMP[]) AS updated_at, unnest(?::BOOLEAN[]) AS audited,
                    unnest(?::VARCHAR[]) AS addr) v
                    WHERE {by_rowid}ratings.answer_id = v.a AND ratings.user_id = v.u""",
                              [list(col) for col in zip(*updates, strict=True)]).fetchone()[0]
                if n != len(updates):
                    if not use_cache:
                        raise StoreError(f"rating update matched {n} of {len(updates)} rows")
                    retry = True
                    raise _StaleCache()
            if events:
                self._insert_rows(c, "rating_events", _EVENT_COLUMNS, events)
            if in_tx:
                c.execute("COMMIT")   # nothing written (all no-ops, or all bad): no WAL write, no fsync
        except BaseException as e:
            if in_tx:
                rollback(c)
            self._rated.clear()       # whatever happened, memory must not claim rows the file may not have
            if retry:
                for p in good:
                    p.results = []
                raise
            err = (e if isinstance(e, StoreError) else self._db_error(e) if isinstance(e, self._errors)
                   else StoreError(f"rating not stored: {e}"))
            for p in good:
                p.error, p.results = err, []
        else:
            for (a, u), row in state.items():     # the committed rows; new ones have no rowid yet
                full.setdefault(a, {})[u] = row[:8]
            for a in {a for a, _ in state} | set(full):
                if a in infos:
                    self._remember_ratings(a, full.get(a, {}))
        finally:
            if not retry:
                for p in good:
                    p.done = True

    @staticmethod
    def _insert_rows(c: duckdb.DuckDBPyConnection, table: str, columns: tuple[tuple[str, str], ...],
                     rows: list[tuple]) -> None:
        """One INSERT for many rows, each column one typed list, unnested: the cheapest way measured
        (docs/experiments/2026-11-23-feedback-store-throughput.md).
        """
        sel = ", ".join(f"unnest(?::{typ}[])" for _, typ in columns)
        c.execute(f"INSERT INTO {table} ({', '.join(n for n, _ in columns)}) SELECT {sel}",
                  [list(col) for col in zip(*rows, strict=True)])

    def get_rating(self, user_id: str, answer_id: str) -> dict | None:
        rows = self._read_dicts("SELECT * FROM ratings WHERE answer_id = ? AND user_id = ?", [answer_id, user_id])
        return rows[0] if rows else None

    def rating_history(self, rating_id: str) -> list[dict]:
        """The audit trail of one rating, oldest first (its creation event included, written or implied)."""
        return self._read_dicts("SELECT * FROM rating_audit WHERE rating_id = ? ORDER BY event_at", [rating_id])
