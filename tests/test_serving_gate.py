import math

import pytest

from serving.gate import should_promote


def m(margin, frac=0.7, loss=0.4):
    return {"margin": margin, "frac_correct_side": frac, "loss": loss}


def test_promotes_when_margin_gain_exceeds_threshold():
    ok, reason = should_promote(m(0.30), m(0.10), min_gain=0.05)
    assert ok and "promoted" in reason and "+0.2000" in reason


def test_rejects_when_gain_not_above_threshold():
    ok, reason = should_promote(m(0.14), m(0.10), min_gain=0.05)
    assert not ok and reason.startswith("not promoted") and "margin gain" in reason
    ok, _ = should_promote(m(0.15), m(0.10), min_gain=0.05 + 1e-9)
    assert not ok


def test_rejects_when_sign_test_regresses_beyond_tolerance():
    ok, reason = should_promote(m(0.5, frac=0.60), m(0.1, frac=0.70), min_gain=0.0)
    assert not ok and "correct side" in reason
    ok, _ = should_promote(m(0.5, frac=0.66), m(0.1, frac=0.70), min_gain=0.0)
    assert ok  # within the 0.05 tolerance


def test_nothing_served_compares_with_base_margin_zero():
    assert should_promote(m(0.01), None, 0.0)[0]
    assert not should_promote(m(-0.01), {}, 0.0)[0]


@pytest.mark.parametrize("bad", [None, {}, {"margin": None}, {"margin": math.nan}, {"margin": "0.3"},
                                 {"margin": math.inf}])
def test_missing_or_non_finite_new_metrics_never_promote(bad):
    ok, reason = should_promote(bad, m(0.0), -1.0)
    assert not ok and reason.startswith("not promoted")


def test_missing_served_margin_refuses():
    ok, reason = should_promote(m(1.0), {"loss": 0.3}, 0.0)
    assert not ok and "served" in reason


def one_class(r_u=None, r_d=None, frac=0.5):
    return {"margin": None, "frac_correct_side": frac, "loss": 0.5, "reward_undesirable": r_u, "reward_desirable": r_d}


def test_one_class_heldout_compares_that_class_reward():
    # only undesirable examples held out: pushing their reward down is the improvement
    ok, reason = should_promote(one_class(r_u=-3.0, frac=0.9), None, min_gain=0.0)
    assert ok and "no held-out desirable" in reason
    ok, reason = should_promote(one_class(r_u=+1.0, frac=0.2), None, min_gain=0.0)
    assert not ok and "does not exceed" in reason
    ok, _ = should_promote(one_class(r_u=-3.0, frac=0.9), one_class(r_u=-1.0, frac=0.8), min_gain=0.5)
    assert ok
    ok, _ = should_promote(one_class(r_u=-3.0, frac=0.6), one_class(r_u=-1.0, frac=0.8), min_gain=0.5)
    assert not ok  # sign test still guards
    # only desirable held out: higher reward is better
    ok, _ = should_promote(one_class(r_d=2.0), one_class(r_d=1.0), min_gain=0.5)
    assert ok
    # a served score of another kind is not comparable
    ok, reason = should_promote(one_class(r_d=2.0), m(0.1), min_gain=0.0)
    assert not ok and "missing" in reason


def test_nan_rewards_never_promote_in_the_one_class_fallback():
    ok, _ = should_promote(one_class(r_u=float("nan")), None, min_gain=0.0)
    assert not ok
