"""The operator's CLI against a running app and a stopped one: `stats`, `export`, `lineage`, `runs` and `backup` go
through the app's authenticated admin API while it runs (DuckDB lets one process open the file, and the app holds
it) and open the file when it is stopped, printing the same thing; `align --now` and `cancel` drive a real
aligner child (tiny model) through the app; the next run's n_D/n_U/λ agree with what the aligner then logs.

The app is the real FastAPI app `create_app` builds, served by uvicorn on a real socket, over a real DuckDB file;
vLLM and the adapter registry are stand-ins (no model is served here).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import uvicorn
from fastapi.testclient import TestClient

from app.cli import main
from app.config import Config
from app.loop.next_run import aligner_settings, next_run, split_counts
from app.loop.realign import Realigner
from app.main import Stack, create_app, default_settings
from app.operator_settings import RUNTIME_FILE, SettingsStore, write_json_atomic
from app.web.admin_api import ADMIN_HEADER, TRANSFER_DIR
from app.web.auth import basic_header
from feedback_store import FeedbackStore
from tests.app.doubles import PointerRegistry
from tests.conftest import free_port

PASSWORD = "s3cret"
TRAIN_ARGS = ["--max-steps", "1", "--batch-size", "4", "--holdout-fraction", "0.25", "--checkpoints", "0"]


class Server:
    base_url = "http://127.0.0.1:9"

    def is_healthy(self, timeout=2.0):
        return True


Registry = PointerRegistry


class RunningApp:
    """The app over a real socket, with the runtime file the CLI finds it by; `stop()` is the app exiting."""

    def __init__(self, data: Path, model_dir: Path, extra_args: list[str], **cfg_kw) -> None:
        self.cfg = Config(data_dir=data, model_dir=model_dir, admin_password=PASSWORD,
                          align_extra_args=" ".join(extra_args), **cfg_kw).resolved()
        self.store = FeedbackStore(self.cfg.db_path, max_user_share=self.cfg.max_user_share or None,
                                   max_addr_share=self.cfg.max_addr_share or None)  # as build_stack opens it
        self.registry = Registry()
        self.realigner = Realigner(self.store, self.registry, model_dir=model_dir, work_dir=data / "runs",
                                   min_gain=-1e9, extra_args=extra_args, lora_rank=8, niceness=0,
                                   max_examples=self.cfg.max_examples, mode=self.cfg.align_mode)
        self.stack = Stack(Server(), self.store, self.registry, None, self.realigner,
                           SettingsStore(data, default_settings(self.cfg)), self.cfg)
        self.app, self.scheduler = create_app(self.stack, PASSWORD)
        self.server: uvicorn.Server | None = None

    def start(self) -> RunningApp:
        self.scheduler.start()
        port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        write_json_atomic(Path(self.cfg.data_dir) / RUNTIME_FILE,
                          {"url": f"http://127.0.0.1:{port}", "pid": os.getpid(), "admin_user": "admin",
                           "admin_password": PASSWORD, "db_path": str(Path(self.cfg.db_path).resolve())},
                          mode=0o600)
        return self

    def stop(self) -> None:
        (Path(self.cfg.data_dir) / RUNTIME_FILE).unlink(missing_ok=True)
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(timeout=30)
            self.server = None
        self.scheduler.shutdown()
        self.store.close()


def _rate(store: FeedbackStore, tag: str, n: int, adapter: str = "base", user: str = "alice") -> list[str]:
    """n answers by `adapter`, two thumbs-up for each thumbs-down; returns the answer ids."""
    conv = store.new_conversation(user)
    ids = []
    for i in range(n):
        q = f"Question {tag}-{i}: name a colour you like and say why."
        m = store.add_user_message(conv, q)
        a = store.add_answer(conv, m, [{"role": "user", "content": q}], f"Blue, answer {tag}-{i}.", adapter=adapter)
        store.rate(user, a, "down" if i % 3 == 2 else "up", reason="wrong" if i % 3 == 2 else None)
        ids.append(a)
    return ids


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _recorded_run(store: FeedbackStore, adapter_dir: Path) -> tuple[str, dict[str, list[str]]]:
    """A finished run as the realigner records one (snapshot, then the aligner's held-out and dropped ids), and
    the adapter it made; returns (run id, the roles the test gave its ratings)."""
    run = store.start_run("operator", {})
    snap = store.export_snapshot(adapter_dir.parent / "snap.parquet", run_id=run)
    ids = sorted(pq.read_table(snap.path).column("example_id").to_pylist())
    roles = {"heldout": ids[:2], "dropped": ids[2:3], "trained": ids[3:]}
    store.finish_run(run, "promoted", n_desirable=4, n_undesirable=2, lambda_d=1.0, lambda_u=1.5,
                     metrics={"version": "kto-v1", "reason": "promoted: test", "heldout": {"new": {"margin": 0.25}}},
                     dropped=roles["dropped"], heldout=roles["heldout"])
    adapter_dir.mkdir(parents=True, exist_ok=True)
    store.register_adapter("kto-v1", adapter_dir, run_id=run)
    store.mark_promoted("kto-v1")
    return run, roles


def test_read_commands_print_the_same_through_the_app_and_from_the_file(tmp_path, capsys):
    """While the app runs, the CLI never opens the file (opening it here, where the app holds it, would fail),
    yet prints what it prints from the file once the app has stopped."""
    data = tmp_path / "data"
    running = RunningApp(data, tmp_path / "model", [])
    store = running.store
    _rate(store, "a", 9)
    run_id, roles = _recorded_run(store, data / "adapters" / "kto-v1")
    later = _rate(store, "b", 7, adapter="kto-v1")
    running.stack.settings.update(max_examples=6)
    answer = later[0]
    commands = {
        "stats": ["stats", "--json"], "stats-text": ["stats"],
        "runs": ["runs", "--json"], "runs-text": ["runs"],
        "lineage": ["lineage", answer, "--json"], "lineage-text": ["lineage", answer],
        "export-kto": ["export", "--out", "OUT/kto.jsonl"],
        "export-snap": ["export", "--format", "snapshot", "--out", "OUT/snap.parquet", "--since", "kto-v1"],
    }
    printed: dict[str, dict[str, str]] = {"app": {}, "file": {}}
    running.start()
    try:
        for via in ("app", "file"):
            if via == "file":
                running.stop()
            out_dir = tmp_path / via
            for name, argv in commands.items():
                argv = [a.replace("OUT", str(out_dir)) for a in argv]
                rc, out, err = _cli(capsys, *argv, "--data-dir", str(data))
                assert rc == 0, (via, name, err)
                printed[via][name] = out.replace(str(out_dir), "OUT")
    finally:
        running.stop() if running.server is not None else None
    assert printed["app"] == printed["file"]
    assert (tmp_path / "app" / "kto.jsonl").read_bytes() == (tmp_path / "file" / "kto.jsonl").read_bytes()
    assert pq.read_table(tmp_path / "app" / "snap.parquet").equals(pq.read_table(tmp_path / "file" / "snap.parquet"))
    assert not any((data / TRANSFER_DIR).iterdir())  # streamed and deleted, nothing left on the server

    stats = json.loads(printed["app"]["stats"])
    nxt = stats["next_run"]  # continue mode: only the 7 ratings since kto-v1, newest 6 of them, minus the held out
    assert nxt["resume"] and nxt["since"] == "kto-v1" and nxt["max_examples"] == 6
    assert nxt["snapshot_desirable"] + nxt["snapshot_undesirable"] == 6
    assert nxt["n_desirable"] + nxt["n_undesirable"] + nxt["heldout_desirable"] + nxt["heldout_undesirable"] == 6
    assert nxt["heldout_desirable"] + nxt["heldout_undesirable"] > 0
    assert stats["counts"]["total"] == 16  # the all-time counts stay in their own place
    lineage = json.loads(printed["app"]["lineage"])
    assert lineage["adapter"] == "kto-v1" and lineage["adapters"][0]["run_id"] == run_id
    assert {k: lineage["adapters"][0][k] for k in roles} == roles
    assert f"{len(roles['trained'])} trained, 2 held out, 1 dropped" in printed["app"]["lineage-text"]
    runs = json.loads(printed["app"]["runs"])
    assert [r["id"] for r in runs] == [run_id] and runs[0]["status"] == "promoted"
    assert "kto-v1" in printed["app"]["runs-text"] and "0.25" in printed["app"]["runs-text"]


def test_backup_through_the_app_writes_only_under_its_data_dir(tmp_path, capsys):
    """`backup --to` gets the copy streamed back; a request naming a server path is refused and writes nothing."""
    data = tmp_path / "data"
    running = RunningApp(data, tmp_path / "model", []).start()
    try:
        _rate(running.store, "a", 4)
        to = tmp_path / "mine" / "copy.duckdb"
        rc, out, err = _cli(capsys, "backup", "--to", str(to), "--data-dir", str(data))
        assert rc == 0, err
        res = json.loads(out)
        assert res["via"] == "app" and res["path"] == str(to.resolve()) and res["bytes"] == to.stat().st_size
        rc, out, err = _cli(capsys, "backup", "--data-dir", str(data))
        assert rc == 0 and Path(json.loads(out)["path"]).parent == data / "backups"
        with TestClient(running.app, base_url="http://testserver") as client:
            headers = {"Authorization": basic_header("admin", PASSWORD), ADMIN_HEADER: "1"}
            elsewhere = tmp_path / "server-side.duckdb"
            r = client.post("/api/admin/backup", json={"to": str(elsewhere)}, headers=headers)
            assert r.status_code == 400 and not elsewhere.exists()
            for body in ({"suffix": "/../../evil.jsonl"}, {"format": "snapshot", "suffix": ".jsonl"},
                         {"format": "dpo", "suffix": ".duckdb"}, {"limit": -1}, {"format": "csv"}):
                assert client.post("/api/admin/export", json=body, headers=headers).status_code == 400, body
            assert client.get("/api/admin/counts").status_code == 401
            assert client.get("/api/admin/lineage/nope", headers=headers).status_code == 404
    finally:
        running.stop()
    with FeedbackStore(to, read_only=True) as b:
        assert b.counts()["total"] == 4
    assert not any((data / TRANSFER_DIR).iterdir())


def test_a_command_naming_another_database_opens_that_file_not_the_running_app(tmp_path, capsys):
    """The app holds its own file; `--db-path` naming another one is not answered from the app's data."""
    data = tmp_path / "data"
    running = RunningApp(data, tmp_path / "model", []).start()
    other = tmp_path / "other.duckdb"
    with FeedbackStore(other) as s:
        _rate(s, "x", 2)
    try:
        _rate(running.store, "a", 5)
        rc, out, err = _cli(capsys, "stats", "--json", "--data-dir", str(data), "--db-path", str(other))
        assert rc == 0, err
        assert json.loads(out)["counts"]["total"] == 2
    finally:
        running.stop()


def test_next_run_counts_only_what_continue_mode_would_train(tmp_path):
    """Served adapter, continue mode: the ratings since its snapshot, capped, minus the held-out slice; fresh mode:
    everything. The realigner's own selection is the same function."""
    store = FeedbackStore(tmp_path / "f.duckdb")
    _rate(store, "a", 12)
    _recorded_run(store, tmp_path / "adapters" / "kto-v1")
    _rate(store, "b", 9, adapter="kto-v1")
    cont = next_run(store, mode="continue", max_examples=2000)
    assert cont.resume and cont.snapshot_desirable + cont.snapshot_undesirable == 9
    fresh = next_run(store, mode="fresh", max_examples=2000)
    assert not fresh.resume and fresh.snapshot_desirable + fresh.snapshot_undesirable == 21
    capped = next_run(store, mode="fresh", max_examples=10, extra_args=["--heldout-fraction", "0"])
    assert (capped.heldout_desirable, capped.heldout_undesirable) == (0, 0)
    assert capped.n_desirable + capped.n_undesirable == 10
    pinned = next_run(store, mode="fresh", max_examples=10, extra_args=["--lambda-u", "2"])
    assert (pinned.lambda_d, pinned.lambda_u, pinned.lambda_mode) == (1.0, 2.0, "pinned")
    store.close()


def test_split_counts_match_the_aligner_split_for_one_kind_held_out():
    """All thumbs-down hash into the held-out slice: the aligner trains on them instead, and so does the count."""
    settings = aligner_settings(["--holdout-fraction", "0.99", "--heldout-min", "0"])
    rows = [(f"e{i}", f"a{i}", i < 5) for i in range(7)]
    out = split_counts(rows, settings)
    assert out["n_desirable"] + out["n_undesirable"] + out["heldout_desirable"] + out["heldout_undesirable"] == 7
    assert out["n_desirable"] > 0 and out["n_undesirable"] > 0 and out["lambda_d"] is not None


@pytest.fixture
def _gate_always_promotes(monkeypatch):
    """A random tiny model has nothing to learn, so the real gate may say no; the gate has its own tests."""
    import app.loop.gate

    monkeypatch.setattr(app.loop.gate, "should_promote", lambda new, served, min_gain: (True, "promoted: test"))
    monkeypatch.setattr(app.loop.gate, "rater_check", lambda new, served, min_gain: (True, "", None))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.usefixtures("_gate_always_promotes")
def test_align_and_cancel_through_the_app_and_the_next_run_numbers_are_the_aligners(tiny_model_dir, tmp_path,
                                                                                      capsys):
    """`stats` before a run says what the aligner then logs (counts after the cap and held-out split, λ);
    `align --now` runs it through the app; lineage separates what trained from what was held out; `cancel` stops
    a second run, recorded as cancelled."""
    data = tmp_path / "data"
    running = RunningApp(data, tiny_model_dir, TRAIN_ARGS).start()
    try:
        _rate(running.store, "a", 20)
        running.stack.settings.update(max_examples=15)
        rc, out, err = _cli(capsys, "stats", "--json", "--data-dir", str(data))
        assert rc == 0, err
        predicted = json.loads(out)["next_run"]
        rc, out, err = _cli(capsys, "align", "--now", "--data-dir", str(data))
        assert rc == 0, (out, err)
        last = json.loads(out.strip().splitlines()[-1])
        assert last["status"] == "promoted", last
        run = running.store.get_run(last["run_id"])
        manifest = json.loads((data / "runs" / f"run-{last['run_id']}" / "adapter" / "manifest.json").read_text())
        logged = {"n_desirable": manifest["n_desirable"], "n_undesirable": manifest["n_undesirable"],
                  "heldout_desirable": manifest["heldout"]["n_desirable"],
                  "heldout_undesirable": manifest["heldout"]["n_undesirable"],
                  "lambda_d": manifest["lambda_d"], "lambda_u": manifest["lambda_u"]}
        assert {k: predicted[k] for k in logged} == logged
        assert predicted["heldout_desirable"] + predicted["heldout_undesirable"] > 0
        assert run["metrics"]["planned"] == {k: predicted[k] for k in run["metrics"]["planned"]}
        assert (run["n_desirable"], run["lambda_d"]) == (manifest["n_desirable"], manifest["lambda_d"])

        conv = running.store.new_conversation("reader")
        q = running.store.add_user_message(conv, "hi")
        answer = running.store.add_answer(conv, q, [{"role": "user", "content": "hi"}], "hello", adapter="kto-v1")
        rc, out, err = _cli(capsys, "lineage", answer, "--json", "--data-dir", str(data))
        assert rc == 0, err
        step = json.loads(out)["adapters"][0]
        assert sorted(step["heldout"]) == sorted(manifest["heldout_examples"])
        assert len(step["trained"]) == manifest["n_desirable"] + manifest["n_undesirable"]
        assert not set(step["trained"]) & set(step["heldout"])

        _rate(running.store, "b", 12, adapter="kto-v1")  # 8 👍 / 4 👎: one of each held out, so it may start
        rc, out, err = _cli(capsys, "align", "--now", "--no-wait", "--data-dir", str(data))
        assert rc == 0, err
        rc, out, err = _cli(capsys, "cancel", "--data-dir", str(data))
        assert rc == 0 and "cancelling run" in out, err
        running.scheduler.wait(timeout=120)
        assert running.realigner.status.last["status"] == "cancelled"
        rc, out, err = _cli(capsys, "cancel", "--data-dir", str(data))
        assert rc == 2 and "no realignment run to cancel" in err
        rc, out, err = _cli(capsys, "runs", "--json", "--data-dir", str(data))
        assert [r["status"] for r in json.loads(out)] == ["cancelled", "promoted"]
    finally:
        running.stop()


def test_console_lists_down_reasons_filtered_by_adapter(tmp_path):
    """Thumbs-down with a reason or comment, newest first, per served version; thumbs-up and bare 👎 stay out."""
    from app.loop.scheduler import RealignScheduler
    from app.web.console import Operator

    running = RunningApp(tmp_path, tmp_path / "model", [])
    store = running.store
    conv = store.new_conversation("bob")
    answers = {}
    for adapter in ("base", "kto-v1"):
        for kind in ("reason", "comment", "bare", "up"):
            m = store.add_user_message(conv, f"{adapter} {kind}?")
            answers[adapter, kind] = store.add_answer(conv, m, [{"role": "user", "content": "q"}],
                                                      f"{adapter} answer {kind}", adapter=adapter)
        store.rate("bob", answers[adapter, "reason"], "down", reason="wrong")
        store.rate("bob", answers[adapter, "comment"], "down", comment=f"too long ({adapter})")
        store.rate("bob", answers[adapter, "bare"], "down")
        store.rate("bob", answers[adapter, "up"], "up", reason="helpful")
    op = Operator(store, running.registry, running.realigner,
                  RealignScheduler(running.realigner, store, running.stack.settings), running.stack.settings)
    every = op.down_reasons()
    assert len(every) == 4 and set(every["adapter"]) == {"base", "kto-v1"}
    v1 = op.down_reasons("kto-v1")
    assert set(v1["answer id"]) == {answers["kto-v1", "reason"], answers["kto-v1", "comment"]}
    assert set(v1["reason"]) == {"wrong", ""} and "too long (kto-v1)" in set(v1["comment"])
    assert op.down_reasons("kto-v9").empty
    store.rate("anon-0123456789abcdef", answers["base", "bare"], "down", reason="rude")
    assert "anon-01234…" in set(op.down_reasons()["user"])       # shortened, as in a run's examples
    store.close()


def test_schedule_and_cancel_through_the_app_and_with_it_stopped(tmp_path, capsys):
    """`schedule` changes the running app's schedule now, or the settings file the app reads at its next start;
    `cancel` with no app has no run to cancel."""
    data = tmp_path / "data"
    running = RunningApp(data, tmp_path / "model", []).start()
    try:
        rc, out, err = _cli(capsys, "schedule", "--every", "45", "--examples-per-run", "30", "--data-dir", str(data))
        assert rc == 0, err
        assert json.loads(out)["next_run"] and running.stack.settings.load().max_examples == 30
        rc, out, err = _cli(capsys, "cancel", "--data-dir", str(data))
        assert rc == 2 and "no realignment run to cancel" in err
    finally:
        running.stop()
    rc, out, err = _cli(capsys, "schedule", "--off", "--data-dir", str(data))
    assert rc == 0, err
    got = json.loads(out)
    assert got["enabled"] is False and got["interval_minutes"] == 45 and "next start" in got["note"]
    rc, out, err = _cli(capsys, "cancel", "--data-dir", str(data))
    assert rc == 2 and "nothing to cancel" in err
    rc, out, err = _cli(capsys, "stats", "--json", "--data-dir", str(data))
    assert rc == 0 and json.loads(out)["next_run"]["max_examples"] == 30  # the persisted examples per run
