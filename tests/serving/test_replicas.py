"""Several vLLM replicas behind the vLLM project's router (vllm-router): a version is loaded and warmed on every
replica in service before the pointer moves; a replica that refuses keeps the swap from happening; a replica that
restarts is taken out of the router and comes back holding the served versions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from serving.registry import AdapterLoadError, AdapterRegistry
from serving.replicas import ReplicaSet
from tests.conftest import wait_until

ROUTER = str(Path(sys.executable).parent / "vllm-router")



@pytest.fixture
def router_factory(free_port, tmp_path):
    """Start vllm-router over the given workers; stopped afterwards."""
    procs: list[subprocess.Popen] = []

    def start(workers: list[str]) -> str:
        port = free_port()
        log = open(tmp_path / f"router-{port}.log", "wb")
        procs.append(subprocess.Popen(
            [ROUTER, "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin",
             "--worker-urls", *workers, "--health-check-interval-secs", "1", "--log-level", "warning",
             "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{url}/list_workers", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        wait_until(up, 60, "the router")
        return url

    yield start
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=10)


# --------------------------------------------------------------------------------------- stand-in replicas

class StubReplica:
    """A replica that speaks vLLM's adapter API in-process; `refuse` makes every load fail as vLLM's would."""

    def __init__(self, port: int, refuse: bool = False):
        self.loaded: list[str] = ["base"]
        self.refuse = refuse
        self.on_load = lambda: None
        app = FastAPI()

        @app.get("/health")
        def health() -> dict:
            return {}

        @app.get("/v1/models")
        def models() -> dict:
            return {"data": [{"id": n} for n in self.loaded]}

        @app.post("/v1/load_lora_adapter")
        async def load(request: Request):
            body = await request.json()
            self.on_load()
            if self.refuse:
                return JSONResponse({"message": "no room for another adapter"}, status_code=500)
            self.loaded.append(body["lora_name"])
            return JSONResponse("ok")

        @app.post("/v1/completions")
        async def complete(request: Request):
            body = await request.json()
            if body["model"] not in self.loaded:
                return JSONResponse({"message": f"The model `{body['model']}` does not exist."}, status_code=404)
            return {"choices": [{"text": "x"}]}

        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=self.server.run, daemon=True).start()
        wait_until(lambda: self.server.started, 10, "a stub replica")

    def stop(self) -> None:
        self.server.should_exit = True


@pytest.fixture
def stubs(free_port):
    made: list[StubReplica] = []

    def make(refuse: bool = False) -> StubReplica:
        made.append(StubReplica(free_port(), refuse))
        return made[-1]

    yield make
    for s in made:
        s.stop()


def test_a_replica_that_refuses_the_load_keeps_the_swap_from_happening(stubs, router_factory, trained_adapters,
                                                                        default_model_dir, tmp_path):
    good, bad = stubs(), stubs(refuse=True)
    pool = ReplicaSet(router_factory([good.url, bad.url]), [good.url, bad.url])
    reg = AdapterRegistry(pool, tmp_path / "adapters", base_model_dir=default_model_dir)
    with pytest.raises(AdapterLoadError, match=bad.url):
        reg.promote(trained_adapters["a"])
    assert reg.current() == "base"
    assert [v["status"] for v in reg.versions()] == ["load_failed"]
    bad.refuse = False
    name = reg.promote(trained_adapters["a"])
    assert reg.current() == name and name in good.loaded and name in bad.loaded


def test_sync_takes_a_replica_without_the_served_version_out_loads_it_and_puts_it_back(
        stubs, router_factory, trained_adapters, default_model_dir, tmp_path):
    a, b = stubs(), stubs()
    pool = ReplicaSet(router_factory([a.url, b.url]), [a.url, b.url])
    reg = AdapterRegistry(pool, tmp_path / "adapters", base_model_dir=default_model_dir)
    v1 = reg.promote(trained_adapters["a"])
    v2 = reg.promote(trained_adapters["b"])
    assert reg.sync_replicas() == {a.url: "in service", b.url: "in service"}

    b.loaded = ["base"]                                    # b restarted between two syncs: it holds no adapter
    routed_during_load: list[list[str]] = []
    b.on_load = lambda: routed_during_load.append(pool.in_service())
    assert reg.sync_replicas()[b.url] == f"put in service (loaded {v2}, {v1})"
    assert routed_during_load == [[a.url], [a.url]]       # out of the router while it loads
    b.on_load = lambda: None

    b.loaded = ["base"]
    b.refuse = True                                        # … and now it cannot load one
    result = reg.sync_replicas()
    assert result[a.url] == "in service" and result[b.url].startswith("out:")
    assert pool.in_service() == [a.url]                    # no chat reaches b while it lacks v2

    b.refuse = False
    assert reg.sync_replicas()[b.url] == f"put in service (loaded {v2}, {v1})"
    assert sorted(pool.in_service()) == sorted([a.url, b.url]) and {v1, v2} <= set(b.loaded)
    events = [e["event"] for e in reg.events()]
    assert "replica_out" in events and "replica_in" in events

    b.stop()                                               # down: out of the router at once
    wait_until(lambda: not pool.replica_healthy(b.url), 10, "the stub to stop")
    assert reg.sync_replicas()[b.url] == "taken out (down)"
    assert pool.in_service() == [a.url] and pool.is_healthy()


def test_a_replica_that_died_since_the_last_check_leaves_the_router_instead_of_failing_the_promotion(
        stubs, router_factory, trained_adapters, default_model_dir, tmp_path):
    a, b = stubs(), stubs()
    pool = ReplicaSet(router_factory([a.url, b.url]), [a.url, b.url])
    reg = AdapterRegistry(pool, tmp_path / "adapters", base_model_dir=default_model_dir)
    b.stop()
    wait_until(lambda: not pool.replica_healthy(b.url), 10, "the stub to stop")
    name = reg.promote(trained_adapters["a"])
    assert reg.current() == name and name in a.loaded and pool.in_service() == [a.url]


def test_a_replica_set_needs_distinct_replicas():
    with pytest.raises(ValueError):
        ReplicaSet("http://127.0.0.1:1", [])
    with pytest.raises(ValueError):
        ReplicaSet("http://127.0.0.1:1", ["http://h:1", "http://h:1/"])


# --------------------------------------------------------------------------------------- two real vLLM replicas

def own_core(i: int) -> dict[str, str]:
    """Replica i's OpenMP threads on a core of their own, as on replicas' own machines: sharing both cores, the
    loaded replica's threads starve the one that restarts (minutes instead of its usual start time)."""
    cores = sorted(os.sched_getaffinity(0))
    return {"VLLM_CPU_OMP_THREADS_BIND": str(cores[i])} if len(cores) >= 2 else {}


@pytest.mark.slow
def test_two_vllm_replicas_behind_the_router_swap_under_streamed_load_and_survive_a_restart(
        default_model_dir, trained_adapters, router_factory, tmp_path):
    from serving.client import ChatClient, ChatError, SamplingParams
    from serving.server import VLLMServer, VLLMServerSpec
    from tests.fixtures_serving import PROMPT, TARGETS

    key = "replica-test-key"
    servers = [VLLMServer(VLLMServerSpec(model_dir=default_model_dir, port=0, max_lora_rank=16, api_key=key,
                                         log_path=tmp_path / f"vllm-{i}.log", restart_backoff=(1.0, 5.0),
                                         env=own_core(i)))
               for i in range(2)]
    starters = [threading.Thread(target=s.start) for s in servers]
    try:
        for t in starters:
            t.start()
        for t in starters:
            t.join()
        urls = [s.base_url for s in servers]
        pool = ReplicaSet(router_factory(urls), urls, api_key=key)
        reg = AdapterRegistry(pool, tmp_path / "adapters", base_model_dir=default_model_dir)
        client = ChatClient(pool.base_url, api_key=key)
        stop = threading.Event()
        paced = threading.Event()  # set at the kill: chats go on while the replica restarts, ~3 a second
        results: list[tuple[float, str, str]] = []          # (started, model, "ok" or the error)

        def chatter() -> None:
            while not stop.is_set():
                model, t0 = reg.current(), time.monotonic()
                try:
                    client.chat(PROMPT, model, SamplingParams(max_tokens=8))
                    results.append((t0, model, "ok"))
                except ChatError as e:
                    results.append((t0, model, str(e)))
                if paced.is_set():
                    stop.wait(0.5)

        threads = [threading.Thread(target=chatter, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: len(results) >= 4, 120, "chats through the router")
        v1 = reg.promote(trained_adapters["a"])
        wait_until(lambda: sum(m == v1 for _, m, _ in results) >= 4, 120, f"chats on {v1}")
        v2 = reg.promote(trained_adapters["b"])
        wait_until(lambda: sum(m == v2 for _, m, _ in results) >= 4, 120, f"chats on {v2}")
        swaps = list(results)
        assert [r for r in swaps if r[2] != "ok"] == [], "a chat failed during the swaps"

        for url in urls:                                     # each replica really answers with the version
            r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                           json={"model": v2, "messages": PROMPT, "max_tokens": 24, "temperature": 0.0})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith(
                TARGETS["b"].split(",")[0][:12])

        syncing = threading.Event()

        def sync() -> None:
            while not syncing.is_set():
                reg.sync_replicas()
                syncing.wait(0.3)

        syncer = threading.Thread(target=sync, daemon=True)
        syncer.start()
        paced.set()
        killed_at = time.monotonic()
        os.killpg(servers[1]._proc.pid, signal.SIGKILL)      # the supervisor restarts it on the same port
        wait_until(lambda: pool.in_service() == [urls[0]], 30, "the killed replica to leave the router")
        out_at = time.monotonic()
        wait_until(lambda: sorted(pool.in_service()) == sorted(urls), 480, "the restarted replica to come back")
        back_at = time.monotonic()
        assert {v1, v2} <= set(reg.loaded_on(urls[1]))
        wait_until(lambda: sum(r[0] > back_at for r in results) >= 4, 120, "chats after the replica came back")
        stop.set()
        syncing.set()
        for t in threads:
            t.join(timeout=120)
        syncer.join(timeout=60)

        unknown = [r for r in results if "does not exist" in r[2]]
        assert unknown == [], f"a chat reached a replica without its version: {unknown[:3]}"
        late = [r for r in results if r[0] > out_at and r[2] != "ok"]
        assert late == [], f"chats failed after the dead replica left the router: {late[:3]}"
        assert killed_at < out_at < back_at
    finally:
        for s in servers:
            s.stop()
