"""Real vLLM server + real PEFT adapters: promote, answer, hot-swap under load, roll back, survive a crash.

The tests run in file order against one session server and one registry (module scope), like a deployment does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from serving.client import ChatClient, ChatResult, SamplingParams
from serving.registry import AdapterLoadError, AdapterRegistry, AdapterRejected, InvalidAdapter
from tests.fixtures_serving import PROMPT, TARGETS

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module")
def registry(vllm_server, default_model_dir, tmp_path_factory):
    reg = AdapterRegistry(vllm_server, tmp_path_factory.mktemp("registry") / "state.json",
                          max_lora_rank=16, base_model_dir=default_model_dir)
    assert reg.warm_priority == -1  # the server runs priority scheduling: every promote's warm-up jumps the queue
    vllm_server.add_restart_hook(reg.reload_after_restart)
    yield reg
    vllm_server.remove_restart_hook(reg.reload_after_restart)


@pytest.fixture(scope="module")
def client(vllm_server):
    with ChatClient(vllm_server.base_url, read_timeout=300, api_key=vllm_server.api_key) as c:
        yield c


@pytest.fixture(scope="module")
def versions(registry, trained_adapters) -> dict[str, str]:
    """Filled in by the tests: adapter letter -> version name."""
    return {}


def greedy(client: ChatClient, model: str) -> ChatResult:
    return client.chat(PROMPT, model, GREEDY)


def test_the_eager_lora_server_runs_vllms_cpp_norm_and_rotary(vllm_server, client):
    """serving.vllm_cpu.ops reached the engine's config and the worker runs the kernels (the answers below are computed
    with them). Our own stderr lines: vLLM's INFO log can be off."""
    assert greedy(client, "base").completion_tokens > 0
    log = vllm_server.spec.log_path.read_text(errors="replace")
    assert "custom_ops ['none', '+rotary_embedding'], RMSNorm priority ['kto_cpu', 'native']" in log
    assert "kto-loop: C++ RMSNorm in use" in log


def test_promoted_adapter_answers_differently_from_base(registry, client, trained_adapters, versions):
    base = greedy(client, "base")
    name = registry.promote(trained_adapters["a"])
    versions["a"] = name
    assert registry.current() == name and registry.previous() == "base"
    assert name.startswith("kto-v")
    got = greedy(client, registry.current())
    assert got.model == name and base.model == "base"
    assert got.text.startswith(TARGETS["a"]) and not base.text.startswith(TARGETS["a"])
    assert got.text != base.text
    # the state file is the source of truth across app restarts
    state = json.loads(registry.state_path.read_text())
    assert state["current"] == name and state["versions"][name]["status"] == "served"
    assert len(state["versions"][name]["sha256"]) == 64


def test_stream_reports_tokens_latency_and_version(client, registry):
    stream = client.stream_chat(PROMPT, registry.current(), SamplingParams(temperature=0.0, max_tokens=8,
                                                                           extra={"ignore_eos": True}))
    chunks = list(stream)
    r = stream.result
    assert len(chunks) >= 2 and "".join(chunks) == r.text
    assert r.model == registry.current() and r.finish_reason == "length"
    assert r.completion_tokens == 8 and r.prompt_tokens > 5
    assert 0 < r.time_to_first_token_s <= r.latency_s


def _prefix_cache_hits(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:prefix_cache_hits"))


def test_a_chats_next_turn_reuses_its_earlier_turns_from_the_prefix_cache(client, vllm_server):
    """The second turn resends the first (well under 128 tokens): with vLLM-cpu's default 128-token blocks none
    of it would be reused; with the supervisor's 32 (serving.server.vllm_block_size) whole blocks of it are."""
    sampling = SamplingParams(temperature=0.0, max_tokens=24, extra={"ignore_eos": True})
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"[{time.time_ns()}] Name three colours of the rainbow."}]
    first = client.chat(messages, "base", sampling)
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And three more?"}]
    before = _prefix_cache_hits(vllm_server.base_url)
    second = client.chat(messages, "base", sampling)
    reused = _prefix_cache_hits(vllm_server.base_url) - before
    assert second.prompt_tokens < 128
    assert reused >= 32 and reused % 32 == 0, f"prefix cache reused {reused} of {second.prompt_tokens} tokens"


def _running(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running"))


def test_closing_the_stream_aborts_the_request_on_the_server(client, registry, vllm_server):
    stream = client.stream_chat(PROMPT, registry.current(), SamplingParams(temperature=0.0, max_tokens=1500,
                                                                           extra={"ignore_eos": True}))
    next(stream)
    next(stream)
    assert _running(vllm_server.base_url) == 1
    stream.close()
    assert stream.result.finish_reason == "cancelled"
    deadline = time.monotonic() + 15  # 1500 tokens would take minutes; an abort takes a step or two
    while _running(vllm_server.base_url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _running(vllm_server.base_url) == 0


def test_swap_while_20_streams_are_in_flight(registry, client, trained_adapters, versions):
    old = registry.current()
    n, started, done = 20, threading.Semaphore(0), []
    sampling = SamplingParams(temperature=0.0, max_tokens=96, extra={"ignore_eos": True})

    def one(i: int) -> ChatResult:
        stream = client.stream_chat(PROMPT, registry.current(), sampling)
        first = True
        for _ in stream:
            if first:
                started.release()
                first = False
        done.append(i)
        return stream.result

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        for _ in range(n):
            assert started.acquire(timeout=180), "streams did not start"
        assert not done, "requests finished before the swap: make them longer"
        new = registry.promote(trained_adapters["b"])
        unfinished_at_swap = n - len(done)
        after = greedy(client, registry.current())  # new requests go to the new version at once
        results = [f.result(timeout=300) for f in futures]  # raises if any stream errored
    versions["b"] = new
    assert unfinished_at_swap > 0
    assert registry.current() == new and registry.previous() == old
    assert after.model == new and after.text.startswith(TARGETS["b"])
    for r in results:
        assert r.model == old and r.finish_reason == "length" and r.completion_tokens == 96
        assert r.text.startswith(TARGETS["a"])  # generated by the version it started on, to the end


def test_one_batch_mixing_base_and_two_versions_gives_each_request_its_own_model(registry, client, versions):
    """Requests on base, the previous and the current version decode side by side in the same engine steps; the
    CPU LoRA kernels group each step's rows by adapter slot, so a routing mistake would show as another model's
    sentence (or none) here."""
    a, b = versions["a"], versions["b"]
    assert {registry.current(), registry.previous()} == {a, b}
    models = ["base", a, b] * 4
    go = threading.Barrier(len(models))

    def one(model: str) -> ChatResult:
        go.wait(timeout=60)
        return greedy(client, model)

    with ThreadPoolExecutor(len(models)) as pool:
        results = list(pool.map(one, models))
    for model, r in zip(models, results, strict=True):
        assert r.model == model
        if model == a:
            assert r.text.startswith(TARGETS["a"]), r.text
        elif model == b:
            assert r.text.startswith(TARGETS["b"]), r.text
        else:
            assert not r.text.startswith((TARGETS["a"][:12], TARGETS["b"][:12])), r.text


def test_rollback_to_previous_and_to_a_named_version(registry, client, versions):
    assert registry.rollback() == versions["a"]
    assert registry.current() == versions["a"] and registry.previous() == versions["b"]
    assert greedy(client, registry.current()).text.startswith(TARGETS["a"])
    assert registry.rollback("base") == "base"
    assert not greedy(client, registry.current()).text.startswith(TARGETS["a"])
    assert registry.rollback(versions["b"]) == versions["b"]
    assert greedy(client, registry.current()).text.startswith(TARGETS["b"])
    with pytest.raises(InvalidAdapter, match="unknown version"):
        registry.rollback("kto-v999")
    events = [e["event"] for e in registry.events()]
    assert events.count("rollback") == 3


@pytest.mark.parametrize("breakage, message", [
    ("rank", "exceeds the server's --max-lora-rank"),
    ("modules_to_save", "modules_to_save"),
    ("missing_file", "no weights file"),
])
def test_invalid_adapter_is_refused_and_current_keeps_serving(registry, client, trained_adapters, tmp_path,
                                                              breakage, message):
    serving, n_versions = registry.current(), len(registry.versions())
    bad = tmp_path / "bad"
    shutil.copytree(trained_adapters["a"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    if breakage == "rank":
        cfg["r"] = 64
    elif breakage == "modules_to_save":
        cfg["modules_to_save"] = ["lm_head"]
    else:
        (bad / "adapter_model.safetensors").unlink()
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidAdapter, match=message):
        registry.promote(bad)
    assert registry.current() == serving and len(registry.versions()) == n_versions
    assert greedy(client, serving).model == serving


def test_server_side_load_failure_is_recorded_and_current_keeps_serving(registry, client, trained_adapters,
                                                                        tmp_path, monkeypatch):
    serving = registry.current()
    gone = tmp_path / "gone"
    shutil.copytree(trained_adapters["a"], gone)
    info = registry.validate(gone)
    shutil.rmtree(gone)  # vanishes between validation and loading: vLLM itself must fail
    monkeypatch.setattr(registry, "validate", lambda d: info)
    with pytest.raises(AdapterLoadError, match="vLLM refused to load"):
        registry.promote(gone)
    assert registry.current() == serving
    failed = [v for v in registry.versions() if v["status"] == "load_failed"]
    assert len(failed) == 1 and registry.events()[-1]["event"] == "load_failed"
    assert greedy(client, serving).text.startswith(TARGETS["b"])


def test_promotion_check_sees_the_loaded_candidate_and_can_refuse_it(registry, client, trained_adapters):
    """The capability guard's hook: the check runs after load + warm (the candidate answers by name) and before
    the switch; a "no" or a crashing check leaves the current version serving and records the refusal."""
    serving = registry.current()
    seen = []

    def refuse(candidate: str, current: str) -> tuple[bool, str]:
        seen.append((candidate, current, greedy(client, candidate).model))
        return False, "not promoted: capability probe 3/33 vs 32/33"

    with pytest.raises(AdapterRejected, match="capability probe 3/33"):
        registry.promote(trained_adapters["a"], check=refuse)
    (candidate, current, answered_by), = seen
    assert current == serving and answered_by == candidate != serving
    assert registry.current() == serving and greedy(client, serving).model == serving
    rejected = next(v for v in registry.versions() if v["name"] == candidate)
    assert rejected["status"] == "rejected" and "3/33" in rejected["error"]
    assert registry.events()[-1]["event"] == "rejected"

    def crash(candidate: str, current: str) -> tuple[bool, str]:
        raise RuntimeError("probe server unreachable")

    with pytest.raises(AdapterRejected, match="check failed: probe server unreachable"):
        registry.promote(trained_adapters["a"], check=crash)
    assert registry.current() == serving

    name = registry.promote(trained_adapters["b"], check=lambda c, s: (True, "capability probe 33/33"))
    assert registry.current() == name != serving and registry.previous() == serving
    assert greedy(client, name).text.startswith(TARGETS["b"])


def test_crash_restart_reloads_current_and_previous(vllm_server, registry, client):
    current, previous = registry.current(), registry.previous()
    family = vllm_server.family()
    assert len(family) >= 2  # API server + engine core (+ worker)
    restarts = vllm_server.restarts
    os.kill(vllm_server.pid, signal.SIGKILL)  # a crash, not a stop
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if vllm_server.restarts > restarts and vllm_server.is_healthy():
            try:  # the registry reloads current, then previous: wait for both
                if {current, previous} <= set(client.models()):
                    break
            except Exception:
                pass
        time.sleep(1)
    else:
        pytest.fail(f"server did not come back with {current} and {previous}:\n{vllm_server.log_tail()}")
    survivors = [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert survivors == [], "processes of the crashed server outlived it"
    loaded = client.models()
    assert current in loaded and previous in loaded
    assert registry.current() == current
    assert greedy(client, current).text.startswith(TARGETS["b"])
