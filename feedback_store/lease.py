"""The leader lease: which one of the app processes sharing a store runs its realignment loop (schedule and runs).

DuckDB: one process opens the file for writing, so that process holds the lease, always; nothing is stored.

PostgreSQL: a session advisory lock, held on a connection of its own, rather than a lease row renewed by a
heartbeat. Why: the server releases the lock the moment the holder's session ends, so a process that is killed
(kill -9, OOM, a crashed host once TCP keepalives notice) hands the role over within one poll of the others, with
no expiry to tune and no clock to trust; and it is the same mechanism that already marks a dead process's runs
(dialect.py, hold_run). What it costs: a connection pooler in transaction mode (PgBouncer's default) would hand
the session to others and break the lock, so the app must reach PostgreSQL directly or through a session-mode
pooler (docs/deploy.md). A lease row would survive such a pooler, but a dead leader would keep the role until its
lease expired, and a leader stalled past expiry (a long GC pause, a suspended VM) would run beside its successor.

Taking the role over also clears what a dead leader left behind: its runs still marked 'running' are marked
failed (the start-up rule, applied now: a run whose process is alive keeps its lock and is left alone), and a
promotion it began but never finished is aborted (promotions only happen inside runs, so when no run is open none
can be in progress).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from feedback_store.dialect import PgConnection, lock_key

__all__ = ["LeaderLease"]

log = logging.getLogger(__name__)

KEEPALIVE = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
# the server's side of the same: a vanished holder's session (host down, no FIN) ends after ~25 s, freeing the lock
SERVER_KEEPALIVE = "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3"


def _holder_name() -> str:
    """What other processes see as the lease holder (pg_stat_activity.application_name, 63 bytes at most)."""
    return f"kto-loop leader {socket.gethostname()} pid {os.getpid()}"[:63]


class LeaderLease:
    """`refresh()` keeps or takes the role and says whether this process holds it; `close()` hands it back."""

    def __init__(self, store: Any):
        self.store = store
        self.shared = not store._dialect.single_writer   # PostgreSQL: other processes may hold it
        self.key = lock_key("leader", store.deployment)
        self.held = not self.shared
        self.since: float | None = time.time() if self.held else None
        self.took_over: list[str] = []     # what the last take-over cleared (for logs and tests)
        self._conn: PgConnection | None = None
        self._cleared = not self.shared    # the take-over clean-up has run since the role was taken
        self._lock = threading.Lock()

    def refresh(self) -> bool:
        """Whether this process leads now: if it held the role, its session must still be alive (else the role is
        lost, and taken again at once if still free); if not, take it if nobody holds it."""
        if not self.shared:
            return True
        with self._lock:
            if self.held:
                try:
                    self._conn.execute("SELECT 1")   # alive: the session, and so its lock, is still there
                except Exception as e:
                    log.error("leader lease lost (its connection failed: %s); this process stops leading", e)
                    self._drop()
            if not self.held:
                try:
                    if self._conn is None:
                        self._conn = PgConnection(self.store._conn.url, reconnect=False, connect_args=dict(
                            KEEPALIVE, application_name=_holder_name(), options=SERVER_KEEPALIVE))
                    self.held = bool(self._conn.execute("SELECT pg_try_advisory_lock(?)", [self.key]).fetchone()[0])
                except Exception as e:
                    log.warning("cannot reach the store for the leader lease: %s", e)
                    self._drop()
                    return False
                if self.held:
                    self.since, self._cleared = time.time(), False
                    log.warning("this process now leads the realignment loop of deployment %r", self.store.deployment)
            if not self._cleared:
                try:
                    self.took_over = self._take_over()
                    self._cleared = True
                except Exception as e:   # tried again at the next refresh; leading goes on meanwhile
                    log.error("could not clear what the previous leader left behind: %s", e)
            return self.held

    def _take_over(self) -> list[str]:
        """Mark the dead holders' runs failed and abort a promotion none of them can finish; what was done."""
        notes = []
        with self.store._lock:   # its clock (strictly increasing timestamps) is shared with every writer
            n = self.store._close_cut_off_runs(conn=self._conn, why="the app process running it stopped "
                                                                    "(another took over the realignment loop)")
        if n:
            notes.append(f"marked {n} run(s) of a stopped process failed")
        if not self.runs_in_flight():
            for v in self.store.pending_promotions():
                self.store.abort_promotion(v, reason="interrupted: the app process promoting it stopped")
                notes.append(f"aborted the interrupted promotion of {v}")
        for note in notes:
            log.warning("leader lease: %s", note)
        return notes

    def runs_in_flight(self) -> list[str]:
        """Runs marked 'running' in the store (any process's), oldest first."""
        return [r[0] for r in self.store._read("SELECT id FROM runs WHERE deployment = ? AND status = 'running' "
                                               "ORDER BY started_at", [self.store.deployment])]

    def holder(self) -> str | None:
        """Who holds the role, as its process names itself ("kto-loop leader HOST pid N"), or None if nobody."""
        if not self.shared:
            return _holder_name() if self.held else None
        k = self.key & 0xFFFFFFFFFFFFFFFF    # a bigint key is stored as two 32-bit halves
        rows = self.store._read(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE "
            "l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.classid::BIGINT = ? "
            "AND l.objid::BIGINT = ?", [k >> 32, k & 0xFFFFFFFF])
        return (rows[0][0] or "an app process") if rows else None

    def _drop(self) -> None:
        self.held, self.since = False, None
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def close(self) -> None:
        """Hand the role back now, so another process takes it at its next refresh: unlocked before the session
        ends (the server ends a closed session's backend a moment later)."""
        if self.shared:
            with self._lock:
                if self.held:
                    try:
                        self._conn.execute("SELECT pg_advisory_unlock(?)", [self.key])
                    except Exception:   # the session is gone already, and its lock with it
                        pass
                self._drop()
