"""feedback_store on a real DuckDB file and a real PostgreSQL database (the `location` fixture): schema, migration,
ratings with audit, siblings, runs, lineage, export. Tests of DuckDB's own row-id cache use `duck_store`."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import duckdb
import pyarrow.parquet as pq
import pytest

from feedback_store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    SNAPSHOT_SCHEMA,
    DuplicateAdapter,
    FeedbackStore,
    InvalidInput,
    InvalidRating,
    ReadOnlyStore,
    SchemaError,
    StoreError,
    UnknownAdapter,
    UnknownAnswer,
    UnknownConversation,
    WrongDeployment,
)


class Clock:
    """A settable clock, so time buckets and `since` filters are exact."""

    def __init__(self, t: datetime = datetime(2025, 3, 1, 9, 0, 0)):
        self.t = t

    def __call__(self) -> datetime:
        return self.t

    def tick(self, **kw) -> None:
        self.t += timedelta(**kw)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(location, clock):
    s = FeedbackStore(location, deployment="prod", clock=clock)
    yield s
    s.close()


@pytest.fixture
def duck_store(tmp_path, clock):
    s = FeedbackStore(tmp_path / "fb.duckdb", deployment="prod", clock=clock)
    yield s
    s.close()


def raw_connection(location):
    """A plain connection to the store's database, bypassing the store (DuckDB's, or psycopg's behind the same
    calling convention)."""
    if isinstance(location, str):
        from feedback_store.dialect import PgConnection
        return PgConnection(location)
    return duckdb.connect(str(location))


def chat(store: FeedbackStore, user="alice", question="What is 2+2?", answer="4", adapter="base"):
    conv = store.new_conversation(user, system_prompt="Be brief.")
    msg = store.add_user_message(conv, question)
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]
    ans = store.add_answer(conv, msg, prompt, answer, adapter=adapter, sampling={"temperature": 0.7},
                           prompt_tokens=12, completion_tokens=1, latency_ms=35.5)
    return conv, msg, ans


def test_schema_created_with_current_version(location):
    path = location
    with FeedbackStore(path) as s:
        assert s.schema_version() == SCHEMA_VERSION == MIGRATIONS[-1].version
    con = raw_connection(path)
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    versions = [r[0] for r in con.execute("SELECT version FROM schema_version ORDER BY 1").fetchall()]
    con.close()
    assert {"conversations", "messages", "answers", "ratings", "rating_events", "runs", "run_examples",
            "adapters", "adapter_events"} <= tables
    assert versions == [m.version for m in MIGRATIONS]
    # reopening is a no-op, not a second migration
    with FeedbackStore(path) as s:
        assert s.schema_version() == SCHEMA_VERSION


def test_migrates_a_v1_file_and_keeps_its_data(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    for stmt in MIGRATIONS[0].statements:          # the v1 DDL exactly as released
        con.execute(stmt)
    con.execute("INSERT INTO schema_version VALUES (1, 'v1', now()::TIMESTAMP)")
    t = datetime(2025, 1, 1, 12)
    con.execute("INSERT INTO conversations VALUES ('c1', 'default', 'bob', NULL, ?)", [t])
    con.execute("INSERT INTO messages VALUES ('m1', 'c1', NULL, 'user', 'hi', ?)", [t])
    con.execute("INSERT INTO answers VALUES ('a1', 'default', 'c1', 'm1', ?, 'hello', 'base', '{}', 1, 1, 1.0, ?)",
                [json.dumps([{"role": "user", "content": "hi"}]), t])
    con.execute("INSERT INTO ratings VALUES ('a1', 'bob', 'r1', 'default', 'base', 'up', NULL, NULL, ?, ?)", [t, t])
    con.execute("INSERT INTO runs (id, deployment, trigger, status, started_at) "
                "VALUES ('run1', 'default', 'operator', 'succeeded', ?)", [t])
    con.execute("INSERT INTO run_examples VALUES ('run1', 'r1', true)")
    con.close()

    with pytest.raises(SchemaError, match="version 1"):
        FeedbackStore(path, read_only=True)            # read-only cannot upgrade
    with FeedbackStore(path) as s:
        assert s.migrated_from == 1
        assert s.schema_version() == SCHEMA_VERSION
        assert s.counts() == {"up": 1, "down": 0, "withdrawn": 0, "total": 1}
        assert s.run_examples("run1") == ["r1"]         # the new `dropped` column defaulted to false
        s.register_adapter("kto-v1", "/adapters/kto-v1", "ab" * 32, run_id="run1")
        s.mark_promoted("kto-v1")                        # needs the v2 adapter_events table
        assert s.current_adapter() == "kto-v1"
        assert s.rate("carol", "a1", "down").changed
    with FeedbackStore(path, read_only=True) as s:
        assert s.counts()["total"] == 2


def test_migrates_a_v3_file_whose_ratings_all_have_their_events(location):
    """v4 writes a new rating's creation event lazily; a v3 file's ratings already have theirs (audited = true),
    so the audit neither loses nor doubles an event, before or after a change."""
    from feedback_store.dialect import dialect_for
    from feedback_store.schema import migrate
    path = location
    con = raw_connection(path)
    assert migrate(con, lambda: datetime(2025, 1, 1), target=3, ddl=dialect_for(path).ddl) == (0, 3)
    t = datetime(2025, 1, 1, 12)
    con.execute("INSERT INTO answers VALUES ('a1', 'default', 'c1', 'm1', ?, 'hello', 'base', '{}', 1, 1, 1.0, ?)",
                [json.dumps([{"role": "user", "content": "hi"}]), t])
    con.execute("INSERT INTO ratings VALUES ('a1', 'bob', 'r1', 'default', 'base', 'up', NULL, NULL, ?, ?)", [t, t])
    con.execute("INSERT INTO rating_events VALUES ('e1', 'r1', 'default', 'a1', 'bob', 'up', NULL, NULL, ?)", [t])
    con.close()
    with FeedbackStore(path) as s:
        assert s.migrated_from == 3 and s.schema_version() == SCHEMA_VERSION
        assert s.get_rating("bob", "a1")["audited"] is True
        assert [(h["id"], h["value"]) for h in s.rating_history("r1")] == [("e1", "up")]
        assert s.rate("bob", "a1", "down").changed
        assert [(h["id"], h["value"]) for h in s.rating_history("r1")][0] == ("e1", "up")
        assert [h["value"] for h in s.rating_history("r1")] == ["up", "down"]
        new = s.rate("carol", "a1", "up")
        assert s.get_rating("carol", "a1")["audited"] is False
        assert [h["value"] for h in s.rating_history(new.rating_id)] == ["up"]
        assert s._cursor().execute("SELECT count(*) FROM rating_audit").fetchone()[0] == 3


def test_newer_schema_is_refused(location):
    path = location
    FeedbackStore(path).close()
    con = raw_connection(path)
    con.execute("INSERT INTO schema_version VALUES (?, 'from the future', now()::TIMESTAMP)", [SCHEMA_VERSION + 1])
    con.close()
    with pytest.raises(SchemaError, match="newer"):
        FeedbackStore(path)


def test_rating_upsert_withdraw_and_audit(store):
    _, _, ans = chat(store)
    first = store.rate("alice", ans, "up")
    assert first.changed and first.value == "up" and first.rating_id
    again = store.rate("alice", ans, "up")                       # idempotent
    assert again == type(first)(first.rating_id, "up", False)
    down = store.rate("alice", ans, "down", reason="wrong", comment="it is 4, not four")
    assert down.changed and down.rating_id == first.rating_id    # one rating per (user, answer)
    assert store.rate("alice", ans, "down").changed is False     # same value, no reason: keeps the reason
    assert store.get_rating("alice", ans)["reason"] == "wrong"
    assert store.counts() == {"up": 0, "down": 1, "withdrawn": 0, "total": 1}
    wd = store.rate("alice", ans, None)
    assert wd.changed and wd.value is None
    assert store.rate("alice", ans, None).changed is False
    assert store.counts() == {"up": 0, "down": 0, "withdrawn": 1, "total": 1}
    history = store.rating_history(first.rating_id)
    assert [h["value"] for h in history] == ["up", "down", None]
    assert history[1]["reason"] == "wrong" and history[1]["comment"] == "it is 4, not four"
    # withdrawing a rating that never existed changes nothing and creates no row
    _, _, other = chat(store, question="And 3+3?", answer="6")
    assert store.rate("bob", other, None).rating_id is None
    assert store.get_rating("bob", other) is None


def test_final_rating_only_counts_for_training(store, tmp_path):
    _, _, a1 = chat(store, answer="4")
    _, _, a2 = chat(store, answer="five")
    store.rate("alice", a1, "down")
    store.rate("alice", a1, "up")       # changed mind: only "up" is exported
    store.rate("bob", a2, "down")
    store.rate("carol", a2, "up")
    store.rate("carol", a2, None)       # withdrawn: not exported
    info = store.export_snapshot(tmp_path / "s.parquet")
    rows = pq.read_table(info.path).to_pylist()
    assert (info.n_desirable, info.n_undesirable) == (1, 1)
    assert sorted((r["answer_id"], r["user_id"], r["label"]) for r in rows) == sorted(
        [(a1, "alice", True), (a2, "bob", False)])


def test_bad_input_raises_typed_errors_and_writes_nothing(location, clock):
    path = location
    with FeedbackStore(path, deployment="staging", clock=clock) as other:
        _, _, foreign = chat(other)
    with FeedbackStore(path, deployment="prod", clock=clock) as s:
        _, _, ans = chat(s)
        with pytest.raises(UnknownAnswer):
            s.rate("alice", "no-such-answer", "up")
        with pytest.raises(WrongDeployment):
            s.rate("alice", foreign, "up")
        for bad in ("like", "UP", 1, True, ""):
            with pytest.raises(InvalidRating):
                s.rate("alice", ans, bad)
        with pytest.raises(InvalidRating):
            s.rate("", ans, "up")
        with pytest.raises(InvalidRating):
            s.rate("alice", ans, "down", reason="x" * 1000)
        with pytest.raises(UnknownConversation):
            s.add_user_message("no-such-conversation", "hi")
        conv = s.new_conversation("alice")
        with pytest.raises(InvalidInput):
            s.add_user_message(conv, "   ")
        msg = s.add_user_message(conv, "hi")
        with pytest.raises(InvalidInput):
            s.add_answer(conv, msg, [{"role": "wizard", "content": "x"}], "y")
        with pytest.raises(UnknownConversation):
            s.add_answer(conv, "not-a-message", [{"role": "user", "content": "hi"}], "y")
        # a batch with one bad item is refused as a whole
        with pytest.raises(UnknownAnswer):
            s.rate_many([("alice", ans, "up"), ("alice", "nope", "up")])
        assert s.counts()["total"] == 0
        assert s.rating_history(s.rate("alice", ans, "up").rating_id)[0]["value"] == "up"
        assert s.counts()["total"] == 1


def test_sibling_answers_are_kept(store):
    conv, msg, first = chat(store, answer="four")
    prompt = store.get_answer(first)["prompt_messages"]
    second = store.add_answer(conv, msg, prompt, "4", adapter="kto-v1")
    sibs = store.siblings(first)
    assert [s["id"] for s in sibs] == [first, second]
    assert [s["text"] for s in sibs] == ["four", "4"]
    store.rate("alice", first, "down")
    store.rate("alice", second, "up")
    assert store.counts() == {"up": 1, "down": 1, "withdrawn": 0, "total": 2}
    follow = store.add_user_message(conv, "thanks", parent_id=second)
    turns = store.conversation(conv)
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "assistant", "user"]
    assert turns[-1]["id"] == follow and turns[-1]["parent_id"] == second
    a = store.get_answer(second)
    assert a["prompt_messages"][0] == {"role": "system", "content": "Be brief."}
    assert a["sampling"] == {} and a["adapter"] == "kto-v1"


def test_dashboard_counts(store, clock):
    answers = []
    for day in range(3):
        for _hour in range(2):
            _, _, a = chat(store, adapter="base" if day < 2 else "kto-v1")
            answers.append(a)
            store.rate("alice", a, "up")
            store.rate("bob", a, "down" if day == 0 else "up")
            clock.tick(hours=1)
        clock.tick(days=1, hours=-2)
    store.rate("carol", answers[0], "up")
    store.rate("carol", answers[0], None)
    by_day = store.counts_by_time("day")
    # carol's rating counts where it ended: withdrawn, on day 4
    assert [(r["bucket"].day, r["up"], r["down"], r["withdrawn"]) for r in by_day] == [
        (1, 2, 2, 0), (2, 4, 0, 0), (3, 4, 0, 0), (4, 0, 0, 1)]
    by_hour = store.counts_by_time("hour")
    assert len(by_hour) == 7 and sum(r["up"] + r["down"] for r in by_hour) == 12
    by_adapter = {r["adapter"]: r for r in store.counts_by_adapter()}
    assert (by_adapter["base"]["up"], by_adapter["base"]["down"]) == (6, 2)
    assert by_adapter["kto-v1"]["approval"] == 1.0 and by_adapter["base"]["approval"] == 0.75
    users = {r["user_id"]: r for r in store.counts_by_user()}
    assert (users["bob"]["up"], users["bob"]["down"], users["carol"]["withdrawn"]) == (4, 2, 1)
    assert store.training_counts() == (10, 2)
    assert store.training_counts(max_examples=2) == (2, 0)
    with pytest.raises(InvalidInput):
        store.counts_by_time("week")


def test_runs_adapters_lineage_and_since_last_run(store, clock, tmp_path):
    _, _, a1 = chat(store)
    _, _, a2 = chat(store)
    r_up = store.rate("alice", a1, "up").rating_id
    r_down = store.rate("bob", a2, "down").rating_id
    assert store.ratings_since_last_run()["total"] == 2
    clock.tick(minutes=5)

    run = store.start_run("operator", {"lora_rank": 16})
    snap = store.export_snapshot(tmp_path / "run1.parquet", run_id=run)
    assert (snap.n_desirable, snap.n_undesirable) == (1, 1)
    store.finish_run(run, "succeeded", lambda_d=1.0, lambda_u=1.2, metrics={"margin": 0.3})
    store.register_adapter("kto-v1", tmp_path / "kto-v1", "cd" * 32, parent=None, run_id=run)
    store.mark_promoted("kto-v1")
    assert store.current_adapter() == "kto-v1"
    assert store.ratings_since_last_run()["total"] == 0
    got = store.get_run(run)
    assert got["status"] == "succeeded" and got["adapter_version"] == "kto-v1"
    assert got["snapshot_sha256"] == snap.sha256 and got["params"] == {"lora_rank": 16}
    assert store.run_examples(run) == sorted([r_up, r_down])

    clock.tick(minutes=5)
    _, _, a3 = chat(store, adapter="kto-v1")       # served by the new adapter
    r3 = store.rate("carol", a3, "up").rating_id
    r4 = store.rate("carol", a1, "down").rating_id
    since = store.ratings_since_last_run()
    assert (since["up"], since["down"], since["total"]) == (1, 1, 2)
    assert set(store.lineage(a3)) == {r_up, r_down}
    assert store.lineage(a1) == []                   # base model: trained on nothing

    clock.tick(minutes=5)
    run2 = store.start_run("schedule")
    snap2 = store.export_snapshot(tmp_path / "run2.parquet", since="last_run", run_id=run2)
    assert {r["example_id"] for r in pq.read_table(snap2.path).to_pylist()} == {r3, r4}
    assert snap2.since == store.get_run(run)["snapshot_at"]
    store.finish_run(run2, "succeeded", dropped=[r4])
    store.register_adapter("kto-v2", tmp_path / "kto-v2", "ef" * 32, parent="kto-v1", run_id=run2)
    store.mark_promoted("kto-v2")
    _, _, a5 = chat(store, adapter="kto-v2")
    assert store.lineage(a5) == [r3]                # r4 was dropped by the aligner
    assert set(store.lineage(a5, include_ancestors=True)) == {r3, r_up, r_down}
    since_v1 = store.snapshot_table(since="kto-v1")  # what kto-v1 has not seen
    assert set(since_v1.column("example_id").to_pylist()) == {r3, r4}

    store.record_rollback("kto-v2", "kto-v1", reason="worse held-out margin")
    assert store.current_adapter() == "kto-v1"
    events = store.adapter_events()
    assert [(e["event"], e["from_version"], e["to_version"]) for e in events] == [
        ("promoted", "base", "kto-v1"), ("promoted", "kto-v1", "kto-v2"), ("rollback", "kto-v2", "kto-v1")]
    adapters = {a["version"]: a for a in store.adapters()}
    assert adapters["kto-v2"]["retired_at"] is not None and adapters["kto-v1"]["retired_at"] is None
    assert [r["id"] for r in store.runs()] == [run2, run]
    with pytest.raises(DuplicateAdapter):
        store.register_adapter("kto-v1", tmp_path, "00")
    with pytest.raises(UnknownAdapter):
        store.mark_promoted("kto-v9")
    with pytest.raises(InvalidInput):
        store.start_run("cron-job")
    with pytest.raises(InvalidInput):
        store.finish_run(run2, "done")


def test_failed_run_does_not_reset_since_last_run_and_stale_runs_are_closed(location, clock):
    path = location
    with FeedbackStore(path, clock=clock) as s:
        _, _, a = chat(s)
        s.rate("alice", a, "up")
        clock.tick(minutes=1)
        failed = s.start_run("schedule")
        s.finish_run(failed, "failed", error="aligner exited with code 2")
        assert s.ratings_since_last_run()["total"] == 1
        s.start_run("operator")                      # the app dies while this one runs
    with FeedbackStore(path, clock=clock) as s:
        latest = s.runs()[0]
        assert latest["status"] == "failed" and "interrupted" in latest["error"]


def test_snapshot_says_which_answers_the_model_ended(store, clock, tmp_path):
    """Cut at max_tokens, stopped by the user, or ended by the model: the aligner trains an end-of-turn only on the
    last (aligner/data.py tokenize_pair)."""
    cases = {  # sampling, completion_tokens -> ended
        "stop": ({"max_tokens": 8, "finish_reason": "stop"}, 8, True),
        "length": ({"max_tokens": 8, "finish_reason": "length"}, 8, False),
        "stopped": ({"max_tokens": 8, "stopped": True, "finish_reason": "stop"}, 3, False),
        "old_full": ({"max_tokens": 8}, 8, False),            # stored before the finish reason was kept
        "old_short": ({"max_tokens": 8}, 5, True),
        "unknown": ({}, None, True),
    }
    ids = {}
    for name, (sampling, n, _) in cases.items():
        conv = store.new_conversation("alice")
        msg = store.add_user_message(conv, name)
        ans = store.add_answer(conv, msg, [{"role": "user", "content": name}], f"answer {name}",
                               sampling=sampling, completion_tokens=n)
        ids[ans] = name
        store.rate("alice", ans, "up")
        clock.tick(minutes=1)
    rows = pq.read_table(store.export_snapshot(tmp_path / "s.parquet").path).to_pylist()
    assert {ids[r["answer_id"]]: r["ended"] for r in rows} == {k: v[2] for k, v in cases.items()}
    rows = pq.read_table(store.export_kto(tmp_path / "kto.parquet").path).to_pylist()   # for TRL users to filter on
    assert {ids[r["answer_id"]]: r["ended"] for r in rows} == {k: v[2] for k, v in cases.items()}


def test_export_round_trip_snapshot_and_kto(store, clock, tmp_path):
    import datasets

    ids = {}
    for i in range(6):
        _, _, a = chat(store, question=f"q{i} ünïcödé", answer=f"a{i}")
        ids[i] = store.rate("alice", a, "up" if i % 3 else "down").rating_id
        clock.tick(minutes=1)
    info = store.export_snapshot(tmp_path / "snap" / "s.parquet", max_examples=4)
    table = pq.read_table(info.path)
    assert table.schema.equals(SNAPSHOT_SCHEMA)
    rows = table.to_pylist()
    assert [r["example_id"] for r in rows] == [ids[5], ids[4], ids[3], ids[2]]   # newest first
    assert (info.n_desirable, info.n_undesirable) == (3, 1) and info.n_examples == 4
    assert json.loads(rows[0]["messages"]) == [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "q5 ünïcödé"}]
    assert rows[0]["completion"] == "a5" and rows[2]["label"] is False
    assert str(rows[0]["rated_at"].tzinfo) == "UTC"
    import hashlib
    assert hashlib.sha256(info.path.read_bytes()).hexdigest() == info.sha256
    assert [p.name for p in info.path.parent.iterdir()] == ["s.parquet"]       # no temp file left behind

    since = store.export_snapshot(tmp_path / "since.parquet", since=datetime(2025, 3, 1, 9, 3, 30))
    assert since.n_examples == 2

    for ext in ("jsonl", "parquet"):
        out = store.export_kto(tmp_path / f"kto.{ext}")
        ds = datasets.load_dataset("json" if ext == "jsonl" else "parquet", data_files=str(out.path),
                                   split="train")
        assert ds.column_names[:3] == ["prompt", "completion", "label"] and len(ds) == 6
        row = ds[0]
        assert row["prompt"][-1] == {"role": "user", "content": "q5 ünïcödé"}
        assert row["completion"] == [{"role": "assistant", "content": "a5"}]
        assert sum(ds["label"]) == 4
    with pytest.raises(InvalidInput, match="jsonl or .parquet"):
        store.export_kto(tmp_path / "kto.csv")


def test_read_only_store_refuses_writes(location, tmp_path):
    path = location
    with FeedbackStore(path) as s:
        _, _, a = chat(s)
    with FeedbackStore(path, read_only=True) as ro:
        with pytest.raises(ReadOnlyStore):
            ro.rate("alice", a, "up")
        with pytest.raises(ReadOnlyStore):
            ro.new_conversation("alice")
        assert ro.counts()["total"] == 0
    with pytest.raises(StoreError, match="no feedback database"):
        FeedbackStore(tmp_path / "missing.duckdb", read_only=True)


def test_rate_many_bulk_path_is_exact(store):
    answers = [chat(store, answer=f"a{i}")[2] for i in range(12)]
    first = store.rate_many([("dave", a, "up") for a in answers])          # > 8: the ON CONFLICT path
    assert all(r.changed for r in first)
    again = store.rate_many([("dave", a, "down" if i % 2 else "up", "wrong" if i % 2 else None)
                             for i, a in enumerate(answers)] + [("dave", answers[0], None)])
    assert [r.changed for r in again[:12]] == [i % 2 == 1 for i in range(12)]
    assert again[12].changed and again[12].value is None                  # later item of the same batch wins
    assert [r.rating_id for r in again[:12]] == [r.rating_id for r in first]
    assert store.counts() == {"up": 5, "down": 6, "withdrawn": 1, "total": 12}
    assert store.get_rating("dave", answers[1])["reason"] == "wrong"
    assert [h["value"] for h in store.rating_history(first[0].rating_id)] == ["up", None]
    assert [h["value"] for h in store.rating_history(first[1].rating_id)] == ["up", "down"]


def test_ratings_are_indexed_by_answer_and_changes_update_in_place(duck_store):
    """The batch read filters on ratings.answer_id: its index must exist (else every rating scans the table),
    and a change rewrites the row (same id, same created_at), never adds one."""
    store = duck_store
    con = store._cursor()
    assert con.execute("SELECT count(*) FROM duckdb_indexes() WHERE table_name = 'ratings' "
                       "AND expressions ILIKE '%answer_id%'").fetchone()[0] >= 1
    answers = [chat(store, answer=f"x{i}")[2] for i in range(3)]
    first = store.rate_many([("erin", a, "up") for a in answers])
    created = {r["id"]: r["created_at"] for r in (store.get_rating("erin", a) for a in answers)}
    again = store.rate_many([("erin", a, "down", "bad") for a in answers] + [("erin", answers[1], None)])
    assert [r.rating_id for r in again[:3]] == [r.rating_id for r in first]
    rows = con.execute("SELECT id, value, reason, created_at, updated_at FROM ratings WHERE user_id = 'erin' "
                       "ORDER BY id").fetchall()
    assert len(rows) == 3
    for rid, value, reason, created_at, updated_at in rows:
        assert created_at == created[rid] and updated_at > created_at
        assert (value, reason) == ((None, None) if rid == first[1].rating_id else ("down", "bad"))


class _Spy:
    """Stands in for the store's writer connection and records every statement, to count the statements a batch
    costs (the DuckDB connection object itself cannot be patched)."""

    def __init__(self, conn):
        self.conn, self.sql = conn, []

    def execute(self, sql, *args):
        self.sql.append(" ".join(sql.split()[:2]))
        return self.conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.conn, name)


def test_rating_a_new_answer_needs_no_read_and_the_cache_stays_exact(duck_store):
    """An answer made by this process has no ratings, so rating it is one autocommit INSERT (no read, no audit row:
    the creation event is implied until the first change); later changes of rows this process wrote (their row
    ids are unknown) read again and stay exact, and write the creation event with the change."""
    store = duck_store
    a = chat(store)[2]
    spy = store._conn = _Spy(store._conn)
    try:
        first = store.rate("fred", a, "up")
        assert spy.sql == ["INSERT INTO"]
        spy.sql.clear()
        assert store.rate("gina", a, "down").changed                   # other user, same answer: still no read
        assert not any(s.startswith("SELECT") for s in spy.sql)
        assert not store.rate("fred", a, "up").changed                 # double click
        changed = store.rate("fred", a, "down", "meh")
        assert changed.changed and changed.rating_id == first.rating_id
        spy.sql.clear()
        assert store.rate("fred", a, None).changed                     # row id now known: update without a read
        assert not any(s.startswith("SELECT") for s in spy.sql) and "UPDATE ratings" in spy.sql
    finally:
        store._conn = spy.conn
    assert store.get_rating("fred", a)["value"] is None and store.get_rating("gina", a)["value"] == "down"
    assert [h["value"] for h in store.rating_history(first.rating_id)] == ["up", "down", None]
    assert store.counts() == {"up": 0, "down": 1, "withdrawn": 1, "total": 2}
    con = store._cursor()
    assert con.execute("SELECT id, value FROM rating_events WHERE rating_id = ? ORDER BY event_at",
                       [first.rating_id]).fetchall()[0] == (first.rating_id, "up")   # the creation, written late
    assert con.execute("SELECT count(*) FROM rating_events WHERE user_id = 'gina'").fetchone()[0] == 0
    assert [h["value"] for h in store.rating_history(store.get_rating("gina", a)["id"])] == ["down"]


def test_a_stale_cached_row_id_is_caught_and_the_batch_redone(duck_store):
    """If a cached row id ever pointed at another row, the UPDATE's key check sees it: the batch is rolled back
    and redone from a fresh read, so the wrong row is never touched."""
    store = duck_store
    a, b = chat(store, answer="A")[2], chat(store, answer="B")[2]
    store.rate_many([("hal", a, "up"), ("hal", b, "up")])
    store.rate_many([("hal", a, "down"), ("hal", b, "down")])          # a read: both row ids now cached
    ra, rb = store._rated[a]["hal"], store._rated[b]["hal"]
    assert ra[4] is not None and rb[4] is not None
    ra[4], rb[4] = rb[4], ra[4]                                          # corrupt the cache on purpose
    assert store.rate("hal", a, "up").changed
    assert store.get_rating("hal", a)["value"] == "up" and store.get_rating("hal", b)["value"] == "down"
    assert store._cursor().execute("SELECT count(*) FROM rating_audit").fetchone()[0] == 5


def test_rate_async_resolves_after_commit_in_order_with_typed_errors(location):
    path = location
    store = FeedbackStore(path)
    answers = [chat(store, answer=f"a{i}")[2] for i in range(300)]
    with pytest.raises(InvalidRating):
        store.rate_async("ivy", answers[0], "sideways")                # malformed: raised at once
    futures = [store.rate_async("ivy", a, "up") for a in answers]
    futures += [store.rate_async("ivy", answers[0], "down"), store.rate_async("ivy", answers[0], "down"),
                store.rate_async("ivy", answers[1], None), store.rate_async("ivy", "no-such-answer", "up")]
    results = [f.result(timeout=60) for f in futures[:-1]]
    with pytest.raises(UnknownAnswer):
        futures[-1].result(timeout=60)
    assert all(r.changed and r.value == "up" for r in results[:300])
    assert [(r.value, r.changed) for r in results[300:]] == [("down", True), ("down", False), (None, True)]
    assert results[300].rating_id == results[0].rating_id
    # resolved = committed: another process-level view of the file (the same rows through a fresh cursor)
    assert store.counts() == {"up": 298, "down": 1, "withdrawn": 1, "total": 300}
    assert [h["value"] for h in store.rating_history(results[0].rating_id)] == ["up", "down"]
    late = [store.rate_async("jo", a, "down") for a in answers]        # close() commits what is still queued
    store.close()
    with pytest.raises(StoreError):
        store.rate_async("jo", answers[0], "up")
    assert all(f.done() and f.result().changed for f in late)
    con = raw_connection(path)
    assert con.execute("SELECT count(*) FROM ratings WHERE user_id = 'jo' AND value = 'down'").fetchone()[0] == 300
    con.close()


def test_two_writable_stores_on_one_file_in_one_process_stay_exact(location):
    """DuckDB shares the database between them, so each sees the other's ratings only by reading: the rating
    cache is off while both are open (on PostgreSQL it is never used: other processes write too)."""
    one = FeedbackStore(location)
    a = chat(one)[2]
    two = FeedbackStore(location)
    try:
        r1 = one.rate("kim", a, "up")
        assert one.rate("kim", a, "down").changed                      # one now knows the row (and its row id)
        r2 = two.rate("kim", a, "up")
        assert r2.changed and r2.rating_id == r1.rating_id
        assert one.rate("kim", a, "down").changed                      # one's memory said "down": it must read
        assert not two.rate("kim", a, "down").changed
    finally:
        two.close()
    assert one.rate("kim", a, None).changed
    assert [h["value"] for h in one.rating_history(r1.rating_id)] == ["up", "down", "up", "down", None]
    one.close()
