"""The web app's guard rails, schedule persistence and the one-run-at-a-time realigner, on the real store.

The vLLM server and adapter registry are stand-ins here (no model is needed to check auth or bookkeeping);
tests/e2e/test_browser.py runs the same app on the real stack.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Config
from app.loop.realign import Realigner, RunInProgress
from app.loop.scheduler import RealignScheduler, validate_schedule
from app.main import Stack, create_app, default_settings
from app.operator_settings import SettingsStore
from app.web.auth import USER_COOKIE, TokenBuckets, basic_header, check_basic
from feedback_store import FeedbackStore
from tests.app.doubles import BaseRegistry, OfflineServer

Server, Registry = OfflineServer, BaseRegistry


@pytest.fixture
def stack(tmp_path):
    cfg = Config(data_dir=tmp_path, model_dir=tmp_path / "model").resolved()
    store = FeedbackStore(cfg.db_path)
    reg = Registry()
    st = Stack(Server(), store, reg, None, Realigner(store, reg, model_dir=cfg.model_dir, work_dir=tmp_path / "runs"),
               SettingsStore(tmp_path, default_settings(cfg)), cfg)
    yield st
    store.close()


@pytest.fixture
def web(stack):
    app, scheduler = create_app(stack, "s3cret")
    scheduler.start()
    with TestClient(app) as client:
        yield client, scheduler
    scheduler.shutdown()


def test_console_and_admin_api_need_the_admin_login(web):
    client, _ = web
    for path in ("/admin/", "/admin/gradio_api/info", "/api/admin/stats", "/admin/config"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"Authorization": basic_header("admin", "wrong")}).status_code == 401
    assert client.post("/api/admin/align", json={}).status_code == 401
    assert client.post("/api/admin/rollback", json={}).status_code == 401
    ok = {"Authorization": basic_header("admin", "s3cret")}
    assert client.get("/admin/", headers=ok).status_code == 200
    stats = client.get("/api/admin/stats", headers=ok).json()
    assert stats["up"] == 0 and stats["served"] == "base" and stats["lambda_d"] is None


def test_chat_page_is_public_and_gives_a_stable_anonymous_id(web):
    client, _ = web
    r = client.get("/")
    assert r.status_code == 200
    uid = r.cookies.get(USER_COOKIE)
    assert uid and uid.startswith("anon-")
    r2 = client.get("/")                      # the cookie is kept, not replaced
    assert r2.status_code == 200 and USER_COOKIE not in r2.cookies


def test_admin_api_schedule_validation_and_persistence(web, stack):
    client, scheduler = web
    ok = {"Authorization": basic_header("admin", "s3cret"), "X-KTO-Loop-Admin": "1"}
    r = client.post("/api/admin/schedule", json={"cron": "not a cron"}, headers=ok)
    assert r.status_code == 400 and "cron" in r.json()["detail"]
    r = client.post("/api/admin/schedule", json={"bogus": 1}, headers=ok)
    assert r.status_code == 400
    r = client.post("/api/admin/schedule", json={"interval_minutes": 30, "min_new_ratings": 5}, headers=ok)
    assert r.status_code == 200 and r.json()["next_run"] is not None
    # a fresh scheduler (an app restart) reads the same schedule back
    fresh = SettingsStore(stack.cfg.data_dir, default_settings(stack.cfg)).load()
    assert (fresh.interval_minutes, fresh.min_new_ratings) == (30, 5)
    again = RealignScheduler(stack.realigner, stack.store, SettingsStore(stack.cfg.data_dir, fresh))
    again.start()
    try:
        assert again.next_run_time() is not None
    finally:
        again.shutdown()
    r = client.post("/api/admin/rollback", json={}, headers=ok)
    assert r.status_code == 400 and "previous" in r.json()["detail"]


def test_validate_schedule():
    validate_schedule(0, "")
    validate_schedule(15, "")
    validate_schedule(0, "0 3 * * *")
    for bad in ((-1, ""), (5, "0 3 * * *"), (0, "61 * * * *")):
        with pytest.raises(ValueError):
            validate_schedule(*bad)


def _rated(store, n_up, n_down):
    conv = store.new_conversation("u")
    for i in range(n_up + n_down):
        m = store.add_user_message(conv, f"q{i}")
        a = store.add_answer(conv, m, [{"role": "user", "content": f"q{i}"}], f"a{i}", adapter="base")
        store.rate("u", a, "up" if i < n_up else "down")


def test_scheduled_tick_waits_for_enough_new_ratings(stack):
    sched = RealignScheduler(stack.realigner, stack.store, stack.settings)
    stack.settings.update(min_new_ratings=3)
    _rated(stack.store, 1, 1)
    info = sched.tick()
    assert not info["started"] and "only 2 new ratings" in info["why"]
    assert stack.store.runs() == []


def test_one_class_only_run_is_recorded_as_failed_with_the_reason(stack):
    _rated(stack.store, 3, 0)
    out = stack.realigner.run("operator")
    assert out.status == "failed" and not out.promoted and "thumbs-down" in out.reason
    run = stack.store.runs()[0]
    assert run["status"] == "failed" and "thumbs-down" in run["error"] and run["trigger"] == "operator"


def test_failed_aligner_subprocess_is_recorded_with_its_error(stack, tmp_path):
    _rated(stack.store, 2, 2)
    stack.realigner.model_dir = tmp_path / "no-such-model"
    out = stack.realigner.run("cli")
    assert out.status == "failed" and "aligner exited with code" in out.reason
    assert stack.store.runs()[0]["error"].startswith("aligner exited with code")


def test_second_trigger_during_a_run_is_rejected(stack):
    rl = stack.realigner
    rl._lock.acquire()                        # a run is going
    try:
        with pytest.raises(RunInProgress):
            rl.run("operator")
        sched = RealignScheduler(rl, stack.store, stack.settings)
        with pytest.raises(RunInProgress):
            sched.start_run("operator")
        assert sched.tick()["started"] is False
    finally:
        rl._lock.release()
    assert stack.store.runs() == []


def test_check_basic_and_rate_limiter():
    assert check_basic(basic_header("a", "b"), "a", "b")
    assert not check_basic(basic_header("a", "c"), "a", "b")
    assert not check_basic("Basic !!!", "a", "b")
    assert not check_basic(basic_header("a", ""), "a", "")     # empty password never matches
    rl = TokenBuckets(2, 60)                    # a burst of 2, then one more every 30 s
    assert rl.allow("u", 0) and rl.allow("u", 1) and not rl.allow("u", 2) and rl.allow("u", 31)
    assert not rl.allow("u", 32) and rl.allow("v", 32)
    assert all(TokenBuckets(0).allow("u", 0) for _ in range(100))   # 0 = no limit


def test_runtime_file_is_private(tmp_path):
    from app.operator_settings import write_json_atomic

    p = Path(tmp_path) / "rt.json"
    write_json_atomic(p, {"admin_password": "x"}, mode=0o600)
    assert (p.stat().st_mode & 0o777) == 0o600
    assert threading.active_count() >= 1
