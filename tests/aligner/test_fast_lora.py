"""The fused LoRA forward must be PEFT's forward: same outputs and gradients, and PEFT's path when switched off."""

from __future__ import annotations

import pytest
import torch

from aligner.model import completion_logps, load_policy


def _peft_forward(model) -> None:
    for m in model.modules():
        m.__dict__.pop("forward", None)  # drop our instance-level override: PEFT's class forward again


def _logps_and_grads(model, seqs, autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    lp = completion_logps(model, seqs, 0, autocast=autocast)
    (lp * torch.tensor([1.0, -0.5, 2.0])).sum().backward()
    return lp.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_lora_forward_matches_peft(tiny_model_dir, dtype):
    torch.manual_seed(0)
    model = load_policy(tiny_model_dir, dtype=dtype)
    assert sum("forward" in m.__dict__ for m in model.modules()) > 0  # the fast path is installed
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # a non-zero adapter, so the LoRA branch matters
    g = torch.Generator().manual_seed(2)
    seqs = [(torch.randint(3, 1000, (p,), generator=g).tolist(), torch.randint(3, 1000, (c,), generator=g).tolist())
            for p, c in [(6, 9), (15, 4), (9, 20)]]
    autocast = dtype == torch.bfloat16
    fast_lp, fast_g = _logps_and_grads(model, seqs, autocast)
    with torch.no_grad(), model.disable_adapter():  # disabled adapter: falls back to PEFT, i.e. the base model
        fast_ref = completion_logps(model, seqs, 0, autocast=autocast)
    _peft_forward(model)
    peft_lp, peft_g = _logps_and_grads(model, seqs, autocast)
    with torch.no_grad(), model.disable_adapter():
        peft_ref = completion_logps(model, seqs, 0, autocast=autocast)
    assert (fast_lp - fast_ref).abs().max() > 1e-2  # the adapter changes the result: the comparison means something
    # alpha = 2 × rank: the scale is a power of two, so the fused product is exact even in bf16
    torch.testing.assert_close(fast_lp, peft_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_ref, peft_ref, rtol=0, atol=0)
    for a, b in zip(fast_g, peft_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_dtype_follows_the_hardware_and_autocast_follows_the_weights(tiny_model_dir, monkeypatch):
    from aligner import model as model_mod

    monkeypatch.setattr(model_mod, "native_bf16", lambda: False)
    assert model_mod.resolve_dtype("auto") == torch.float32  # emulated bf16 is ~20x slower to train (docstring)
    monkeypatch.setattr(model_mod, "native_bf16", lambda: True)
    assert model_mod.resolve_dtype("auto") == torch.bfloat16
    assert model_mod.resolve_dtype("float32") == torch.float32
    with pytest.raises(ValueError, match="auto, bfloat16 or float32"):
        model_mod.resolve_dtype("fp8")
    seqs = [([5, 6, 7], [8, 9]), ([10, 11], [12, 13, 14])]
    for dtype in (torch.float32, torch.bfloat16):
        model = load_policy(tiny_model_dir, dtype=dtype)
        assert model.get_base_model().lm_head.weight.dtype == dtype
        with torch.no_grad():  # the default is exactly the explicit choice that fits the weights
            want = completion_logps(model, seqs, 0, autocast=dtype == torch.bfloat16)
            torch.testing.assert_close(completion_logps(model, seqs, 0), want, rtol=0, atol=0)
