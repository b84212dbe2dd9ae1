import math
from pathlib import Path

import pytest

from app.loop.gate import Attempt, Candidate, _without, decide, rater_check, should_promote, sign_test_p


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


# ---------------------------------------------------------------- rater check (hand-made manifests)

def held(rows, served=False):
    """Held-out metrics shaped like the aligner's manifest from (rater, desirable, reward) rows."""
    from statistics import mean

    def block(rs):
        d = [r for _, up, r in rs if up]
        u = [r for _, up, r in rs if not up]
        return {"n_desirable": len(d), "n_undesirable": len(u), "reward_desirable": mean(d) if d else None,
                "reward_undesirable": mean(u) if u else None}

    out = block(rows)
    out["margin"] = (out["reward_desirable"] - out["reward_undesirable"]
                     if out["n_desirable"] and out["n_undesirable"] else None)
    out["frac_correct_side"] = 0.5
    out["per_rater"] = {who: dict(block([r for r in rows if r[0] == who]), n=sum(r[0] == who for r in rows))
                        for who in sorted({r[0] for r in rows})}
    return out


HONEST = [(w, up, 0.0) for w in ("ann", "bob", "cy") for up in (True, False)]


def test_a_gain_that_rests_on_one_rater_is_refused():
    """Mallory's four held-out answers carry the whole gain; the three honest raters' answers did not move."""
    mallory = [("mallory", True, 6.0), ("mallory", True, 6.0), ("mallory", False, -6.0), ("mallory", False, -6.0)]
    new, served = held(HONEST + mallory), held([(w, up, 0.0) for w, up, _ in HONEST + mallory])
    assert should_promote(new, served, 0.0)[0]  # the margin test alone would serve it
    ok, reason, rec = rater_check(new, served, 0.0)
    assert not ok and reason == ("not promoted: the held-out gain rests on one rater: without mallory's 4 of 10 "
                                 "held-out answers it is +0.0000, not above +0.0000")
    assert rec["most_influential"] == "mallory" and rec["raters"] == 4 and rec["gain"] == pytest.approx(4.8)
    assert rec["gain_without"] == pytest.approx(0.0) and not rec["ok"]


def test_a_gain_shared_by_the_raters_passes_and_is_recorded():
    rows = [(w, up, (1.0 if up else -1.0) * (1 + i)) for i, w in enumerate(("ann", "bob", "cy"))
            for up in (True, False)]
    new, served = held(rows), held([(w, up, 0.0) for w, up, _ in rows])
    ok, reason, rec = rater_check(new, served, 0.5)
    assert ok and reason == ""
    # cy moved most (±3): without cy's answers the gain is the mean of ann's and bob's, 2 × 1.5 = 3.0
    assert rec["most_influential"] == "cy" and rec["gain_without"] == pytest.approx(3.0) and rec["ok"]


def test_nothing_served_compares_against_the_base_model():
    rows = [("ann", True, 0.1), ("ann", False, -0.1), ("bob", True, 2.0), ("bob", False, -2.0)]
    ok, reason, rec = rater_check(held(rows), None, 0.5)
    assert not ok and "without bob's 2 of 4" in reason and rec["gain_without"] == pytest.approx(0.2)
    assert rater_check(held(rows), None, 0.1)[0]


def test_a_rater_who_held_a_whole_class_leaves_that_class_score():
    """Ann gave every held-out thumbs-up, Bob every thumbs-down: without one of them the gate compares the other
    class's rewards (as should_promote does for a one-class held-out set)."""
    rows = [("ann", True, 1.0), ("ann", True, 1.0), ("bob", False, -0.5)]
    ok, _, rec = rater_check(held(rows), held([(w, up, 0.0) for w, up, _ in rows]), 0.0)
    assert rec["most_influential"] == "ann" and rec["gain_without"] == pytest.approx(0.5) and ok
    only = [("ann", True, 1.0), ("ann", True, 1.0), ("bob", True, -1.0)]  # one class; without ann, bob's −1
    ok, reason, rec = rater_check(held(only), held([(w, up, 0.0) for w, up, _ in only]), 0.0)
    assert not ok and rec["most_influential"] == "ann" and rec["gain_without"] == pytest.approx(-1.0)


def test_a_rater_with_one_heldout_answer_is_not_left_out():
    """Twenty honest one-answer raters whose answers moved slightly the wrong way and zed's one answer that moved
    far the right way (the flipped-thumbs run's shape): the small gain rests on one answer, which says nothing
    about zed's taste, so the check leaves zed in; a second answer from zed makes it a rater's gain, refused."""
    crowd = [(f"u{i:02d}", i % 2 == 0, -0.1 if i % 2 == 0 else 0.1) for i in range(20)]
    zed = [("zed", True, 6.0)]
    base = [(w, up, 0.0) for w, up, _ in crowd + zed]
    new, served = held(crowd + zed), held(base)
    assert should_promote(new, served, 0.0)[0] and _without(new, "zed")["margin"] < 0
    assert rater_check(new, served, 0.0) == (True, "", None)
    ok, reason, rec = rater_check(held(crowd + zed + zed), held(base + [("zed", True, 0.0)]), 0.0)
    assert not ok and "without zed's 2 of 22 held-out answers" in reason
    assert rec["raters"] == 21 and rec["judged"] == 1


def test_no_breakdown_or_a_single_rater_is_not_judged():
    assert rater_check(m(1.0), m(0.0), 0.0) == (True, "", None)  # manifests from before the breakdown
    one = held([("ann", True, 1.0), ("ann", False, -1.0)])
    assert rater_check(one, None, 0.0) == (True, "", None)
    assert rater_check(None, None, 0.0) == (True, "", None)


def test_the_aligners_breakdown_matches_a_recount_without_the_rater():
    """aligner.evaluate's per-rater numbers, taken out by the gate, equal the metrics computed without that rater."""
    import torch

    from aligner.evaluate import heldout_metrics
    from app.loop.gate import _without

    raters = ["ann", "bob", "ann", "cy", "bob", "cy", "ann"]
    rewards = torch.tensor([0.5, -1.0, 2.0, 0.25, 1.5, -0.75, -2.0])
    desirable = torch.tensor([True, False, True, True, True, False, False])
    full = heldout_metrics(rewards, rewards.roll(1), desirable, 0.1, 1.0, 1.0, raters)
    assert full["per_rater"]["ann"] == {"n": 3, "n_desirable": 2, "n_undesirable": 1, "reward_desirable": 1.25,
                                        "reward_undesirable": -2.0, "frac_correct_side": pytest.approx(1.0)}
    keep = [i for i, r in enumerate(raters) if r != "ann"]
    alone = heldout_metrics(rewards[keep], rewards[keep].roll(1), desirable[keep], 0.1, 1.0, 1.0)
    assert _without(full, "ann")["margin"] == pytest.approx(alone["margin"])
    with pytest.raises(ValueError, match="2 raters for 7"):
        heldout_metrics(rewards, rewards, desirable, 0.1, 1.0, 1.0, ["ann", "bob"])


# ---------------------------------------------------------------- checkpoint fallback (decide)

def test_decide_refuses_on_the_rater_check_before_loading_and_falls_back_to_a_checkpoint(tmp_path):
    mallory = [("mallory", True, 6.0), ("mallory", False, -6.0)]
    served = held([(w, up, 0.0) for w, up, _ in HONEST + mallory])
    broad = [(w, up, 1.0 if up else -1.0) for w, up, _ in HONEST] + [("mallory", True, 1.0), ("mallory", False, -1.0)]
    cands = [Candidate("final", None, tmp_path, held(HONEST + mallory)),
             Candidate("step 2/3", 2, tmp_path / "c2", None, pending=True),
             Candidate("step 1/3", 1, tmp_path / "c1", None, pending=True)]
    loaded, evaluated = [], []

    def evaluate(pending):
        evaluated.append([c.name for c in pending])
        for c in pending:
            c.pending, c.heldout_new = False, held(broad if c.step == 1 else HONEST + mallory)

    def attempt(cand):
        loaded.append(cand.name)
        return Attempt(f"kto-v{len(loaded)}")

    res = decide(cands, {"heldout": {"served": served}}, 0.0, attempt, evaluate)
    assert loaded == ["step 1/3"] and evaluated == [["step 2/3", "step 1/3"]]  # evaluated once, loaded once
    assert res.promoted and res.version == "kto-v1" and res.promoted_checkpoint["step"] == 1
    assert [(v["candidate"], v["promoted"]) for v in res.candidates] == [
        ("final", False), ("step 2/3", False), ("step 1/3", True)]
    assert res.candidates[0]["reason"].startswith("not promoted: the held-out gain rests on one rater: without "
                                                  "mallory's")
    assert res.reason.endswith(f"[checkpoint step 1/3 of the run; the final adapter was refused: "
                               f"{res.candidates[0]['reason']}]")
    assert res.rater_check["ok"] and res.candidates[0]["rater_check"]["most_influential"] == "mallory"


def test_decide_records_a_capability_refusal_of_every_candidate():
    guard = {"candidate": "kto-v3", "candidate_correct": 6, "served_correct": 10, "n": 10}
    cands = [Candidate("final", None, Path("f"), m(1.0)), Candidate("step 1/2", 1, Path("c"), m(0.5))]
    res = decide(cands, {"heldout": {"served": None}}, 0.0,
                 lambda c: Attempt(None, f"not promoted: probe {c.name}", guard), lambda p: None)
    assert not res.promoted and res.version is None and res.capability_guard == guard
    assert res.reason == "not promoted: probe final (so were the run's 1 earlier checkpoint)"
    assert [v["version"] for v in res.candidates] == ["kto-v3", "kto-v3"]  # the name each was loaded under


def test_a_promotion_says_what_the_capability_guard_and_its_loop_check_counted():
    guard = {"candidate": "kto-v1", "candidate_correct": 10, "served_correct": 10, "n": 10}
    looped = {**guard, "candidate_loops": 3, "floor_loops": 2, "floor_model": "base", "loops_n": 64}
    for record, tail in [(guard, "capability probe 10/10 (served 10/10)"),
                         (looped, "capability probe 10/10 (served 10/10); loops on 3/64 open prompts (2 for base)")]:
        res = decide([Candidate("final", None, Path("f"), m(1.0))], {"heldout": {"served": None}}, 0.0,
                     lambda c, r=record: Attempt("kto-v1", None, r), lambda p: None)
        assert res.promoted and res.reason.endswith(tail), res.reason
