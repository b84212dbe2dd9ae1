"""vLLM's own data parallelism (`--data-parallel-size 2`, two engines behind one API server): a version the
registry loads at run time answers on every engine, so one server with several engines needs no router."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import re

import httpx

from serving.registry import AdapterRegistry
from serving.server import VLLMServer, VLLMServerSpec
from tests.fixtures_serving import PROMPT, TARGETS


def test_a_runtime_adapter_load_reaches_both_data_parallel_engines(default_model_dir, trained_adapters, tmp_path):
    key = "dp-test-key"
    server = VLLMServer(VLLMServerSpec(model_dir=default_model_dir, port=0, max_lora_rank=16, api_key=key,
                                       log_path=tmp_path / "vllm.log", data_parallel=2))
    server.start()
    try:
        reg = AdapterRegistry(server, tmp_path / "adapters", base_model_dir=default_model_dir)
        v1 = reg.promote(trained_adapters["a"])

        def ask(_: int) -> str:
            r = httpx.post(f"{server.base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"model": v1, "messages": PROMPT, "max_tokens": 24, "temperature": 0.0},
                           timeout=180)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        with cf.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(16)))
        assert all(a.startswith(TARGETS["a"].split(",")[0][:12]) for a in answers), answers
        # vLLM counts finished requests per engine: every one of them answered with the adapter (above)
        metrics = httpx.get(f"{server.base_url}/metrics", headers={"Authorization": f"Bearer {key}"}).text
        done = collections.Counter()
        for engine, n in re.findall(r'^vllm:request_success_total\{[^}]*engine="(\d+)"[^}]*\} ([0-9.e+]+)$',
                                    metrics, re.M):
            done[engine] += float(n)
        assert set(done) == {"0", "1"} and min(done.values()) > 0, f"requests per engine: {dict(done)}"
    finally:
        server.stop()
