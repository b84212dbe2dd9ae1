"""The KTO loss (Ethayarajh et al., ICML 2024, eq. 7-8), as a pure function of implied rewards.

Kept free of models and I/O so that the paper's worked example, the gradient direction and the saturation
property can be tested on plain tensors, and so that the trainer, the held-out evaluation and the TRL parity test
all share one definition.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


class KTOLoss(NamedTuple):
    loss: torch.Tensor          # scalar: mean of `losses` over the batch
    losses: torch.Tensor        # [B] per-example weighted losses (float32)
    z0: torch.Tensor            # scalar reference point after the clamp at 0 (detached)
    z0_pre_clamp: torch.Tensor  # scalar mean mismatched log-ratio before the clamp (detached), for the logs


def rotation(n: int) -> list[int]:
    """Partner index for each example: x_i is paired with y_{i+1} (wrapping), never with itself, never reversed.

    A batch of one has no mismatched partner, so it is refused rather than silently paired with itself.
    """
    if n < 2:
        raise ValueError(f"mismatched KL pairs need a batch of at least 2 examples, got {n}")
    return [(i + 1) % n for i in range(n)]


def kl_baseline(kl_rewards: torch.Tensor, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """z0 = max(0, mean of the mismatched log-ratios); returns (z0, pre-clamp mean), both detached float32.

    Under several processes the mean is over all of them: `all_reduce_sum` sums a [sum, count] pair across
    processes, so uneven per-process batch sizes still give the exact global mean.
    """
    kl = kl_rewards.detach().float().reshape(-1)
    stats = torch.stack([kl.sum(), torch.tensor(float(kl.numel()), device=kl.device)])
    if all_reduce_sum is not None:
        stats = all_reduce_sum(stats)
    pre = stats[0] / stats[1].clamp(min=1.0)
    return pre.clamp(min=0.0), pre


def kto_loss(rewards: torch.Tensor, kl_rewards: torch.Tensor | None, desirable: torch.Tensor, beta: float,
             lambda_d: float, lambda_u: float, *, z0_pre_clamp: torch.Tensor | None = None) -> KTOLoss:
    """KTO loss from implied rewards r = log π_θ(y|x) − log π_ref(y|x) (summed over completion tokens).

    desirable:  1 − σ(β(r − z0)) weighted by λ_D;  undesirable: 1 − σ(β(z0 − r)) weighted by λ_U.
    z0 comes from `kl_rewards` (log-ratios of mismatched pairs), or from `z0_pre_clamp` when the caller already
    reduced it over gradient-accumulation micro-batches and processes. A batch with one class only is fine.
    """
    r = rewards.float()
    mask = desirable.to(device=r.device, dtype=torch.bool)
    if z0_pre_clamp is None:
        if kl_rewards is None:
            raise ValueError("kto_loss needs kl_rewards or z0_pre_clamp")
        z0, pre = kl_baseline(kl_rewards)
    else:
        pre = z0_pre_clamp.detach().float().to(r.device)
        z0 = pre.clamp(min=0.0)
    value_d = torch.sigmoid(beta * (r - z0))
    value_u = torch.sigmoid(beta * (z0 - r))
    losses = torch.where(mask, lambda_d * (1.0 - value_d), lambda_u * (1.0 - value_u))
    loss = losses.sum() / max(losses.numel(), 1)
    return KTOLoss(loss, losses, z0, pre)


def bucket_kl(ref_top: torch.Tensor, ref_rest: torch.Tensor, policy_top: torch.Tensor,
              policy_rest: torch.Tensor) -> torch.Tensor:
    """KL(π_ref ‖ π_θ) per position over k+1 buckets: the reference's k likeliest tokens, and everything else.

    Arguments are log-probabilities: [N, k] at the same token ids for both models, and [N] for the rest's mass.
    Not part of KTO: the optional anchor term (aligner/anchor.py). By the data-processing inequality it is at
    most the full-vocabulary KL, and it is zero, with zero gradient, while the policy equals the reference, so it
    resists drift without pulling towards any one answer. Caching k values instead of the whole vocabulary keeps
    a reference forward out of every training step.
    """
    ref_top, ref_rest = ref_top.detach().float(), ref_rest.detach().float()
    return ((ref_top.exp() * (ref_top - policy_top.float())).sum(-1)
            + ref_rest.exp() * (ref_rest - policy_rest.float()))


def rest_logp(top: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ exp(top)) over the last axis: the log-mass outside the k listed tokens, floored at 1e-12."""
    return torch.log(torch.clamp(-torch.expm1(torch.logsumexp(top.float(), dim=-1)), min=1e-12))
