"""A real adapter trained by the aligner on the tiny model loads into a real vLLM server and serves a chat."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from aligner import cli
from tests.aligner.support import synthetic_rows, write_snapshot


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_trained_adapter_loads_in_vllm(tmp_path, tiny_model_dir, free_port):
    snap = write_snapshot(tmp_path / "s.parquet", synthetic_rows(10, 8, seed=11))
    adapter = tmp_path / "kto-v1"
    assert cli.main(["--snapshot", str(snap), "--out", str(adapter), "--model-dir", str(tiny_model_dir),
                     "--max-steps", "2", "--batch-size", "4", "--max-length", "128"]) == 0
    upper = tmp_path / "kto-upper"  # adapter in the upper layer only (PEFT layers_to_transform)
    assert cli.main(["--snapshot", str(snap), "--out", str(upper), "--model-dir", str(tiny_model_dir),
                     "--max-steps", "2", "--batch-size", "4", "--max-length", "128", "--first-lora-layer", "1"]) == 0

    port = free_port()
    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLLM_CPU_KVCACHE_SPACE="1")
    log = open(tmp_path / "vllm.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
         "--served-model-name", "base", "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
         "--dtype", "bfloat16", "--max-model-len", "512", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            assert server.poll() is None, (tmp_path / "vllm.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "vLLM did not become ready"
            time.sleep(2)
        for name, path in (("kto-v1", adapter), ("kto-upper", upper)):
            r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                           timeout=120)
            assert r.status_code == 200, r.text
        models = {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}
        assert {"kto-v1", "kto-upper"} <= models
        for name in ("kto-v1", "kto-upper"):
            r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
                "model": name, "max_tokens": 8, "temperature": 0.0,
                "messages": [{"role": "system", "content": "You are a helpful assistant."},
                             {"role": "user", "content": "Tell me about bees."}]})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == name and body["usage"]["completion_tokens"] > 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
