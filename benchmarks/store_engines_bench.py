"""The feedback store on DuckDB against PostgreSQL, side by side in one run: ratings/s with 1 and 4 writers, and the
console's dashboard queries at 1 M ratings.

    .venv/bin/python -m benchmarks.store_engines_bench [--ratings 1000000] [--write-ratings 800] [--repeats 3]

Writes benchmarks/results/store_engines_bench/<date>_<cpu>.json (`_n<N>` appended when --ratings is not 1 M).

Write throughput goes through the real FeedbackStore API, in writer processes started for the case: each writer
first stores its answers as the app does (new_conversation, then add_user_message + add_answer per turn, four
turns a conversation; timed apart, as answers/s), then all writers start together and call rate() once per
answer (70 % 👎, a third of them with a reason). Cases, interleaved in every repeat:

- duckdb 1 process: the app's shape. DuckDB lets one process open the file for writing, so 4 writers on DuckDB
  are 4 threads of that one process sharing one FeedbackStore (its group commit batches their ratings).
- postgres 1 process, postgres 1 process × 4 threads (like for like with DuckDB's 4 threads), postgres 4
  processes (each its own FeedbackStore: the scaled shape of docs/deploy.md).

The PostgreSQL server is the tests' throwaway cluster (tests/fixtures_pg.py, PgServer) started here with durable
commits (fsync and synchronous_commit on, as DuckDB's commits are), so both engines pay one fsync per commit.

Dashboard queries: the same 1 M ratings (10,000 raters, 250,000 conversations, six promoted versions after base,
70/30 👎/👍, 2 % withdrawn, reasons and comments on some 👎) are generated once in DuckDB and bulk-loaded into both
engines (DuckDB INSERT ... SELECT, PostgreSQL COPY, then VACUUM ANALYZE as autovacuum would leave it). Each
store method the console's refresh calls (app/web/console.py, Operator) is then timed through FeedbackStore,
the engines rotating, median of 5 after a warm-up. A third column is the console's DuckDB copy of the PostgreSQL
store (feedback_store/mirror.py; what the app reads with db_url set): the time to make it (median of 5) and the
calls it answers; `--repeats 0` skips the write throughput.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from benchmarks.harness import machine, result_path, write_result
from feedback_store import FeedbackStore
from feedback_store.core import utcnow
from tests.fixtures_pg import PgServer, pg_bin_dir

DEPLOYMENT = "default"
USERS = 10_000
VERSIONS = 6                      # kto-v1 .. kto-v6 after base; the answers' time split in VERSIONS + 1 periods
DAYS = 90
TURNS = 4                         # answers per conversation
REASONS = ("wrong facts", "too long", "did not answer", "rude", "unsafe")
# what the console runs with (app/config.py defaults): the snapshot's share caps and a run's max_examples
MAX_USER_SHARE, MAX_ADDR_SHARE, MAX_EXAMPLES = 0.1, 0.2, 2000
# a production-like server on this 2-core, 23 GiB machine: durable commits (the defaults), more memory than 128 MB
PG_SETTINGS = {"shared_buffers": "1GB", "work_mem": "32MB", "maintenance_work_mem": "256MB", "max_wal_size": "4GB",
               "fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}


# ------------------------------------------------------------------------------------------- the PostgreSQL server
class BenchPg(PgServer):
    """The tests' throwaway cluster, started with durable commits and PG_SETTINGS instead of their fsync=off."""

    def start(self) -> BenchPg:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--locale=C", "--encoding=UTF8",
                  "--no-sync")
        opts = f"-k {self.sock} -c listen_addresses='' " + " ".join(f"-c {k}={v}" for k, v in PG_SETTINGS.items())
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "server.log"), "-w", "start")
        return self


def pg_version(bin_dir: Path) -> str:
    return subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True, text=True).stdout.strip()


def fsync_ms(folder: Path, n: int = 100) -> float:
    """One small write + fsync on the disk both engines write to: the floor of a durable commit."""
    fd = os.open(folder / "fsync.bin", os.O_WRONLY | os.O_CREAT)
    try:
        t = time.perf_counter()
        for _ in range(n):
            os.write(fd, b"x" * 128)
            os.fsync(fd)
        return (time.perf_counter() - t) * 1000 / n
    finally:
        os.close(fd)
        os.unlink(folder / "fsync.bin")


# -------------------------------------------------------------------------------------------- write throughput
def _store_answers(store: FeedbackStore, user: str, n: int) -> list[str]:
    """n answers stored the way the app stores a chat's turns, TURNS to a conversation."""
    answers: list[str] = []
    conv = None
    for i in range(n):
        if i % TURNS == 0:
            conv = store.new_conversation(user, "Be helpful and concise.")
        q = f"question {i} from {user}: how do I bake bread without yeast?"
        msg = store.add_user_message(conv, q)
        answers.append(store.add_answer(conv, msg, [{"role": "system", "content": "Be helpful and concise."},
                                                    {"role": "user", "content": q}],
                                        f"Answer {i}: use baking soda and an acid such as yoghurt; " * 3,
                                        sampling={"temperature": 0.7}, prompt_tokens=30, completion_tokens=60,
                                        latency_ms=900.0))
    return answers


def _rate_all(store: FeedbackStore, user: str, answers: list[str], k: int) -> None:
    """One rate() per answer, as the app calls it per thumb: 70 % down, a third of the downs with a reason."""
    for i, a in enumerate(answers):
        down = (i * 7 + k) % 10 < 7
        reason = REASONS[i % len(REASONS)] if down and i % 3 == 0 else None
        store.rate(user, a, "down" if down else "up", reason=reason, client_addr=f"10.0.{k}.{i % 200}")


def writer_process(location: str, threads: int, per_thread: int, tag: str, barrier: Any, out: Any) -> None:
    """One app process: its own FeedbackStore, `threads` threads each storing then rating `per_thread` answers."""
    store = FeedbackStore(location, DEPLOYMENT)
    try:
        answers: list[list[str]] = [[] for _ in range(threads)]
        go = threading.Event()
        spans: list[tuple[float, float]] = [(0.0, 0.0)] * threads
        ready = threading.Barrier(threads + 1)

        def work(k: int) -> None:
            user = f"{tag}-t{k}"
            answers[k] = _store_answers(store, user, per_thread)
            ready.wait()
            go.wait()
            t0 = time.perf_counter()
            _rate_all(store, user, answers[k], k)
            spans[k] = (t0, time.perf_counter())

        ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        t_prep = time.perf_counter()
        for th in ts:
            th.start()
        ready.wait()
        prep_s = time.perf_counter() - t_prep
        barrier.wait()                    # every process has stored its answers: start rating together
        go.set()
        for th in ts:
            th.join()
        out.put({"ratings": threads * per_thread, "prep_s": prep_s, "t0": min(s[0] for s in spans),
                 "t1": max(s[1] for s in spans)})
    finally:
        store.close()


def run_case(location: str, procs: int, threads: int, total: int, tag: str) -> dict[str, float]:
    """ratings/s of `procs` processes × `threads` threads rating `total` answers in all (each rate() durable when
    it returns), over the span from the first rating to the last; answers/s of storing them beforehand."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs + 1), ctx.Queue()
    per = max(1, total // (procs * threads))
    ps = [ctx.Process(target=writer_process, args=(location, threads, per, f"{tag}-p{j}", barrier, out))
          for j in range(procs)]
    for p in ps:
        p.start()
    barrier.wait(timeout=600)
    got = [out.get(timeout=600) for _ in ps]
    for p in ps:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a writer process of {tag} failed (exit code {p.exitcode})")
    n = sum(g["ratings"] for g in got)
    return {"ratings_per_s": n / (max(g["t1"] for g in got) - min(g["t0"] for g in got)),
            "answers_per_s": n / max(g["prep_s"] for g in got), "ratings": n}


CASES = (  # name, engine, processes, threads per process
    ("duckdb_1proc", "duckdb", 1, 1),
    ("duckdb_1proc_4threads", "duckdb", 1, 4),
    ("postgres_1proc", "postgres", 1, 1),
    ("postgres_1proc_4threads", "postgres", 1, 4),
    ("postgres_4procs", "postgres", 4, 1),
)


def throughput(where: dict[str, str], total: int, repeats: int) -> dict[str, Any]:
    """Every case in every repeat, the order rotated each repeat; medians."""
    runs: dict[str, list[dict[str, float]]] = {c[0]: [] for c in CASES}
    loads = []
    for rep in range(repeats):
        order = CASES[rep % len(CASES):] + CASES[:rep % len(CASES)]
        for name, engine, procs, threads in order:
            loads.append(os.getloadavg()[0])
            r = run_case(where[engine], procs, threads, total, f"{name}-r{rep}")
            runs[name].append(r)
            print(f"  {name:26s} {r['ratings_per_s']:8.0f} ratings/s  {r['answers_per_s']:7.0f} answers/s  "
                  f"(load {loads[-1]:.1f})", flush=True)
    cases = {name: {"engine": engine, "processes": procs, "threads_per_process": threads,
                    "ratings_per_s": statistics.median(r["ratings_per_s"] for r in runs[name]),
                    "answers_per_s": statistics.median(r["answers_per_s"] for r in runs[name]),
                    "runs": runs[name]}
             for name, engine, procs, threads in CASES}
    return {"ratings_per_case": total, "repeats": repeats, "cases": cases, "load_avg_1min": loads}


# ------------------------------------------------------------------------------------------- 1 M ratings, loaded
def generate(con: duckdb.DuckDBPyConnection, n: int, end: datetime) -> dict[str, str]:
    """The rows, as temp tables g_<table> of `con`, with every column the store's tables hold; returns table -> the
    SELECT of its columns in the product's order (the same text feeds DuckDB's INSERT and PostgreSQL's COPY)."""
    start = end - timedelta(days=DAYS)
    span_us = DAYS * 86_400_000_000
    con.execute(f"""CREATE TEMP TABLE g_base AS SELECT i, i // {TURNS} AS c,
            TIMESTAMP '{start:%Y-%m-%d %H:%M:%S}' + to_microseconds((i * {span_us} // {n})::BIGINT) AS t,
            (i * {VERSIONS + 1}) // {n} AS v
        FROM range({n}) r(i)""")
    # raters: a skewed population (a few heavy raters, a long tail), 3,000 client addresses among them
    con.execute(f"""CREATE TEMP TABLE g_users AS SELECT c,
            'user-' || lpad(floor({USERS} * pow((hash(c, 7) % 1000003) / 1000003.0, 2))::BIGINT::VARCHAR, 5, '0')
            AS user_id FROM (SELECT DISTINCT c FROM g_base)""")
    con.execute("""CREATE TEMP TABLE g_conv AS SELECT c, u.user_id, min(t) - INTERVAL 10 SECOND AS created_at
        FROM g_base JOIN g_users u USING (c) GROUP BY c, u.user_id""")
    version = "CASE WHEN v = 0 THEN 'base' ELSE 'kto-v' || v::VARCHAR END"
    # every 10th answer is a regeneration: a sibling of the previous answer (same user message)
    msg_of = "md5('m' || (CASE WHEN i % 10 = 9 THEN i - 1 ELSE i END)::VARCHAR)"
    reason = "(['" + "', '".join(REASONS) + "'])[1 + (hash(i, 13) % " + str(len(REASONS)) + ")::BIGINT]"
    con.execute(f"""CREATE TEMP TABLE g_ratings AS SELECT b.i, b.c, md5('a' || b.i::VARCHAR) AS answer_id, u.user_id,
            md5('r' || b.i::VARCHAR) AS id, {version} AS adapter,
            CASE WHEN hash(i, 11) % 1000 < 20 THEN NULL WHEN hash(i, 11) % 1000 < 706 THEN 'down' ELSE 'up' END
            AS value, CASE WHEN hash(i, 11) % 1000 < 706 THEN 'down' ELSE 'up' END AS first_value,
            b.t + INTERVAL 20 SECOND AS created_at,
            b.t + CASE WHEN hash(i, 11) % 1000 < 20 THEN INTERVAL 80 SECOND ELSE INTERVAL 20 SECOND END AS updated_at,
            '10.0.' || ((hash(u.user_id, 19) % 3000) // 250)::VARCHAR || '.' ||
            ((hash(u.user_id, 19) % 3000) % 250)::VARCHAR AS client_addr
        FROM g_base b JOIN g_users u USING (c)""")
    d = f"'{DEPLOYMENT}'"
    ends = [start + timedelta(microseconds=k * span_us // (VERSIONS + 1)) for k in range(1, VERSIONS + 1)]
    runs_rows = ", ".join(
        f"('run-{k}', TIMESTAMP '{t:%Y-%m-%d %H:%M:%S}', 'kto-v{k}', {'NULL' if k == 1 else repr(f'kto-v{k - 1}')})"
        for k, t in enumerate(ends, 1))
    con.execute(f"CREATE TEMP TABLE g_runs AS SELECT * FROM (VALUES {runs_rows}) v(id, t, version, parent)")
    return {
        "conversations": f"""SELECT md5('c' || c::VARCHAR), {d}, user_id, 'Be helpful and concise.', created_at
            FROM g_conv""",
        "messages": f"""SELECT md5('s' || c::VARCHAR), md5('c' || c::VARCHAR), NULL, 'system',
                'Be helpful and concise.', created_at FROM g_conv
            UNION ALL SELECT md5('m' || i::VARCHAR), md5('c' || c::VARCHAR),
                CASE WHEN i % {TURNS} = 0 THEN NULL ELSE md5('a' || (i - 1)::VARCHAR) END, 'user',
                'Question ' || i::VARCHAR || ': how should I plan a three-day trip to the mountains in spring?',
                t - INTERVAL 5 SECOND FROM g_base WHERE i % 10 <> 9""",
        "answers": f"""SELECT md5('a' || i::VARCHAR), {d}, md5('c' || c::VARCHAR), {msg_of},
                '[{{"role":"system","content":"Be helpful and concise."}},{{"role":"user","content":"Question ' ||
                (CASE WHEN i % 10 = 9 THEN i - 1 ELSE i END)::VARCHAR ||
                ': how should I plan a three-day trip to the mountains in spring?"}}]',
                'Answer ' || i::VARCHAR || ': start with the weather forecast, book a hut for the two nights, pack '
                || 'layers and a map, and keep the third day short so the walk down is not rushed.',
                {version}, '{{"temperature":0.7,"top_p":0.95,"max_tokens":256}}', 30 + hash(i, 3) % 40,
                40 + hash(i, 5) % 200, 300.0 + hash(i, 9) % 3000, t FROM g_base""",
        "ratings": f"""SELECT answer_id, user_id, id, {d}, adapter, value,
                CASE WHEN first_value = 'down' AND hash(i, 17) % 100 < 30 THEN {reason} END,
                CASE WHEN first_value = 'down' AND hash(i, 23) % 100 < 5
                    THEN 'it said ' || i::VARCHAR || ' but the trail is closed in spring' END,
                created_at, updated_at, value IS NULL, client_addr FROM g_ratings""",
        # a withdrawn rating has its creation event and its withdrawal written (schema v4: audited = true)
        "rating_events": f"""SELECT id, id, {d}, answer_id, user_id, first_value, NULL, NULL, created_at, client_addr
                FROM g_ratings WHERE value IS NULL
            UNION ALL SELECT md5('e' || i::VARCHAR), id, {d}, answer_id, user_id, NULL, NULL, NULL, updated_at,
                client_addr FROM g_ratings WHERE value IS NULL""",
        "runs": f"""SELECT id, {d}, 'schedule', 'succeeded', t, t + INTERVAL 13 MINUTE, t, md5(id), NULL, NULL,
                NULL, NULL, '{{}}', '{{"version":"' || version || '"}}', NULL, version, NULL FROM g_runs""",
        "adapters": f"""SELECT {d}, version, '/srv/kto-loop/adapters/' || version, md5(version), parent, id,
                t + INTERVAL 13 MINUTE, t + INTERVAL 14 MINUTE, NULL FROM g_runs""",
        "adapter_events": f"""SELECT md5('ev' || id), {d}, 'promoted', coalesce(parent, 'base'), version,
                'gate passed', t + INTERVAL 14 MINUTE FROM g_runs""",
    }


COLUMNS = {  # the product's column order of each table (explicit, so a later migration's columns stay default)
    "conversations": "id, deployment, user_id, system_prompt, created_at",
    "messages": "id, conversation_id, parent_id, role, content, created_at",
    "answers": "id, deployment, conversation_id, parent_id, prompt_messages, text, adapter, sampling, prompt_tokens, "
               "completion_tokens, latency_ms, created_at",
    "ratings": "answer_id, user_id, id, deployment, adapter, value, reason, comment, created_at, updated_at, audited, "
               "client_addr",
    "rating_events": "id, rating_id, deployment, answer_id, user_id, value, reason, comment, event_at, client_addr",
    "runs": "id, deployment, trigger, status, started_at, finished_at, snapshot_at, snapshot_sha256, n_desirable, "
            "n_undesirable, lambda_d, lambda_u, params, metrics, error, adapter_version, snapshot_caps",
    "adapters": "deployment, version, path, sha256, parent, run_id, created_at, promoted_at, retired_at",
    "adapter_events": "id, deployment, event, from_version, to_version, reason, event_at",
}


def load_both(duck_path: Path, pg_url: str, n: int, tmp: Path) -> dict[str, Any]:
    """The same n ratings into a new DuckDB file and an empty PostgreSQL database, each schema made by the store
    itself; seconds each load took."""
    FeedbackStore(duck_path, DEPLOYMENT).close()
    FeedbackStore(pg_url, DEPLOYMENT).close()
    con = duckdb.connect(str(duck_path))
    try:
        t = time.perf_counter()
        selects = generate(con, n, utcnow() - timedelta(minutes=5))
        gen_s = time.perf_counter() - t
        t = time.perf_counter()
        con.execute("BEGIN")
        for table, sql in selects.items():
            con.execute(f"INSERT INTO {table} ({COLUMNS[table]}) {sql}")
        con.execute("COMMIT")
        con.execute("CHECKPOINT")
        duck_s = time.perf_counter() - t
        t = time.perf_counter()
        for table, sql in selects.items():
            con.execute(f"COPY ({sql}) TO '{tmp / table}.csv' (FORMAT csv, HEADER false)")
        csv_s = time.perf_counter() - t
    finally:
        con.close()
    import psycopg

    t = time.perf_counter()
    with psycopg.connect(pg_url, autocommit=True) as pg:
        with pg.cursor() as cur:
            for table in selects:
                with open(tmp / f"{table}.csv", "rb") as f, \
                        cur.copy(f"COPY {table} ({COLUMNS[table]}) FROM STDIN (FORMAT csv)") as cp:
                    while chunk := f.read(1 << 20):
                        cp.write(chunk)
                (tmp / f"{table}.csv").unlink()
        copy_s = time.perf_counter() - t
        t = time.perf_counter()
        pg.execute("VACUUM ANALYZE")
        vacuum_s = time.perf_counter() - t
        sizes = {"postgres_db_mb": pg.execute("SELECT pg_database_size(current_database())").fetchone()[0] / 2**20}
    sizes["duckdb_file_mb"] = duck_path.stat().st_size / 2**20
    return {"generate_s": gen_s, "duckdb_insert_checkpoint_s": duck_s, "csv_export_s": csv_s,
            "postgres_copy_s": copy_s, "postgres_vacuum_analyze_s": vacuum_s, **sizes}


def check_same(stores: dict[str, FeedbackStore]) -> dict[str, Any]:
    """The product's own answers agree on both engines (else the timings would compare different work)."""
    from app.loop.next_run import next_run

    seen = {e: {"counts": s.counts(), "by_adapter": [(r["adapter"], r["up"], r["down"]) for r in
                                                     s.counts_by_adapter()],
                "current": s.current_adapter(), "next_run": next_run(s, mode="continue",
                                                                     max_examples=MAX_EXAMPLES).as_dict()}
            for e, s in stores.items()}
    a, b = seen.values()
    if a != b:
        raise RuntimeError(f"the engines disagree on the loaded rows: {a} vs {b}")
    return seen["duckdb"]


def dashboard_queries(store: FeedbackStore, tmp: Path) -> dict[str, Callable[[], object]]:
    """Each store call the console's refresh makes (app/web/console.py: Operator.summary, by_time, by_adapter,
    by_user, runs, adapters; the 👎 reasons tab), with the console's arguments, and export_snapshot of a run."""
    from app.cli import stats as cli_stats  # here, not at the top: the writer processes need neither
    from app.loop.next_run import next_run

    def nxt() -> dict:
        return next_run(store, mode="continue", max_examples=MAX_EXAMPLES).as_dict()
    served = store.current_adapter()
    nx = nxt()
    return {
        "counts": store.counts,
        "next_run": nxt,     # what the next run would train on: current_adapter, adapters, snapshot_keys, split
        "ratings_since_last_run": store.ratings_since_last_run,
        "training_counts_unseen_by_served": lambda: store.training_counts(since=served, max_user_share=None,
                                                                          max_addr_share=None),
        "snapshot_shares": lambda: cli_stats.shares(store, nx),
        "last_run_checks": lambda: cli_stats.last_run_checks(store),
        "counts_by_time_hour": lambda: store.counts_by_time("hour"),
        "counts_by_time_day": lambda: store.counts_by_time("day"),
        "counts_by_adapter": store.counts_by_adapter,
        "counts_by_user_top100": store.counts_by_user,
        "runs": store.runs,
        "adapters": store.adapters,
        "down_reasons": store.down_reasons,
        "down_reasons_served": lambda: store.down_reasons(served),
        "export_snapshot_newest_2000": lambda: store.export_snapshot(tmp / "snapshot.parquet",
                                                                     max_examples=MAX_EXAMPLES),
    }


REFRESH = ("counts", "next_run", "ratings_since_last_run", "training_counts_unseen_by_served", "snapshot_shares",
           "last_run_checks", "counts_by_time_hour", "counts_by_adapter", "counts_by_user_top100", "runs", "adapters")


# the calls the console's DuckDB copy of a PostgreSQL store answers (app/web/console.py, Operator.counted); the
# others (runs, adapters, 👎 reasons, exports) stay on PostgreSQL
COPIED = ("counts", "next_run", "ratings_since_last_run", "training_counts_unseen_by_served", "snapshot_shares",
          "counts_by_time_hour", "counts_by_time_day", "counts_by_adapter", "counts_by_user_top100")


def dashboard(stores: dict[str, FeedbackStore], tmp: Path, repeats: int) -> dict[str, dict[str, float]]:
    """Median ms of each query per engine, engines rotating (the order turned each repeat), after a warm-up;
    `console_refresh` is the sum of the calls one refresh of the console makes (on the copy: the COPIED calls
    there, the rest on PostgreSQL, as the app does)."""
    queries = {e: dashboard_queries(s, tmp / e) for e, s in stores.items()}
    for e in stores:
        (tmp / e).mkdir(exist_ok=True)
    out: dict[str, dict[str, float]] = {}
    for name in queries["duckdb"]:
        engines = [e for e in stores if e != "postgres_copy" or name in COPIED]
        times: dict[str, list[float]] = {e: [] for e in engines}
        for e in engines:
            queries[e][name]()                          # warm-up
        for rep in range(repeats):
            for e in engines[rep % len(engines):] + engines[:rep % len(engines)]:
                t = time.perf_counter()
                queries[e][name]()
                times[e].append((time.perf_counter() - t) * 1000)
        out[name] = {e: statistics.median(v) for e, v in times.items()}
        out[name].update({f"{e}_over_duckdb": out[name][e] / out[name]["duckdb"] for e in engines if e != "duckdb"})
        print(f"  {name:34s} " + "   ".join(f"{e} {out[name][e]:9.1f} ms" for e in engines), flush=True)
    refresh = {e: sum(out[q][e] for q in REFRESH) for e in ("duckdb", "postgres")}
    if "postgres_copy" in stores:
        refresh["postgres_copy"] = sum(out[q]["postgres_copy" if q in COPIED else "postgres"] for q in REFRESH)
    out["console_refresh"] = refresh | {f"{e}_over_duckdb": v / refresh["duckdb"] for e, v in refresh.items()
                                        if e != "duckdb"}
    print("  console refresh: " + ", ".join(f"{e} {v:.1f} ms" for e, v in refresh.items()), flush=True)
    return out


def dashboard_copy(pg: FeedbackStore, tmp: Path, repeats: int) -> tuple[FeedbackStore, dict[str, Any]]:
    """Time making the console's DuckDB copy of the PostgreSQL store (feedback_store/mirror.py, build), median of
    `repeats`; returns the last copy, opened read-only as the app opens it, and the timings."""
    from feedback_store.mirror import build

    times, n = [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        n = build(pg, tmp / "copy.duckdb")
        times.append(time.perf_counter() - t)
    print(f"  dashboard copy of {n:,} ratings: median {statistics.median(times):.2f} s of {repeats}", flush=True)
    copy = FeedbackStore(tmp / "copy.duckdb", DEPLOYMENT, read_only=True, max_user_share=MAX_USER_SHARE,
                         max_addr_share=MAX_ADDR_SHARE)
    return copy, {"ratings": n, "seconds": times, "median_s": statistics.median(times),
                  "file_mb": (tmp / "copy.duckdb").stat().st_size / 2**20}


# ------------------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratings", type=int, default=1_000_000, help="ratings loaded for the dashboard queries")
    ap.add_argument("--write-ratings", type=int, default=800, help="ratings per throughput case and repeat")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the throughput cases (0: skip them)")
    ap.add_argument("--query-repeats", type=int, default=5, help="timed calls of each dashboard query")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or result_path("store_engines_bench", None if args.ratings == 1_000_000 else f"n{args.ratings}")
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        raise SystemExit("PostgreSQL is not installed (initdb/pg_ctl not found); `make test` installs it")
    t_all = time.perf_counter()
    result: dict[str, Any] = {"machine": machine()}
    server = BenchPg(bin_dir).start()
    try:
        with tempfile.TemporaryDirectory(prefix="kto-store-bench-") as d:
            tmp = Path(d)
            import psycopg

            with psycopg.connect(server.url(), autocommit=True) as pg:
                server_version = pg.execute("SHOW server_version").fetchone()[0]
            result["machine"].update({"postgres": pg_version(bin_dir), "postgres_server_version": server_version,
                                      "psycopg": psycopg.__version__, "fsync_ms": fsync_ms(tmp)})
            result["postgres_settings"] = PG_SETTINGS
            where = {"duckdb": str(tmp / "writes.duckdb"), "postgres": server.new_database()}
            print(f"write throughput: {args.write_ratings} ratings per case, {args.repeats} repeats", flush=True)
            if args.repeats:
                result["throughput"] = throughput(where, args.write_ratings, args.repeats)

            print(f"loading {args.ratings:,} ratings into both engines", flush=True)
            pg_url = server.new_database()
            result["load"] = load_both(tmp / "dash.duckdb", pg_url, args.ratings, tmp)
            print("  " + ", ".join(f"{k} {v:.1f}" for k, v in result["load"].items()), flush=True)
            stores = {e: FeedbackStore(loc, DEPLOYMENT, max_user_share=MAX_USER_SHARE, max_addr_share=MAX_ADDR_SHARE)
                      for e, loc in (("duckdb", tmp / "dash.duckdb"), ("postgres", pg_url))}
            try:
                result["loaded"] = check_same(stores)
                stores["postgres_copy"], result["dashboard_copy"] = dashboard_copy(stores["postgres"], tmp,
                                                                                   args.query_repeats)
                result["dashboard_ms"] = dashboard(stores, tmp, args.query_repeats)
            finally:
                for s in stores.values():
                    s.close()
    finally:
        server.stop()
    result["machine"]["load_avg_at_end"] = os.getloadavg()[0]
    result["ratios"] = {
        "dashboard_postgres_over_duckdb": {q: v["postgres_over_duckdb"] for q, v in result["dashboard_ms"].items()},
        "dashboard_copy_over_duckdb": {q: v["postgres_copy_over_duckdb"] for q, v in result["dashboard_ms"].items()
                                       if "postgres_copy_over_duckdb" in v},
    }
    if "throughput" in result:
        cases = result["throughput"]["cases"]
        duck1 = cases["duckdb_1proc"]["ratings_per_s"]
        result["ratios"].update({
            **{f"{k}_over_duckdb_1proc": v["ratings_per_s"] / duck1 for k, v in cases.items()
               if k != "duckdb_1proc"},
            "postgres_4procs_over_duckdb_1proc_4threads": cases["postgres_4procs"]["ratings_per_s"]
            / cases["duckdb_1proc_4threads"]["ratings_per_s"],
            "postgres_1proc_4threads_over_duckdb_1proc_4threads": cases["postgres_1proc_4threads"]["ratings_per_s"]
            / cases["duckdb_1proc_4threads"]["ratings_per_s"],
        })
    write_result(result, out, t_all)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
