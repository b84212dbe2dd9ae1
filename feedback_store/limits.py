"""Rate-limit token buckets kept in the store, so app processes sharing one PostgreSQL database share each limit
(N replicas with per-process buckets would allow N times every limit).

One bucket per (deployment, limiter, key): `tokens` left at `seen_s` (seconds since the epoch, the callers' wall
clock), refilled at `per_s` tokens a second up to `capacity`. A take is one INSERT ... ON CONFLICT DO UPDATE ...
RETURNING: PostgreSQL locks the row (or the key, for a first take) for that one statement, so concurrent takes from
any number of processes are applied one after another and none is lost. A full bucket is the same as none, so full
buckets are deleted now and then (the table holds only keys active within their refill time).
"""

from __future__ import annotations

import math
import threading

from feedback_store.core import StoreCore, _check_str
from feedback_store.errors import InvalidInput, StoreError

# the bucket after refilling to now (the stored row, then the proposed one's time, capacity and rate)
_REFILLED = ("least(excluded.capacity, rate_buckets.tokens + "
             "greatest(0, excluded.seen_s - rate_buckets.seen_s) * excluded.per_s)")
_TAKE = f"""INSERT INTO rate_buckets (deployment, limiter, bucket_key, tokens, seen_s, capacity, per_s, allowed)
    VALUES (?, ?, ?, ?, ?, ?, ?, true)
    ON CONFLICT (deployment, limiter, bucket_key) DO UPDATE SET
        allowed = {_REFILLED} >= 1,
        tokens = {_REFILLED} - CASE WHEN {_REFILLED} >= 1 THEN 1 ELSE 0 END,
        seen_s = greatest(rate_buckets.seen_s, excluded.seen_s),
        capacity = excluded.capacity, per_s = excluded.per_s
    RETURNING allowed"""
_COUNT_LOCK = threading.Lock()


class RateLimits(StoreCore):
    """Token buckets shared by every process on this store (see the module docstring)."""

    PRUNE_EVERY = 1000          # takes by this store between deletions of full buckets

    def _prune_due(self) -> bool:
        """Every PRUNE_EVERY-th take of this store (any thread)."""
        with _COUNT_LOCK:
            self._rate_takes = getattr(self, "_rate_takes", 0) + 1
            return self._rate_takes % self.PRUNE_EVERY == 0

    def take_token(self, limiter: str, key: str, capacity: int, period_s: float, now: float) -> bool:
        """Take one token from bucket (`limiter`, `key`) holding up to `capacity`, refilled at capacity per
        `period_s` seconds, at time `now` (epoch seconds); whether there was one. capacity 0 = no limit."""
        _check_str("limiter", limiter)
        _check_str("key", key, max_len=1024)
        if capacity <= 0:
            return True
        if not (period_s > 0 and math.isfinite(now)):
            raise InvalidInput(f"a bucket needs a positive period and a finite time, got {period_s!r}, {now!r}")
        with self._tx() as c:
            allowed = c.execute(_TAKE, [self.deployment, limiter, key, float(capacity - 1), float(now),
                                        float(capacity), capacity / period_s]).fetchone()[0]
        if self._prune_due():
            try:
                self.prune_rate_buckets(now)
            except (StoreError, *self._errors):   # the take counted; a failed prune waits for the next one
                pass
        return bool(allowed)

    def prune_rate_buckets(self, now: float) -> int:
        """Delete the buckets that are full again at `now` (the same as no bucket); how many."""
        with self._tx() as c:
            return int(c.execute("DELETE FROM rate_buckets WHERE deployment = ? AND "
                                 "tokens + greatest(0, ? - seen_s) * per_s >= capacity",
                                 [self.deployment, float(now)]).fetchone()[0])

    def rate_bucket_count(self) -> int:
        """How many buckets this deployment holds (not yet full again, or not yet pruned)."""
        return int(self._read("SELECT count(*) FROM rate_buckets WHERE deployment = ?", [self.deployment])[0][0])
