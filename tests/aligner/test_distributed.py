"""Two processes under `accelerate launch` (gloo on CPU) give the same run as one process on the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.aligner.support import synthetic_rows, write_snapshot

# The default rate suits the real model; 3 steps on the tiny one must visibly move weights. float32 on every CPU:
# where bf16 is native it would be the default, and its rounding follows how each process batches the reference
# pass, differences Adam turns into steps of ±lr (below).
ARGS = ["--batch-size", "4", "--epochs", "1", "--max-steps", "3", "--threads", "1", "--max-length", "128",
        "--lr", "1e-3", "--dtype", "float32"]


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.timeout(600)
@pytest.mark.parametrize("extra", [[], ["--first-lora-layer", "1"]], ids=["all-layers", "upper-layer"])
def test_two_processes_match_one(tmp_path, tiny_model_dir, free_port, extra):
    snap = write_snapshot(tmp_path / "s.parquet", synthetic_rows(20, 16, seed=5))
    common = ["--snapshot", str(snap), "--model-dir", str(tiny_model_dir), *ARGS, *extra]
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher = [str(accelerate)] if accelerate.exists() else [shutil.which("accelerate") or "accelerate"]
    env = dict(os.environ, MASTER_PORT=str(free_port()))
    two = tmp_path / "two"
    proc = subprocess.run([*launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--main_process_port", env["MASTER_PORT"], "--mixed_precision", "no",
                           "--dynamo_backend", "no", "-m", "aligner", "--out", str(two), *common],
                          capture_output=True, text=True, timeout=540, env=env, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = tmp_path / "one"
    proc = subprocess.run([sys.executable, "-m", "aligner", "--out", str(one), "--grad-accum", "2", *common],
                          capture_output=True, text=True, timeout=540, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]

    m2, m1 = _manifest(two), _manifest(one)
    assert m2["hyperparameters"]["world_size"] == 2 and m1["hyperparameters"]["world_size"] == 1
    assert m2["hyperparameters"]["global_batch"] == m1["hyperparameters"]["global_batch"] == 8
    for a, b in zip(m2["log"], m1["log"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-3)
        assert a["z0_pre_clamp"] == pytest.approx(b["z0_pre_clamp"], abs=2e-2)  # z0 over both processes' pairs
        assert a["reward_desirable"] == pytest.approx(b["reward_desirable"], abs=2e-2, nan_ok=True) \
            if a["reward_desirable"] is not None else b["reward_desirable"] is None
    w2, w1 = load_file(two / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
    assert w2.keys() == w1.keys()
    moved = max((w1[k]).abs().max().item() for k in w1 if "lora_B" in k)
    diff = max((w2[k] - w1[k]).abs().max().item() for k in w1)
    assert moved > 1e-3, "the run must actually update the adapter"
    # The per-step loss, z0 and rewards above are the exact check. Weights are compared loosely: Adam divides by
    # sqrt(v), so parameters whose gradient is near zero (lora_A while lora_B is still ~0) turn last-bit
    # differences of the reference pass (batched differently across 1 and 2 processes) into steps of ±lr.
    # Dropping one process's gradient moves the weights by the order of `moved`.
    assert diff < 0.5 * moved, f"2-process weights differ from 1-process by {diff} (moved {moved})"
    if extra:  # each process kept the layer-1 inputs of its own micro-batches and started there
        assert m2["prefix"]["layers"] == 1 and 0 < m2["prefix"]["sequences"] < m1["prefix"]["sequences"]
