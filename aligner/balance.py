"""λ_D / λ_U from the observed thumbs-up / thumbs-down counts (KTO paper, eq. 9).

The paper recommends λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3]; we keep one weight at exactly 1 and raise the minority
class's, so the loss scale stays comparable between runs. No torch import: the dashboard calls it on every refresh.
"""

from __future__ import annotations

import math

RATIO_MIN = 1.0
RATIO_MAX = 4.0 / 3.0
# The default target sits in the middle of the paper's range: neither class is favoured at the edge of the rule.
DEFAULT_TARGET_RATIO = 7.0 / 6.0
# Operator preferences, all inside the rule: "penalise bad answers more" moves weight to undesirable examples
# (the lower end), "reward good answers more" moves it to desirable ones (the upper end).
PREFERENCES = {"neutral": DEFAULT_TARGET_RATIO, "penalise_bad": RATIO_MIN, "reward_good": RATIO_MAX}


def weighted_ratio(n_desirable: int, n_undesirable: int, lambda_d: float, lambda_u: float) -> float:
    """λ_D·n_D / (λ_U·n_U): the quantity the paper's rule constrains."""
    return (lambda_d * n_desirable) / (lambda_u * n_undesirable)


def auto_lambdas(n_desirable: int, n_undesirable: int, target_ratio: float | None = None,
                 pinned: tuple[float, float] | None = None, preference: str | None = None) -> tuple[float, float]:
    """(λ_D, λ_U) with one of them 1 and λ_D·n_D / (λ_U·n_U) == target_ratio ∈ [1, 4/3].

    `pinned` returns the operator's weights unchanged (after validation); `preference` is one of PREFERENCES and
    picks the target when `target_ratio` is not given. Raises ValueError when a class is empty: KTO cannot
    place the reference point with only one kind of feedback, so the run must be refused, not divided by zero.
    """
    for name, n in (("n_desirable", n_desirable), ("n_undesirable", n_undesirable)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {n!r}")
    if n_desirable == 0 or n_undesirable == 0:
        missing = "thumbs-up (desirable)" if n_desirable == 0 else "thumbs-down (undesirable)"
        raise ValueError(f"cannot train: no {missing} ratings ({n_desirable} up, {n_undesirable} down); "
                         "KTO needs both kinds of feedback")
    if pinned is not None:
        lambda_d, lambda_u = (float(v) for v in pinned)
        if not all(math.isfinite(v) and v > 0 for v in (lambda_d, lambda_u)):
            raise ValueError(f"pinned weights must be positive and finite, got {pinned!r}")
        return lambda_d, lambda_u
    if target_ratio is None:
        if preference is not None and preference not in PREFERENCES:
            raise ValueError(f"unknown preference {preference!r}; choose from {sorted(PREFERENCES)}")
        target_ratio = PREFERENCES[preference or "neutral"]
    if not RATIO_MIN <= target_ratio <= RATIO_MAX:
        raise ValueError(f"target_ratio must be in [{RATIO_MIN}, {RATIO_MAX:.4f}], got {target_ratio}")
    lambda_d = target_ratio * n_undesirable / n_desirable
    if lambda_d >= 1.0:
        return lambda_d, 1.0
    return 1.0, n_desirable / (target_ratio * n_undesirable)


def resolve(n_desirable: int, n_undesirable: int, lambda_d: float | None = None, lambda_u: float | None = None,
            target_ratio: float | None = None, preference: str | None = None) -> tuple[float, float, str]:
    """(λ_D, λ_U, "pinned" | "auto") from the aligner's settings: one pinned weight pins both (the other is 1).
    The aligner and the app's "next run" numbers call this one rule."""
    if lambda_d is not None or lambda_u is not None:
        pinned = (lambda_d if lambda_d is not None else 1.0, lambda_u if lambda_u is not None else 1.0)
        return (*auto_lambdas(n_desirable, n_undesirable, pinned=pinned), "pinned")
    return (*auto_lambdas(n_desirable, n_undesirable, target_ratio=target_ratio, preference=preference), "auto")


def describe(n_desirable: int, n_undesirable: int, lambda_d: float, lambda_u: float) -> str:
    """One line for logs and the dashboard: counts, weights and where they sit in the paper's range."""
    ratio = weighted_ratio(n_desirable, n_undesirable, lambda_d, lambda_u)
    inside = RATIO_MIN - 1e-9 <= ratio <= RATIO_MAX + 1e-9
    return (f"{n_desirable} up / {n_undesirable} down → λ_D={lambda_d:.3f}, λ_U={lambda_u:.3f}, "
            f"λ_D·n_D/(λ_U·n_U)={ratio:.3f} ({'inside' if inside else 'outside'} the paper's [1, 4/3])")
