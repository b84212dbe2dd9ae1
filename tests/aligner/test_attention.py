"""Our attention backward must be SDPA's gradient, and must not touch SDPA's forward (aligner/attention.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aligner.attention import NAME, CausalAttention, implementation
from aligner.model import completion_logps, load_policy


@pytest.mark.parametrize("n_rep", [1, 3])
def test_matmul_backward_is_the_exact_gradient_of_causal_attention(n_rep):
    g = torch.Generator().manual_seed(0)
    b, h_kv, t, d = 2, 2, 7, 8
    q = torch.randn(b, h_kv * n_rep, t, d, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(b, h_kv, t, d, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(b, h_kv, t, d, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(b, h_kv * n_rep, t, d, dtype=torch.float64, generator=g)  # a non-trivial upstream gradient

    ours = CausalAttention.apply(q, k, v, 0.3, n_rep)
    grads_ours = torch.autograd.grad((ours * w).sum(), (q, k, v))
    # Independent reference: the attention written out, differentiated by autograd.
    kr, vr = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    s = (q @ kr.transpose(-1, -2)) * 0.3
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.softmax(s, dim=-1) @ vr
    grads_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))

    torch.testing.assert_close(ours, ref)
    for a, r in zip(grads_ours, grads_ref, strict=True):
        assert r.abs().max() > 1e-3
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)
    assert torch.equal(ours.detach(), F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3,
                                                                     enable_gqa=n_rep > 1).detach())


def _logps_and_grads(model, seqs):
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)  # a non-zero adapter so every LoRA weight gets a gradient
    params = [p for p in model.parameters() if p.requires_grad]
    lp = completion_logps(model, seqs, 0)
    (lp * torch.tensor([1.0, -0.5, 2.0])).sum().backward()
    with torch.inference_mode():
        lp_no_grad = completion_logps(model, seqs, 0)
    return lp.detach(), lp_no_grad, [p.grad.clone() for p in params]


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return (torch.cat([(x - y).flatten() for x, y in zip(a, b, strict=True)]).norm()
            / torch.cat([y.flatten() for y in b]).norm()).item()


def test_policy_log_probs_are_sdpa_s_and_gradients_match_the_flash_backward(tiny_model_dir):
    g = torch.Generator().manual_seed(2)
    seqs = [(torch.randint(3, 1000, (p,), generator=g).tolist(), torch.randint(3, 1000, (c,), generator=g).tolist())
            for p, c in [(5, 9), (20, 3), (11, 30)]]  # ragged: right padding, the shape the aligner trains on
    got = {}
    for dtype in (torch.float32, torch.bfloat16):
        for backward in ("matmul", "flash"):
            torch.manual_seed(1)  # the same LoRA initialisation for all four
            model = load_policy(tiny_model_dir, dtype=dtype, attention_backward=backward)
            assert model.get_base_model().config._attn_implementation == implementation(backward)
            got[dtype, backward] = _logps_and_grads(model, seqs)
    for dtype in (torch.float32, torch.bfloat16):
        (lp_m, lp0_m, _), (lp_f, lp0_f, _) = got[dtype, "matmul"], got[dtype, "flash"]
        # The forward is SDPA's in every pass: bit for bit, with or without gradient, either backward.
        assert torch.equal(lp_m, lp0_m) and torch.equal(lp_m, lp_f) and torch.equal(lp0_m, lp0_f)
    truth = got[torch.float32, "flash"][2]
    assert torch.cat([x.flatten() for x in truth]).norm() > 0
    # float32: both are the exact gradient, up to rounding.
    assert _rel(got[torch.float32, "matmul"][2], truth) < 1e-5
    # bf16 (as the aligner runs where bf16 is native): ours rounds the attention gradient in float32, so it is no
    # further from the float32 gradient than PyTorch's flash backward is.
    err_m, err_f = _rel(got[torch.bfloat16, "matmul"][2], truth), _rel(got[torch.bfloat16, "flash"][2], truth)
    assert err_m < 0.05 and err_m <= 1.1 * err_f, (err_m, err_f)


def test_generation_with_a_kv_cache_and_padding_takes_sdpa_s_own_path(tiny_model_dir):
    """Left-padded batched generation (the anchor answers) needs masks and a cache: our path must step aside."""
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    outs = []
    for backward in ("matmul", "flash"):
        model = load_policy(tiny_model_dir, dtype=torch.float32, attention_backward=backward)
        with torch.inference_mode():
            outs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                       use_cache=True, pad_token_id=0))
    assert torch.equal(outs[0], outs[1])


def test_unknown_backward_is_refused(tiny_model_dir):
    assert implementation("matmul") == NAME and implementation("flash") == "sdpa"
    with pytest.raises(ValueError, match="matmul, flash"):
        load_policy(tiny_model_dir, attention_backward="eager")


def test_long_batches_take_pytorch_s_backward(tiny_model_dir, monkeypatch):
    """Past MAX_MATMUL_LENGTH tokens PyTorch's flash backward is the faster one: ours must step aside."""
    from aligner import attention

    calls = []
    real = CausalAttention.apply
    monkeypatch.setattr(CausalAttention, "apply", lambda *a: calls.append(a[0].shape[2]) or real(*a))
    model = load_policy(tiny_model_dir, dtype=torch.float32)
    short = attention.MAX_MATMUL_LENGTH - 10
    for n in (short, attention.MAX_MATMUL_LENGTH + 10):
        completion_logps(model, [(list(range(3, 13)), list(range(20, 20 + n - 10)))], 0).sum().backward()
    assert calls and set(calls) == {short}  # every layer of the short batch, none of the long one
