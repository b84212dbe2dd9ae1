import math

import pytest

from app.loop.gate import should_promote, sign_test_p


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


def sides(margin, flags):
    return {"margin": margin, "frac_correct_side": sum(flags) / len(flags), "loss": 0.4, "correct_side": flags}


def test_sign_test_p_values():
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(2, 0) == pytest.approx(0.25)
    assert sign_test_p(5, 0) == pytest.approx(1 / 32)
    assert sign_test_p(6, 2) == pytest.approx((28 + 8 + 1) / 256)
    assert sign_test_p(1, 3) == pytest.approx(15 / 16)


def test_paired_side_test_allows_noise_the_fixed_tolerance_refused():
    # the simulator's case: 21 held-out examples, served 18 right, the candidate 16 (2 flips), big margin gain
    served = [1.0] * 18 + [0.0] * 3
    new = [0.0, 0.0] + [1.0] * 16 + [0.0] * 3
    assert not should_promote({k: v for k, v in sides(21.4, new).items() if k != "correct_side"},
                              {k: v for k, v in sides(0.0, served).items() if k != "correct_side"}, 0.0)[0]
    ok, reason = should_promote(sides(21.4, new), sides(0.0, served), 0.0)
    assert ok and "2 worse, 0 better" in reason


def test_paired_side_test_refuses_a_significant_regression():
    served = [1.0] * 18 + [0.0] * 3
    new = [0.0] * 6 + [1.0] * 12 + [1.0] + [0.0] * 2  # 6 moved to the wrong side, 1 to the right one: p = 8/128
    assert should_promote(sides(5.0, new), sides(0.0, served), 0.0)[0]
    new[18] = 0.0  # 6 wrong, 0 right: p = 1/64
    ok, reason = should_promote(sides(5.0, new), sides(0.0, served), 0.0)
    assert not ok and "6 held-out examples moved to the wrong side and 0" in reason
    # ties with z0 count half: 1 → 0.5 is a move to the wrong side
    ok, _ = should_promote(sides(5.0, [0.5] * 6 + [1.0] * 15), sides(0.0, [1.0] * 21), 0.0)
    assert not ok


def test_paired_lists_of_different_length_fall_back_to_the_share_rule():
    ok, reason = should_promote(sides(5.0, [1.0] * 10), sides(0.0, [1.0] * 20), 0.0)
    assert ok and "sides" not in reason
