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


def attacked_run(base_up: int, final_up: int, n: int = 100, name: str = "attacker (not lists)") -> dict:
    """One repeat's record: the attacker's held-out thumbs-up counts at base and after its one cycle."""
    def m(k: int) -> dict:
        return {"desirable_rate": 0.5, "by_rater": {name: {"desirable_rate": k / n, "ci95": list(wilson(k, n)),
                                                            "n_up": k, "n_rated": n}}}
    return {"case": {"attacker": name}, "base": m(base_up), "cycles": [{"eval": m(final_up)}]}


def test_pooled_over_seeds_shows_a_movement_each_seed_alone_cannot():
    runs = [attacked_run(33, 40) for _ in range(5)]
    for r in runs:  # each seed alone: 40 of 100 has an interval reaching below 33%, so "not moved"
        assert goals.check(r["base"], r["cycles"], r["case"])["not_toward_attacker"] is True
    pooled = goals.pooled_toward_attacker(runs)
    assert [c["n_up"] for c in pooled["by_cycle"]] == [165, 200] and pooled["by_cycle"][1]["n_rated"] == 500
    assert pooled["moved_toward_attacker"] is True and pooled["runs_toward_attacker"] == 5
    still = goals.pooled_toward_attacker([attacked_run(33, 35) for _ in range(4)] + [attacked_run(33, 30)])
    assert still["moved_toward_attacker"] is False and still["runs_toward_attacker"] == 4
    # no single attacker, or a record without counts: no pooled verdict
    assert goals.pooled_toward_attacker([attacked_run(33, 40), attacked_run(33, 40, name="other")]) is None
    bare = attacked_run(33, 40)
    del bare["base"]["by_rater"]["attacker (not lists)"]["n_up"]
    assert goals.pooled_toward_attacker([bare, attacked_run(33, 40)]) is None


def test_repeats_carry_the_pooled_verdict_and_the_printout_says_it():
    from app.sim import report

    runs = []
    for seed in range(3):
        r = attacked_run(30, 40) | {"rater": "lists", "seed": seed}
        r["cycles"][0].update(promoted=True, cycle_seconds=100.0)
        r["base"].update(capability_accuracy=1.0)
        r["cycles"][0]["eval"].update(capability_accuracy=1.0)
        r["summary"] = report.summarize(r["base"], r["cycles"], r["case"])
        runs.append(r)
    (group,) = report.repeats(runs)
    assert group["attacker_pooled"]["moved_toward_attacker"] is True  # 120/300 vs 30%: interval 34.6–45.6%
    lines = report.summary_lines({"runs": runs, "repeats": [group]})
    assert ("  attacker (not lists), pooled over 3 repeats: 30.0% → 40.0% (last 95% interval 34.6%–45.6%): "
            "moved toward the attacker; higher at the end in 3 of 3") in lines
    assert report.repeats(runs[:1])[0]["attacker_pooled"] is None  # one run: its own goal says it
