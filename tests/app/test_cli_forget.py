"""`kto-loop forget USER` against a running app (through its admin API) and a stopped one (on the file), the
forget endpoint's guards, and the retention job: old conversations go at start-up and daily, on the leader only.

The app is the real FastAPI app over a real socket and DuckDB file, as in test_cli_operator.py (no model served)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.cli._remote import call
from app.config import Config
from app.loop.scheduler import RealignScheduler
from app.main import default_settings
from app.operator_settings import SettingsStore
from app.web.admin_api import ADMIN_HEADER
from app.web.auth import basic_header
from app.web.console import Operator
from feedback_store import FeedbackStore
from tests.app.test_cli_operator import PASSWORD, RunningApp, _cli, _rate, _recorded_run

ALICE, BOB, CAROL = "user:alice", "anon-00112233aabbccdd", "key:mobile/carol"


def _answers_of(path: Path, user: str) -> int:
    with FeedbackStore(path, read_only=True) as s:
        return s._read("SELECT count(*) FROM ratings WHERE user_id = ?", [user])[0][0]


def test_forget_through_the_running_app_then_on_the_stopped_file(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    running = RunningApp(data, tmp_path / "model", [])
    store = running.store
    _rate(store, "a", 9, user=ALICE)
    run_id, _ = _recorded_run(store, data / "adapters" / "kto-v1")      # kto-v1 trained on alice's ratings, and serves
    bob = _rate(store, "b", 4, adapter="kto-v1", user=BOB)
    _rate(store, "c", 3, user=CAROL)
    running.start()
    try:
        monkeypatch.setattr("builtins.input", lambda prompt="": "n")
        rc, out, err = _cli(capsys, "forget", ALICE, "--data-dir", str(data))
        assert rc == 1 and "nothing deleted" in err and "kto-v1" in err and "1 conversations" in err
        assert store.counts()["total"] == 16                 # declined: nothing deleted

        rc, out, err = _cli(capsys, "forget", ALICE, "--yes", "--data-dir", str(data))
        assert rc == 0, err
        assert "deleted 1 conversations (9 messages, 9 answers) and 9 ratings (6 up, 3 down" in out
        assert "kto-v1: run" in out and "serving now" in out and "align_mode=fresh" in out
        assert store.counts()["total"] == 7 and not store._read("SELECT * FROM ratings WHERE user_id = ?", [ALICE])
        # what reads ratings, runs and lineage still answers, through the app
        for argv in (["stats", "--json"], ["runs", "--json"], ["lineage", bob[0], "--json"]):
            rc, out, err = _cli(capsys, *argv, "--data-dir", str(data))
            assert rc == 0, (argv, err)
        assert json.loads(out)["adapters"][0]["version"] == "kto-v1" and json.loads(out)["adapters"][0]["deleted"] == 9
        rc, out, err = _cli(capsys, "lineage", bob[0], "--data-dir", str(data))
        assert "9 of its ratings deleted since" in out
        # the console's numbers and its view of the run's examples (rows now point at deleted ratings)
        assert call(running.cfg, "GET", "/api/admin/stats")
        page = call(running.cfg, "GET", f"/api/admin/runs/{run_id}/examples", params={"role": "trained"})
        assert page["total"] == 6 and all(e["answer"] is None for e in page["examples"])
        op = Operator(store, running.registry, running.realigner, running.scheduler, running.stack.settings)
        table, _ = op.run_examples_table(run_id)
        assert len(table) == 6 and set(table["answer"]) == {"(deleted since)"}
    finally:
        running.stop()

    monkeypatch.setattr("builtins.input", lambda prompt="": "yes")
    rc, out, err = _cli(capsys, "forget", CAROL, "--json", "--data-dir", str(data))     # the app is stopped
    assert rc == 0, err
    report = json.loads(out)
    assert (report["conversations"], report["ratings"], report["runs"]) == (1, 3, [])
    db = data / "feedback.duckdb"
    assert _answers_of(db, CAROL) == 0 and _answers_of(db, BOB) == 4
    with FeedbackStore(db, read_only=True) as s:
        assert [(r["reason"], r["id_kind"], r["ratings"]) for r in s.forget_log()] == [
            ("forget", "key", 3), ("forget", "user", 9)]
    rc, out, err = _cli(capsys, "forget", "user:nobody", "--data-dir", str(data))
    assert rc == 0 and "nothing to delete" in out


def test_the_forget_endpoint_is_a_guarded_admin_mutation(tmp_path):
    """Unauthenticated: 401; a forgeable request (no admin header, or a form): 403; a malformed body: 400; none of
    them deletes anything."""
    data = tmp_path / "data"
    running = RunningApp(data, tmp_path / "model", [])
    _rate(running.store, "a", 3, user=ALICE)
    auth = {"Authorization": basic_header("admin", PASSWORD)}
    body = json.dumps({"user": ALICE})
    try:
        with TestClient(running.app) as c:
            assert c.post("/api/admin/forget", content=body, headers={"Content-Type": "application/json",
                                                                       ADMIN_HEADER: "1"}).status_code == 401
            assert c.post("/api/admin/forget", content=body,
                          headers={**auth, "Content-Type": "application/json"}).status_code == 403
            assert c.post("/api/admin/forget", data={"user": ALICE},
                          headers={**auth, ADMIN_HEADER: "1"}).status_code == 403
            json_admin = {**auth, "Content-Type": "application/json", ADMIN_HEADER: "1"}
            for bad in ({"user": 5}, {"user": " "}, {"user": ALICE, "dry_run": "no"}, {"user": ALICE, "all": True}):
                r = c.post("/api/admin/forget", content=json.dumps(bad), headers=json_admin)
                assert r.status_code == 400, bad
            assert running.store.counts()["total"] == 3
            r = c.post("/api/admin/forget", content=json.dumps({"user": ALICE, "dry_run": True}), headers=json_admin)
            assert r.status_code == 200 and r.json()["ratings"] == 3 and running.store.counts()["total"] == 3
    finally:
        running.stop()


class Lease:
    """A leader lease another process holds."""

    shared = True

    def refresh(self) -> bool:
        return False

    def holder(self) -> str:
        return "another process"

    def close(self) -> None:
        pass


def _old_and_new(db: Path) -> tuple[datetime, str, str]:
    """One conversation last active 40 days ago and one from today; (now, old id, new id)."""
    now = datetime.now(UTC).replace(tzinfo=None)
    t = [now - timedelta(days=40)]
    with FeedbackStore(db, clock=lambda: t[0]) as s:
        old = s.new_conversation(BOB)
        m = s.add_user_message(old, "hello")
        s.rate(BOB, s.add_answer(old, m, [{"role": "user", "content": "hello"}], "hi"), "up")
        t[0] = now
        new = s.new_conversation(BOB)
        s.add_user_message(new, "hello again")
    return now, old, new


def _conversations(db: Path) -> set[str]:
    with FeedbackStore(db, read_only=True) as s:
        return {r[0] for r in s._read("SELECT id FROM conversations")}


@pytest.mark.parametrize("days, lease, kept", [(30, None, "new"), (0, None, "both"), (30, Lease(), "both"),
                                               (50, None, "both")])
def test_the_retention_job_runs_at_start_up_on_the_leader_only(tmp_path, days, lease, kept):
    db = tmp_path / "fb.duckdb"
    now, old, new = _old_and_new(db)
    store = FeedbackStore(db)
    settings = SettingsStore(tmp_path, default_settings(Config()))
    sched = RealignScheduler(None, store, settings, clock=lambda: now.replace(tzinfo=UTC).timestamp(), lease=lease,
                             sync_s=0, retention_days=days)
    sched.start()
    try:
        deadline = time.monotonic() + 10
        while kept == "new" and not store.forget_log() and time.monotonic() < deadline:
            time.sleep(0.05)
        if kept == "both":
            time.sleep(0.5)       # time for a start-up pass that must not happen
            assert sched.expire() is None or sched.expire()["conversations"] == 0
        log = store.forget_log()
    finally:
        sched.shutdown()
        store.close()
    left = _conversations(db)
    if kept == "new":
        assert left == {new} and [(r["reason"], r["conversations"], r["ratings"]) for r in log] == [
            ("retention", 1, 1)]
    else:
        assert left == {old, new} and log == []


def test_the_app_wires_retention_days_into_its_scheduler(tmp_path):
    """The real app's start (create_app's scheduler) deletes what the setting says is too old."""
    data = tmp_path / "data"
    data.mkdir()
    _, old, new = _old_and_new(data / "feedback.duckdb")
    running = RunningApp(data, tmp_path / "model", [], retention_days=30)
    running.start()
    try:
        deadline = time.monotonic() + 10
        while not running.store.forget_log() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        running.stop()
    assert _conversations(data / "feedback.duckdb") == {new}
