"""The operator console's trust signals (share caps at work, the last run's per-rater check, an unusable settings
file) and the newcomer papercuts of issue #42 (a run refused before training when it could not be judged, its
outcome replacing "started", a count that a refused run does not reset, a schedule that cannot look on while
nothing is set, start-up progress lines), on the real store and the real app; vLLM is a stand-in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from aligner.config import TrainConfig
from aligner.data import is_heldout
from app.cli import main
from app.config import Config
from app.loop.next_run import fewest_per_kind
from app.loop.realign import Realigner
from app.main import Stack, create_app, default_settings
from app.operator_settings import SETTINGS_FILE, SettingsStore
from app.web.admin_api import admin_headers
from app.web.auth import basic_header
from app.web.console import schedule_state, settings_warning, summary_markdown, trust_markdown
from feedback_store import FeedbackStore
from tests.app.doubles import BaseRegistry, OfflineServer

PASSWORD = "s3cret"
AUTH = {"Authorization": basic_header("admin", PASSWORD)} | admin_headers()


Server, Registry = OfflineServer, BaseRegistry


def _stats_and_counts(st: Stack) -> tuple[dict, dict]:
    """GET /api/admin/stats and /api/admin/counts from the real app on this stack."""
    app, scheduler = create_app(st, PASSWORD)
    scheduler.start()
    try:
        with TestClient(app) as client:
            return (client.get("/api/admin/stats", headers=AUTH).json(),
                    client.get("/api/admin/counts", headers=AUTH).json())
    finally:
        scheduler.shutdown()


def _stack(data: Path, **store_kw) -> Stack:
    cfg = Config(data_dir=data, model_dir=data / "no-model", admin_password=PASSWORD).resolved()
    store = FeedbackStore(cfg.db_path, **store_kw)
    reg = Registry()
    return Stack(Server(), store, reg, None,
                 Realigner(store, reg, model_dir=cfg.model_dir, work_dir=data / "runs", niceness=0),
                 SettingsStore(data, default_settings(cfg)), cfg)


@pytest.fixture
def stack(tmp_path):
    st = _stack(tmp_path / "data")
    yield st
    st.store.close()


@pytest.fixture
def web(stack):
    app, scheduler = create_app(stack, PASSWORD)
    scheduler.start()
    with TestClient(app) as client:
        yield client, scheduler
    scheduler.shutdown()


def _rate(store: FeedbackStore, user: str, n_up: int, n_down: int, addr: str | None = None,
          outside_hash_slice: bool = False) -> None:
    """`user` rates n_up 👍 and n_down 👎 answers; `outside_hash_slice`: only answers the aligner's hash slice does
    not hold out (answer ids are random), so what is held out is the floor's doing alone."""
    conv = store.new_conversation(user)
    rated, i = 0, 0
    while rated < n_up + n_down:
        q = f"{user} question {i}"
        m = store.add_user_message(conv, q)
        a = store.add_answer(conv, m, [{"role": "user", "content": q}], f"{user} answer {i}", adapter="base")
        i += 1
        if outside_hash_slice and is_heldout(a, TrainConfig.heldout_fraction):
            continue
        store.rate(user, a, "up" if rated < n_up else "down", client_addr=addr)
        rated += 1


def _finished_run(store: FeedbackStore, status: str, metrics: dict, tmp: Path) -> str:
    run = store.start_run("operator", {})
    store.export_snapshot(tmp / f"snap-{run}.parquet", run_id=run)
    store.finish_run(run, status, metrics=metrics, error=metrics.get("error"))
    return run


# ---------------------------------------------------------------- a run that could not be judged is refused first

def test_realign_with_too_few_ratings_is_refused_before_anything_runs(web, stack):
    """2 👍 / 2 👎: the held-out floor sets none aside, so the gate could never promote; the API (and with it the
    console and `kto-loop align --now`) says what a run needs, and no run is recorded or trained."""
    client, _ = web
    _rate(stack.store, "alice", 2, 2, outside_hash_slice=True)
    r = client.post("/api/admin/align", json={}, headers=AUTH)
    assert r.status_code == 422, r.text
    why = r.json()["detail"]
    assert "too few ratings" in why and "heldout_min = 3" in why and f"at least {fewest_per_kind(3)} 👍" in why
    assert "min_new_ratings = 50" in why and "2 👍 / 2 👎" in why
    assert stack.store.runs() == [] and not (stack.cfg.data_dir / "runs").exists()


def test_align_now_with_the_app_stopped_refuses_before_starting_vllm(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    store = FeedbackStore(data / "feedback.duckdb")
    _rate(store, "alice", 5, 1)
    store.close()
    rc = main(["align", "--now", "--data-dir", str(data), "--model-dir", str(tmp_path / "no-model")])
    err = capsys.readouterr().err
    assert rc == 1 and "not started: too few ratings" in err and "5 👍 / 1 👎" in err, err
    assert "starting vLLM" not in err
    with FeedbackStore(data / "feedback.duckdb") as store:
        assert store.runs() == []


def test_enough_ratings_start_and_the_outcome_replaces_started(stack):
    """4 👍 / 4 👎 pass (one of each is held out); the run fails here (no model), and the console's line for it
    says so once it has ended."""
    from app.loop.scheduler import RealignScheduler
    from app.web.console import Operator

    _rate(stack.store, "alice", 4, 4)
    sched = RealignScheduler(stack.realigner, stack.store, stack.settings)
    op = Operator(stack.store, stack.registry, stack.realigner, sched, stack.settings)
    assert op.cannot_run(stack.settings.load()) is None
    msg = op.realign_now()
    run_id = stack.realigner.status.run_id
    assert "started" in msg and run_id in msg
    assert stack.realigner.running and op.run_outcome(run_id) is None  # the aligner child is still importing
    sched.wait(timeout=300)
    line = op.run_outcome(run_id)
    assert line.startswith(f"❌ Run {run_id} failed:") and "aligner exited" in line, line
    assert op.run_outcome("no-such-run") is None and op.run_outcome(None) is None


# ---------------------------------------------------------------- counts a refused run does not reset

def test_ratings_not_yet_learned_survive_a_rejected_run(stack, tmp_path):
    _rate(stack.store, "alice", 3, 2)
    _finished_run(stack.store, "rejected", {"reason": "not promoted: margin"}, tmp_path)
    from app.loop.scheduler import RealignScheduler
    from app.web.console import Operator

    op = Operator(stack.store, stack.registry, stack.realigner,
                  RealignScheduler(stack.realigner, stack.store, stack.settings), stack.settings)
    s = op.summary()
    assert s["new_since_last_run"] == 0 and s["unseen_by_served"] == 5
    assert "| **5** | 0 |" in summary_markdown(s)


# ---------------------------------------------------------------- share caps and the per-rater check

def test_share_caps_and_the_rater_check_in_the_console_the_api_and_stats(tmp_path, capsys):
    """mallory supplies most ratings: the cap's cut shows per user and per address; the last run's per-rater check
    refused a gain resting on her, in plain words, in the console, GET /api/admin/stats and `kto-loop stats`."""
    data = tmp_path / "data"
    st = _stack(data, max_user_share=0.4, max_addr_share=0.5)
    _rate(st.store, "mallory", 8, 4, addr="10.0.0.66")
    _rate(st.store, "alice", 2, 2, addr="10.0.0.1")
    _rate(st.store, "bob", 2, 2, addr="10.0.0.2")
    check = {"raters": 3, "most_influential": "mallory", "n": 5, "n_heldout": 8, "gain": 0.4,
             "gain_without": -0.02, "min_gain": 0.0, "ok": False}
    reason = ("not promoted: the held-out gain rests on one rater: without mallory's 5 of 8 held-out answers it is "
              "-0.0200")
    _finished_run(st.store, "rejected", {"reason": reason, "rater_check": check}, tmp_path)
    s, counts = _stats_and_counts(st)
    sh = s["shares"]
    top = sh["top_users"][0]
    assert top["user_id"] == "mallory" and top["dropped"] > 0 and sh["user_cap"] == top["kept"]
    assert sh["top_addrs"][0]["client_addr"] == "10.0.0.66" and sh["n_dropped"] == sum(sh["dropped_by_user"].values())
    assert s["last_run_checks"]["rater_check"]["most_influential"] == "mallory"
    assert counts["shares"] == sh and counts["last_run_checks"] == s["last_run_checks"]
    md = trust_markdown(s)
    assert f"They cut **{sh['n_dropped']}**" in md and f"at most {sh['user_cap']} ratings per signed user" in md
    assert "**refused** — the gain rests on one rater: without `mallory` (5 of 8 held-out answers)" in md
    assert reason in md
    from app.loop.scheduler import RealignScheduler
    from app.web.console import Operator

    op = Operator(st.store, st.registry, st.realigner, RealignScheduler(st.realigner, st.store, st.settings),
                  st.settings)
    table = op.share_table(sh)
    row = table[(table["by"] == "user") & (table["who"] == "mallory")].iloc[0]
    assert row["cut by cap"].startswith(f"{top['dropped']} (≤ {sh['user_cap']} kept)")
    st.store.close()
    rc = main(["stats", "--data-dir", str(data), "--max-user-share", "0.4", "--max-addr-share", "0.5"])
    out = capsys.readouterr().out
    assert rc == 0 and f"user mallory: {top['kept']} ratings" in out and "per-rater check REFUSED" in out, out


# ---------------------------------------------------------------- an unusable settings file

def test_an_unusable_settings_file_is_a_warning_at_the_top_of_the_console_and_in_the_api(stack):
    path = Path(stack.cfg.data_dir) / SETTINGS_FILE
    path.write_text('{"interval_minutes": "30"}')
    s, counts = _stats_and_counts(stack)
    assert "interval_minutes" in s["settings_error"] and str(path) in s["settings_error"]
    assert counts["settings_error"] == s["settings_error"] and s["scheduled"] is False
    banner = settings_warning(s["settings_error"])
    assert "Scheduled realignment is off" in banner and str(path) in banner and "Schedule & settings" in banner
    assert f"{SETTINGS_FILE}.bad" in banner and settings_warning(None) == ""


# ---------------------------------------------------------------- a schedule that cannot look on while nothing is set

def test_scheduling_cannot_be_enabled_without_a_schedule(web, stack, capsys):
    client, scheduler = web
    got = client.get("/api/admin/schedule", headers=AUTH).json()
    assert (got["interval_minutes"], got["cron"], got["scheduled"]) == (0, "", False)
    assert "**off**: no interval or cron expression" in schedule_state(stack.settings.load(), None)
    r = client.post("/api/admin/schedule", json={"enabled": True}, headers=AUTH)
    assert r.status_code == 400 and "without a schedule" in r.json()["detail"]
    r = client.post("/api/admin/schedule", json={"interval_minutes": 30, "cron": "", "enabled": True}, headers=AUTH)
    assert r.status_code == 200 and r.json()["scheduled"] is True and r.json()["next_run"]
    s = stack.settings.load()
    assert schedule_state(s, scheduler.next_run_time()).startswith("Scheduling is **on**: every 30 minutes")
    r = client.post("/api/admin/schedule", json={"interval_minutes": 0, "enabled": True}, headers=AUTH)
    assert r.status_code == 400 and stack.settings.load().interval_minutes == 30  # nothing written


def test_schedule_on_without_a_schedule_is_refused_by_the_cli(tmp_path, capsys):
    data = tmp_path / "data"
    rc = main(["schedule", "--on", "--data-dir", str(data)])
    assert rc == 2 and "without a schedule" in capsys.readouterr().err


# ---------------------------------------------------------------- `make run`'s first minutes

def test_start_up_says_what_it_starts_and_where_the_vllm_log_is(tmp_path, monkeypatch, capsys):
    import serving.server
    from app.main import build_stack
    from tests.app.test_served_truth import FakeVLLM

    fake = FakeVLLM()
    fake.log_path = tmp_path / "data" / "vllm.log"
    monkeypatch.setattr(serving.server, "VLLMServer", lambda spec: fake)
    cfg = Config(data_dir=tmp_path / "data", model_dir=tmp_path / "model", promote_max_capability_drop=-1.0).resolved()
    try:
        with build_stack(cfg):
            pass
    finally:
        fake.close()
    err = capsys.readouterr().err
    assert f"starting vLLM with {tmp_path / 'model'} (log: {fake.log_path})" in err and "1-3 minutes" in err
    assert "vLLM is ready" in err


def test_run_says_it_fetches_the_default_model(tmp_path, monkeypatch, capsys):
    import serving.model_fetch

    def no_network(models_dir, progress=True):
        raise serving.model_fetch.ModelFetchError("offline")

    monkeypatch.setattr(serving.model_fetch, "ensure_default_model", no_network)
    rc = main(["run", "--home", str(tmp_path / "home"), "--data-dir", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert rc == 2 and "fetching the default model SmolLM2-135M-Instruct" in err and "first start only" in err


def test_json_of_stats_is_json(stack):
    """The summary (with shares and checks) goes through the API's JSON encoding as it is."""
    from app.loop.scheduler import RealignScheduler
    from app.web.console import Operator

    op = Operator(stack.store, stack.registry, stack.realigner,
                  RealignScheduler(stack.realigner, stack.store, stack.settings), stack.settings)
    json.dumps(op.summary(), default=str)


# ---------------------------------------------------------------- what the operator sees (real Chromium)

def test_the_console_in_chromium_warns_says_empty_refuses_and_fits_the_runs_table_at_1400px(tmp_path):
    """Empty tables say so; a refused Realign now says why; an unusable settings file is a banner at the top;
    the runs table's headers stay on one line and its reason column is on screen at 1400 px."""
    from playwright.sync_api import expect, sync_playwright

    from tests.app.test_cli_operator import PASSWORD as CLI_PASSWORD
    from tests.app.test_cli_operator import RunningApp
    from tests.e2e.test_browser import ARGS, CHROMIUM

    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: apt-get install -y chromium")
    running = RunningApp(tmp_path / "data", tmp_path / "model", []).start()
    url = json.loads((tmp_path / "data" / "app_runtime.json").read_text())["url"]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            ctx = browser.new_context(viewport={"width": 1400, "height": 900},
                                      http_credentials={"username": "admin", "password": CLI_PASSWORD})
            page = ctx.new_page()
            page.goto(url + "/admin/")
            expect(page.get_by_text("Per user: no ratings yet")).to_be_visible(timeout=30_000)
            expect(page.locator("#kto-warning")).to_be_hidden()
            expect(page.get_by_text("Who supplies the next run's ratings (top signed users and client addresses): "
                                    "none yet")).to_be_visible()
            page.get_by_role("tab", name="Schedule & settings").click()
            expect(page.locator("#kto-schedule-state")).to_contain_text("Scheduling is off", timeout=10_000)
            expect(page.get_by_label("Scheduling enabled")).not_to_be_checked()
            page.click("#kto-realign")
            expect(page.locator("#kto-realign-msg")).to_contain_text("Not started: too few ratings", timeout=20_000)
            page.get_by_role("tab", name="Runs").click()
            expect(page.get_by_text("Realignment runs: no runs yet")).to_be_visible(timeout=10_000)

            _rate(running.store, "alice", 3, 2)
            reason = ("not promoted: the held-out gain rests on one rater: without mallory's 5 of 8 held-out "
                      "answers it is -0.0200, not above +0.0000")
            _finished_run(running.store, "rejected", {"reason": reason, "version": "kto-v1",
                                                      "heldout": {"new": {"margin": 0.25}}}, tmp_path)
            (tmp_path / "data" / SETTINGS_FILE).write_text("{not json")
            expect(page.locator("#kto-warning")).to_contain_text("Scheduled realignment is off", timeout=20_000)
            runs = page.locator("#kto-runs")
            expect(runs).to_contain_text("rejected", timeout=20_000)
            heights = [h["height"] for h in runs.locator("th").evaluate_all(
                "hs => hs.filter(h => h.offsetParent).map(h => h.getBoundingClientRect().toJSON())")]
            assert heights and max(heights) < 1.5 * min(heights), heights  # no header wraps a letter per line
            cell = runs.get_by_role("gridcell", name=reason)
            expect(cell).to_be_visible()
            box = cell.bounding_box()
            assert box["x"] + 150 < 1400 and box["width"] >= 150, box
            assert cell.evaluate("c => c.scrollWidth <= c.clientWidth + 1"), "the reason is cut off"
            lines = ("c => { const w = document.createTreeWalker(c, NodeFilter.SHOW_TEXT), tops = new Set(); "
                     "while (w.nextNode()) { if (!w.currentNode.textContent.trim()) continue; "
                     "const r = document.createRange(); r.selectNodeContents(w.currentNode); "
                     "for (const x of r.getClientRects()) tops.add(Math.round(x.top)); } return tops.size }")
            for short in ("operator", "rejected", "kto-v1"):  # short values stay on one line
                assert runs.get_by_role("gridcell", name=short).evaluate(lines) == 1, short
            browser.close()
    finally:
        running.stop()
