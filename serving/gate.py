"""Promotion gate: does a freshly trained adapter beat the served one on the aligner's held-out set?

Pure function, no I/O. Inputs are the `heldout.new` / `heldout.served` dicts of the aligner manifest:
`{"margin", "frac_correct_side", "loss"}` where margin = mean implied reward on held-out desirable answers minus
the mean on undesirable ones, and frac_correct_side = share of held-out examples whose reward has the sign of
their label. Both adapters are scored on the same held-out examples against the same reference, so the numbers
are comparable.

The rule (all must hold):
1. the new metrics exist and are finite;
2. margin gain: new.margin - served.margin > min_gain;
3. no regression on the sign test: new.frac_correct_side >= served.frac_correct_side - frac_tolerance.
When nothing is served yet (`served` is None or empty) the base model is the comparison: its margin against
itself is 0 and rule 3 is skipped.
"""

from __future__ import annotations

import math
from typing import Any

FRAC_TOLERANCE = 0.05


def _num(d: dict[str, Any], key: str) -> float | None:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def should_promote(new: dict[str, Any] | None, served: dict[str, Any] | None, min_gain: float,
                   frac_tolerance: float = FRAC_TOLERANCE) -> tuple[bool, str]:
    """(promote?, human-readable reason); the reason is recorded with the run either way."""
    if not new:
        return False, "not promoted: the new adapter has no held-out metrics"
    new_margin = _num(new, "margin")
    if new_margin is None:
        return False, ("not promoted: the new adapter's held-out margin is missing or not finite "
                       f"({new.get('margin')!r})")
    if not served:
        if new_margin > min_gain:
            return True, f"promoted: held-out margin {new_margin:+.4f} > {min_gain:+.4f} (nothing served yet: base)"
        return False, f"not promoted: held-out margin {new_margin:+.4f} does not exceed {min_gain:+.4f} (vs base)"
    served_margin = _num(served, "margin")
    if served_margin is None:
        return False, f"not promoted: the served adapter's held-out margin is missing ({served.get('margin')!r})"
    gain = new_margin - served_margin
    if not gain > min_gain:
        return False, (f"not promoted: margin gain {gain:+.4f} (new {new_margin:+.4f}, served {served_margin:+.4f}) "
                       f"does not exceed {min_gain:+.4f}")
    new_frac, served_frac = _num(new, "frac_correct_side"), _num(served, "frac_correct_side")
    if new_frac is not None and served_frac is not None and new_frac < served_frac - frac_tolerance:
        return False, (f"not promoted: share on the correct side fell from {served_frac:.3f} to {new_frac:.3f} "
                       f"(tolerance {frac_tolerance:.2f}) despite margin gain {gain:+.4f}")
    return True, (f"promoted: margin gain {gain:+.4f} (new {new_margin:+.4f}, served {served_margin:+.4f}) "
                  f"> {min_gain:+.4f}")
