"""Causal self-attention for training on CPU: SDPA's forward, a batched-matmul backward.

PyTorch's CPU flash-attention backward is slow, and eager attention rounds differently in bf16; so the forward
*is* SDPA (log-probs bit-identical) and only the gradient differs: recompute P from the saved q, k, v (as in
FlashAttention, Dao et al. 2022) and apply the textbook backward in float32 softmax/dS:

    dV = Pᵀ dO,   dP = dO Vᵀ,   dS = P ⊙ (dP − rowsum(P ⊙ dP)),   dQ = s·dS K,   dK = s·dSᵀ Q

Used only with gradient, causal, no mask or dropout, equal query/key length, ≤ MAX_MATMUL_LENGTH tokens; anything
else calls transformers' SDPA unchanged. Measured: docs/experiments/2026-12-01-attention-backward.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

NAME = "kto_sdpa"  # the attn_implementation name registered with transformers
# Longest sequence our backward takes; longer ones use PyTorch's. One forward + backward of SmolLM2 on 2048-token
# batches (2-core AMX Xeon), PyTorch's flash backward / ours: 1.145 at 96 tokens, 1.124 at 160, 0.989 at 192
# (break-even), 0.943 at 256, 0.675 at 512 (docs/experiments/2026-12-01-attention-backward.md): recomputing the
# [B, H, T, T] scores costs more as T grows, the flash kernel's fixed overhead less.
MAX_MATMUL_LENGTH = 192
BACKWARDS = ("matmul", "flash")  # ours, or PyTorch's flash-attention backward (attn_implementation "sdpa")


class CausalAttention(torch.autograd.Function):
    """softmax(q kᵀ · scale, causal) v for [B, H, T, D] q and [B, H / n_rep, T, D] k, v (grouped-query heads)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                n_rep: int, offset: int = 0) -> torch.Tensor:
        ctx.save_for_backward(q, k, v)
        ctx.scale, ctx.n_rep, ctx.offset = scale, n_rep, offset
        if offset:  # k, v start with `offset` shared-head positions every query attends to (model.SharedHead)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=head_mask(q.shape[2], offset, q.device),
                                                  scale=scale, enable_gqa=n_rep > 1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=n_rep > 1)

    @staticmethod
    def backward(ctx: Any, d_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v = ctx.saved_tensors
        scale, n_rep, offset = ctx.scale, ctx.n_rep, ctx.offset
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            dt = q.dtype  # the matmuls in the inputs' dtype (bf16 under autocast: AMX), the softmax in float32
            acc = torch.promote_types(dt, torch.float32)  # (float64 inputs stay float64 throughout)
            do = d_out.to(dt)
            kr = k.repeat_interleave(n_rep, dim=1)  # head h of q reads kv head h // n_rep
            vr = v.repeat_interleave(n_rep, dim=1)
            t, tk = q.shape[2], k.shape[2]
            s = torch.matmul(q, kr.transpose(-1, -2)).to(acc).mul_(scale)
            s.masked_fill_(torch.ones(t, tk, dtype=torch.bool, device=q.device).triu_(1 + offset), float("-inf"))
            p = torch.softmax(s, dim=-1)
            del s
            dp = torch.matmul(do, vr.transpose(-1, -2)).to(acc)
            ds = (p * (dp - (p * dp).sum(-1, keepdim=True))).to(dt)
            del dp
            p = p.to(dt)
            dv = torch.matmul(p.transpose(-1, -2), do)
            dq = torch.matmul(ds, kr).mul_(scale)
            dk = torch.matmul(ds.transpose(-1, -2), q).mul_(scale)
            if n_rep > 1:  # each kv head's gradient is the sum over the query heads that read it
                b, h_kv, _, d = k.shape
                dk = dk.view(b, h_kv, n_rep, tk, d).sum(2, dtype=acc)
                dv = dv.view(b, h_kv, n_rep, tk, d).sum(2, dtype=acc)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def head_mask(t: int, offset: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[t, offset + t] boolean, True = attend: every query sees the `offset` head positions, then its row causally."""
    return torch.ones(t, offset + t, dtype=torch.bool, device=device).tril_(offset)


def attention_forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; outputs [B, T, H, D] like its SDPA function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    offset = int(kwargs.pop("kto_head", 0) or 0)  # model.SharedHead: attention_mask is then head_mask(T, offset)
    if (offset and torch.is_grad_enabled() and not dropout and key.shape[2] == query.shape[2] + offset
            and key.shape[2] <= MAX_MATMUL_LENGTH):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = CausalAttention.apply(query, key, value, scale, getattr(module, "num_key_value_groups", 1), offset)
        return out.transpose(1, 2).contiguous(), None
    if (not torch.is_grad_enabled() or attention_mask is not None or dropout or not causal
            or query.shape[2] != key.shape[2] or not 2 <= query.shape[2] <= MAX_MATMUL_LENGTH
            or kwargs.get("position_bias") is not None
            or kwargs.get("cache") is not None or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = CausalAttention.apply(query, key, value, scale, getattr(module, "num_key_value_groups", 1))
    return out.transpose(1, 2).contiguous(), None


def implementation(backward: str) -> str:
    """The attn_implementation for `backward` (one of BACKWARDS), registering ours with transformers once."""
    if backward == "flash":
        return "sdpa"
    if backward != "matmul":
        raise ValueError(f"attention backward must be one of {', '.join(BACKWARDS)}, got {backward!r}")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # masks are built exactly as for SDPA (None when causal)
    return NAME
