"""Held-out metrics for the promotion gate: the same numbers for the new adapter and the served one.

Rewards are always measured against the base model here (whatever reference the training run used), so the new
and the served adapter are compared on one scale; the served base model therefore has reward 0 everywhere.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from aligner.loss import kto_loss


def heldout_metrics(rewards: torch.Tensor, kl_rewards: torch.Tensor, desirable: torch.Tensor, beta: float,
                    lambda_d: float, lambda_u: float) -> dict[str, Any]:
    """Mean reward margin (desirable − undesirable), fraction on the right side of z0, and the KTO loss.

    A tie with z0 counts half: a policy equal to the reference scores 0.5, the coin-flip baseline.
    """
    r = rewards.float()
    d = desirable.bool()
    out = kto_loss(r, kl_rewards, d, beta, lambda_d, lambda_u)
    z0 = out.z0
    right = torch.where(d, (r > z0).float() + 0.5 * (r == z0).float(), (r < z0).float() + 0.5 * (r == z0).float())
    mean_d = r[d].mean().item() if d.any() else None
    mean_u = r[~d].mean().item() if (~d).any() else None
    metrics = {
        "margin": mean_d - mean_u if mean_d is not None and mean_u is not None else None,
        "frac_correct_side": right.mean().item(),
        "loss": out.loss.item(),
        "reward_desirable": mean_d,
        "reward_undesirable": mean_u,
        "z0": z0.item(),
        "z0_pre_clamp": out.z0_pre_clamp.item(),
        # per example, in held-out order (the same for the new and the served adapter): the gate's paired test
        "correct_side": [float(x) for x in right.tolist()],
    }
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite held-out metric(s): {', '.join(bad)}")
    return metrics
