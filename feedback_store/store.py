"""FeedbackStore: the one DuckDB file that remembers every conversation, answer, rating, run and adapter.

Threads: writes go through one connection under one lock; ratings use group commit (each caller queues its
rating, one leader commits everything queued in one transaction of a fixed number of statements while the others
sleep), because a DuckDB commit fdatasyncs the WAL (1-4 ms here) and would otherwise cap a process at a few
hundred ratings/s. Reads use one cursor per thread,
so a dashboard query never waits for a writer (DuckDB MVCC). A call returns only after its transaction commits.

"Single writer" means the one process DuckDB lets write the file (the app). Inside it, ratings arrive either from
many threads calling rate() (each blocks until durable; group commit batches them) or from one thread using
rate_async(), which queues the rating and returns a Future that a background committer resolves only after the
COMMIT that made it durable, so one thread can keep many ratings in flight. Because no other process writes, the
store also keeps the ratings of recently used answers in memory (an answer's ratings are complete once read or
once the answer was created here), so a batch of new ratings needs no read; and since a new rating's creation
event is implied by its row until its first change (schema v4), that batch is one autocommit INSERT.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from feedback_store import files
from feedback_store.errors import (
    DuplicateAdapter,
    InvalidInput,
    InvalidRating,
    ReadOnlyStore,
    SchemaError,
    StoreError,
    StoreLocked,
    UnknownAdapter,
    UnknownAnswer,
    UnknownConversation,
    UnknownRun,
    WrongDeployment,
)
from feedback_store.schema import SCHEMA_VERSION, file_version, migrate

RATING_VALUES = ("up", "down", None)
ROLES = ("system", "user", "assistant")
TRIGGERS = ("schedule", "operator", "simulator", "cli")
RUN_STATUSES = ("running", "succeeded", "promoted", "rejected", "failed", "cancelled")
BASE = "base"

# writable stores open per file in this process: DuckDB shares one database between them, so the rows another
# store writes are invisible to this one's rating cache; with two or more open, nobody trusts the cache
_WRITERS: dict[str, int] = {}
_WRITERS_LOCK = threading.Lock()
MAX_ID, MAX_REASON, MAX_COMMENT = 256, 200, 4000

_RATING_COLUMNS = tuple((n, "VARCHAR") for n in ("answer_id", "user_id", "id", "deployment", "adapter", "value",
                                                "reason", "comment")) + (("created_at", "TIMESTAMP"),
                                                                         ("updated_at", "TIMESTAMP"),
                                                                         ("audited", "BOOLEAN"))
_EVENT_COLUMNS = tuple((n, "VARCHAR") for n in ("id", "rating_id", "deployment", "answer_id", "user_id", "value",
                                               "reason", "comment")) + (("event_at", "TIMESTAMP"),)


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


@dataclass(frozen=True)
class RateResult:
    """rating_id is stable per (user, answer); None when withdrawing a rating that never existed."""
    rating_id: str | None
    value: str | None
    changed: bool


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    n_desirable: int
    n_undesirable: int
    sha256: str
    since: datetime | None = None
    until: datetime | None = None
    run_id: str | None = None

    @property
    def n_examples(self) -> int:
        return self.n_desirable + self.n_undesirable


@dataclass
class _Item:
    user_id: str
    answer_id: str
    value: str | None
    reason: str | None
    comment: str | None
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


class FeedbackStore:
    """One DuckDB file; `deployment` scopes every row, so one file can serve several deployments."""

    gather_s = 0.002   # the longest a group-commit leader waits for more ratings (0: never wait)
    max_pending = 10_000   # rate_async blocks while this many ratings wait for a commit

    def __init__(self, path: str | Path, deployment: str = "default", *, read_only: bool = False,
                 clock: Callable[[], datetime] = utcnow, answer_cache_size: int = 50_000):
        _check_str("deployment", deployment)
        self.path = Path(path)
        self.deployment = deployment
        self.read_only = read_only
        self._clock = clock
        self._last_ts = datetime.min
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
            raise StoreError(f"cannot open {self.path}: {e}") from None
        self._lock = threading.Lock()          # guards self._conn: every write, and cursor creation
        self._queue: list[_Pending] = []       # ratings waiting for the next group commit
        mutex = threading.Lock()               # guards _queue, _leading, _last_released
        self._queue_cv = threading.Condition(mutex)     # followers sleep on it until their batch committed
        self._arrival_cv = threading.Condition(mutex)   # a gathering leader sleeps on it
        self._leading = False                  # a thread is committing a batch right now
        self._last_released = 0                # callers the last commit released (they often rate again)
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self._answers: OrderedDict[str, tuple[str, str]] = OrderedDict()   # id -> (deployment, adapter)
        self._answer_cache_size = answer_cache_size
        # answer id -> {user_id: [rating id, value, reason, comment, rowid or None]}: every rating of that answer
        # (exact because this process is the only writer; changed only under self._lock, after a COMMIT)
        self._rated: OrderedDict[str, dict[str, list]] = OrderedDict()
        self._queued_items = 0                 # ratings in self._queue (rate_async blocks above max_pending)
        self._committer: threading.Thread | None = None
        self._inflight: list[_Pending] = []    # the batch being committed now
        self._stopping = False
        self._closed = False
        try:
            if read_only:
                version = file_version(self._conn)
                if version != SCHEMA_VERSION:
                    raise SchemaError(f"{self.path} has schema version {version}, this code needs "
                                      f"{SCHEMA_VERSION}; open it once read-write (start the app) to upgrade")
            else:
                self.migrated_from, _ = migrate(self._conn, self._now)
                # only this process writes the file: a run still 'running' was cut off by a crash or restart
                self._conn.execute("UPDATE runs SET status = 'failed', finished_at = ?, error = "
                                   "'interrupted: the app stopped during the run' WHERE status = 'running' "
                                   "AND deployment = ?", [self._now(), self.deployment])
        except BaseException:
            self._conn.close()
            raise
        self._key = str(self.path.resolve())
        if not read_only:
            with _WRITERS_LOCK:
                _WRITERS[self._key] = _WRITERS.get(self._key, 0) + 1

    # ---------------------------------------------------------------- plumbing
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
        return self._cursor().execute(sql, params or []).fetchall()

    def _read_dicts(self, sql: str, params: list | None = None) -> list[dict]:
        cur = self._cursor().execute(sql, params or [])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    @contextmanager
    def _tx(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One write transaction on the shared connection: all of it commits or none of it does."""
        if self.read_only:
            raise ReadOnlyStore(f"{self.path} is open read-only")
        with self._lock:
            if self._closed:
                raise StoreError("the feedback store is closed")
            self._conn.execute("BEGIN TRANSACTION")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

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
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self.read_only:
                with _WRITERS_LOCK:
                    _WRITERS[self._key] -= 1
            for cur in self._cursors:
                cur.close()
            self._conn.close()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def schema_version(self) -> int:
        return int(self._read("SELECT max(version) FROM schema_version")[0][0])

    # ---------------------------------------------------------------- conversations and answers
    def new_conversation(self, user_id: str, system_prompt: str | None = None) -> str:
        _check_str("user_id", user_id)
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise InvalidInput("system_prompt must be a string or None")
        conv_id = _new_id()
        with self._tx() as c:
            now = self._now()
            c.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?)",
                      [conv_id, self.deployment, user_id, system_prompt, now])
            if system_prompt:
                c.execute("INSERT INTO messages VALUES (?, ?, NULL, 'system', ?, ?)",
                          [_new_id(), conv_id, system_prompt, now])
        return conv_id

    def _check_conversation(self, c: duckdb.DuckDBPyConnection, conv_id: str) -> None:
        _check_str("conversation id", conv_id, error=UnknownConversation)
        row = c.execute("SELECT deployment FROM conversations WHERE id = ?", [conv_id]).fetchone()
        if row is None:
            raise UnknownConversation(f"unknown conversation {conv_id!r}")
        if row[0] != self.deployment:
            raise WrongDeployment(f"conversation {conv_id!r} belongs to deployment {row[0]!r}, "
                                  f"not {self.deployment!r}")

    def _last_node(self, c: duckdb.DuckDBPyConnection, conv_id: str) -> str | None:
        row = c.execute("""SELECT id FROM (
                SELECT id, created_at FROM messages WHERE conversation_id = ? AND role <> 'system'
                UNION ALL SELECT id, created_at FROM answers WHERE conversation_id = ?)
            ORDER BY created_at DESC LIMIT 1""", [conv_id, conv_id]).fetchone()
        return row[0] if row else None

    def add_user_message(self, conv_id: str, content: str, parent_id: str | None = None) -> str:
        """parent_id: the answer this message replies to; None = the latest turn of the conversation."""
        if not isinstance(content, str) or not content.strip():
            raise InvalidInput("message content must be a non-empty string")
        msg_id = _new_id()
        with self._tx() as c:
            self._check_conversation(c, conv_id)
            if parent_id is None:
                parent_id = self._last_node(c, conv_id)
            else:
                found = c.execute("SELECT count(*) FROM answers WHERE id = ? AND conversation_id = ?",
                                  [parent_id, conv_id]).fetchone()[0]
                if not found:
                    raise UnknownConversation(f"parent {parent_id!r} is not an answer of conversation {conv_id!r}")
            c.execute("INSERT INTO messages VALUES (?, ?, ?, 'user', ?, ?)",
                      [msg_id, conv_id, parent_id, content, self._now()])
        return msg_id

    def add_answer(self, conv_id: str, parent_id: str, prompt_messages: list[dict], text: str,
                   adapter: str = BASE, sampling: dict | None = None, prompt_tokens: int | None = None,
                   completion_tokens: int | None = None, latency_ms: float | None = None) -> str:
        """Store one assistant answer to the user message `parent_id`; a regeneration is another call with the
        same parent (siblings are kept). prompt_messages is the exact context sent to the model."""
        if not isinstance(prompt_messages, list) or not prompt_messages:
            raise InvalidInput("prompt_messages must be a non-empty list of {role, content} dicts")
        clean = []
        for m in prompt_messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise InvalidInput(f"bad prompt message {m!r}: need role in {ROLES} and string content")
            clean.append({"role": m["role"], "content": m["content"]})
        if not isinstance(text, str):
            raise InvalidInput("answer text must be a string")
        _check_str("adapter", adapter)
        for name, v in (("prompt_tokens", prompt_tokens), ("completion_tokens", completion_tokens)):
            if v is not None and (not isinstance(v, int) or v < 0):
                raise InvalidInput(f"{name} must be a non-negative int or None")
        if latency_ms is not None and not isinstance(latency_ms, int | float):
            raise InvalidInput("latency_ms must be a number or None")
        ans_id = _new_id()
        with self._tx() as c:
            self._check_conversation(c, conv_id)
            row = c.execute("SELECT role FROM messages WHERE id = ? AND conversation_id = ?",
                            [parent_id, conv_id]).fetchone()
            if row is None or row[0] != "user":
                raise UnknownConversation(f"parent {parent_id!r} is not a user message of conversation {conv_id!r}")
            c.execute("INSERT INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      [ans_id, self.deployment, conv_id, parent_id, json.dumps(clean, ensure_ascii=False), text,
                       adapter, json.dumps(sampling or {}), prompt_tokens, completion_tokens,
                       None if latency_ms is None else float(latency_ms), self._now()])
        with self._lock:     # after the COMMIT: the caches describe committed rows only
            self._remember_answer(ans_id, self.deployment, adapter)
            self._remember_ratings(ans_id, {})       # a new answer has no ratings yet
        return ans_id

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

    def get_answer(self, answer_id: str) -> dict:
        rows = self._read_dicts("SELECT * FROM answers WHERE id = ?", [answer_id])
        if not rows:
            raise UnknownAnswer(f"unknown answer {answer_id!r}")
        a = rows[0]
        if a["deployment"] != self.deployment:
            raise WrongDeployment(f"answer {answer_id!r} belongs to deployment {a['deployment']!r}")
        a["prompt_messages"] = json.loads(a["prompt_messages"])
        a["sampling"] = json.loads(a["sampling"]) if a["sampling"] else {}
        return a

    def siblings(self, answer_id: str) -> list[dict]:
        """Every answer to the same user message (regenerations included), oldest first."""
        a = self.get_answer(answer_id)
        return [{**r, "prompt_messages": json.loads(r["prompt_messages"])} for r in self._read_dicts(
            "SELECT * FROM answers WHERE parent_id = ? ORDER BY created_at", [a["parent_id"]])]

    def conversation(self, conv_id: str) -> list[dict]:
        """All turns (system, user, every answer) of a conversation in creation order."""
        self._check_conversation(self._cursor(), conv_id)
        return self._read_dicts("""SELECT id, parent_id, role, content, NULL AS adapter, created_at FROM messages
                WHERE conversation_id = ?
            UNION ALL SELECT id, parent_id, 'assistant', text, adapter, created_at FROM answers
                WHERE conversation_id = ? ORDER BY created_at""", [conv_id, conv_id])

    # ---------------------------------------------------------------- ratings
    def rate(self, user_id: str, answer_id: str, value: str | None, reason: str | None = None,
             comment: str | None = None) -> RateResult:
        """Set the user's current rating of an answer ("up", "down", or None = withdraw). Idempotent: the same
        value again changes nothing (reason/comment None keep the stored ones). Durable when it returns."""
        return self._submit([self._item(user_id, answer_id, value, reason, comment)])[0]

    def rate_many(self, items: Iterable[tuple | dict]) -> list[RateResult]:
        """Several ratings in one transaction (all or none), applied in order; items are (user_id, answer_id,
        value[, reason[, comment]]) tuples or dicts with those keys."""
        parsed = [self._item(**it) if isinstance(it, dict) else self._item(*it) for it in items]
        return self._submit(parsed) if parsed else []

    @staticmethod
    def _item(user_id: str, answer_id: str, value: str | None, reason: str | None = None,
              comment: str | None = None) -> _Item:
        _check_str("user_id", user_id, error=InvalidRating)
        if not isinstance(answer_id, str) or not answer_id:
            raise UnknownAnswer(f"unknown answer {answer_id!r}")
        if value not in RATING_VALUES or not (value is None or isinstance(value, str)):
            raise InvalidRating(f"rating value must be 'up', 'down' or None (withdraw), got {value!r}")
        _check_str("reason", reason, MAX_REASON, optional=True, error=InvalidRating)
        if comment is not None and (not isinstance(comment, str) or len(comment) > MAX_COMMENT):
            raise InvalidRating(f"comment must be a string of at most {MAX_COMMENT} characters")
        return _Item(user_id, answer_id, value, reason, comment)

    def rate_async(self, user_id: str, answer_id: str, value: str | None, reason: str | None = None,
                   comment: str | None = None) -> Future:
        """rate() without waiting: returns a Future of the RateResult, resolved by a background committer only
        after the COMMIT that made the rating durable (or failed with the typed error rate() would raise). A
        malformed value raises here, at once. Ratings of one caller are applied in the order submitted. Blocks
        while more than max_pending ratings are queued, so a runaway producer cannot grow memory without bound."""
        item = self._item(user_id, answer_id, value, reason, comment)
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
        """What a batch needs to know: (deployment, adapter) of its answers, and the current rows of every
        (answer, user) it rates, as {key: [id, value, reason, comment, rowid, created_at, audited, None]} (the
        last field is set when the row changes); plus, per answer, every rating row it has (the batch's answers'
        rating cache after the commit). Answers whose ratings are all in memory need no read; the others take
        one statement that filters on one-column indexes (answers.id, ratings.answer_id), a lookup at any size
        (`answer_id = ? AND user_id = ?` would scan). A cached row written by this process has no rowid yet; an
        item on such a row makes its answer read again. As the file's only writer (under self._lock) the read
        needs no transaction: nothing can change the rows before this batch writes, and the UPDATE checks each
        rowid's key anyway. Without the cache (another writable store shares the file, or a retry) the read opens
        the batch's transaction first (returned True), so the rowids read are the rows the UPDATE will change."""
        keys = {(it.answer_id, it.user_id) for p in batch for it in p.items}
        answer_ids = sorted({a for a, _ in keys})
        infos = {a: self._answers[a] for a in answer_ids if a in self._answers}
        misses = [a for a in answer_ids if a not in infos]
        use_cache = use_cache and _WRITERS.get(self._key, 0) == 1
        known = {a: self._rated[a] for a in answer_ids if use_cache and a in self._rated}
        for a, u in keys:
            row = known.get(a, {}).get(u)
            if row is not None and row[4] is None:
                known.pop(a)
        to_read = [a for a in answer_ids if a not in known]
        full: dict[str, dict[str, list]] = {a: {u: list(r) for u, r in rows.items()} for a, rows in known.items()}
        in_tx = bool(to_read or misses) and not use_cache
        if to_read or misses:
            sql = """SELECT 1, answer_id, user_id, id, rowid, value, reason, comment, created_at, audited
                FROM ratings WHERE answer_id IN (SELECT unnest(?::VARCHAR[]))"""
            params: list = [to_read]
            if misses:     # answers added by this process are cached (add_answer), so usually skipped
                sql = """SELECT 0, id, deployment, adapter, NULL::BIGINT, NULL, NULL, NULL, NULL::TIMESTAMP,
                    NULL::BOOLEAN FROM answers WHERE id IN (SELECT unnest(?::VARCHAR[])) UNION ALL """ + sql
                params.insert(0, misses)
            for a in to_read:
                full[a] = {}
            if in_tx:
                self._conn.execute("BEGIN TRANSACTION")
            try:
                rows = self._conn.execute(sql, params).fetchall()
            except BaseException:
                if in_tx:
                    self._conn.execute("ROLLBACK")
                raise
            for kind, a, u, rid, rowid, v, r, cm, created_at, audited in rows:
                if kind == 0:                        # a: answer id, u: deployment, rid: adapter
                    infos[a] = (u, rid)
                    self._remember_answer(a, u, rid)
                else:
                    full[a][u] = [rid, v, r, cm, rowid, created_at, audited]
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
                        state[key] = [_new_id(), it.value, it.reason, it.comment, None, now, False, now]
                        created.add(key)
                        p.results.append(RateResult(state[key][0], it.value, True))
                        continue                           # its creation event is implied by the row
                    before = tuple(cur[1:4])
                    if cur[1] == it.value:                 # same thumb (or withdrawn again): only new text counts
                        new = (cur[2] if it.reason is None else it.reason,
                               cur[3] if it.comment is None else it.comment)
                        if it.value is None or new == (cur[2], cur[3]):
                            p.results.append(RateResult(cur[0], cur[1], False))
                            continue
                        now = self._now()
                        cur[2:4], cur[7] = new, now
                    else:
                        now = self._now()
                        cur[1:4], cur[7] = (it.value, it.reason, it.comment), now
                    if not cur[6]:                         # first change: write the implied creation event
                        events.append((cur[0], cur[0], self.deployment, it.answer_id, it.user_id, *before, cur[5]))
                        cur[6] = True
                    p.results.append(RateResult(cur[0], cur[1], True))
                    events.append((_new_id(), cur[0], self.deployment, it.answer_id, it.user_id, *cur[1:4], now))
            inserts, updates = [], []
            for (a, u), (rid, v, r, cm, rowid, created_at, audited, updated) in state.items():
                if (a, u) in created:
                    inserts.append((a, u, rid, self.deployment, adapters[(a, u)], v, r, cm, created_at, updated,
                                    audited))
                elif updated is not None:
                    updates.append((rowid, a, u, v, r, cm, updated, audited))
            if (updates or events) and not in_tx:
                c.execute("BEGIN TRANSACTION")
                in_tx = True
            if inserts:               # alone (no read, no change): an autocommit statement, its own transaction
                self._insert_rows(c, "ratings", _RATING_COLUMNS, inserts)
            if updates:     # rowid finds the row; the key check catches a cached rowid that went stale
                n = c.execute("""UPDATE ratings SET value = v.value, reason = v.reason, comment = v.comment,
                    updated_at = v.updated_at, audited = v.audited FROM (SELECT unnest(?) AS rid,
                    unnest(?::VARCHAR[]) AS a, unnest(?::VARCHAR[]) AS u, unnest(?::VARCHAR[]) AS value,
                    unnest(?::VARCHAR[]) AS reason, unnest(?::VARCHAR[]) AS comment,
                    unnest(?::TIMESTAMP[]) AS updated_at, unnest(?::BOOLEAN[]) AS audited) v
                    WHERE ratings.rowid = v.rid AND ratings.answer_id = v.a AND ratings.user_id = v.u""",
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
                try:
                    c.execute("ROLLBACK")
                except duckdb.Error:
                    pass
            self._rated.clear()       # whatever happened, memory must not claim rows the file may not have
            if retry:
                for p in good:
                    p.results = []
                raise
            err = e if isinstance(e, StoreError) else StoreError(f"rating not stored: {e}")
            for p in good:
                p.error, p.results = err, []
        else:
            for (a, u), row in state.items():     # the committed rows; new ones have no rowid yet
                full.setdefault(a, {})[u] = row[:7]
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
        """One INSERT for many rows, each column passed as one typed list and unnested: measured cheaper than a
        VALUES list with a placeholder per value (parameter binding) or a registered Arrow table, at any size."""
        sel = ", ".join(f"unnest(?::{typ}[])" for _, typ in columns)
        c.execute(f"INSERT INTO {table} ({', '.join(n for n, _ in columns)}) SELECT {sel}",
                  [list(col) for col in zip(*rows, strict=True)])

    def get_rating(self, user_id: str, answer_id: str) -> dict | None:
        rows = self._read_dicts("SELECT * FROM ratings WHERE answer_id = ? AND user_id = ?", [answer_id, user_id])
        return rows[0] if rows else None

    def rating_history(self, rating_id: str) -> list[dict]:
        """The audit trail of one rating, oldest first (its creation event included, written or implied)."""
        return self._read_dicts("SELECT * FROM rating_audit WHERE rating_id = ? ORDER BY event_at", [rating_id])

    # ---------------------------------------------------------------- dashboard queries
    _COUNTS = ("count(*) FILTER (WHERE value = 'up') AS up, count(*) FILTER (WHERE value = 'down') AS down, "
               "count(*) FILTER (WHERE value IS NULL) AS withdrawn")

    def counts(self) -> dict:
        """Current ratings of this deployment: up, down, withdrawn, total."""
        up, down, wd = self._read(f"SELECT {self._COUNTS} FROM ratings WHERE deployment = ?",
                                  [self.deployment])[0]
        return {"up": up, "down": down, "withdrawn": wd, "total": up + down + wd}

    def counts_by_time(self, bucket: str = "day", since: datetime | None = None) -> list[dict]:
        """Time series of current ratings by the time they took their final value (UTC buckets)."""
        if bucket not in ("day", "hour"):
            raise InvalidInput("bucket must be 'day' or 'hour'")
        since = datetime.min if since is None else _naive_utc(since)
        return self._read_dicts(f"""SELECT date_trunc('{bucket}', updated_at) AS bucket, {self._COUNTS}
            FROM ratings WHERE deployment = ? AND updated_at >= ? GROUP BY 1 ORDER BY 1""",
                                [self.deployment, since])

    def counts_by_adapter(self) -> list[dict]:
        """Per served version: up/down/withdrawn and approval = up / (up + down), oldest version first."""
        rows = self._read_dicts(f"""SELECT adapter, {self._COUNTS}, min(created_at) AS first_rated_at
            FROM ratings WHERE deployment = ? GROUP BY adapter ORDER BY first_rated_at""", [self.deployment])
        for r in rows:
            r["approval"] = r["up"] / (r["up"] + r["down"]) if r["up"] + r["down"] else None
        return rows

    def counts_by_user(self, limit: int | None = 100) -> list[dict]:
        """Most active raters first (a single user dominating the data shows up here)."""
        sql = f"""SELECT user_id, {self._COUNTS}, count(*) AS total FROM ratings WHERE deployment = ?
            GROUP BY user_id ORDER BY total DESC, user_id"""
        params: list = [self.deployment]
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return self._read_dicts(sql, params)

    def last_run(self, include_failed: bool = False) -> dict | None:
        """The latest finished run. Failed/cancelled runs trained nothing and a running one has not finished,
        so they are skipped unless include_failed (then: the latest run of any status)."""
        where = "" if include_failed else "AND status IN ('succeeded', 'promoted', 'rejected')"
        rows = self._read_dicts(f"SELECT * FROM runs WHERE deployment = ? {where} ORDER BY started_at DESC "
                                "LIMIT 1", [self.deployment])
        return self._decode_run(rows[0]) if rows else None

    def _last_cutoff(self) -> datetime | None:
        run = self.last_run()
        return None if run is None else (run["snapshot_at"] or run["started_at"])

    def ratings_since_last_run(self) -> dict:
        """Final ratings that changed after the last run's snapshot (what a new run would add)."""
        since = self._last_cutoff()
        up, down, wd = self._read(f"SELECT {self._COUNTS} FROM ratings WHERE deployment = ? AND updated_at > ?",
                                  [self.deployment, since or datetime.min])[0]
        return {"since": since, "up": up, "down": down, "withdrawn": wd, "total": up + down}

    def training_counts(self, since: datetime | str | None = None, max_examples: int | None = None
                        ) -> tuple[int, int]:
        """(n_desirable, n_undesirable) that export_snapshot with the same arguments would write."""
        where, params = self._snapshot_filter(self._resolve_since(since), None)
        sql = f"SELECT value FROM ratings r WHERE {where} ORDER BY updated_at DESC"
        if max_examples is not None:
            sql += " LIMIT ?"
            params.append(int(max_examples))
        return tuple(self._read(f"SELECT count(*) FILTER (WHERE value = 'up'), count(*) FILTER "
                                f"(WHERE value = 'down') FROM ({sql})", params)[0])  # type: ignore[return-value]

    # ---------------------------------------------------------------- training snapshot
    def _resolve_since(self, since: datetime | str | None) -> datetime | None:
        """None, a time, "last_run", or an adapter version: the ratings that version has not seen."""
        if since is None or isinstance(since, datetime):
            return None if since is None else _naive_utc(since)
        if since == "last_run":
            return self._last_cutoff()
        if isinstance(since, str):
            rows = self._read("""SELECT coalesce(r.snapshot_at, a.created_at) FROM adapters a
                LEFT JOIN runs r ON r.id = a.run_id WHERE a.deployment = ? AND a.version = ?""",
                              [self.deployment, since])
            if not rows:
                raise UnknownAdapter(f"unknown adapter version {since!r}")
            return rows[0][0]
        raise InvalidInput(f"since must be None, a datetime, 'last_run' or an adapter version, got {since!r}")

    def _snapshot_filter(self, since: datetime | None, until: datetime | None) -> tuple[str, list]:
        where, params = "r.deployment = ? AND r.value IS NOT NULL", [self.deployment]
        if since is not None:
            where += " AND r.updated_at > ?"
            params.append(since)
        if until is not None:
            where += " AND r.updated_at <= ?"
            params.append(until)
        return where, params

    def snapshot_table(self, since: datetime | str | None = None, max_examples: int | None = None,
                       until: datetime | None = None) -> pa.Table:
        """Final non-withdrawn ratings joined with their answers, newest first, in the snapshot schema."""
        if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 0):
            raise InvalidInput("max_examples must be a non-negative int or None")
        where, params = self._snapshot_filter(self._resolve_since(since), until)
        sql = f"""SELECT r.id AS example_id, r.answer_id, a.prompt_messages AS messages, a.text AS completion,
                r.value = 'up' AS label, r.user_id, r.adapter, r.updated_at AS rated_at
            FROM ratings r JOIN answers a ON a.id = r.answer_id
            WHERE {where} ORDER BY r.updated_at DESC, r.id"""
        if max_examples is not None:
            sql += " LIMIT ?"
            params.append(max_examples)
        return files.to_snapshot_table(self._cursor().sql(sql, params=params).to_arrow_table())

    def export_snapshot(self, path: str | Path, since: datetime | str | None = None,
                        max_examples: int | None = None, run_id: str | None = None) -> SnapshotInfo:
        """Write the aligner's Parquet snapshot atomically. With run_id, also record which ratings (and labels)
        the run trains on and the snapshot cutoff, for lineage and "ratings since the last run"."""
        if run_id is not None:
            self.get_run(run_id)
        until = self._now()
        since_t = self._resolve_since(since)
        table = self.snapshot_table(since_t, max_examples, until=until)
        digest = files.write_snapshot(Path(path), table)
        n_d = int(pc.sum(table.column("label")).as_py() or 0)
        n_u = table.num_rows - n_d
        if run_id is not None:
            with self._tx() as c:
                c.execute("DELETE FROM run_examples WHERE run_id = ?", [run_id])
                c.register("_examples", table.select(["example_id", "label"]))
                try:
                    c.execute("INSERT INTO run_examples SELECT ?, example_id, label, false FROM _examples", [run_id])
                finally:
                    c.unregister("_examples")
                c.execute("UPDATE runs SET snapshot_at = ?, snapshot_sha256 = ?, n_desirable = ?, n_undesirable = ? "
                          "WHERE id = ?", [until, digest, n_d, n_u, run_id])
        return SnapshotInfo(Path(path), n_d, n_u, digest, since_t, until, run_id)

    def export_kto(self, path: str | Path, since: datetime | str | None = None,
                   max_examples: int | None = None) -> SnapshotInfo:
        """TRL's unpaired format (prompt messages, [assistant completion], label); .jsonl or .parquet."""
        try:
            files.kto_format(Path(path))
        except ValueError as e:
            raise InvalidInput(str(e)) from None
        table = self.snapshot_table(since, max_examples)
        digest = files.write_kto(Path(path), files.kto_rows(table))
        n_d = int(pc.sum(table.column("label")).as_py() or 0)
        return SnapshotInfo(Path(path), n_d, table.num_rows - n_d, digest, self._resolve_since(since), None)

    # ---------------------------------------------------------------- runs
    def start_run(self, trigger: str, params: dict | None = None) -> str:
        if trigger not in TRIGGERS:
            raise InvalidInput(f"trigger must be one of {TRIGGERS}, got {trigger!r}")
        run_id = _new_id()
        with self._tx() as c:
            c.execute("INSERT INTO runs (id, deployment, trigger, status, started_at, params) "
                      "VALUES (?, ?, ?, 'running', ?, ?)",
                      [run_id, self.deployment, trigger, self._now(), json.dumps(params or {}, default=str)])
        return run_id

    def finish_run(self, run_id: str, status: str, *, n_desirable: int | None = None,
                   n_undesirable: int | None = None, lambda_d: float | None = None, lambda_u: float | None = None,
                   metrics: dict | None = None, error: str | None = None, adapter_version: str | None = None,
                   dropped: Iterable[str] = ()) -> None:
        """Close a run. `dropped`: example ids the aligner skipped, so lineage lists only trained ratings."""
        if status not in RUN_STATUSES or status == "running":
            raise InvalidInput(f"status must be one of {RUN_STATUSES[1:]}, got {status!r}")
        self.get_run(run_id)
        with self._tx() as c:
            c.execute("""UPDATE runs SET status = ?, finished_at = ?, n_desirable = coalesce(?, n_desirable),
                n_undesirable = coalesce(?, n_undesirable), lambda_d = ?, lambda_u = ?, metrics = ?, error = ?,
                adapter_version = coalesce(?, adapter_version) WHERE id = ?""",
                      [status, self._now(), n_desirable, n_undesirable, lambda_d, lambda_u,
                       json.dumps(metrics or {}, default=str), error, adapter_version, run_id])
            dropped = list(dropped)
            if dropped:
                c.execute("UPDATE run_examples SET dropped = true WHERE run_id = ? AND list_contains(?, rating_id)",
                          [run_id, dropped])

    @staticmethod
    def _decode_run(r: dict) -> dict:
        r["params"] = json.loads(r["params"]) if r["params"] else {}
        r["metrics"] = json.loads(r["metrics"]) if r["metrics"] else {}
        return r

    def get_run(self, run_id: str) -> dict:
        rows = self._read_dicts("SELECT * FROM runs WHERE id = ?", [run_id])
        if not rows:
            raise UnknownRun(f"unknown run {run_id!r}")
        if rows[0]["deployment"] != self.deployment:
            raise WrongDeployment(f"run {run_id!r} belongs to deployment {rows[0]['deployment']!r}")
        return self._decode_run(rows[0])

    def runs(self, limit: int = 50) -> list[dict]:
        """Newest first."""
        return [self._decode_run(r) for r in self._read_dicts(
            "SELECT * FROM runs WHERE deployment = ? ORDER BY started_at DESC LIMIT ?", [self.deployment, limit])]

    def run_examples(self, run_id: str, include_dropped: bool = False) -> list[str]:
        where = "" if include_dropped else "AND NOT dropped"
        return [r[0] for r in self._read(
            f"SELECT rating_id FROM run_examples WHERE run_id = ? {where} ORDER BY rating_id", [run_id])]

    # ---------------------------------------------------------------- adapters and lineage
    def register_adapter(self, version: str, path: str | Path, sha256: str | None = None,
                         parent: str | None = None, run_id: str | None = None) -> None:
        _check_str("version", version)
        if version == BASE:
            raise InvalidInput(f"{BASE!r} is the base model, not an adapter version")
        if run_id is not None:
            self.get_run(run_id)
        with self._tx() as c:
            if c.execute("SELECT count(*) FROM adapters WHERE deployment = ? AND version = ?",
                         [self.deployment, version]).fetchone()[0]:
                raise DuplicateAdapter(f"adapter version {version!r} is already registered")
            c.execute("INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
                      [self.deployment, version, str(path), sha256, parent, run_id, self._now()])
            if run_id is not None:
                c.execute("UPDATE runs SET adapter_version = ? WHERE id = ?", [version, run_id])

    def _check_adapter(self, c: duckdb.DuckDBPyConnection, version: str) -> None:
        if version != BASE and not c.execute("SELECT count(*) FROM adapters WHERE deployment = ? AND version = ?",
                                             [self.deployment, version]).fetchone()[0]:
            raise UnknownAdapter(f"unknown adapter version {version!r}")

    def _event(self, c: duckdb.DuckDBPyConnection, event: str, from_v: str | None, to_v: str,
               reason: str | None, now: datetime) -> None:
        c.execute("INSERT INTO adapter_events VALUES (?, ?, ?, ?, ?, ?, ?)",
                  [_new_id(), self.deployment, event, from_v, to_v, reason, now])

    def mark_promoted(self, version: str, reason: str | None = None) -> None:
        """`version` now serves chats; the version it replaces is retired (kept on disk for rollback)."""
        with self._tx() as c:
            self._check_adapter(c, version)
            now, prev = self._now(), self._current(c)
            c.execute("UPDATE adapters SET retired_at = ? WHERE deployment = ? AND version = ?",
                      [now, self.deployment, prev])
            c.execute("UPDATE adapters SET promoted_at = ?, retired_at = NULL WHERE deployment = ? AND version = ?",
                      [now, self.deployment, version])
            self._event(c, "promoted", prev, version, reason, now)

    def record_rollback(self, from_version: str, to_version: str, reason: str | None = None) -> None:
        """Serving went back from `from_version` to `to_version` (an older adapter or "base")."""
        with self._tx() as c:
            self._check_adapter(c, from_version)
            self._check_adapter(c, to_version)
            now = self._now()
            c.execute("UPDATE adapters SET retired_at = ? WHERE deployment = ? AND version = ?",
                      [now, self.deployment, from_version])
            c.execute("UPDATE adapters SET retired_at = NULL WHERE deployment = ? AND version = ?",
                      [self.deployment, to_version])
            self._event(c, "rollback", from_version, to_version, reason, now)

    def _current(self, c: duckdb.DuckDBPyConnection) -> str:
        row = c.execute("SELECT to_version FROM adapter_events WHERE deployment = ? ORDER BY event_at DESC LIMIT 1",
                        [self.deployment]).fetchone()
        return row[0] if row else BASE

    def current_adapter(self) -> str:
        """The version the last promotion or rollback put in service ("base" if none)."""
        return self._current(self._cursor())

    def adapters(self) -> list[dict]:
        return self._read_dicts("SELECT * FROM adapters WHERE deployment = ? ORDER BY created_at",
                                [self.deployment])

    def adapter_events(self) -> list[dict]:
        return self._read_dicts("SELECT * FROM adapter_events WHERE deployment = ? ORDER BY event_at",
                                [self.deployment])

    def lineage(self, answer_id: str, include_ancestors: bool = False) -> list[str]:
        """Rating ids that trained the adapter which produced this answer ([] for the base model). With
        include_ancestors, also those of the adapters it was resumed from (its parent chain)."""
        version = self.get_answer(answer_id)["adapter"]
        out: set[str] = set()
        seen: set[str] = set()
        while version and version != BASE and version not in seen:
            seen.add(version)
            rows = self._read("SELECT run_id, parent FROM adapters WHERE deployment = ? AND version = ?",
                              [self.deployment, version])
            if not rows:
                break
            run_id, parent = rows[0]
            if run_id is not None:
                out.update(self.run_examples(run_id))
            if not include_ancestors:
                break
            version = parent
        return sorted(out)
