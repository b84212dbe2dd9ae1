"""Crash safety and concurrency of the feedback store on a real DuckDB file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import duckdb
import pytest

from feedback_store import FeedbackStore

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import sys, threading
    from feedback_store import FeedbackStore
    store = FeedbackStore(sys.argv[1])
    conv = store.new_conversation("writer")
    msg = store.add_user_message(conv, "rate me")
    answers = [store.add_answer(conv, msg, [{"role": "user", "content": "rate me"}], f"answer {i}")
               for i in range(40)]
    out = threading.Lock()

    def loop(t):
        i = 0
        while True:                      # until SIGKILL
            res = store.rate(f"user-{t}-{i}", answers[i % len(answers)], "up" if i % 3 else "down")
            with out:                    # reported only after rate() returned, i.e. after COMMIT
                print(res.rating_id, flush=True)
            i += 1

    def async_loop():                    # one producer keeping many ratings in flight with rate_async
        import queue
        inflight = queue.Queue(maxsize=2000)

        def report():
            while True:
                fut = inflight.get()
                res = fut.result()       # resolved only after the COMMIT that holds it
                with out:
                    print(res.rating_id, flush=True)
        threading.Thread(target=report, daemon=True).start()
        i = 0
        while True:
            inflight.put(store.rate_async(f"async-{i}", answers[i % len(answers)], "up" if i % 3 else "down"))
            i += 1

    if sys.argv[2] == "async":
        threading.Thread(target=async_loop, daemon=True).start()
    else:
        for t in range(4):
            threading.Thread(target=loop, args=(t,), daemon=True).start()
    threading.Event().wait()
""")


@pytest.mark.parametrize("mode", ["threads", "async"])
def test_kill_9_keeps_every_committed_rating(tmp_path, mode):
    """4 threads calling rate(), or one thread with rate_async() futures: whatever was reported committed
    before SIGKILL is in the file after reopening."""
    db = tmp_path / "crash.duckdb"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(db), mode], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    reported: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while len(reported) < 150 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            reported.append(line.strip())
        os.kill(proc.pid, signal.SIGKILL)          # mid-loop: other threads are inside rate() right now
    finally:
        proc.kill()
        rest = proc.stdout.read()      # through the same buffered reader: communicate() would skip its buffer
        proc.wait(timeout=30)
    # a line cut short by the kill was never fully reported: count complete lines only
    reported += [x.strip() for x in rest.splitlines(keepends=True) if x.endswith("\n") and x.strip()]
    assert proc.returncode == -signal.SIGKILL
    assert len(reported) >= 150, "child did not get going"

    with FeedbackStore(db) as store:              # reopens (replays the WAL)
        con = store._cursor()
        stored = {r[0] for r in con.execute("SELECT id FROM ratings").fetchall()}
        missing = set(reported) - stored
        assert not missing, f"{len(missing)} committed ratings lost"
        # no half-written rating: every rating row has its audit event and vice versa
        orphans = con.execute("""SELECT count(*) FROM ratings r FULL JOIN rating_audit e ON e.rating_id = r.id
            WHERE r.id IS NULL OR e.rating_id IS NULL""").fetchone()[0]
        assert orphans == 0
        assert len(stored) >= len(reported)       # at most a few committed but not yet printed
        # and the store is fully usable after the crash
        assert store.counts()["total"] == len(stored)


def test_50_concurrent_raters_lose_and_duplicate_nothing(tmp_path):
    store = FeedbackStore(tmp_path / "busy.duckdb")
    conv = store.new_conversation("host")
    msg = store.add_user_message(conv, "q")
    answers = [store.add_answer(conv, msg, [{"role": "user", "content": "q"}], f"a{i}") for i in range(12)]
    n_users = 50
    barrier = threading.Barrier(n_users)
    expected: dict[tuple[str, str], str | None] = {}
    changes = [0] * n_users
    errors: list[BaseException] = []

    def rater(u: int) -> None:
        user = f"user-{u}"
        try:
            barrier.wait()
            for k, a in enumerate(answers):
                first = "up" if (u + k) % 2 else "down"
                changes[u] += store.rate(user, a, first).changed
                changes[u] += store.rate(user, a, first).changed                # double click: no-op
                final = {0: first, 1: "down" if first == "up" else "up", 2: None}[(u * k) % 3]
                if final != first:
                    changes[u] += store.rate(user, a, final).changed
                expected[(user, a)] = final
        except BaseException as e:     # surfaced below; a thread must not die silently
            errors.append(e)

    threads = [threading.Thread(target=rater, args=(u,)) for u in range(n_users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[:3]
    store.close()

    con = duckdb.connect(str(tmp_path / "busy.duckdb"), read_only=True)
    rows = con.execute("SELECT user_id, answer_id, value, id FROM ratings").fetchall()
    n_events = con.execute("SELECT count(*) FROM rating_audit").fetchone()[0]
    con.close()
    assert len(rows) == n_users * len(answers)                         # none lost, none duplicated
    assert len({r[3] for r in rows}) == len(rows)
    assert {(u, a): v for u, a, v, _ in rows} == expected               # last write of each user wins
    assert n_events == sum(changes)                                     # the audit has exactly the changes
    assert sum(changes) == n_users * len(answers) + sum(1 for (u, a), v in expected.items()
                                                         if v != ("up" if (int(u.split("-")[1]) +
                                                                          answers.index(a)) % 2 else "down"))


def test_group_commit_batches_concurrent_raters_and_a_bad_rating_fails_alone(tmp_path):
    """16 threads: far fewer transactions than ratings (that is what makes 16 threads fast), every rating and
    audit row stored once, and a rating of an unknown answer inside a shared batch fails only its own caller."""
    store = FeedbackStore(tmp_path / "group.duckdb")
    conv = store.new_conversation("host")
    msg = store.add_user_message(conv, "q")
    answers = [store.add_answer(conv, msg, [{"role": "user", "content": "q"}], f"a{i}") for i in range(20)]
    batches: list[int] = []
    commit = store._commit_ratings

    def counting(batch):
        batches.append(sum(len(p.items) for p in batch))
        commit(batch)
    store._commit_ratings = counting
    bad_errors: list[BaseException] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def rater(k: int) -> None:
        barrier.wait()
        for i, a in enumerate(answers):
            try:
                store.rate(f"u{k}", a, "up" if (i + k) % 2 else "down")
            except BaseException as e:
                errors.append(e)
            if k == 0 and i % 5 == 0:
                try:
                    store.rate("u0", "no-such-answer", "up")
                except BaseException as e:
                    bad_errors.append(e)

    threads = [threading.Thread(target=rater, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[:3]
    assert len(bad_errors) == 4 and all(type(e).__name__ == "UnknownAnswer" for e in bad_errors)
    assert sum(batches) == 16 * len(answers) + 4
    assert len(batches) < 16 * len(answers) / 2, f"{len(batches)} commits: group commit is not batching"
    con = store._cursor()
    assert con.execute("SELECT count(*), count(DISTINCT id) FROM ratings").fetchone() == (320, 320)
    assert con.execute("SELECT count(*) FROM rating_audit").fetchone()[0] == 320
    assert con.execute("SELECT count(*) FROM ratings WHERE answer_id = 'no-such-answer'").fetchone()[0] == 0
    store.close()
