"""The λ rule (paper eq. 9) over many class counts, and that the module stays torch-free."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aligner.balance import DEFAULT_TARGET_RATIO, PREFERENCES, RATIO_MAX, RATIO_MIN, auto_lambdas, weighted_ratio

counts = st.integers(min_value=1, max_value=1_000_000)


@settings(max_examples=500, deadline=None)
@given(counts, counts, st.none() | st.floats(min_value=RATIO_MIN, max_value=RATIO_MAX),
       st.none() | st.sampled_from(sorted(PREFERENCES)))
def test_rule_holds(n_d, n_u, target, preference):
    lam_d, lam_u = auto_lambdas(n_d, n_u, target_ratio=target, preference=preference)
    assert min(lam_d, lam_u) == 1.0, "one weight stays at exactly 1"
    assert lam_d >= 1.0 and lam_u >= 1.0
    ratio = weighted_ratio(n_d, n_u, lam_d, lam_u)
    assert RATIO_MIN - 1e-9 <= ratio <= RATIO_MAX + 1e-9
    expected = target if target is not None else PREFERENCES[preference or "neutral"]
    assert ratio == pytest.approx(expected, rel=1e-9)


def test_examples():
    assert auto_lambdas(100, 100) == pytest.approx((DEFAULT_TARGET_RATIO, 1.0))
    assert auto_lambdas(300, 100, target_ratio=1.0) == pytest.approx((1.0, 3.0))  # minority (down) upweighted
    assert auto_lambdas(10, 90, target_ratio=1.0) == pytest.approx((9.0, 1.0))
    assert auto_lambdas(10, 90, pinned=(1.0, 1.0)) == (1.0, 1.0)
    assert weighted_ratio(100, 100, *auto_lambdas(100, 100, preference="penalise_bad")) == pytest.approx(1.0)


@pytest.mark.parametrize("n_d,n_u", [(0, 5), (5, 0), (0, 0)])
def test_refuses_one_class(n_d, n_u):
    with pytest.raises(ValueError, match="cannot train"):
        auto_lambdas(n_d, n_u)


@pytest.mark.parametrize("kwargs", [dict(target_ratio=0.9), dict(target_ratio=1.5), dict(preference="x"),
                                    dict(pinned=(0.0, 1.0)), dict(pinned=(float("nan"), 1.0))])
def test_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        auto_lambdas(10, 10, **kwargs)


def test_balance_does_not_import_torch():
    code = "import sys, aligner.balance; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
