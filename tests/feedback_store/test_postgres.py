"""What only PostgreSQL has: several processes writing one store at once, and the locks that keep that exact; and
that both engines write the same snapshot for the same rows."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from feedback_store import FeedbackStore, InvalidInput, StoreError
from feedback_store.core import rollback
from feedback_store.dialect import PgConnection, lock_key, redact


def _chat(store: FeedbackStore, i: int) -> str:
    conv = store.new_conversation(f"u{i}", system_prompt="Be brief.")
    msg = store.add_user_message(conv, f"q{i} ünïcödé")
    return store.add_answer(conv, msg, [{"role": "user", "content": f"q{i} ünïcödé"}], f"a{i}", latency_ms=1.5)


def _scripted_history(store: FeedbackStore, out: Path) -> tuple[str, bytes]:
    answers = [_chat(store, i) for i in range(6)]
    store.rate_many([(f"r{j}", a, "up" if (i + j) % 3 else "down", None, None, f"10.0.0.{j}")
                     for i, a in enumerate(answers) for j in range(3)])
    store.rate("r0", answers[0], None)
    store.rate("r1", answers[1], "up", reason="changed my mind")
    run = store.start_run("cli")
    info = store.export_snapshot(out, run_id=run, max_user_share=0.5)
    assert store.get_run(run)["snapshot_sha256"] == info.sha256
    return info.sha256, out.read_bytes()


def test_both_engines_write_the_same_snapshot_file_for_the_same_rows(tmp_path, pg_url, monkeypatch):
    """Same ids, same clock, same calls: the Parquet files (and so their sha256) are byte for byte the same."""
    import feedback_store.conversations as conversations
    import feedback_store.ratings as ratings
    import feedback_store.runs as runs

    got = []
    for location in (tmp_path / "fb.duckdb", pg_url):
        ids = itertools.count()
        for mod in (conversations, ratings, runs):
            monkeypatch.setattr(mod, "_new_id", lambda ids=ids: f"{next(ids):032x}")
        ticks = itertools.count()

        def clock(ticks=ticks) -> datetime:
            return datetime(2025, 3, 1, 9) + timedelta(seconds=next(ticks))
        with FeedbackStore(location, clock=clock) as s:
            got.append(_scripted_history(s, tmp_path / f"{len(got)}.parquet"))
    assert got[0][0] == got[1][0] and got[0][1] == got[1][1]


_WORKER = r"""
import json, sys, time
from pathlib import Path
from feedback_store import FeedbackStore

url, me, sync = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
store = FeedbackStore(url)                      # all four migrate the fresh database at the same moment
(sync / f"ready{me}").touch()
while not (sync / "go").exists():
    time.sleep(0.01)
answers = json.loads((sync / "go").read_text())
n = 0
for rnd in range(4):
    # every process rates every (user, answer) key; a new reason each time makes each call a change
    batch = [(f"user{u}", a, "up" if (u + i + rnd + me) % 2 else "down", f"p{me}r{rnd}")
             for i, a in enumerate(answers) for u in range(5)]
    if rnd % 2:
        store.rate_many(batch)
    else:
        for item in batch:
            assert store.rate(*item).changed
    n += len(batch)
store.close()
print(n)
"""


def test_four_processes_rating_at_once_all_land_with_one_current_rating_per_key(pg_url, tmp_path):
    """Four app processes open a fresh database together (migrations one at a time), then all rate the same
    (user, answer) keys at once: every change is in the audit, each key has exactly one rating row, and each
    row holds the value of its last audited change."""
    sync = tmp_path / "sync"
    sync.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, pg_url, str(i), str(sync)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2]) for i in range(4)]
    try:
        deadline = time.monotonic() + 60
        while not all((sync / f"ready{i}").exists() for i in range(4)):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with FeedbackStore(pg_url) as s:
            answers = [_chat(s, i) for i in range(10)]
            (sync / "go.tmp").write_text(json.dumps(answers))
            (sync / "go.tmp").rename(sync / "go")
            outs = [p.communicate(timeout=120) for p in procs]
            assert [p.returncode for p in procs] == [0] * 4, [o[1][-2000:] for o in outs]
            calls = sum(int(o[0]) for o in outs)
            assert calls == 4 * 4 * 10 * 5
            rows = s._read("SELECT answer_id, user_id, id, value, reason FROM ratings")
            assert len(rows) == 10 * 5 == len({(a, u) for a, u, *_ in rows}) == len({r[2] for r in rows})
            assert s._read("SELECT count(*), count(DISTINCT id) FROM rating_audit")[0] == (calls, calls)
            last = {r[0]: (r[1], r[2]) for r in s._read(
                """SELECT DISTINCT ON (rating_id) rating_id, value, reason FROM rating_audit
                   ORDER BY rating_id, event_at DESC""")}
            assert {rid: (v, r) for _, _, rid, v, r in rows} == last
            assert s.schema_version() == s._read("SELECT max(version) FROM schema_version")[0][0]
            assert s._read("SELECT count(*) FROM schema_version")[0][0] == s.schema_version()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _blocked(fn) -> tuple[threading.Thread, dict]:
    """Run fn in a thread; its result or error lands in the returned dict."""
    out: dict = {}

    def run():
        try:
            out["result"] = fn()
        except Exception as e:       # noqa: BLE001 - the test inspects it
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_a_first_rating_waits_for_another_writer_of_the_same_key(pg_url):
    """Another process holding the key's lock (its rating transaction still open) and then committing the row:
    this store waits, then finds the row and changes it, instead of inserting a second one."""
    with FeedbackStore(pg_url) as s:
        a = _chat(s, 0)
        other = PgConnection(pg_url)
        other.execute("BEGIN")
        other.execute("SELECT pg_advisory_xact_lock(?)", [lock_key(a, "ann")])
        t, out = _blocked(lambda: s.rate("ann", a, "down"))
        time.sleep(0.5)
        assert t.is_alive()                                   # waiting for the other writer
        other.execute("""INSERT INTO ratings (answer_id, user_id, id, deployment, adapter, value, created_at,
            updated_at, audited) VALUES (?, 'ann', 'theirs', 'default', 'base', 'up', now(), now(), false)""", [a])
        other.execute("COMMIT")
        t.join(10)
        assert out == {"result": out.get("result")} and out["result"].rating_id == "theirs"
        assert [h["value"] for h in s.rating_history("theirs")] == ["up", "down"]
        other.close()


def test_one_active_api_key_per_client_across_processes(pg_url):
    """The check-then-insert of a client's key holds a lock for its name: a key another process created while
    this one waited is seen, and refused as a second active key."""
    with FeedbackStore(pg_url) as s:
        other = PgConnection(pg_url)
        other.execute("BEGIN")
        other.execute("SELECT pg_advisory_xact_lock(?)", [lock_key("default", "api-key:app")])
        t, out = _blocked(lambda: s.create_api_key("app"))
        time.sleep(0.5)
        assert t.is_alive()
        other.execute("INSERT INTO api_keys VALUES ('k1', 'default', 'app', 'hash', 'ktol-xxxx', now(), NULL)")
        other.execute("COMMIT")
        t.join(10)
        assert isinstance(out.get("error"), InvalidInput)
        assert [k["active"] for k in s.api_keys("app")] == [True]
        other.close()


def test_a_run_of_a_live_process_is_not_closed_by_another_starting_up(pg_url):
    """On one file only this process writes, so a 'running' run at start-up was cut off; on PostgreSQL another
    process may be running it right now: it stays open while that process lives, and is closed after it died."""
    first = FeedbackStore(pg_url)
    run = first.start_run("schedule")
    with FeedbackStore(pg_url) as second:
        assert second.get_run(run)["status"] == "running"
    first._conn.close()                 # the process dies: its connection, and the run's lock, are gone
    first._closed = True
    with FeedbackStore(pg_url) as third:
        got = third.get_run(run)
        assert got["status"] == "failed" and "interrupted" in got["error"]
        done = third.start_run("operator")
        third.finish_run(done, "succeeded")
    with FeedbackStore(pg_url) as fourth:
        assert fourth.get_run(done)["status"] == "succeeded"


def test_backups_are_the_servers_business(pg_url, tmp_path):
    """The online backup copies a DuckDB file; a PostgreSQL store says what to use instead, and writes nothing."""
    with FeedbackStore(pg_url) as s:
        with pytest.raises(StoreError, match="pg_dump"):
            s.backup(tmp_path / "b.duckdb")
    assert not list(tmp_path.iterdir())


def test_a_dropped_connection_is_replaced_and_an_open_transaction_is_never_half_redone(pg_url):
    """The server drops every connection of the store (a restart, a failover): the next write and read work on new
    connections, which hold the open runs' locks again; a transaction that was cut is refused, never continued
    outside its transaction, and retrying the write applies it once."""
    def drop_all() -> None:
        admin = PgConnection(pg_url)
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                      "AND pid <> pg_backend_pid()")
        admin.close()

    with FeedbackStore(pg_url) as s:
        a = _chat(s, 0)
        run = s.start_run("schedule")
        assert s.counts()["total"] == 0
        drop_all()
        assert s.rate("ann", a, "up").changed
        with FeedbackStore(pg_url) as other:      # the new connection holds the open run again
            assert other.get_run(run)["status"] == "running"
        assert s.counts()["total"] == 1
        s._conn.execute("BEGIN")                  # a rating batch's transaction: its locks, then its read
        drop_all()
        with pytest.raises(psycopg.OperationalError):   # never re-run on a new connection, outside its transaction
            s._conn.execute("SELECT count(*) FROM ratings")
        rollback(s._conn)
        assert s.get_rating("ann", a)["value"] == "up"
        assert s.rate("ann", a, "down").changed and s.get_rating("ann", a)["value"] == "down"


def test_the_url_password_never_shows_in_messages():
    assert redact("postgresql://kto:s3cret@db.example:5432/kto") == "postgresql://kto:***@db.example:5432/kto"
    assert redact("postgresql://kto@/kto?host=/run/pg") == "postgresql://kto@/kto?host=/run/pg"
