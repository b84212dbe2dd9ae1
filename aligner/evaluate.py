"""Held-out metrics for the promotion gate: the same numbers for the new adapter and the served one.

Rewards are always measured against the base model here (whatever reference the training run used), so the new
and the served adapter are compared on one scale; the served base model therefore has reward 0 everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from aligner.loss import kto_loss


def per_rater(rewards: torch.Tensor, desirable: torch.Tensor, right: torch.Tensor,
              raters: Sequence[str | None]) -> dict[str, dict[str, Any]]:
    """The held-out numbers per rater (examples without a rater are left out), so the gate can ask whether a gain
    survives without any one identity's ratings."""
    out: dict[str, dict[str, Any]] = {}
    for who in sorted({r for r in raters if r is not None}):
        mine = torch.tensor([r == who for r in raters])
        d, u = mine & desirable, mine & ~desirable
        out[who] = {"n": int(mine.sum()), "n_desirable": int(d.sum()), "n_undesirable": int(u.sum()),
                    "reward_desirable": rewards[d].mean().item() if d.any() else None,
                    "reward_undesirable": rewards[u].mean().item() if u.any() else None,
                    "frac_correct_side": right[mine].mean().item()}
    return out


def heldout_metrics(rewards: torch.Tensor, kl_rewards: torch.Tensor, desirable: torch.Tensor, beta: float,
                    lambda_d: float, lambda_u: float, raters: Sequence[str | None] | None = None) -> dict[str, Any]:
    """Mean reward margin (desirable − undesirable), fraction on the right side of z0, and the KTO loss; with
    `raters` (who rated each example, in order), the same per rater.

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
        "n_desirable": int(d.sum()),
        "n_undesirable": int((~d).sum()),
        "z0": z0.item(),
        "z0_pre_clamp": out.z0_pre_clamp.item(),
        # per example, in held-out order (the same for the new and the served adapter): the gate's paired test
        "correct_side": [float(x) for x in right.tolist()],
    }
    if raters is not None:
        if len(raters) != len(r):
            raise ValueError(f"{len(raters)} raters for {len(r)} held-out examples")
        metrics["per_rater"] = per_rater(r, d, right, raters)
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"non-finite held-out metric(s): {', '.join(bad)}")
    return metrics
