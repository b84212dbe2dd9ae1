"""Promotion gate: does a freshly trained adapter beat the served one on the aligner's held-out set?

Pure function, no I/O. Inputs are the `heldout.new` / `heldout.served` dicts of the aligner manifest:
`{"margin", "frac_correct_side", "loss"}` where margin = mean implied reward on held-out desirable answers minus
the mean on undesirable ones, and frac_correct_side = share of held-out examples whose reward has the sign of
their label. Both adapters are scored on the same held-out examples against the same reference, so the numbers
are comparable.

The rule (all must hold):
1. the new metrics exist and are finite;
2. margin gain: new.margin - served.margin > min_gain;
3. no significant regression on the side test. With per-example `correct_side` lists (same held-out examples,
   same order), an exact sign test on the examples that changed side (McNemar's test for paired data, exact
   form): refuse when the new adapter moved significantly more examples to the wrong side than to the right one
   (one-sided p <= alpha, 0.05). A fixed tolerance on the share cannot work for small held-out sets: with 21
   examples, 0.05 is less than one example, so any two flips refused a candidate with a large margin gain.
   Without the lists (older manifests): new.frac_correct_side >= served.frac_correct_side - frac_tolerance.
When nothing is served yet (`served` is None or empty) the base model is the comparison: its margin against
itself is 0 and rule 3 is skipped. When the held-out set holds one class only (a heavily imbalanced snapshot can
leave no held-out thumbs-up), the margin is undefined; the gate then compares that class's mean reward instead
(lower on undesirable answers, higher on desirable ones), with the same threshold and sign test.
"""

from __future__ import annotations

import math
from typing import Any

FRAC_TOLERANCE = 0.05
SIGN_TEST_ALPHA = 0.05


def sign_test_p(worse: int, better: int) -> float:
    """One-sided exact sign test: P(at least `worse` of the `worse + better` changed examples went the wrong way)
    if each change were a fair coin."""
    n = worse + better
    return sum(math.comb(n, k) for k in range(worse, n + 1)) / 2 ** n if n else 1.0


def _paired_sides(new: dict[str, Any], served: dict[str, Any]) -> tuple[int, int] | None:
    """(examples that moved to the wrong side, examples that moved to the right side), or None without lists."""
    a, b = new.get("correct_side"), served.get("correct_side")
    if not (isinstance(a, list) and isinstance(b, list) and a and len(a) == len(b)):
        return None
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in a + b):
        return None
    return sum(n < s for n, s in zip(a, b, strict=True)), sum(n > s for n, s in zip(a, b, strict=True))


def _num(d: dict[str, Any], key: str) -> float | None:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _score(d: dict[str, Any]) -> tuple[float | None, str]:
    """The number to compare and its name: the margin, or, when the held-out set holds one class only (heavy
    imbalance leaves no held-out thumbs-up, say), that class's mean reward oriented so that higher is better."""
    margin = _num(d, "margin")
    if margin is not None or d.get("margin") is not None:
        return margin, "margin"
    r_d, r_u = _num(d, "reward_desirable"), _num(d, "reward_undesirable")
    if d.get("reward_desirable") is None and r_u is not None:
        return -r_u, "−reward on held-out undesirable (no held-out desirable)"
    if d.get("reward_undesirable") is None and r_d is not None:
        return r_d, "reward on held-out desirable (no held-out undesirable)"
    return None, "margin"


def should_promote(new: dict[str, Any] | None, served: dict[str, Any] | None, min_gain: float,
                   frac_tolerance: float = FRAC_TOLERANCE, alpha: float = SIGN_TEST_ALPHA) -> tuple[bool, str]:
    """(promote?, human-readable reason); the reason is recorded with the run either way."""
    if not new:
        return False, "not promoted: the new adapter has no held-out metrics"
    new_score, what = _score(new)
    if new_score is None:
        return False, ("not promoted: the new adapter's held-out margin is missing or not finite "
                       f"({new.get('margin')!r})")
    if not served:
        if new_score > min_gain:
            return True, f"promoted: held-out {what} {new_score:+.4f} > {min_gain:+.4f} (nothing served yet: base)"
        return False, f"not promoted: held-out {what} {new_score:+.4f} does not exceed {min_gain:+.4f} (vs base)"
    served_score, served_what = _score(served)
    if served_score is None or served_what != what:
        return False, f"not promoted: the served adapter's held-out {what} is missing ({served.get('margin')!r})"
    gain = new_score - served_score
    if not gain > min_gain:
        return False, (f"not promoted: {what} gain {gain:+.4f} (new {new_score:+.4f}, served {served_score:+.4f}) "
                       f"does not exceed {min_gain:+.4f}")
    paired = _paired_sides(new, served)
    if paired is not None:
        worse, better = paired
        p = sign_test_p(worse, better)
        if worse > better and p <= alpha:
            return False, (f"not promoted: {worse} held-out examples moved to the wrong side and {better} to the "
                           f"right one (sign test p = {p:.3f} <= {alpha}) despite {what} gain {gain:+.4f}")
        return True, (f"promoted: {what} gain {gain:+.4f} (new {new_score:+.4f}, served {served_score:+.4f}) "
                      f"> {min_gain:+.4f}; sides: {worse} worse, {better} better (p = {p:.2f})")
    new_frac, served_frac = _num(new, "frac_correct_side"), _num(served, "frac_correct_side")
    if new_frac is not None and served_frac is not None and new_frac < served_frac - frac_tolerance:
        return False, (f"not promoted: share on the correct side fell from {served_frac:.3f} to {new_frac:.3f} "
                       f"(tolerance {frac_tolerance:.2f}) despite {what} gain {gain:+.4f}")
    return True, (f"promoted: {what} gain {gain:+.4f} (new {new_score:+.4f}, served {served_score:+.4f}) "
                  f"> {min_gain:+.4f}")
