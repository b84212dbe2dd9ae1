"""On a PostgreSQL store the console's figures and the Prometheus gauges come from the DuckDB copy
(feedback_store/mirror.py): the same numbers as the store itself, the time they are from on the page, and the
store read once per interval; the real app on a real PostgreSQL server, vLLM a stand-in."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Config
from app.loop.realign import Realigner
from app.main import Stack, create_app, default_settings
from app.operator_settings import SettingsStore
from app.web.admin_api import admin_headers
from app.web.auth import basic_header
from app.web.console import summary_markdown
from feedback_store import FeedbackStore
from feedback_store.mirror import DashboardCopy
from tests.app.doubles import BaseRegistry, OfflineServer

PASSWORD = "s3cret"
AUTH = {"Authorization": basic_header("admin", PASSWORD)} | admin_headers()


def _stack(data: Path, url: str, dashboard_s: float, clock) -> Stack:
    cfg = Config(data_dir=data, model_dir=data / "no-model", admin_password=PASSWORD, db_url=url,
                 dashboard_copy_s=dashboard_s).resolved()
    store = FeedbackStore(url, max_user_share=0.5)
    reg = BaseRegistry()
    copy = DashboardCopy(store, data / "dashboard", dashboard_s, clock=clock) if dashboard_s else None
    return Stack(OfflineServer(), store, reg, None,
                 Realigner(store, reg, model_dir=cfg.model_dir, work_dir=data / "runs", niceness=0),
                 SettingsStore(data, default_settings(cfg)), cfg, copy)


def _rate(store: FeedbackStore, user: str, n_up: int, n_down: int) -> None:
    conv = store.new_conversation(user)
    for i in range(n_up + n_down):
        q = f"{user} question {i}"
        a = store.add_answer(conv, store.add_user_message(conv, q), [{"role": "user", "content": q}],
                             f"{user} answer {i}", adapter="base")
        store.rate(user, a, "up" if i < n_up else "down", client_addr=f"10.1.0.{i % 3}")


def _get(st: Stack, path: str) -> dict | str:
    app, scheduler = create_app(st, PASSWORD)
    try:
        with TestClient(app) as client:
            r = client.get(path, headers=AUTH)
            assert r.status_code == 200, r.text
            return r.json() if path.startswith("/api") else r.text
    finally:
        scheduler.shutdown()


@pytest.fixture
def stacks(tmp_path, pg_url):
    now = [100.0]
    with_copy = _stack(tmp_path / "a", pg_url, 30.0, lambda: now[0])
    without = _stack(tmp_path / "b", pg_url, 0.0, None)
    yield with_copy, without, now
    with_copy.dashboard.close()
    with_copy.store.close()
    without.store.close()


def test_the_console_shows_the_stores_figures_from_the_copy_and_when_they_are_from(stacks):
    st, direct, now = stacks
    _rate(st.store, "alice", 6, 3)
    _rate(st.store, "bob", 2, 5)
    st.dashboard.refresh()
    got, want = _get(st, "/api/admin/stats"), _get(direct, "/api/admin/stats")
    assert got.pop("counted_at") == 100.0 and want.pop("counted_at") is None
    assert got.pop("counted_every_s") == 30.0
    want.pop("counted_every_s")
    for k in ("run", "next_run", "last_tick"):
        got.pop(k), want.pop(k)
    assert got == want and got["up"] == 8 and got["down"] == 8 and got["shares"]["n_candidates"] == 16
    assert "Counts as of 00:01:40 UTC (a copy of the store, refreshed every 30 s)" in summary_markdown(
        {**_get(st, "/api/admin/stats"), "next_run": None})


def test_a_new_rating_shows_once_the_copy_is_refreshed(stacks):
    st, direct, now = stacks
    _rate(st.store, "alice", 3, 3)
    st.dashboard.refresh()
    _rate(st.store, "carol", 1, 0)
    assert _get(st, "/api/admin/stats")["up"] == 3 and _get(direct, "/api/admin/stats")["up"] == 4
    metrics = _get(st, "/metrics")
    assert 'kto_loop_ratings{value="up"} 3.0' in metrics
    now[0] += 30                                # stale: this read starts a copy and does not wait for it
    assert _get(st, "/api/admin/stats")["up"] == 3
    st.dashboard.refresh()
    assert _get(st, "/api/admin/stats")["up"] == 4
    assert 'kto_loop_ratings{value="up"} 4.0' in _get(st, "/metrics")
