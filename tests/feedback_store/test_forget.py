"""Forgetting a user and expiring old conversations, on both engines: exactly that user's (or those conversations')
rows go, nobody else's; an audit row keeps the counts and no id; the runs that learnt from the deleted ratings are
named; snapshots, stats and lineage keep working over lineage rows that now point at nothing."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from feedback_store import FeedbackStore, InvalidInput, UnknownAnswer

ALICE, BOB = "user:alice", "anon-0123456789abcdef"
SECRET = "my-secret-phone-number-5550123"


class Clock:
    """A store clock the test moves: rows get the ages the test gives them, nothing sleeps."""

    def __init__(self) -> None:
        self.t = datetime(2026, 1, 1, 12, 0)

    def __call__(self) -> datetime:
        return self.t


def _chat(s: FeedbackStore, user: str, n: int, tag: str, adapter: str = "base") -> tuple[str, list[str]]:
    """One conversation of `user` with n answers, each rated by `user` (every third one down, with a reason)."""
    conv = s.new_conversation(user, system_prompt="be brief")
    answers = []
    for i in range(n):
        m = s.add_user_message(conv, f"{tag} question {i}: {SECRET if user == ALICE else 'hello'}")
        a = s.add_answer(conv, m, [{"role": "user", "content": "q"}], f"{tag} answer {i}", adapter=adapter)
        s.rate(user, a, "down" if i % 3 == 2 else "up", reason="wrong" if i % 3 == 2 else None,
               comment=SECRET if user == ALICE and i % 3 == 2 else None, client_addr="10.0.0.1")
        answers.append(a)
    return conv, answers


def _rows(s: FeedbackStore) -> dict[str, list[tuple]]:
    """Every row of every table, as text: what a privacy check searches."""
    tables = ["conversations", "messages", "answers", "ratings", "rating_events", "runs", "run_examples",
              "adapters", "adapter_events", "forgotten"]
    return {t: sorted(tuple(str(v) for v in r) for r in s._read(f"SELECT * FROM {t}")) for t in tables}


def _without(rows: dict[str, list[tuple]], *needles: str) -> dict[str, list[tuple]]:
    return {t: [r for r in rs if not any(n in v for v in r for n in needles)] for t, rs in rows.items()}


def test_forget_deletes_exactly_that_users_rows_and_keeps_counts_without_the_id(location, tmp_path):
    with FeedbackStore(location) as s:
        a_conv, a_answers = _chat(s, ALICE, 4, "a")
        a_conv2, a_answers2 = _chat(s, ALICE, 2, "a2")
        b_conv, b_answers = _chat(s, BOB, 3, "b")
        s.rate(ALICE, b_answers[0], "down", reason="rude", comment=SECRET)   # alice on bob's answer
        s.rate(ALICE, a_answers[0], "down", reason="changed my mind")        # a change: an audit event
        s.rate(BOB, a_answers[1], "up")                                      # bob on alice's answer
        s.rate(ALICE, a_answers[3], None)                                    # withdrawn
        before = _rows(s)
        preview = s.forget_user(ALICE, dry_run=True)
        assert _rows(s) == before                                            # a dry run deletes nothing
        report = s.forget_user(ALICE)
        after = _rows(s)

    assert report.as_dict() | {"at": None} == preview.as_dict() | {"dry_run": False}
    assert (report.conversations, report.answers, report.messages) == (2, 6, 2 + 6)   # system prompts are messages
    assert report.ratings == 8 and report.by_value == {"up": 4, "down": 3, "withdrawn": 1}
    assert report.rating_events >= 3
    # nothing of alice remains anywhere, and what bob wrote or rated on his own conversation is untouched
    assert not any(ALICE in v or SECRET in v or a_conv in v for rs in after.values() for r in rs for v in r)
    kept = _without(before, ALICE, SECRET, a_conv, a_conv2, *a_answers, *a_answers2)
    for t in ("conversations", "messages", "answers", "runs", "run_examples", "adapters", "adapter_events"):
        assert after[t] == kept[t], t
    assert [r[1] for r in after["ratings"]] == [BOB] * 3     # bob's rating of alice's answer went with the answer
    assert {r[0] for r in after["ratings"]} == set(b_answers)
    assert after["messages"] and b_conv in {r[0] for r in after["conversations"]}

    with FeedbackStore(location) as s:
        log = s.forget_log()
        assert s.counts() == {"up": 2, "down": 1, "withdrawn": 0, "total": 3}
    assert len(log) == 1
    row = log[0]
    assert (row["reason"], row["id_kind"], row["conversations"], row["answers"], row["ratings"]) == \
        ("forget", "user", 2, 6, 8)
    assert (row["ratings_up"], row["ratings_down"], row["ratings_withdrawn"]) == (4, 3, 1)
    assert "user_id" not in row and not any(ALICE in str(v) or "alice" in str(v) for v in row.values())


def test_forget_names_the_runs_and_adapters_that_learnt_from_the_user(location, tmp_path):
    """The run that trained on alice's ratings, and the adapter continued from it, are reported; afterwards
    lineage, snapshots, stats and the run log still work although run_examples point at deleted ratings."""
    with FeedbackStore(location) as s:
        _, a_answers = _chat(s, ALICE, 3, "a")
        _, b_answers = _chat(s, BOB, 3, "b")
        run1 = s.start_run("operator")
        snap = s.export_snapshot(tmp_path / "s1.parquet", run_id=run1)
        ids = pq.read_table(snap.path).column("example_id").to_pylist()
        alice_ids = {r["id"] for a in a_answers if (r := s.get_rating(ALICE, a))}
        held = sorted(alice_ids)[:1]
        s.finish_run(run1, "promoted", heldout=held)
        s.register_adapter("kto-v1", tmp_path / "v1", run_id=run1)
        s.mark_promoted("kto-v1")
        _, later = _chat(s, BOB, 3, "c", adapter="kto-v1")
        run2 = s.start_run("operator")
        s.export_snapshot(tmp_path / "s2.parquet", since="kto-v1", run_id=run2)
        s.finish_run(run2, "promoted")
        s.register_adapter("kto-v2", tmp_path / "v2", parent="kto-v1", run_id=run2)
        s.mark_promoted("kto-v2")
        _, newest = _chat(s, BOB, 1, "d", adapter="kto-v2")
        lineage_before = s.lineage_detail(newest[0], include_ancestors=True)
        report = s.forget_user(ALICE)

        assert len(ids) == 6
        assert report.runs == [
            {"run_id": run1, "version": "kto-v1", "status": "promoted", "trained": 2, "heldout": 1, "dropped": 0,
             "via": None, "served": False},
            {"run_id": run2, "version": "kto-v2", "status": None, "trained": 0, "heldout": 0, "dropped": 0,
             "via": "kto-v1", "served": True}]
        assert json.loads(json.dumps(s.forget_log()[0]["runs"])) == report.runs
        # everything that reads lineage, runs, ratings or answers still works
        lineage = s.lineage_detail(newest[0], include_ancestors=True)
        # a run's record is history: its rating ids stay, resolving to nothing, and lineage counts them as deleted
        assert [a.pop("deleted") for a in lineage["adapters"]] == [0, 3]
        assert [a.pop("deleted") for a in lineage_before["adapters"]] == [0, 0] and lineage == lineage_before
        assert [a["version"] for a in lineage["adapters"]] == ["kto-v2", "kto-v1"]
        assert s.lineage(later[0]) == sorted(set(ids) - set(held))
        assert [r["id"] for r in s.runs()] == [run2, run1]
        page = s.run_example_rows(run1)
        assert page["total"] == 5 and sorted(str(e["user_id"]) for e in page["examples"]) == ["None"] * 2 + [BOB] * 3
        snap = s.export_snapshot(tmp_path / "after.parquet")
        assert snap.n_examples == 7 and set(pq.read_table(snap.path).column("user_id").to_pylist()) == {BOB}
        assert s.export_kto(tmp_path / "after.jsonl").n_examples == 7
        assert sum(s.training_counts()) == 7
        assert [u["user_id"] for u in s.counts_by_user()] == [BOB]
        assert sum(r["up"] + r["down"] for r in s.counts_by_adapter()) == 7
        assert all(r["user_id"] == BOB for r in s.down_reasons())
        assert s.ratings_since_last_run()["total"] == 1
        # the rating caches forgot too: a deleted answer cannot be rated, a new rating is a new row
        with pytest.raises(UnknownAnswer):
            s.rate(ALICE, a_answers[0], "up")
        with pytest.raises(UnknownAnswer):
            s.rate(BOB, a_answers[1], "up")
        assert s.rate(ALICE, b_answers[0], "up").changed
        assert s.get_rating(ALICE, b_answers[0])["value"] == "up"


def test_forgetting_an_unknown_user_deletes_nothing_and_logs_nothing(location):
    with FeedbackStore(location) as s:
        _chat(s, BOB, 2, "b")
        report = s.forget_user("user:nobody")
        assert not report.deleted_anything and report.runs == [] and s.forget_log() == []
        assert s.counts()["total"] == 2
        with pytest.raises(InvalidInput):
            s.forget_user("")


def test_retention_deletes_conversations_by_last_activity(location):
    """Old conversations go; one whose answer was rated (or that got a message) recently stays whole; the cutoff
    is by last activity, not by creation."""
    clock = Clock()
    with FeedbackStore(location, clock=clock) as s:
        old, old_answers = _chat(s, ALICE, 2, "old")
        revived, revived_answers = _chat(s, BOB, 2, "revived")
        talked, _ = _chat(s, BOB, 1, "talked")
        clock.t += timedelta(days=40)
        s.rate(BOB, revived_answers[0], "down", reason="aged badly")           # a rating change is activity
        s.add_user_message(talked, "still here")                               # so is a message
        new, _ = _chat(s, ALICE, 1, "new")
        cutoff = clock.t - timedelta(days=30)
        assert s.expire_before(cutoff, dry_run=True).conversations == 1
        report = s.expire_before(cutoff)
        assert (report.conversations, report.answers, report.ratings) == (1, 2, 2)
        assert report.by_value == {"up": 2, "down": 0, "withdrawn": 0} and report.cutoff == cutoff
        convs = {r[0] for r in s._read("SELECT id FROM conversations")}
        assert convs == {revived, talked, new}
        assert not s._read("SELECT * FROM answers WHERE conversation_id = ?", [old])
        assert all(s.get_rating(ALICE, a) is None for a in old_answers)
        assert s.get_rating(BOB, revived_answers[1])["value"] == "up"          # the revived conversation is whole
        log = s.forget_log()
        assert [(r["reason"], r["id_kind"], r["conversations"]) for r in log] == [("retention", None, 1)]
        assert s.expire_before(cutoff).conversations == 0 and len(s.forget_log()) == 1   # nothing more: no row
        with pytest.raises(InvalidInput):
            s.expire_before("30 days")  # type: ignore[arg-type]


def test_forget_of_one_deployment_leaves_another_deployments_rows(tmp_path: Path):
    db = tmp_path / "fb.duckdb"
    with FeedbackStore(db, deployment="a") as a:
        _chat(a, ALICE, 1, "a")
    with FeedbackStore(db, deployment="b") as b:
        _chat(b, ALICE, 1, "b")
        assert b.forget_user(ALICE).conversations == 1
    with FeedbackStore(db, deployment="a") as a:
        assert a.counts()["total"] == 1 and a.forget_log() == []


def test_another_process_cannot_rate_an_answer_forgotten_elsewhere(pg_url):
    """Two app processes on one PostgreSQL store: the one that wrote (and cached) an answer refuses a rating of it
    once the other has forgotten its user, instead of storing the rating of a deleted answer."""
    with FeedbackStore(pg_url) as writer, FeedbackStore(pg_url) as other:
        _, answers = _chat(writer, ALICE, 2, "a")
        assert other.forget_user(ALICE).answers == 2
        with pytest.raises(UnknownAnswer):
            writer.rate(ALICE, answers[0], "down")
        assert writer.counts()["total"] == 0


def test_a_second_store_on_the_file_cannot_rate_an_answer_the_first_forgot(tmp_path: Path):
    with FeedbackStore(tmp_path / "fb.duckdb") as writer, FeedbackStore(tmp_path / "fb.duckdb") as other:
        _, answers = _chat(writer, ALICE, 1, "a")
        assert other.forget_user(ALICE).answers == 1
        with pytest.raises(UnknownAnswer):
            writer.rate(ALICE, answers[0], "down")
