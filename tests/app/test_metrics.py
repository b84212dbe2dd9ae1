"""Prometheus /metrics on the real app and a real DuckDB file: the operator's login guards it, it parses as
Prometheus text, and its figures move after a chat, a rating, a run and a swap."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.main import Stack
from app.web.metrics import run_summary
from tests.app.test_openai_api import ADMIN, feedback, oai, scripted_apps


@pytest.fixture
def make_app(tmp_path):
    with scripted_apps(tmp_path) as make:
        yield make


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    r = httpx.get(url + "/metrics", auth=ADMIN, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def test_metrics_need_the_operator_login(make_app):
    url, _, _ = make_app()
    assert httpx.get(url + "/metrics", timeout=10).status_code == 401
    assert httpx.get(url + "/metrics", auth=("admin", "wrong"), timeout=10).status_code == 401
    assert httpx.get(url + "/metrics", auth=ADMIN, timeout=10).status_code == 200


def test_counters_move_after_a_chat_and_a_rating(make_app):
    url, store, _ = make_app()
    before = scrape(url)
    assert before[("kto_loop_chats_total", (("channel", "api"),))] == 0
    assert before[("kto_loop_ratings", (("value", "up"),))] == 0
    assert before[("kto_loop_vllm_up", ())] == 1
    assert before[("kto_loop_served", (("version", "base"),))] == 1
    key, _ = store.create_api_key("acme")
    a = oai(url, key).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}]).id
    b = oai(url, key).chat.completions.create(model="m", messages=[{"role": "user", "content": "yo"}]).id
    conv = store.new_conversation("anon-0123456789abcdef")              # a chat from the page
    store.add_answer(conv, store.add_user_message(conv, "hey"), [{"role": "user", "content": "hey"}], "hello")
    assert feedback(url, key, answer_id=a, value="up").status_code == 200
    assert feedback(url, key, answer_id=b, value="down").status_code == 200
    after = scrape(url)
    assert after[("kto_loop_chats_total", (("channel", "api"),))] == 2
    assert after[("kto_loop_chats_total", (("channel", "page"),))] == 1
    assert after[("kto_loop_ratings", (("value", "up"),))] == 1
    assert after[("kto_loop_ratings", (("value", "down"),))] == 1
    assert after[("kto_loop_like_rate", (("version", "base"),))] == pytest.approx(0.5)


def test_runs_and_swaps_are_measured(make_app):
    url, store, _ = make_app()
    run = store.start_run("operator")
    store.finish_run(run, "failed", error="boom")
    m = scrape(url)
    assert m[("kto_loop_run_duration_seconds_count", (("status", "failed"),))] == 1
    assert m[("kto_loop_run_duration_seconds_sum", (("status", "failed"),))] >= 0


def test_swap_latency_comes_from_the_registry(tmp_path):
    from app.web.metrics import StackCollector

    class Registry:
        def current(self):
            return "v2"

        def versions(self):
            return [{"name": "v1", "load_s": 1.5, "warm_s": 0.25}, {"name": "v2", "status": "loading"}]

    class Down:
        def is_healthy(self, timeout=2.0):
            raise ConnectionError("refused")

    from feedback_store import FeedbackStore

    with FeedbackStore(tmp_path / "f.duckdb") as store:
        st = Stack(Down(), store, Registry(), None, None, None, None)
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in StackCollector(st).collect() for s in fam.samples}
    assert samples[("kto_loop_swap_seconds", (("phase", "load"), ("version", "v1")))] == 1.5
    assert samples[("kto_loop_swap_seconds", (("phase", "warm"), ("version", "v1")))] == 0.25
    assert not any(k[0] == "kto_loop_swap_seconds" and ("version", "v2") in k[1] for k in samples)
    assert samples[("kto_loop_vllm_up", ())] == 0
    assert samples[("kto_loop_served", (("version", "v2"),))] == 1


def test_run_summary_counts_finished_runs_by_outcome():
    from datetime import datetime

    t = datetime(2026, 1, 1)
    runs = [{"status": "promoted", "started_at": t, "finished_at": t + timedelta(seconds=30)},
            {"status": "promoted", "started_at": t, "finished_at": t + timedelta(seconds=10)},
            {"status": "rejected", "started_at": t, "finished_at": t + timedelta(seconds=5)},
            {"status": "running", "started_at": t, "finished_at": None}]
    assert run_summary(runs) == {"promoted": (2, 40.0), "rejected": (1, 5.0)}
