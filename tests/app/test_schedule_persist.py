"""The realignment schedule across restarts, and its backoff after failed runs.

The rules are pure functions checked on a fake clock (a daily interval with a restart every day); the scheduler
itself runs on the real APScheduler with the real DuckDB store and the real Realigner (whose runs fail at once
here: one kind of rating only), restarted by building a new RealignScheduler on the same data dir, as `kto-loop
run` does.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from apscheduler.triggers.interval import IntervalTrigger

from app.config import Config
from app.loop.realign import Realigner
from app.loop.scheduler import (
    STATE_FILE,
    RealignScheduler,
    backoff_until,
    failure_streak,
    first_run_time,
    schedule_key,
)
from app.main import default_settings
from app.operator_settings import OperatorSettings, SettingsStore
from feedback_store import FeedbackStore

DAY = timedelta(days=1)
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Registry:
    def current(self):
        return "base"


@pytest.fixture
def parts(tmp_path):
    cfg = Config(data_dir=tmp_path, model_dir=tmp_path / "model").resolved()
    store = FeedbackStore(cfg.db_path)
    settings = SettingsStore(tmp_path, default_settings(cfg))
    realigner = Realigner(store, Registry(), model_dir=cfg.model_dir, work_dir=tmp_path / "runs")
    yield store, settings, realigner
    store.close()


def _restarting(parts, **kw) -> RealignScheduler:
    store, settings, realigner = parts
    return RealignScheduler(realigner, store, SettingsStore(settings.path.parent, settings.defaults), **kw)


# ---------------------------------------------------------------- pure rules on a fake clock

def test_a_daily_interval_with_a_restart_every_day_still_fires():
    s = OperatorSettings(interval_minutes=24 * 60)
    key = schedule_key(s)
    state = None
    fired = []
    now = T0
    for _day in range(5):
        # the app (re)starts at `now`: a new trigger, whose own first time would be a full day from `now`
        trigger = IntervalTrigger(minutes=s.interval_minutes, start_date=now + DAY, timezone=UTC)
        first = first_run_time(trigger, state, key, now)
        state = {"schedule": key, "next_run": first.isoformat()}
        restart_at = now + timedelta(hours=23)                  # ...and is restarted 23 h later
        if first <= restart_at:
            fired.append(first)
            state["next_run"] = trigger.get_next_fire_time(first, restart_at).isoformat()
        now = restart_at
    assert fired == [T0 + DAY, T0 + 2 * DAY, T0 + 3 * DAY, T0 + 4 * DAY]


def test_a_run_time_missed_while_down_is_due_at_once_and_a_changed_schedule_starts_afresh():
    s = OperatorSettings(interval_minutes=60)
    trigger = IntervalTrigger(minutes=60, start_date=T0 + timedelta(hours=1), timezone=UTC)
    key = schedule_key(s)
    state = {"schedule": key, "next_run": (T0 - timedelta(hours=5)).isoformat()}
    assert first_run_time(trigger, state, key, T0) == T0 - timedelta(hours=5)      # past: due now
    other = schedule_key(OperatorSettings(interval_minutes=30))
    half = IntervalTrigger(minutes=30, start_date=T0 + timedelta(minutes=30), timezone=UTC)
    assert first_run_time(half, state, other, T0) == T0 + timedelta(minutes=30)
    assert first_run_time(trigger, {"schedule": key, "next_run": "garbage"}, key, T0) == T0 + timedelta(hours=1)


def test_backoff_doubles_per_failed_run_in_a_row_up_to_a_cap():
    assert backoff_until(0, 1000.0) == 0.0
    assert [backoff_until(n, 1000.0, 600, 3600) - 1000 for n in (1, 2, 3, 4, 5)] == [600, 1200, 2400, 3600, 3600]
    t = datetime(2026, 3, 1, 12, 0)
    runs = [{"status": "running"}, {"status": "failed", "finished_at": t}, {"status": "cancelled"},
            {"status": "failed", "finished_at": t - DAY}, {"status": "promoted"}, {"status": "failed"}]
    assert failure_streak(runs) == (2, t.replace(tzinfo=UTC).timestamp())
    assert failure_streak([{"status": "rejected"}, {"status": "failed"}]) == (0, None)


# ---------------------------------------------------------------- the real scheduler

def test_restarts_and_unrelated_saves_keep_the_next_run(parts):
    store, settings, realigner = parts
    settings.update(interval_minutes=24 * 60)
    first = _restarting(parts)
    first.start()
    at = first.next_run_time()
    first.update(min_new_ratings=3)                    # an unrelated save
    assert first.next_run_time() == at
    first.shutdown()
    time.sleep(1.2)                                    # "now" moved on: a fresh interval would end later
    again = _restarting(parts)
    again.start()
    try:
        assert again.next_run_time() == at
        again.update(interval_minutes=12 * 60)         # a new schedule counts from now
        assert again.next_run_time() != at
    finally:
        again.shutdown()


def test_one_catch_up_run_after_downtime_then_the_old_rhythm(parts):
    store, settings, realigner = parts
    settings.update(interval_minutes=60)
    missed = datetime.now(UTC) - timedelta(hours=2, minutes=30)       # three run times passed while down
    (settings.path.parent / STATE_FILE).write_text(json.dumps(
        {"schedule": schedule_key(settings.load()), "next_run": missed.isoformat()}))
    sched = _restarting(parts)
    ticks: list[float] = []
    done = threading.Event()
    real_tick = sched.tick

    def tick():
        ticks.append(time.time())
        done.set()
        return real_tick()

    sched.tick = tick
    sched.start()
    try:
        assert done.wait(10), "no catch-up run"
        time.sleep(1.5)
        assert len(ticks) == 1                                         # coalesced: one run, not three
        nxt = datetime.fromisoformat(sched.next_run_time())
        assert abs((nxt - (missed + timedelta(hours=3))).total_seconds()) < 1   # same grid as before
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:                              # persisted for the next restart
            state = json.loads((settings.path.parent / STATE_FILE).read_text())
            if datetime.fromisoformat(state["next_run"]) > datetime.now(UTC):
                break
            time.sleep(0.1)
        assert abs((datetime.fromisoformat(state["next_run"]) - nxt).total_seconds()) < 1
    finally:
        sched.shutdown()


def _rated(store, n_up, n_down, user="u"):
    conv = store.new_conversation(user)
    for i in range(n_up + n_down):
        m = store.add_user_message(conv, f"q{i}")
        a = store.add_answer(conv, m, [{"role": "user", "content": f"q{i}"}], f"a{i}", adapter="base")
        store.rate(user, a, "up" if i < n_up else "down")


def test_failed_runs_back_off_exponentially_instead_of_retrying_every_tick(parts):
    store, settings, realigner = parts
    settings.update(min_new_ratings=1)
    _rated(store, 3, 0)                                # thumbs-up only: every run fails at once
    offset = [0.0]
    sched = _restarting(parts, clock=lambda: time.time() + offset[0], backoff=(600.0, 3600.0))

    def tick_and_wait():
        info = sched.tick()
        sched.wait(30)
        return info

    assert tick_and_wait()["started"]                  # first failure
    assert [r["status"] for r in store.runs()] == ["failed"]
    info = tick_and_wait()
    assert not info["started"] and "backing off after 1 failed run" in info["why"]
    assert len(store.runs()) == 1
    # the store stamps failures with the real time, the scheduler's clock runs `offset` seconds ahead of it
    offset[0] = 601                                    # 10 minutes after the failure: one more try
    assert tick_and_wait()["started"] and len(store.runs()) == 2
    offset[0] = 1100                                   # the second wait is 20 minutes
    info = tick_and_wait()
    assert not info["started"] and "after 2 failed run" in info["why"] and len(store.runs()) == 2
    offset[0] = 1205
    assert tick_and_wait()["started"] and len(store.runs()) == 3
    assert sched.backoff_state()["failures_in_a_row"] == 3
