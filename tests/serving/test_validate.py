"""AdapterRegistry.validate: what vLLM cannot serve is refused with a clear message before the server is touched."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from serving.registry import AdapterRegistry, InvalidAdapter


def _peft_adapter(model_dir: Path, out: Path, r: int = 8) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", bias="none", task_type="CAUSAL_LM",
                     init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def good_adapter(default_model_dir, tmp_path_factory) -> Path:
    return _peft_adapter(default_model_dir, tmp_path_factory.mktemp("good") / "a")


@pytest.fixture
def registry(default_model_dir, tmp_path, free_port) -> AdapterRegistry:
    # nothing listens there: validation must never need the server
    return AdapterRegistry(f"http://127.0.0.1:{free_port()}", tmp_path / "state.json", max_lora_rank=16,
                           base_model_dir=default_model_dir)


def _variant(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(config_changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_valid_adapter_records_sha256(registry, good_adapter):
    info = registry.validate(good_adapter)
    want = hashlib.sha256((good_adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert info.sha256 == want and info.rank == 8 and "q_proj" in info.target_modules


@pytest.mark.parametrize("changes, message", [
    ({"r": 32}, "rank 32 exceeds the server's --max-lora-rank 16"),
    ({"rank_pattern": {"q_proj": 64}}, "rank 64 exceeds"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "bias='all'"),
    ({"peft_type": "IA3"}, "only LORA"),
    ({"target_modules": []}, "no target_modules"),
])
def test_unservable_configs_are_refused(registry, good_adapter, tmp_path, changes, message):
    bad = _variant(good_adapter, tmp_path / "bad", **changes)
    with pytest.raises(InvalidAdapter, match=message.replace("(", r"\(").replace("[", r"\[")):
        registry.validate(bad)


def test_missing_files_are_refused(registry, good_adapter, tmp_path):
    no_weights = _variant(good_adapter, tmp_path / "w")
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidAdapter, match="no weights file"):
        registry.validate(no_weights)
    no_config = _variant(good_adapter, tmp_path / "c")
    (no_config / "adapter_config.json").unlink()
    with pytest.raises(InvalidAdapter, match="adapter_config.json is missing"):
        registry.validate(no_config)
    with pytest.raises(InvalidAdapter, match="does not exist"):
        registry.validate(tmp_path / "nowhere")


def test_adapter_of_another_base_model_is_refused(registry, tiny_model_dir, tmp_path):
    tiny = _peft_adapter(tiny_model_dir, tmp_path / "tiny")
    with pytest.raises(InvalidAdapter, match="differs from the served model"):
        registry.validate(tiny)  # its config names the tiny model dir, whose config.json differs
    renamed = _variant(tiny, tmp_path / "renamed", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(InvalidAdapter, match="do not fit the served model"):
        registry.validate(renamed)  # a plausible name, but the tensor shapes give it away


def test_invalid_promote_changes_nothing(registry, good_adapter, tmp_path):
    bad = _variant(good_adapter, tmp_path / "bad", r=64)
    with pytest.raises(InvalidAdapter):
        registry.promote(bad)
    assert registry.current() == "base" and registry.versions() == []
    assert not registry.state_path.exists()


def test_registry_accepts_a_server_and_an_adapter_directory(default_model_dir, tmp_path):
    """The app's form: AdapterRegistry(server, adapter_dir): state in DIR/registry.json, versions copied to DIR,
    base model taken from the server's spec."""
    from types import SimpleNamespace

    server = SimpleNamespace(base_url="http://127.0.0.1:9/", spec=SimpleNamespace(model_dir=default_model_dir))
    reg = AdapterRegistry(server, tmp_path / "adapters", max_lora_rank=16)
    assert reg.state_path == tmp_path / "adapters" / "registry.json"
    assert reg.store_dir == tmp_path / "adapters" and reg.base_model_dir == default_model_dir
    assert reg.base_url == "http://127.0.0.1:9" and reg.current() == "base" and reg.previous() is None
