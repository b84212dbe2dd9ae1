"""Bounding training memory by chunking a micro-batch's gradient pass must not change the run."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from aligner.train import TrainConfig, _grad_chunks, run
from tests.test_aligner_support import synthetic_rows, write_snapshot


def test_grad_chunks_respect_budget_and_cover_batch():
    lengths = {0: 100, 1: 500, 2: 250, 3: 40, 4: 480, 5: 90}
    fake = [type("E", (), {"prompt_ids": [0] * (n - 1), "completion_ids": [0]})() for n in lengths.values()]
    chunks = _grad_chunks(list(lengths), fake, budget=1000)
    assert sorted(i for c in chunks for i in c) == sorted(lengths)
    for c in chunks:  # padded size = count × longest; a single over-budget example still gets its own chunk
        assert len(c) == 1 or len(c) * max(lengths[i] for i in c) <= 1000
    assert len(_grad_chunks(list(lengths), fake, budget=10**6)) == 1


@pytest.mark.timeout(300)
def test_chunked_gradient_equals_whole_batch(tmp_path, tiny_model_dir):
    snap = write_snapshot(tmp_path / "s.parquet", synthetic_rows(10, 6, seed=7))
    outs = {}
    for budget in (10**6, 64):  # one forward per micro-batch vs (nearly) one example per forward
        out = tmp_path / f"b{budget}"
        m = run(TrainConfig(snapshot=str(snap), out=str(out), model_dir=str(tiny_model_dir), epochs=1, batch_size=8,
                            max_length=128, heldout_fraction=0.0, max_steps=2, threads=1, grad_tokens=budget))
        outs[budget] = (m, load_file(out / "adapter_model.safetensors"))
    (m1, w1), (m2, w2) = outs[10**6], outs[64]
    for a, b in zip(m1["log"], m2["log"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    assert max(w1[k].abs().max().item() for k in w1 if "lora_B" in k) > 1e-3
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4
    assert m1["train_tokens"] == m2["train_tokens"]
    assert torch.isfinite(torch.tensor(m1["final_loss"]))
