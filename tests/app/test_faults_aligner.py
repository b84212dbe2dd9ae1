"""Faults of the aligner child, on the real store and real child processes (a stand-in aligner command):
a hung aligner that prints nothing is freed at its time limit (the default one scales with the run's examples),
one that outgrows its memory cap is stopped, it is first in line for the kernel's OOM killer, the operator can
cancel a run (Realigner, admin API, `kto-loop cancel`), and a SIGKILLed app leaves no aligner behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import app.loop.realign as realign
from app.loop.realign import NotCancellable, Realigner, RunOutcome
from feedback_store import FeedbackStore

REPO = Path(__file__).resolve().parents[2]
HANG = "import time; time.sleep(600)"  # an aligner that hangs without printing a line


class Registry:
    def current(self) -> str:
        return "base"


class FakeAligner(Realigner):
    """The real Realigner with a stand-in aligner command (`script` run by Python, niced like the real one)."""

    def __init__(self, *args: Any, script: str, **kw: Any):
        super().__init__(*args, **kw)
        self.script = script

    def command(self, snapshot: Path, out: Path, served_dir: Path | None, resume_dir: Path | None = None) -> list[str]:
        return self._niced([sys.executable, "-c", self.script])


def _store(path: Path, n: int = 4) -> FeedbackStore:
    """A store with n rated answers, alternately up and down: enough for a run to reach its aligner."""
    store = FeedbackStore(path)
    conv = store.new_conversation("user-a")
    for i in range(n):
        m = store.add_user_message(conv, f"Question {i}?")
        a = store.add_answer(conv, m, [{"role": "user", "content": f"Question {i}?"}], f"Answer {i}.", adapter="base")
        store.rate("user-a", a, "up" if i % 2 == 0 else "down")
    return store


def _aligner(tmp_path: Path, store: FeedbackStore, script: str, **kw: Any) -> FakeAligner:
    return FakeAligner(store, Registry(), model_dir=tmp_path, work_dir=tmp_path / "runs", script=script,
                       niceness=0, **kw)


def _start(rl: Realigner) -> tuple[threading.Thread, dict[str, RunOutcome]]:
    result: dict[str, RunOutcome] = {}
    t = threading.Thread(target=lambda: result.setdefault("out", rl.run("operator")), daemon=True)
    t.start()
    return t, result


def _child(rl: Realigner, timeout: float = 30.0) -> subprocess.Popen:
    """The aligner child of the run in progress, once it is spawned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = rl._proc
        if proc is not None and rl.status.phase == "train":
            return proc
        time.sleep(0.05)
    raise AssertionError(f"no aligner child after {timeout} s (phase {rl.status.phase})")


def _alive(pids: list[int]) -> list[int]:
    """The pids among `pids` still running (a zombie has ended: only its parent has not reaped it yet)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := _alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def _finish(rl: Realigner, t: threading.Thread, result: dict[str, RunOutcome], timeout: float) -> RunOutcome:
    t.join(timeout)
    if t.is_alive():
        rl.close()  # do not leave the stand-in running when the guard under test failed
        t.join(30)
        raise AssertionError(f"the run was still going after {timeout} s")
    return result["out"]


def test_default_timeout_scales_with_examples_and_epochs():
    assert realign.aligner_timeout(0) == realign.ALIGN_START_S
    assert realign.aligner_timeout(100, 2) == realign.ALIGN_START_S + 200 * realign.ALIGN_S_PER_EXAMPLE
    # the bound is generous: ≥ 3x the ~2.7 s per example measured on the 2-core EPYC (aligner_phases)
    assert realign.ALIGN_S_PER_EXAMPLE >= 3 * 2.7
    assert realign.epochs_of(["--epochs", "3", "--max-steps", "2"]) == 3
    assert realign.epochs_of(["--epochs=2"]) == 2 and realign.epochs_of([]) == 1


def test_hung_aligner_that_prints_nothing_is_freed_at_the_default_scaled_timeout(tmp_path: Path, monkeypatch):
    """No timeout configured: the run's own limit (start-up allowance + per example) applies, enforced by a
    watchdog, not by the aligner's output. 1 s + 4 examples × 0.5 s = 3 s here."""
    monkeypatch.setattr(realign, "ALIGN_START_S", 1.0)
    monkeypatch.setattr(realign, "ALIGN_S_PER_EXAMPLE", 0.5)
    store = _store(tmp_path / "f.duckdb", n=4)
    rl = _aligner(tmp_path, store, HANG)
    assert rl.timeout_s is None
    t0 = time.monotonic()
    t, result = _start(rl)
    pid = _child(rl).pid
    out = _finish(rl, t, result, timeout=30)
    took = time.monotonic() - t0
    assert out.status == "failed" and "time limit of 3 s" in out.reason, out.reason
    assert 3 <= took < 20
    assert _wait_gone([pid], 5) == []
    assert store.get_run(out.run_id)["status"] == "failed"
    store.close()


def test_configured_timeout_wins_and_frees_a_silent_aligner(tmp_path: Path):
    store = _store(tmp_path / "f.duckdb")
    rl = _aligner(tmp_path, store, HANG, timeout_s=2.0)
    t, result = _start(rl)
    out = _finish(rl, t, result, timeout=30)
    assert out.status == "failed" and "time limit of 2 s" in out.reason
    assert rl.status.phase == "failed" and not rl.running
    store.close()


def test_hung_checkpoint_evaluation_is_freed_at_the_default_limit_and_recorded(tmp_path: Path, monkeypatch):
    """The checkpoint evaluator is an aligner child too: with no timeout configured the same watchdog frees it
    (here at a 2 s start-up allowance), and its failure lands in the manifest."""
    from app.loop.gate import Candidate

    monkeypatch.setattr(realign, "ALIGN_START_S", 2.0)
    store = _store(tmp_path / "f.duckdb")
    rl = _aligner(tmp_path, store, HANG)
    rl._niced = lambda cmd: [sys.executable, "-c", HANG]  # the evaluator's command, hung
    out = tmp_path / "runs" / "run-x" / "adapter"
    out.mkdir(parents=True)
    manifest: dict = {}
    earlier = [Candidate("step 1/2", 1, out / "checkpoints/step-1", None, pending=True)]
    t = threading.Thread(target=rl._evaluate_checkpoints, args=(out, manifest, earlier, None), daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():
        rl.close()
        raise AssertionError("the hung evaluator was still running after 30 s")
    assert "checkpoint evaluation ran past its time limit of 2 s" in manifest["checkpoint_eval_error"]
    store.close()


def test_aligner_over_its_memory_cap_is_stopped(tmp_path: Path):
    """300 MiB touched against a 150 MiB cap: the watchdog on the group's resident memory kills it at once."""
    store = _store(tmp_path / "f.duckdb")
    grow = "b = bytearray(300 * 2**20); import time; time.sleep(600)"
    rl = _aligner(tmp_path, store, grow, timeout_s=600, max_memory_bytes=150 * 2**20)
    t0 = time.monotonic()
    t, result = _start(rl)
    out = _finish(rl, t, result, timeout=60)
    assert out.status == "failed" and "GiB of memory, over the 0.15 GiB cap" in out.reason, out.reason
    assert time.monotonic() - t0 < 30
    store.close()


def test_default_memory_cap_is_half_the_machine_and_can_be_turned_off(tmp_path: Path):
    assert Realigner(None, Registry(), model_dir=tmp_path, work_dir=tmp_path).max_memory_bytes == \
        psutil.virtual_memory().total // 2
    assert Realigner(None, Registry(), model_dir=tmp_path, work_dir=tmp_path, max_memory_bytes=None).max_memory_bytes \
        is None
    with pytest.raises(ValueError, match="timeout"):
        Realigner(None, Registry(), model_dir=tmp_path, work_dir=tmp_path, timeout_s=-1)


def test_aligner_goes_first_to_the_oom_killer(tmp_path: Path):
    """The child's oom_score_adj is the maximum (vLLM and the app keep theirs), so under memory pressure the kernel
    kills the aligner, whose run is simply recorded as failed, rather than the server users chat with."""
    store = _store(tmp_path / "f.duckdb")
    show = "import sys; sys.stderr.write(open('/proc/self/oom_score_adj').read()); sys.exit(3)"
    out = _aligner(tmp_path, store, show, timeout_s=60).run("operator")
    assert out.status == "failed" and "exited with code 3: 1000" in out.reason, out.reason
    assert int(Path("/proc/self/oom_score_adj").read_text()) < 1000
    store.close()


def test_cancel_stops_the_aligner_and_records_the_run_as_cancelled(tmp_path: Path):
    store = _store(tmp_path / "f.duckdb")
    rl = _aligner(tmp_path, store, HANG, timeout_s=600)
    with pytest.raises(NotCancellable, match="no realignment run"):
        rl.cancel()
    t, result = _start(rl)
    pid = _child(rl).pid
    assert rl.cancel().startswith("cancelling run")
    out = _finish(rl, t, result, timeout=30)
    assert out.status == "cancelled" and not out.promoted
    assert store.get_run(out.run_id)["status"] == "cancelled"
    assert rl.status.phase == "cancelled" and rl.status.last["status"] == "cancelled"
    assert _wait_gone([pid], 5) == []
    with pytest.raises(NotCancellable):
        rl.cancel()
    rl.script = "import sys; sys.exit(4)"
    again = rl.run("operator")  # the next run is not cancelled by the last one's request
    assert again.status == "failed" and "exited with code 4" in again.reason
    store.close()


def _admin_app(rl: Realigner, store: FeedbackStore):
    from fastapi import FastAPI

    from app.web.admin_api import AdminRequestGuard, admin_router
    from app.web.console import Operator

    class St:
        realigner = rl

    api = FastAPI()
    api.include_router(admin_router(St(), Operator(store, Registry(), rl, None, None), None))
    api.add_middleware(AdminRequestGuard)
    return api


def test_admin_api_cancel_behind_the_admin_request_guard(tmp_path: Path):
    from fastapi.testclient import TestClient

    from app.web.admin_api import admin_headers

    store = _store(tmp_path / "f.duckdb")
    rl = _aligner(tmp_path, store, HANG, timeout_s=600)
    client = TestClient(_admin_app(rl, store))
    assert client.post("/api/admin/cancel", json={}, headers=admin_headers()).status_code == 409  # nothing runs
    t, result = _start(rl)
    _child(rl)
    forged = client.post("/api/admin/cancel", data={}, headers={"Origin": "http://evil.example"})
    assert forged.status_code == 403 and rl.running  # a cross-site form post does not reach the run
    r = client.post("/api/admin/cancel", json={}, headers=admin_headers())
    assert r.status_code == 200 and r.json()["message"].startswith("cancelling run"), r.text
    assert _finish(rl, t, result, timeout=30).status == "cancelled"
    store.close()


def test_console_cancel_button_cancels_the_run(tmp_path: Path):
    """The console's "Cancel run" button calls the same cancel and says what happened."""
    from app.config import Config
    from app.main import default_settings
    from app.operator_settings import SettingsStore
    from app.web.console import Operator, build_console

    store = _store(tmp_path / "f.duckdb")
    rl = _aligner(tmp_path, store, HANG, timeout_s=600)
    settings = SettingsStore(tmp_path, default_settings(Config(data_dir=tmp_path).resolved()))
    demo = build_console(Operator(store, Registry(), rl, None, settings))
    button = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "kto-cancel")
    press = next(f.fn for f in demo.fns.values() if (button._id, "click") in f.targets)
    assert press().startswith("⚠️ Not cancelled: no realignment run")
    t, result = _start(rl)
    _child(rl)
    assert press().startswith("🛑 cancelling run")
    assert _finish(rl, t, result, timeout=30).status == "cancelled"
    store.close()


def test_kto_loop_cancel_reaches_the_running_app(tmp_path: Path):
    """`kto-loop cancel` finds the app through its runtime file and cancels over the authenticated API."""
    import uvicorn

    from app.cli import main as cli_main
    from app.operator_settings import RUNTIME_FILE, write_json_atomic
    from app.web.auth import AuthMiddleware, raters_for

    store = _store(tmp_path / "f.duckdb")
    rl = _aligner(tmp_path, store, HANG, timeout_s=600)
    api = _admin_app(rl, store)
    api.add_middleware(AuthMiddleware, admin_user="admin", admin_password="pw",
                       raters=raters_for(tmp_path / "secret", trusted_proxies="", user_header="", new_ids_per_hour=10))
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    data = tmp_path / "data"
    data.mkdir()
    write_json_atomic(data / RUNTIME_FILE, {"url": f"http://127.0.0.1:{port}", "pid": os.getpid(),
                                            "admin_user": "admin", "admin_password": "pw"}, mode=0o600)
    try:
        t, result = _start(rl)
        _child(rl)
        assert cli_main(["cancel", "--data-dir", str(data)]) == 0
        assert _finish(rl, t, result, timeout=30).status == "cancelled"
        assert cli_main(["cancel", "--data-dir", str(data)]) == 2  # nothing left to cancel: 409, said so
    finally:
        rl.close()
        server.should_exit = True
        store.close()


APP = textwrap.dedent("""
    import json, sys, threading, time
    from pathlib import Path
    from feedback_store import FeedbackStore
    from tests.app.test_faults_aligner import FakeAligner, Registry
    tmp = Path(sys.argv[1])
    store = FeedbackStore(tmp / "f.duckdb")
    spawn = "import subprocess, time; subprocess.Popen(['sleep', '600']); time.sleep(600)"
    rl = FakeAligner(store, Registry(), model_dir=tmp, work_dir=tmp / "runs", script=spawn, niceness=0,
                     timeout_s=600)
    def report():
        while rl._proc is None:
            time.sleep(0.05)
        time.sleep(1.0)  # the stand-in has started its own child
        print(json.dumps({"aligner": rl._proc.pid}), flush=True)
    threading.Thread(target=report, daemon=True).start()
    rl.run("operator")
""")


def test_sigkilled_app_leaves_no_aligner_behind(tmp_path: Path):
    """kill -9 of the process running a realignment: the aligner and what it spawned go too."""
    _store(tmp_path / "f.duckdb").close()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    app = subprocess.Popen([sys.executable, "-c", APP, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env,
                           cwd=REPO)
    family: list[int] = []
    try:
        line = app.stdout.readline()
        assert line, "the app exited before starting its aligner"
        aligner = json.loads(line)["aligner"]
        family = [p.pid for p in psutil.Process(app.pid).children(recursive=True)]
        assert aligner in family and len(family) >= 3  # the aligner, its child, the lifeline watchdog
        os.kill(app.pid, signal.SIGKILL)
        app.wait(10)
        assert _wait_gone(family, 15) == [], "orphans left after the app was killed"
    finally:
        if app.poll() is None:
            app.kill()
        for pid in _alive(family):  # only when the guard failed: do not leave them running
            os.kill(pid, signal.SIGKILL)
