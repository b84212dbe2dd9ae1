"""Faults and attacks on the store's data: a full disk, a damaged file, backups taken while ratings arrive,
restore, and their retention. Each runs against real DuckDB files; the disk-full test in a child process whose
file-size limit (RLIMIT_FSIZE) plays the full disk."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from feedback_store import (
    CorruptStore,
    FeedbackStore,
    InvalidInput,
    PeriodicBackup,
    StoreLocked,
    check_backup,
    default_backup_dir,
    list_backups,
    newest_backup,
    prune_backups,
    restore,
)
from feedback_store.backup import backup_name

ROOT = Path(__file__).resolve().parents[2]


def _answers(store: FeedbackStore, n: int) -> list[str]:
    conv = store.new_conversation("host")
    msg = store.add_user_message(conv, "hi")
    return [store.add_answer(conv, msg, [{"role": "user", "content": "hi"}], f"answer {i}") for i in range(n)]


# ---------------------------------------------------------------- disk full
DISK_FULL_CHILD = textwrap.dedent("""
    import os, resource, signal, sys, threading
    sys.path.insert(0, sys.argv[2])
    from feedback_store import FeedbackStore, StorageFull
    path = sys.argv[1]
    store = FeedbackStore(path)
    conv = store.new_conversation("host")
    msg = store.add_user_message(conv, "hi")
    answers = [store.add_answer(conv, msg, [{"role": "user", "content": "hi"}], "x") for _ in range(40)]
    store._conn.execute("CHECKPOINT")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)    # the write fails with EFBIG instead of killing us
    limit = os.path.getsize(path) + 200_000
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    out = threading.Lock()

    def say(*words):
        with out:
            print(*words, flush=True)

    def rater(t):                     # concurrent callers: their ratings share group commits
        for i in range(100_000):
            user, answer, value = f"t{t}-{i}", answers[i % 40], "up" if i % 3 else "down"
            try:
                store.rate(user, answer, value, comment="c" * 300)
            except Exception as e:
                say("FAIL", type(e).__name__, str(e).replace(chr(10), " "))
                return
            say("ACK", user, answer, value)

    def async_rater():                # one thread, many ratings in flight
        futures = []
        for i in range(100_000):
            user, answer = f"a-{i}", answers[i % 40]
            futures.append((user, answer, store.rate_async(user, answer, "up", comment="c" * 300)))
            if len(futures) >= 50:
                for u, a, f in futures:
                    try:
                        f.result()
                    except Exception as e:
                        say("FAIL", type(e).__name__, str(e).replace(chr(10), " "))
                        return
                    say("ACK", u, a, "up")
                futures = []

    threads = [threading.Thread(target=rater, args=(t,)) for t in range(3)] + [threading.Thread(target=async_rater)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    try:                              # a write in a transaction of its own (BEGIN ... COMMIT, then ROLLBACK)
        store.add_answer(conv, msg, [{"role": "user", "content": "hi"}], "y" * 400_000)
        say("TX stored")
    except Exception as e:
        say("TX", type(e).__name__, str(e).replace(chr(10), " "))
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))   # space freed
    store.rate("after", answers[0], "down")
    say("ACK", "after", answers[0], "down")
    store.close()
""")


def test_disk_full_says_disk_full_and_loses_nothing_acknowledged(tmp_path):
    """Every rating that returned (or whose Future resolved) is in the file afterwards; every failure says the
    disk is full, never DuckDB's "cannot rollback - no transaction is active"; the store works again once space
    is back, without a restart."""
    db = tmp_path / "fb.duckdb"
    proc = subprocess.run([sys.executable, "-c", DISK_FULL_CHILD, str(db), str(ROOT)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    acked = [ln.split()[1:] for ln in lines if ln.startswith("ACK ")]
    fails = [ln for ln in lines if ln.startswith("FAIL ")]
    tx = [ln for ln in lines if ln.startswith("TX ")]
    assert len(acked) > 100 and len(fails) == 4, proc.stdout[-2000:]
    for ln in fails + tx:
        assert ln.split()[1] == "StorageFull" and "is full" in ln and "no transaction is active" not in ln, ln
    with duckdb.connect(str(db), read_only=True) as con:
        stored = {(u, a): v for u, a, v in con.execute("SELECT user_id, answer_id, value FROM ratings").fetchall()}
    lost = [x for x in acked if stored.get((x[0], x[1])) != x[2]]
    assert not lost, f"{len(lost)} acknowledged ratings lost, e.g. {lost[:3]}"
    assert acked[-1][0] == "after"


# ---------------------------------------------------------------- damaged file, backup, restore
def _damage_header(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(b"\0" * 8192)


def _damage_blocks(path: Path) -> None:
    """Overwrite bytes inside data blocks (not the header): found only when those blocks are read."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for off in range(3 * 4096 * 64, size, 262_144):
            f.seek(off + 5000)
            f.write(os.urandom(2000))


def _filled(path: Path, n: int = 2000) -> int:
    with FeedbackStore(path) as s:
        answers = _answers(s, 20)
        s.rate_many([(f"u{i}", answers[i % 20], "up" if i % 2 else "down", None, "c" * 200, f"10.0.{i % 7}.1")
                     for i in range(n)])
        return s.counts()["total"]


@pytest.mark.parametrize("damage", [_damage_header, _damage_blocks])
def test_a_damaged_store_names_the_newest_backup_and_the_restore_command(tmp_path, damage):
    db = tmp_path / "data" / "feedback.duckdb"
    total = _filled(db)
    with FeedbackStore(db) as s:
        s.backup_to_dir()
        time.sleep(0.01)
        newest = s.backup_to_dir().path
    assert newest_backup(default_backup_dir(db)) == newest and len(list_backups(default_backup_dir(db))) == 2
    damage(db)
    with pytest.raises(CorruptStore) as e:
        FeedbackStore(db, verify=True).close()
    msg = str(e.value)
    assert "damaged" in msg and str(newest.resolve()) in msg and f"kto-loop restore {newest.resolve()}" in msg
    moved = restore(newest, db)
    assert moved is not None and moved.exists() and moved != db       # the damaged file is kept aside
    with FeedbackStore(db, verify=True) as s:
        assert s.counts()["total"] == total


def test_no_backup_is_said_plainly(tmp_path):
    db = tmp_path / "feedback.duckdb"
    _filled(db, 10)
    _damage_header(db)
    with pytest.raises(CorruptStore, match="There is no backup"):
        FeedbackStore(db, read_only=True)


def test_backup_under_concurrent_writes_is_consistent_and_complete(tmp_path):
    """Writers keep committing while backups are taken: each backup opens on its own, holds every rating
    acknowledged before it started, and never half of a transaction that spans tables (one MVCC snapshot): a
    changed rating updates `ratings` and appends two `rating_events` rows in one transaction."""
    db = tmp_path / "feedback.duckdb"
    store = FeedbackStore(db)
    (a,) = _answers(store, 1)
    acked: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def writer(t: int) -> None:
        i = 0
        while not stop.is_set():
            u = f"w{t}-{i}"
            store.rate(u, a, "up")
            store.rate(u, a, "down")          # UPDATE ratings + creation and change events: all or nothing
            with lock:
                acked.append(u)
            i += 1

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    try:
        backups = []
        for k in range(10):
            time.sleep(0.05)
            with lock:
                before = list(acked)
            info = store.backup(tmp_path / "bk" / f"b{k}.duckdb")
            backups.append((info.path, before))
    finally:
        stop.set()
        for t in threads:
            t.join()
        store.close()
    assert len(acked) > 50
    for path, before in backups:
        check_backup(path)
        with duckdb.connect(str(path), read_only=True) as con:
            changed = {u for (u,) in con.execute("SELECT user_id FROM ratings WHERE value = 'down'").fetchall()}
            audited = {u for u, n in con.execute("SELECT user_id, count(*) FROM rating_events GROUP BY 1")
                       .fetchall() if n == 2}
        assert changed == audited, "a backup holds half of a transaction"
        assert set(before) <= changed, "a backup misses ratings acknowledged before it started"


def test_backup_never_overwrites_and_restore_refuses_while_the_app_holds_the_file(tmp_path):
    db = tmp_path / "feedback.duckdb"
    _filled(db, 10)
    with FeedbackStore(db) as s:
        bk = s.backup(tmp_path / "b.duckdb").path
        with pytest.raises(InvalidInput, match="never overwrites"):
            s.backup(bk)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[2]); "
                               "from feedback_store import FeedbackStore; s = FeedbackStore(sys.argv[1]); "
                               "print('open', flush=True); time.sleep(60)", str(db), str(ROOT)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(StoreLocked, match="stop the app"):
            restore(bk, db)
    finally:
        holder.kill()
        holder.wait()
    assert restore(bk, db) is not None


def test_restore_refuses_a_damaged_backup_and_keeps_the_current_file(tmp_path):
    db = tmp_path / "feedback.duckdb"
    _filled(db, 10)
    with FeedbackStore(db) as s:
        bk = s.backup(tmp_path / "b.duckdb").path
    _damage_blocks(bk) if bk.stat().st_size > 3 * 4096 * 64 else _damage_header(bk)
    before = db.read_bytes()
    with pytest.raises(CorruptStore):
        restore(bk, db)
    assert db.read_bytes() == before


def test_prune_keeps_the_newest_and_never_the_last(tmp_path):
    d = tmp_path / "backups"
    d.mkdir()
    names = [backup_name("feedback.duckdb", datetime(2026, 1, 1) + timedelta(hours=h)) for h in range(5)]
    for n in names:
        (d / n).write_bytes(b"x")
    (d / "notes.txt").write_text("not a backup")
    assert [p.name for p in prune_backups(d, 2)] == names[2::-1]
    assert [p.name for p in list_backups(d)] == names[:2:-1] and (d / "notes.txt").exists()
    with pytest.raises(InvalidInput):
        prune_backups(d, 0)


def test_periodic_backup_is_due_one_interval_after_the_newest_file_even_across_restarts(tmp_path):
    db = tmp_path / "feedback.duckdb"
    _filled(db, 10)
    d = default_backup_dir(db)
    with FeedbackStore(db) as s:
        now = [time.time()]
        pb = PeriodicBackup(s, d, interval_s=3600, keep=2, clock=lambda: now[0])
        assert pb.due_at() <= now[0]                       # no backup yet: one now
        for _ in range(3):
            assert pb.run_once() is not None
        assert len(list_backups(d)) == 2                   # retention applied after each
        newest = newest_backup(d)
        restarted = PeriodicBackup(s, d, interval_s=3600, keep=2, clock=lambda: now[0])
        assert restarted.due_at() == pytest.approx(newest.stat().st_mtime + 3600, abs=5)
        pb.start()                                         # not due: the thread takes nothing and stops promptly
        time.sleep(0.2)
        pb.stop()
        assert newest_backup(d) == newest and pb.status()["last_error"] is None


def test_periodic_backup_thread_takes_the_overdue_backup_at_start(tmp_path):
    db = tmp_path / "feedback.duckdb"
    _filled(db, 10)
    d = default_backup_dir(db)
    with FeedbackStore(db) as s:
        pb = PeriodicBackup(s, d, interval_s=3600, keep=3).start()
        try:
            deadline = time.time() + 30
            while not list_backups(d) and time.time() < deadline:
                time.sleep(0.05)
        finally:
            pb.stop()
        assert len(list_backups(d)) == 1 and pb.due_at() == pytest.approx(time.time() + 3600, abs=60)
        assert check_backup(newest_backup(d))["ratings"] == 10
