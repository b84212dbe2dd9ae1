"""The goal check on hand-made cycle records: each goal's threshold, when it is not posed, and the verdict over
seeds."""

from __future__ import annotations

import pytest

from app.sim import goals
from app.sim.measure import wilson


def ev(rate: float, cap: float = 1.0, n: int = 100, **by: float) -> dict:
    """A measurement: the main preference's rate, capability, and other preferences' rates by name."""
    out = {"desirable_rate": rate, "ci95": list(wilson(round(rate * n), n)), "capability_accuracy": cap}
    if by:
        out["by_rater"] = {name: {"desirable_rate": r, "ci95": list(wilson(round(r * n), n))} for name, r in by.items()}
    return out


def cycles(*evals: dict, seconds: float = 500.0) -> list[dict]:
    return [{"cycle": i, "eval": e, "cycle_seconds": seconds} for i, e in enumerate(evals, 1)]


def posed(g: dict) -> dict:
    return {k: v for k, v in g.items() if v is not None}


def test_plain_run_meeting_every_goal():
    g = goals.check(ev(0.10), cycles(ev(0.25), ev(0.40)))
    assert posed(g) == {"gain_30_points_in_2_cycles": True, "capability_95pct_every_cycle": True,
                        "cycle_10_min_every_cycle": True}
    assert goals.all_held(g)


@pytest.mark.parametrize("rates,expected", [
    ([0.45], True),  # reached in cycle 1 already
    ([0.25, 0.40], True),  # exactly +30 in cycle 2
    ([0.25, 0.39], False),
    ([0.25, 0.30, 0.60], False),  # only in cycle 3: too late
    ([0.25], None),  # one cycle run, not reached: cannot tell yet
])
def test_gain_of_30_points_within_two_cycles(rates, expected):
    assert goals.check(ev(0.10), cycles(*[ev(r) for r in rates]))["gain_30_points_in_2_cycles"] is expected


def test_mostly_liked_preference_must_halve_the_disliked_share_instead():
    g = goals.check(ev(0.84), cycles(ev(0.88), ev(0.92)))
    assert g["gain_30_points_in_2_cycles"] is None and g["disliked_share_halves_in_2_cycles"] is True  # 16% → 8%
    assert goals.check(ev(0.84), cycles(ev(0.88), ev(0.91)))["disliked_share_halves_in_2_cycles"] is False
    # at exactly half liked the +30 goal still applies
    assert goals.check(ev(0.50), cycles(ev(0.80)))["gain_30_points_in_2_cycles"] is True


def test_capability_and_time_after_every_cycle():
    assert goals.check(ev(0.1, cap=1.0), cycles(ev(0.5, cap=0.95), ev(0.5, cap=0.97)))[
        "capability_95pct_every_cycle"] is True
    assert goals.check(ev(0.1, cap=1.0), cycles(ev(0.5, cap=0.94), ev(0.5, cap=1.0)))[
        "capability_95pct_every_cycle"] is False
    assert goals.check(ev(0.1), cycles(ev(0.5), seconds=600))["cycle_10_min_every_cycle"] is True
    assert goals.check(ev(0.1), cycles(ev(0.5), seconds=601))["cycle_10_min_every_cycle"] is False
    assert goals.check(ev(0.1), []) == {k: None for k in goals.check(ev(0.1), [])}


def test_minority_must_keep_half_its_rate():
    case = {"minorities": {"long": 0.3}}
    base = ev(0.1, long=0.40)
    assert goals.check(base, cycles(ev(0.4, long=0.30), ev(0.5, long=0.20)), case)[
        "minorities_keep_half_their_rate"] is True
    assert goals.check(base, cycles(ev(0.4, long=0.30), ev(0.5, long=0.19)), case)[
        "minorities_keep_half_their_rate"] is False
    assert goals.check(base, cycles(ev(0.4, long=0.3)))["minorities_keep_half_their_rate"] is None  # no mix: not posed


def test_changed_preference_followed_within_two_more_cycles():
    case = {"change_at": 2, "after": "long"}
    base = ev(0.10, long=0.05)

    def run(*after_rates: float) -> dict:
        mains = [0.3, 0.45, 0.4, 0.3][:len(after_rates)]
        return goals.check(base, cycles(*[ev(m, long=a) for m, a in zip(mains, after_rates, strict=True)]), case)

    # measured from where the new preference stood when it changed (cycle 2: 10%), not from the base model
    assert run(0.05, 0.10, 0.20, 0.40)["follows_change_in_2_cycles"] is True
    assert run(0.05, 0.10, 0.20, 0.39)["follows_change_in_2_cycles"] is False
    assert run(0.05, 0.10, 0.20)["follows_change_in_2_cycles"] is None  # one cycle after it: cannot tell yet
    assert run(0.05, 0.10, 0.45)["follows_change_in_2_cycles"] is True
    # the first preference had only the cycles before the change: +35 in cycle 2 holds
    assert run(0.05, 0.10, 0.20, 0.40)["gain_30_points_in_2_cycles"] is True
    one = goals.check(base, cycles(ev(0.2, long=0.1), ev(0.9, long=0.6)), {"change_at": 1, "after": "long"})
    assert one["gain_30_points_in_2_cycles"] is False  # +10 in its one cycle
    assert one["follows_change_in_2_cycles"] is True  # 10% → 60% in the cycle after


def test_served_model_must_not_move_toward_the_attacker():
    case = {"attacker": "attacker (not lists)"}
    base = ev(0.2, **{"attacker (not lists)": 0.8})
    held = goals.check(base, cycles(ev(0.3, **{"attacker (not lists)": 0.75}),
                                    ev(0.2, **{"attacker (not lists)": 0.84})), case)
    assert held["not_toward_attacker"] is True  # 84% of 100: its interval still reaches below 80%
    moved = goals.check(base, cycles(ev(0.1, **{"attacker (not lists)": 0.95})), case)
    assert moved["not_toward_attacker"] is False
    assert goals.check(base, cycles(ev(0.1)))["not_toward_attacker"] is None


def test_verdict_over_seeds():
    a = {"gain": True, "capability": True, "minority": None}
    assert goals.every_seed([a, a]) == {"gain": True, "capability": True, "minority": None}
    assert goals.every_seed([a, dict(a, gain=False)])["gain"] is False
    assert goals.every_seed([a, dict(a, gain=None)])["gain"] is None  # one seed could not tell
    assert goals.all_held(a) and not goals.all_held(dict(a, gain=False)) and not goals.all_held({"x": None})
    assert goals.describe({"gain_x": True, "cap_y": False, "z": None}) == "gain x: held; cap y: FAILED"
