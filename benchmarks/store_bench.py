"""Feedback-store benchmark: ratings/s (one thread, 16 threads, batched) and dashboard latency at 100k / 1M.

Run: .venv/bin/python -m benchmarks.store_bench [--sizes 100000 1000000]
(writes benchmarks/results/store_bench/<date>_<cpu>.json unless --out)
Synthetic rows are bulk-loaded with INSERT ... SELECT FROM range() (not through the API), then every dashboard
query is timed through FeedbackStore. Figures are medians; the machine is shared, so the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import duckdb

from benchmarks.harness import machine, result_path
from feedback_store import FeedbackStore


def median_ms(fn: Callable[[], object], repeats: int = 7) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def fresh_answers(store: FeedbackStore, n: int) -> list[str]:
    conv = store.new_conversation("bench")
    msg = store.add_user_message(conv, "q")
    con = store._conn  # bulk: one INSERT, not n API calls
    with store._lock:
        ids = [r[0] for r in con.execute("""INSERT INTO answers SELECT md5(random()::VARCHAR || i::VARCHAR), ?, ?,
            ?, '[{"role":"user","content":"q"}]', 'a', 'base', '{}', 1, 1, 1.0, now()::TIMESTAMP
            FROM range(?) t(i) RETURNING id""", [store.deployment, conv, msg, n]).fetchall()]
    return ids


def as_if_added(store: FeedbackStore, answers: list[str]) -> None:
    """What add_answer leaves in the app: the answer and its (empty) rating set cached, so no batch reads."""
    with store._lock:
        for a in answers:
            store._remember_answer(a, store.deployment, "base")
            store._remember_ratings(a, {})


def run_async(store: FeedbackStore, n: int, tag: str) -> float:
    """ratings/s of one thread calling rate_async() n times, timed until the last future resolved (= durable)."""
    ans = fresh_answers(store, n)
    as_if_added(store, ans)
    t = time.perf_counter()
    futures = [store.rate_async(tag, a, "up" if i % 3 else "down") for i, a in enumerate(ans)]
    for f in futures:
        f.result()
    return n / (time.perf_counter() - t)


def run_threads(store: FeedbackStore, n_threads: int, per_thread: int, tag: str, cached: bool = False) -> float:
    """ratings/s of n_threads threads each calling rate() in a loop through one store (one writer connection)."""
    ans = fresh_answers(store, per_thread)
    if cached:
        as_if_added(store, ans)

    def worker(k: int) -> None:
        for i, a in enumerate(ans):
            store.rate(f"{tag}-{k}", a, "up" if (i + k) % 3 else "down")
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return n_threads * len(ans) / (time.perf_counter() - t)


def throughput(store: FeedbackStore, repeats: int) -> dict:
    """ratings/s, every rating durable when its call returns:
    single_thread_rate         one thread calling rate() in a loop: one commit (fdatasync) per rating
    threads16_rate             one writer process, 16 threads calling rate(): group commit (the app's shape)
    threads16_rate_no_gather   the same with the group-commit gather wait off (FeedbackStore.gather_s = 0)
    threads16_rate_cached      16 threads, answers cached as add_answer leaves them (the app's case): no read
    single_thread_rate_many100 one thread, rate_many batches of 100 (one transaction each)
    single_thread_rate_async   one thread, rate_async() 3,000 times, until every future resolved (committed)
    threads16_rate and _no_gather rate answers bulk-inserted behind the store's back: every batch reads them."""
    keys = ("single_thread_rate", "threads16_rate", "threads16_rate_no_gather", "threads16_rate_cached",
            "single_thread_rate_many100", "single_thread_rate_async")
    out: dict[str, list[float]] = {k: [] for k in keys}
    gather = store.gather_s
    loads = []
    for rep in range(repeats):
        loads.append(os.getloadavg()[0])
        out["single_thread_rate"].append(run_threads(store, 1, 300, f"s{rep}"))
        out["threads16_rate"].append(run_threads(store, 16, 150, f"t{rep}"))
        store.gather_s = 0.0
        try:
            out["threads16_rate_no_gather"].append(run_threads(store, 16, 150, f"n{rep}"))
        finally:
            store.gather_s = gather
        out["threads16_rate_cached"].append(run_threads(store, 16, 150, f"c{rep}", cached=True))

        ans = fresh_answers(store, 3000)
        t = time.perf_counter()
        for j in range(0, len(ans), 100):
            store.rate_many([(f"b{rep}", a, "up" if i % 3 else "down") for i, a in enumerate(ans[j:j + 100])])
        out["single_thread_rate_many100"].append(len(ans) / (time.perf_counter() - t))
        out["single_thread_rate_async"].append(run_async(store, 3000, f"a{rep}"))
    return {**{k: {"median": statistics.median(v), "runs": v} for k, v in out.items()}, "loadavg_1min": loads}


def commit_ceiling(tmp: Path, n: int = 200) -> dict:
    """What one durable commit costs here: bare DuckDB autocommit inserts and a raw fsync."""
    con = duckdb.connect(str(tmp / "ceiling.duckdb"))
    con.execute("CREATE TABLE t (a VARCHAR)")
    t = time.perf_counter()
    for i in range(n):
        con.execute("INSERT INTO t VALUES (?)", [str(i)])
    commits = n / (time.perf_counter() - t)
    con.close()
    fd = os.open(tmp / "fsync.bin", os.O_WRONLY | os.O_CREAT)
    t = time.perf_counter()
    for _ in range(100):
        os.write(fd, b"x" * 128)
        os.fsync(fd)
    fsync_ms = (time.perf_counter() - t) * 10
    os.close(fd)
    return {"duckdb_autocommit_inserts_per_s": commits, "fsync_ms": fsync_ms}


def bulk_load(path: Path, n: int, deployment: str = "default") -> None:
    """n answers and n never-changed ratings: 1,000 users, 5 adapter versions, 60 days of timestamps."""
    FeedbackStore(path, deployment).close()
    con = duckdb.connect(str(path))
    con.execute("BEGIN")
    con.execute("""INSERT INTO answers SELECT md5('a' || i::VARCHAR), ?, md5('c' || (i // 4)::VARCHAR),
        md5('m' || i::VARCHAR), '[{"role":"system","content":"Be helpful."},{"role":"user","content":"question ' ||
        i::VARCHAR || '"}]', 'answer number ' || i::VARCHAR, CASE WHEN i % 5 = 0 THEN 'base' ELSE 'kto-v' ||
        (i % 5)::VARCHAR END, '{"temperature":0.7}', 20, 40, 120.0,
        TIMESTAMP '2025-01-01' + to_microseconds((i * 5184000000000 // ?)::BIGINT) FROM range(?) t(i)""",
                [deployment, n, n])
    con.execute("""INSERT INTO ratings SELECT id, 'user-' || (hash(id) % 1000)::VARCHAR, md5('r' || id), deployment,
        adapter, CASE WHEN hash(id) % 10 < 6 THEN 'up' WHEN hash(id) % 10 < 9 THEN 'down' ELSE NULL END,
        NULL, NULL, created_at + INTERVAL 1 MINUTE, created_at + INTERVAL 1 MINUTE, false FROM answers""")
    # never-changed ratings: their creation events are implied by the rows (schema v4), so no rating_events rows
    con.execute("""INSERT INTO runs (id, deployment, trigger, status, started_at, finished_at, snapshot_at)
        VALUES ('run-0', ?, 'schedule', 'succeeded', TIMESTAMP '2025-02-25', TIMESTAMP '2025-02-25 00:13:00',
                TIMESTAMP '2025-02-25')""", [deployment])
    con.execute("COMMIT")
    con.execute("CHECKPOINT")
    con.close()


def dashboard(path: Path) -> dict:
    store = FeedbackStore(path)
    try:
        queries = {
            "counts": store.counts,
            "counts_by_time_day": lambda: store.counts_by_time("day"),
            "counts_by_time_hour": lambda: store.counts_by_time("hour"),
            "counts_by_adapter": store.counts_by_adapter,
            "counts_by_user_top100": store.counts_by_user,
            "ratings_since_last_run": store.ratings_since_last_run,
            "training_counts_max2000": lambda: store.training_counts(max_examples=2000),
            "current_adapter": store.current_adapter,
            "runs": store.runs,
        }
        res = {name: median_ms(fn) for name, fn in queries.items()}
        with tempfile.TemporaryDirectory() as d:
            res["export_snapshot_2000"] = median_ms(
                lambda: store.export_snapshot(Path(d) / "s.parquet", max_examples=2000), repeats=3)
        it = iter(fresh_answers(store, 21))
        res["rate_one_at_this_size"] = median_ms(lambda: store.rate("late", next(it), "up"), repeats=20)
        old = iter(store._read("SELECT user_id, answer_id FROM ratings WHERE value = 'up' LIMIT 21"))
        res["rate_change_at_this_size"] = median_ms(   # an existing rating flips up -> down: the UPDATE path
            lambda: store.rate(*next(old), "down"), repeats=20)
        return res
    finally:
        store.close()


def locked_vs_cursor(store: FeedbackStore, seconds: float = 3.0) -> dict:
    """counts() latency while 16 threads rate: per-thread cursor (the design) vs the shared connection + lock."""
    stop = threading.Event()
    ans = fresh_answers(store, 2000)

    def writer(k: int) -> None:
        i = 0
        while not stop.is_set():
            store.rate(f"w{k}", ans[i % len(ans)], "up" if i % 2 else "down")
            i += 1

    def locked_counts() -> object:
        with store._lock:
            return store._conn.execute("SELECT count(*) FILTER (WHERE value = 'up') FROM ratings").fetchall()

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(16)]
    for th in threads:
        th.start()
    try:
        out = {}
        for name, fn in (("cursor_per_thread_ms", store.counts), ("shared_connection_lock_ms", locked_counts)):
            times, end = [], time.perf_counter() + seconds
            while time.perf_counter() < end:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1000)
            out[name] = statistics.median(times)
    finally:
        stop.set()
        for th in threads:
            th.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(result_path("store_bench")))
    args = ap.parse_args()
    result: dict = {"machine": machine()}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        result["commit_ceiling"] = commit_ceiling(tmp)
        with FeedbackStore(tmp / "tp.duckdb") as store:
            result["ratings_per_s"] = throughput(store, args.repeats)
            result["read_under_write_load"] = locked_vs_cursor(store)
        result["dashboard_ms"] = {}
        for n in args.sizes:
            t = time.perf_counter()
            bulk_load(tmp / f"n{n}.duckdb", n)
            load_s = time.perf_counter() - t
            result["dashboard_ms"][str(n)] = {"bulk_load_s": load_s, **dashboard(tmp / f"n{n}.duckdb")}
    result["machine"]["loadavg_end"] = os.getloadavg()

    tp = {k: v["median"] for k, v in result["ratings_per_s"].items() if isinstance(v, dict)}
    goal = 2000
    m = result["machine"]
    print(f"machine: {m['cpu']} x{m['cores']}, load average at start {m['loadavg_start']}")
    print(f"durable commit here: fsync {result['commit_ceiling']['fsync_ms']:.2f} ms, bare DuckDB autocommit "
          f"{result['commit_ceiling']['duckdb_autocommit_inserts_per_s']:.0f} inserts/s")
    for k, v in tp.items():
        print(f"{k:30s} {v:9.0f} ratings/s   ({v / goal:.2f}x the 2,000/s goal)")
    print(f"16 threads vs one thread: {tp['threads16_rate'] / tp['single_thread_rate']:.1f}x; gather on vs off: "
          f"{tp['threads16_rate'] / tp['threads16_rate_no_gather']:.2f}x; cached vs read: "
          f"{tp['threads16_rate_cached'] / tp['threads16_rate']:.2f}x; rate_async vs rate(): "
          f"{tp['single_thread_rate_async'] / tp['single_thread_rate']:.1f}x; rate_many(100) vs rate(): "
          f"{tp['single_thread_rate_many100'] / tp['single_thread_rate']:.1f}x; one thread vs the commit ceiling "
          f"(1 / fdatasync): {tp['single_thread_rate'] * result['commit_ceiling']['fsync_ms'] / 1000:.2f}x")
    rw = result["read_under_write_load"]
    ratio = rw["shared_connection_lock_ms"] / rw["cursor_per_thread_ms"]
    print(f"counts() under 16 writers: cursor {rw['cursor_per_thread_ms']:.1f} ms vs shared lock "
          f"{rw['shared_connection_lock_ms']:.1f} ms ({ratio:.1f}x)")
    sizes = list(result["dashboard_ms"])
    print("dashboard median ms: " + "  ".join(f"{s:>10s}" for s in sizes))
    for q in result["dashboard_ms"][sizes[0]]:
        row = [result["dashboard_ms"][s][q] for s in sizes]
        flag = "" if q in ("bulk_load_s", "export_snapshot_2000") or max(row) <= 200 else "  > 200 ms goal"
        print(f"  {q:28s} " + "  ".join(f"{x:10.1f}" for x in row) + flag)
    result["goals"] = {"ratings_per_s": goal, "dashboard_ms_at_1M": 200}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
