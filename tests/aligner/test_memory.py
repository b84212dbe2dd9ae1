"""Bounding training memory by chunking a micro-batch's gradient pass must not change the run."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from aligner.train import TrainConfig, _grad_chunks, run
from tests.aligner.support import synthetic_rows, write_snapshot


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
                            max_length=128, heldout_fraction=0.0, max_steps=2, threads=1, grad_tokens=budget,
                            lr=1e-3))  # not the default: 2 steps must move the weights past the check below
        outs[budget] = (m, load_file(out / "adapter_model.safetensors"))
    (m1, w1), (m2, w2) = outs[10**6], outs[64]
    # bf16 autocast: the batch shape moves the last bits, so compare to bf16-noise tolerances. (Adapter weights are
    # not compared: Adam's first steps are ≈ ±lr per element, so noise-level gradients flip whole lr-sized steps.)
    for a, b in zip(m1["log"], m2["log"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-4)
        # bf16 keeps 8 mantissa bits (relative rounding 2^-9 ≈ 2e-3 per value): on a CPU with native bf16 the two
        # batch shapes gave 0.4671 against 0.4665 (1.4e-3). The float32 test below checks the chunking exactly.
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-2)
        assert a["reward_desirable"] == pytest.approx(b["reward_desirable"], abs=1e-2)
    assert max(w1[k].abs().max().item() for k in w1 if "lora_B" in k) > 1e-3
    assert w1.keys() == w2.keys()
    assert m1["train_tokens"] == m2["train_tokens"]


def test_chunked_backward_gives_the_same_gradient(tiny_model_dir):
    """In float32 the chunked gradient is the whole-batch gradient: the per-example loss makes chunking exact."""
    from aligner.model import completion_logps, load_policy

    torch.manual_seed(0)
    model = load_policy(tiny_model_dir, dtype=torch.float32)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)  # a non-zero adapter so every LoRA weight gets a gradient
    g = torch.Generator().manual_seed(1)
    seqs = [(torch.randint(3, 1000, (int(p),), generator=g).tolist(), torch.randint(3, 1000, (int(c),), generator=g)
             .tolist()) for p, c in [(5, 9), (20, 3), (11, 30), (7, 7)]]
    weights = torch.tensor([0.3, -1.0, 0.7, 2.0])
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(chunks: list[list[int]]) -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        for c in chunks:
            (completion_logps(model, [seqs[i] for i in c], 0, autocast=False) * weights[c]).sum().backward()
        return [p.grad.clone() for p in params]

    whole, chunked = grads([[0, 1, 2, 3]]), grads([[1, 3], [0], [2]])
    assert max(w.abs().max().item() for w in whole) > 1e-4
    for w, c in zip(whole, chunked, strict=True):
        torch.testing.assert_close(c, w, rtol=1e-4, atol=1e-6)


def test_keeping_or_recomputing_the_lm_head_logits_gives_the_same_gradient(tiny_model_dir, monkeypatch):
    """Short forwards keep their log-softmax for the backward; long ones recompute each tile's logits there. Both
    are the same function: same log-probs, same gradient."""
    from aligner import model as model_mod
    from aligner.model import completion_logps, load_policy

    torch.manual_seed(0)
    model = load_policy(tiny_model_dir, dtype=torch.float32)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    g = torch.Generator().manual_seed(2)
    seqs = [(torch.randint(3, 1000, (int(p),), generator=g).tolist(), torch.randint(3, 1000, (int(c),), generator=g)
             .tolist()) for p, c in [(6, 40), (15, 25), (9, 33)]]
    weights = torch.tensor([1.0, -0.5, 0.8])
    params = [p for p in model.parameters() if p.requires_grad]
    monkeypatch.setattr(model_mod, "LM_HEAD_TILE", 32)  # 98 completion positions: several tiles either way

    def run(keep: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        monkeypatch.setattr(model_mod, "LM_HEAD_KEEP_POSITIONS", keep)
        for p in params:
            p.grad = None
        lp = completion_logps(model, seqs, 0, autocast=False)
        (lp * weights).sum().backward()
        return lp.detach(), [p.grad.clone() for p in params]

    (lp_kept, g_kept), (lp_re, g_re) = run(10**6), run(0)
    torch.testing.assert_close(lp_kept, lp_re, rtol=0, atol=0)
    assert max(x.abs().max().item() for x in g_kept) > 1e-4
    for a, b in zip(g_kept, g_re, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
