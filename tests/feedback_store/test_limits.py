"""Rate-limit buckets in the store (feedback_store/limits.py), on both engines: capacity and refill against a
controlled clock, full buckets pruned, a forgotten user's buckets gone, and on PostgreSQL several processes taking
from one bucket at once never get more than it holds."""

from __future__ import annotations

import multiprocessing as mp
import threading

import pytest

from feedback_store import FeedbackStore, InvalidInput

T0 = 1_700_000_000.0


def test_a_bucket_holds_its_capacity_and_refills_at_its_rate(location):
    with FeedbackStore(location) as s:
        assert [s.take_token("messages", "u", 3, 60.0, T0) for _ in range(5)] == [True] * 3 + [False] * 2
        assert s.take_token("messages", "u", 3, 60.0, T0 + 19.9) is False     # one token per 20 s
        assert s.take_token("messages", "u", 3, 60.0, T0 + 20.0) is True
        assert s.take_token("messages", "u", 3, 60.0, T0 + 20.0) is False
        assert s.take_token("messages", "u", 3, 60.0, T0 + 10_000) is True   # refilled, up to capacity only
        assert [s.take_token("messages", "u", 3, 60.0, T0 + 10_000) for _ in range(3)] == [True, True, False]
        assert s.take_token("messages", "v", 3, 60.0, T0) is True              # per key
        assert s.take_token("ratings", "u", 3, 60.0, T0) is True               # per limiter
        assert s.take_token("messages", "u", 3, 60.0, T0 - 5.0) is False       # a clock behind adds nothing
        assert all(s.take_token("open", "u", 0, 60.0, T0) for _ in range(10))   # 0 = no limit, and no row
        assert s.rate_bucket_count() == 3
        with pytest.raises(InvalidInput):
            s.take_token("messages", "u", 3, 0.0, T0)


def test_a_bucket_is_the_same_as_the_in_memory_one(location):
    """Same capacities, rates and answers as app/web/auth.py TokenBuckets for one irregular stream of events."""
    from app.web.auth import TokenBuckets

    mem = TokenBuckets(5, 60.0)
    times = [0, 0, 1, 2, 2, 2, 3, 14, 15, 15, 27, 27, 27, 28, 60, 61, 61, 61, 61, 61, 61, 200, 200]
    with FeedbackStore(location) as s:
        got = [s.take_token("m", "k", 5, 60.0, T0 + t) for t in times]
    assert got == [mem.allow("k", T0 + t) for t in times]
    assert True in got and False in got


def test_full_buckets_are_pruned_and_busy_ones_kept(location):
    with FeedbackStore(location) as s:
        s.PRUNE_EVERY = 13
        for i in range(10):
            s.take_token("m", f"idle{i}", 2, 60.0, T0)        # full again 30 s later
        s.take_token("m", "busy", 2, 60.0, T0 + 50)
        s.take_token("m", "busy", 2, 60.0, T0 + 50)            # empty at +50: not full before +110
        assert s.rate_bucket_count() == 11
        s.take_token("m", "new", 2, 60.0, T0 + 61)             # the 13th take prunes
        assert s.rate_bucket_count() == 2
        assert s.take_token("m", "busy", 2, 60.0, T0 + 61) is False   # its state survived the pruning
        assert s.prune_rate_buckets(T0 + 10_000) == 2 and s.rate_bucket_count() == 0


def test_forgetting_a_user_drops_their_buckets(location):
    with FeedbackStore(location) as s:
        s.take_token("messages", "anon-0123456789abcdef", 2, 60.0, T0)
        s.take_token("messages", "anon-fedcba9876543210", 2, 60.0, T0)
        s.forget_user("anon-0123456789abcdef")
        assert s._read("SELECT bucket_key FROM rate_buckets") == [("anon-fedcba9876543210",)]


def test_threads_on_one_store_never_take_more_than_the_capacity(location):
    with FeedbackStore(location) as s:
        allowed: list[bool] = []
        start = threading.Barrier(6)

        def worker() -> None:
            start.wait()
            mine = [s.take_token("m", "shared", 25, 3600.0, T0) for _ in range(10)]
            allowed.extend(mine)

        threads = [threading.Thread(target=worker) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(allowed) == 25 and len(allowed) == 60


def _taker(url: str, takes: int, start, out) -> None:
    """One app process: its own store connection, `takes` takes from the shared bucket as fast as it can."""
    with FeedbackStore(url) as s:
        start.wait()
        out.put(sum(s.take_token("messages", "shared", 50, 3600.0, T0) for _ in range(takes)))


def test_processes_sharing_a_postgres_store_never_take_more_than_the_capacity(pg_url):
    FeedbackStore(pg_url).close()                         # migrated once, before the race
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_taker, args=(pg_url, 30, start, out)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert sum(got) == 50 and len(got) == 4, got          # 120 takes, one bucket of 50, no refill at one instant
    with FeedbackStore(pg_url) as s:
        assert s._read("SELECT tokens, allowed FROM rate_buckets") == [(0.0, False)]
