"""One truth for what is served: the real store and the real adapter registry, talking to a stand-in vLLM that
implements the three endpoints the registry uses (list, load, complete) and can be "restarted" (forgets adapters).

Each test breaks one step (a store write, a file, a restart) and checks that the store and the registry still name
the same version, and that the error reaches the caller."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from app.config import Config
from app.loop import served
from app.loop.realign import Realigner
from app.web.console import Operator
from feedback_store import FeedbackStore
from serving.registry import AdapterRegistry

BASE_NAME = "served-base"


class FakeVLLM:
    """The registry's view of vLLM: /v1/models, /v1/load_lora_adapter, /v1/completions."""

    def __init__(self) -> None:
        self.loaded: set[str] = set()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._send(200, {"data": [{"id": n} for n in [BASE_NAME, *sorted(fake.loaded)]]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/v1/load_lora_adapter":
                    if body["lora_name"] in fake.loaded or not Path(body["lora_path"]).is_dir():
                        return self._send(400, {"error": {"message": f"cannot load {body['lora_name']}"}})
                    fake.loaded.add(body["lora_name"])
                    return self._send(200, {})
                if body.get("model") in fake.loaded | {BASE_NAME}:
                    return self._send(200, {"choices": [{"text": "ok"}]})
                return self._send(404, {"error": {"message": f"model {body.get('model')} does not exist"}})

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()
        self.spec = SimpleNamespace(model_dir=None)
        self.api_key = None  # the stand-in checks no key (tests/serving/test_vllm_guard.py covers the real one)
        self.hooks: list = []

    # the parts of serving.server.VLLMServer that build_stack uses
    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def add_restart_hook(self, fn) -> None:
        self.hooks.append(fn)

    def restart(self) -> None:
        """A vLLM restart: every runtime adapter is gone; then the restart hooks run, as the supervisor does."""
        self.loaded.clear()
        for fn in self.hooks:
            fn()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def make_adapter(d: Path, seed: float = 0.0) -> Path:
    import torch
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                       "target_modules": ["q_proj"], "bias": "none"}))
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.full((4, 8), seed),
               "base_model.model.layers.0.q_proj.lora_B.weight": torch.zeros(8, 4)},
              str(d / "adapter_model.safetensors"))
    return d


class DiskFull(OSError):
    pass


def boom(*a, **k):
    raise DiskFull(28, "No space left on device")


@pytest.fixture
def vllm():
    fake = FakeVLLM()
    yield fake
    fake.close()


@pytest.fixture
def parts(tmp_path, vllm):
    store = FeedbackStore(tmp_path / "data" / "feedback.duckdb")
    registry = AdapterRegistry(vllm, tmp_path / "data" / "adapters", max_lora_rank=16)
    yield store, registry
    store.close()


def agree(store, registry) -> str:
    assert store.current_adapter() == registry.current()
    return registry.current()


# ---------------------------------------------------------------- promotion

def test_a_store_write_failure_after_the_switch_leaves_serving_and_store_agreeing(parts, tmp_path, monkeypatch):
    store, registry = parts
    rl = Realigner(store, registry, model_dir=tmp_path, work_dir=tmp_path / "runs")
    v1 = rl._promote(make_adapter(tmp_path / "a1", 1.0), None, store.start_run("cli"))
    assert v1 == "kto-v1" and agree(store, registry) == "kto-v1"
    monkeypatch.setattr(store, "mark_promoted", boom)
    with pytest.raises(served.ServingError, match=r"kto-v2 could not be recorded as served .*No space left on device"
                                                  r".*serving kto-v1 again"):
        rl._promote(make_adapter(tmp_path / "a2", 2.0), "kto-v1", store.start_run("cli"))
    assert agree(store, registry) == "kto-v1"
    assert store.pending_promotions() == []  # the attempt is closed, with its reason
    last = store.adapter_events()[-1]
    assert last["event"] == "aborted" and last["to_version"] == "kto-v2" and "No space left" in last["reason"]


def test_a_store_write_failure_before_the_switch_never_switches(parts, tmp_path, monkeypatch):
    store, registry = parts
    monkeypatch.setattr(store, "begin_promotion", boom)
    rl = Realigner(store, registry, model_dir=tmp_path, work_dir=tmp_path / "runs")
    with pytest.raises(served.ServingError, match="not promoted: the store could not record the new version .*"
                                                  "still serving base"):
        rl._promote(make_adapter(tmp_path / "a1"), None, store.start_run("cli"))
    assert agree(store, registry) == "base"


def test_a_failed_undo_is_reported_and_the_next_start_brings_serving_back(parts, tmp_path, monkeypatch, vllm):
    store, registry = parts
    served.promote(store, registry, make_adapter(tmp_path / "a1"), parent=None, run_id=None)
    monkeypatch.setattr(store, "mark_promoted", boom)
    monkeypatch.setattr(registry, "rollback", lambda v=None: boom())
    with pytest.raises(served.ServingError, match="kto-v2 is serving but the store could not record it .* switching "
                                                  "back to kto-v1 failed .*the next start serves what the store says"):
        served.promote(store, registry, make_adapter(tmp_path / "a2", 2.0), parent="kto-v1", run_id=None)
    assert registry.current() == "kto-v2" and store.current_adapter() == "kto-v1"
    monkeypatch.undo()
    vllm.loaded.clear()  # the app restarts (so does vLLM)
    restarted = AdapterRegistry(vllm, tmp_path / "data" / "adapters", max_lora_rank=16)
    notes = served.reconcile(store, restarted)
    assert agree(store, restarted) == "kto-v1" and "kto-v1" in vllm.loaded
    assert "aborted the interrupted promotion of kto-v2" in notes and store.pending_promotions() == []


def test_a_promotion_interrupted_after_the_switch_is_aborted_at_the_next_start(parts, tmp_path, vllm):
    """The app dies between the switch and the store's commit: the store never said kto-v1 serves, so it does not."""
    store, registry = parts
    real_mark = store.mark_promoted
    store.mark_promoted = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())  # the app dies right here
    with pytest.raises(KeyboardInterrupt):
        served.promote(store, registry, make_adapter(tmp_path / "a1"), parent=None, run_id=None)
    store.mark_promoted = real_mark
    assert store.pending_promotions() == ["kto-v1"] and registry.current() == "kto-v1"
    vllm.loaded.clear()
    restarted = AdapterRegistry(vllm, tmp_path / "data" / "adapters", max_lora_rank=16)
    notes = served.reconcile(store, restarted)
    assert notes == ["aborted the interrupted promotion of kto-v1", "serving base (the registry had kto-v1)"]
    assert agree(store, restarted) == "base" and store.pending_promotions() == []


# ---------------------------------------------------------------- rollback

def test_a_rollback_the_store_cannot_record_is_undone_and_reported(parts, tmp_path, monkeypatch):
    store, registry = parts
    for i in (1, 2):
        served.promote(store, registry, make_adapter(tmp_path / f"a{i}", float(i)), parent=None, run_id=None)
    op = Operator(store, registry, None, None, None)
    monkeypatch.setattr(store, "record_rollback", boom)
    with pytest.raises(served.ServingError, match="rollback to kto-v1 not done: the store could not record it .*"
                                                  "No space left on device.*still serving kto-v2"):
        op.rollback(None)
    assert agree(store, registry) == "kto-v2"
    monkeypatch.undo()
    assert op.rollback("kto-v1") == "Now serving kto-v1 (was kto-v2)." and agree(store, registry) == "kto-v1"


# ---------------------------------------------------------------- start and vLLM restarts (through build_stack)

@pytest.fixture
def app_start(tmp_path, vllm, monkeypatch):
    """build_stack on the stand-in vLLM: what `kto-loop run` does at start."""
    import serving.server
    from app.main import build_stack

    monkeypatch.setattr(serving.server, "VLLMServer", lambda spec: vllm)
    cfg = Config(data_dir=tmp_path / "data", model_dir=tmp_path / "model", promote_max_capability_drop=-1.0).resolved()
    return lambda: build_stack(cfg)


def _promote_two(tmp_path, vllm) -> tuple[FeedbackStore, AdapterRegistry]:
    store = FeedbackStore(tmp_path / "data" / "feedback.duckdb")
    registry = AdapterRegistry(vllm, tmp_path / "data" / "adapters", max_lora_rank=16)
    for i in (1, 2):
        served.promote(store, registry, make_adapter(tmp_path / f"a{i}", float(i)), parent=None, run_id=None)
    return store, registry


def test_store_and_registry_disagreeing_are_reconciled_on_start(tmp_path, vllm, app_start):
    """registry.json says kto-v2 (its switch happened), the store says kto-v1 (an operator rollback whose record
    was lost, say): the store wins at start, and vLLM has kto-v1 loaded."""
    store, registry = _promote_two(tmp_path, vllm)
    registry.rollback("kto-v1")  # switched without the store knowing
    registry.rollback("kto-v2")
    store.record_rollback("kto-v2", "kto-v1", reason="operator")
    store.close()
    vllm.loaded.clear()
    with app_start() as st:
        assert agree(st.store, st.registry) == "kto-v1" and "kto-v1" in vllm.loaded


def test_a_served_version_whose_files_are_gone_falls_back_in_the_store_too(tmp_path, vllm, app_start):
    store, registry = _promote_two(tmp_path, vllm)
    store.close()
    with app_start() as st:
        assert agree(st.store, st.registry) == "kto-v2"
        shutil.rmtree(tmp_path / "data" / "adapters" / "kto-v2")
        vllm.restart()  # vLLM died and came back: nothing loaded; kto-v2 cannot be loaded again
        assert agree(st.store, st.registry) == "kto-v1" and "kto-v1" in vllm.loaded
        last = st.store.adapter_events()[-1]
        assert (last["event"], last["from_version"], last["to_version"]) == ("rollback", "kto-v2", "kto-v1")
        assert last["reason"].startswith("fallback: kto-v2: the files of kto-v2 are gone")
    with app_start() as st:  # and the next start agrees with that
        assert agree(st.store, st.registry) == "kto-v1"


def test_later_continue_runs_do_not_fail_with_unknown_adapter(parts, tmp_path, monkeypatch):
    """A promotion whose store write failed must not leave the registry serving a version the store does not know:
    the next "continue" run resumes from what the store records and trains (here: a stand-in aligner)."""
    store, registry = parts
    rl = Realigner(store, registry, model_dir=tmp_path, work_dir=tmp_path / "runs", min_gain=-1.0)
    conv = store.new_conversation("u")
    for i in range(6):
        m = store.add_user_message(conv, f"question {i}")
        a = store.add_answer(conv, m, [{"role": "user", "content": f"question {i}"}], f"answer {i}", adapter="base")
        store.rate(f"rater-{i}", a, "up" if i % 2 else "down")
    trained: list = []

    def fake_train(snapshot, out, served_dir, progress, resume_dir=None, *a, **k):
        trained.append(resume_dir)
        make_adapter(out, float(len(trained)))
        (out / "manifest.json").write_text(json.dumps({"heldout": {"new": {"margin": 1.0}, "served": None}}))

    monkeypatch.setattr(rl, "_train", fake_train)
    first = rl.run("cli")
    assert first.promoted and agree(store, registry) == "kto-v1", first.reason
    m = store.add_user_message(conv, "one more question")
    for i, v in enumerate(("up", "down")):
        a = store.add_answer(conv, m, [{"role": "user", "content": "one more"}], f"again {i}", adapter="kto-v1")
        store.rate(f"rater-x{i}", a, v)
    monkeypatch.setattr(store, "register_adapter", boom)
    failed = rl.run("cli")
    assert failed.status == "failed" and "No space left on device" in failed.reason, failed.reason
    assert agree(store, registry) == "kto-v1"
    monkeypatch.undo()
    monkeypatch.setattr(rl, "_train", fake_train)
    later = rl.run("cli")
    assert later.promoted and later.version == "kto-v3" and agree(store, registry) == "kto-v3", later.reason
    assert trained[-1] == Path(registry.path_of("kto-v1"))  # resumed the served version


def test_a_run_takes_the_served_version_from_the_store(parts, tmp_path, monkeypatch):
    """Should the registry ever serve a version the store does not know (switched behind its back), the run still
    resumes what the store records instead of failing with UnknownAdapter."""
    store, registry = parts
    v1 = served.promote(store, registry, make_adapter(tmp_path / "a1"), parent=None, run_id=None)
    registry.promote(make_adapter(tmp_path / "stray", 5.0))  # kto-v2: never recorded
    conv = store.new_conversation("u")
    m = store.add_user_message(conv, "a question")
    for i, v in enumerate(("up", "down")):
        store.rate(f"r{i}", store.add_answer(conv, m, [{"role": "user", "content": "q"}], f"a{i}", adapter=v1), v)
    rl = Realigner(store, registry, model_dir=tmp_path, work_dir=tmp_path / "runs")
    seen: list = []
    monkeypatch.setattr(rl, "_train", lambda snapshot, out, served_dir, *a, **k: seen.append(served_dir) or boom())
    out = rl.run("cli")
    assert seen == [Path(registry.path_of("kto-v1"))] and "No space left on device" in out.reason, out.reason
