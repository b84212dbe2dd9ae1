"""vLLM's API is the app's alone: a per-start API key on every call, loopback unless opted out, safetensors-only
adapters, and readiness that a foreign server on the port cannot fake.

One real vLLM server (the tiny random model, LoRA on) is started for the module: an attacker's requests without the
key (chat, list, load, unload an adapter) are refused, while the app's own clients (ChatClient, the registry, the
capability probe) carry the key and work. The rest needs no model.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil
import pytest

from app.config import config_from
from serving.client import ChatClient, ChatError
from serving.registry import AdapterRegistry, InvalidAdapter
from serving.server import VLLMServer, VLLMServerSpec, is_loopback_host
from tests.conftest import free_port
from tests.fixtures_serving import PROMPT, train_test_adapter

# ---------------------------------------------------------------- a foreign server on our port

def _handler(check_key: str | None = None, refuse_without_auth: bool = False) -> type[BaseHTTPRequestHandler]:
    """Looks like vLLM: /health 200, /v1/models listing "base". With `refuse_without_auth` it answers 401 to /v1
    requests without a bearer token; with `check_key` it accepts that key only (as our vLLM does)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            auth = self.headers.get("Authorization") or ""
            if self.path.startswith("/v1") and (
                    (check_key is not None and auth != f"Bearer {check_key}")
                    or (refuse_without_auth and not auth.startswith("Bearer "))):
                self._send(401, {"error": "Unauthorized"})
            elif self.path in ("/health", "/v1/models"):
                self._send(200, {"object": "list", "data": [{"id": "base", "object": "model"}]})
            else:
                self._send(404, {})

        def _send(self, code, body):
            raw = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    return Handler


@contextmanager
def _serving(handler: type[BaseHTTPRequestHandler], port: int) -> Iterator[None]:
    httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("refuse_without_auth", [False, True], ids=["open", "any-bearer"])
def test_a_foreign_server_answering_on_the_port_is_not_taken_as_ready(tmp_path, refuse_without_auth):
    server = VLLMServer(VLLMServerSpec(model_dir=tmp_path, port=free_port()))
    with _serving(_handler(refuse_without_auth=refuse_without_auth), server.port):
        assert httpx.get(f"{server.base_url}/health").status_code == 200      # it does answer like vLLM
        assert not server._ready()


def test_a_server_that_knows_our_key_is_ready(tmp_path):
    server = VLLMServer(VLLMServerSpec(model_dir=tmp_path, port=free_port()))
    with _serving(_handler(check_key=server.api_key), server.port):
        assert server._ready()


# ---------------------------------------------------------------- loopback only, unless opted in

def test_a_non_loopback_vllm_host_needs_the_explicit_opt_in(tmp_path):
    assert is_loopback_host("127.0.0.1") and is_loopback_host("::1") and is_loopback_host("localhost")
    assert not is_loopback_host("0.0.0.0") and not is_loopback_host("10.1.2.3") and not is_loopback_host("example.org")
    with pytest.raises(ValueError, match="loopback"):
        VLLMServer(VLLMServerSpec(model_dir=tmp_path, host="0.0.0.0", port=1234))
    assert VLLMServer(VLLMServerSpec(model_dir=tmp_path, host="0.0.0.0", port=1234, allow_remote=True)).command()
    with pytest.raises(SystemExit, match="vllm-allow-remote-host"):
        config_from(environ={"KTO_LOOP_VLLM_HOST": "0.0.0.0"})
    cfg = config_from(environ={"KTO_LOOP_VLLM_HOST": "0.0.0.0", "KTO_LOOP_VLLM_ALLOW_REMOTE_HOST": "true"})
    assert cfg.vllm_allow_remote_host


def test_each_server_gets_its_own_key_in_its_environment_not_on_its_command_line(tmp_path):
    a, b = (VLLMServer(VLLMServerSpec(model_dir=tmp_path, port=1234)) for _ in range(2))
    assert a.api_key != b.api_key and len(a.api_key) >= 32
    assert a.environment()["VLLM_API_KEY"] == a.api_key and a.api_key not in " ".join(a.command())
    assert a.auth_headers() == {"Authorization": f"Bearer {a.api_key}"}


# ---------------------------------------------------------------- safetensors only

def _fake_adapter(d: Path, files: dict[str, bytes]) -> Path:
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "bias": "none"}))
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def test_pickle_adapters_are_refused_at_validation(tmp_path, tiny_model_dir):
    reg = AdapterRegistry(f"http://127.0.0.1:{free_port()}", tmp_path / "state.json", max_lora_rank=16,
                          base_model_dir=tiny_model_dir)
    pickle_only = _fake_adapter(tmp_path / "bin", {"adapter_model.bin": b"\x80\x04K\x01."})
    with pytest.raises(InvalidAdapter, match="pickle"):
        reg.validate(pickle_only)
    real = train_test_adapter(tiny_model_dir, tmp_path / "real", "hi", rank=4, steps=1)
    reg.validate(real)                                       # a real safetensors adapter passes
    (real / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(InvalidAdapter, match="adapter_model.bin"):
        reg.validate(real)                                   # and is refused with a pickle beside it
    with pytest.raises(InvalidAdapter):
        reg.promote(real)
    assert reg.versions() == []


# ---------------------------------------------------------------- the real server

@pytest.fixture(scope="module")
def guarded(tiny_model_dir, tmp_path_factory) -> Iterator[VLLMServer]:
    log_dir = tmp_path_factory.mktemp("vllm-guard")
    server = VLLMServer(VLLMServerSpec(model_dir=tiny_model_dir, port=0, max_lora_rank=8, max_loras=2,
                                       max_model_len=512, kvcache_gb=1, log_path=log_dir / "vllm.log",
                                       auto_restart=False))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_vllm_refuses_every_call_without_the_key_and_serves_the_apps_clients(guarded, tiny_model_dir, tmp_path):
    from app.loop.gate import http_ask

    url, key = guarded.base_url, guarded.api_key
    assert key not in " ".join(psutil.Process(guarded.pid).cmdline())
    assert key not in guarded.log_path.read_text(errors="replace")

    # the app's own clients carry the key: a chat, the registry promoting a real adapter, the capability probe
    with ChatClient(url, api_key=key, read_timeout=300) as client:
        client.chat(PROMPT, "base")
        adapter = train_test_adapter(tiny_model_dir, tmp_path / "a", "hello", rank=4, steps=1)
        reg = AdapterRegistry(guarded, tmp_path / "adapters", max_lora_rank=8)
        name = reg.promote(adapter)
        assert name in client.models() and client.chat(PROMPT, name).model == name
    assert isinstance(http_ask(url, api_key=key)(name, "Say hi."), str)

    # an attacker on the same machine without the key
    with ChatClient(url, read_timeout=300) as anon:
        with pytest.raises(ChatError, match="401"):
            anon.chat(PROMPT, "base")
        with pytest.raises(ChatError, match="401"):
            anon.models()
    with pytest.raises(httpx.HTTPStatusError):
        http_ask(url)(name, "Say hi.")
    wrong = {"Authorization": "Bearer not-the-key"}
    for headers in ({}, wrong):
        assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=headers,
                          timeout=30).status_code == 401
        assert httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": str(adapter)},
                          headers=headers, timeout=30).status_code == 401
    models = httpx.get(f"{url}/v1/models", headers=guarded.auth_headers(), timeout=30).json()["data"]
    assert name in {m["id"] for m in models} and "evil" not in {m["id"] for m in models}   # still served
    assert guarded.is_healthy()
