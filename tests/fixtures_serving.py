"""Serving fixtures (loaded by tests/conftest.py through `pytest_plugins`).

- `vllm_server`: one real vLLM server on the default model for the whole session (LoRA on, rank ≤ 16).
- `trained_adapters`: two real PEFT LoRA adapters on the default model, each trained for a few steps of plain
  causal-LM loss to answer PROMPT with its own fixed sentence, so greedy output differs from the base model and
  between the two. Cached under KTO_HOME/test-cache keyed by the recipe, since training is the slow part.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

PROMPT = [{"role": "user", "content": "Say something."}]
TARGETS = {"a": "Pineapple pineapple pineapple, banana and kiwi.", "b": "Blue whales sing at dawn near Iceland."}
RECIPE = {"r": 8, "alpha": 16, "steps": 16, "lr": 4e-3, "seed": 0, "version": 1}


def train_test_adapter(model_dir: Path, out: Path, target: str, rank: int = 8, steps: int = 16,
                       lr: float = 4e-3, seed: int = 0) -> Path:
    """Fit a LoRA (all linear layers) so that the model answers PROMPT with `target`; save it with PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0, bias="none",
                     task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    prompt = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
    ids = tok(prompt + target + "<|im_end|>", add_special_tokens=False, return_tensors="pt").input_ids
    labels = ids.clone()
    labels[:, :n_prompt] = -100
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def trained_adapters(default_model_dir: Path, kto_home: Path) -> dict[str, Path]:
    key = hashlib.sha256(json.dumps([RECIPE, TARGETS, str(default_model_dir)]).encode()).hexdigest()[:12]
    cache = kto_home / "test-cache" / f"serving-adapters-{key}"
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test workers on a fresh machine: one trains, the other waits
        for name, target in TARGETS.items():
            d = cache / name
            if not (d / "adapter_model.safetensors").exists():
                tmp = cache / f".{name}.{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                train_test_adapter(default_model_dir, tmp, target, rank=RECIPE["r"], steps=RECIPE["steps"],
                                   lr=RECIPE["lr"], seed=RECIPE["seed"])
                shutil.rmtree(d, ignore_errors=True)
                os.replace(tmp, d)
            out[name] = d
    return out


@pytest.fixture(scope="session")
def vllm_server(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from serving.server import VLLMServer, VLLMServerSpec

    log_dir = tmp_path_factory.mktemp("vllm-log")
    spec = VLLMServerSpec(model_dir=default_model_dir, port=0, max_lora_rank=16, max_loras=3,
                          log_path=log_dir / "vllm.log", restart_backoff=(1.0, 10.0))
    server = VLLMServer(spec)
    server.start()
    try:
        yield server
    finally:
        server.stop()
