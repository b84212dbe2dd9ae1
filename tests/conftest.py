"""Fixtures shared by every test module.

`default_model_dir` is the real embedded SmolLM2 (fetched once per machine); `tiny_model_dir` is a randomly
initialised Llama with the same tokenizer and chat template, small enough for fast unit tests yet shaped so that
transformers, PEFT and vLLM all load it (head_dim 64 is one vLLM's CPU attention supports).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

pytest_plugins = ["tests.fixtures_pg"] + (
    ["tests.fixtures_serving"] if (Path(__file__).parent / "fixtures_serving.py").exists() else [])

TINY_CONFIG = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
)


def free_port() -> int:
    """A TCP port that was free a moment ago on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond, timeout: float, what: str, every: float = 0.2) -> None:
    """Poll `cond()` until it is true; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist two workers share the cores: an OpenMP thread with nothing to do sleeps instead of
    spinning, so the other worker's threads get the core (torch and vLLM here use libgomp)."""
    if hasattr(config, "workerinput"):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(name="free_port")
def free_port_fixture():
    return free_port


@pytest.fixture(scope="session")
def kto_home() -> Path:
    """The project home the tests share with `make run` (models are fetched there once)."""
    return Path(os.environ.get("KTO_LOOP_HOME", "~/.cache/kto-loop")).expanduser()


@pytest.fixture(scope="session")
def default_model_dir(kto_home: Path) -> Path:
    from serving.model_fetch import ensure_default_model

    return ensure_default_model(kto_home / "models", progress=False)


def build_tiny_model(tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """Save a random tiny Llama plus the tokenizer of `tokenizer_dir` into `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **TINY_CONFIG)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(default_model_dir, tmp_path_factory.mktemp("tiny-llama"))
