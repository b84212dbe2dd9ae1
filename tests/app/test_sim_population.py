"""Who rates in a simulation: noise, rating probability, a mix, a changed preference and an attacker, as pure
wrappers and draws, and collection through the real ChatService and store with identities and addresses."""

from __future__ import annotations

import pytest

from app.sim import population as pop
from app.sim import run as sim
from app.sim.inputs import SimulationError


def likes_lists(prompt: str, answer: str) -> bool | None:
    return answer.startswith("- ")


def likes_long(prompt: str, answer: str) -> bool | None:
    return None if "haiku" in prompt else len(answer.split()) > 20


ANSWERS = [(f"prompt {i % 7}", f"answer number {i}") for i in range(4000)]


def test_draws_are_fixed_by_their_inputs_and_spread_evenly():
    assert pop.draw(0, "flip", "p", "a") == pop.draw(0, "flip", "p", "a")
    assert pop.draw(0, "flip", "p", "a") != pop.draw(1, "flip", "p", "a") != pop.draw(0, "rate", "p", "a")
    xs = [pop.draw(3, i) for i in range(4000)]
    assert all(0 <= x < 1 for x in xs)
    quarters = [sum(a <= x < a + 0.25 for x in xs) / 4000 for a in (0, 0.25, 0.5, 0.75)]
    assert quarters == pytest.approx([0.25] * 4, abs=0.03)


def test_flipped_turns_over_that_share_of_thumbs_and_leaves_skips_alone():
    always_up = pop.flipped(lambda p, a: True, 0.2, seed=7)
    verdicts = [always_up(p, a) for p, a in ANSWERS]
    assert sum(v is False for v in verdicts) / len(verdicts) == pytest.approx(0.2, abs=0.025)
    assert verdicts == [always_up(p, a) for p, a in ANSWERS]  # seeded: the same run replays
    assert verdicts != [pop.flipped(lambda p, a: True, 0.2, seed=8)(p, a) for p, a in ANSWERS]
    assert all(pop.flipped(lambda p, a: True, 0.0, seed=1)(p, a) for p, a in ANSWERS[:50])
    assert not any(pop.flipped(lambda p, a: True, 1.0, seed=1)(p, a) for p, a in ANSWERS[:50])
    assert pop.flipped(lambda p, a: None, 1.0, seed=1)("p", "a") is None


def test_sometimes_rates_that_share_of_answers():
    third = pop.sometimes(lambda p, a: True, 0.33, seed=0)
    verdicts = [third(p, a) for p, a in ANSWERS]
    assert sum(v is True for v in verdicts) / len(verdicts) == pytest.approx(0.33, abs=0.025)
    assert set(verdicts) == {True, None}
    assert all(pop.sometimes(lambda p, a: False, 1.0, seed=0)(p, a) is False for p, a in ANSWERS[:50])


def test_opposite_reverses_the_preference():
    rev = pop.opposite(likes_long)
    assert rev("q", "short") is True and rev("q", "word " * 30) is False and rev("a haiku", "x") is None


def test_population_draws_groups_by_share_and_gives_attackers_few_identities_one_address():
    case = pop.Case(("lists", likes_lists), (("long", likes_long, 0.3),), attacker_share=0.2, attacker_identities=5,
                    flip=0.3)
    p = case.population(1, seed=4)
    assert [(g.name, round(g.share, 3)) for g in p.groups] == [("lists", 0.56), ("long", 0.24), ("attacker", 0.2)]
    users = [p.user(i, "t") for i in range(3000)]
    share = {g: sum(u.group == g for u in users) / len(users) for g in ("lists", "long", "attacker")}
    assert share == pytest.approx({"lists": 0.56, "long": 0.24, "attacker": 0.2}, abs=0.03)
    attackers = [u for u in users if u.group == "attacker"]
    honest = [u for u in users if u.group != "attacker"]
    assert {u.user_id for u in attackers} == {f"sim-attacker-{k}" for k in range(5)}
    assert {u.addr for u in attackers} == {pop.ATTACKER_ADDR}
    assert len({u.user_id for u in honest}) == len({u.addr for u in honest}) == len(honest)  # many real users
    # the attacker rates exactly the opposite of the honest main preference: no noise on it
    assert all(u.rater("q", "- a list") is False and u.rater("q", "prose") is True for u in attackers[:100])
    # honest users carry the label noise: about 30% of one answer's thumbs come out reversed
    flips = [u.rater("q", "- a list") is False for u in honest if u.group == "lists"]
    assert sum(flips) / len(flips) == pytest.approx(0.3, abs=0.05)
    again = [p.user(i, "t") for i in range(200)]  # pure: the same chat is the same user with the same verdicts
    assert [(u.group, u.user_id, u.addr, u.rater("q", "- a")) for u in again] == \
        [(u.group, u.user_id, u.addr, u.rater("q", "- a")) for u in users[:200]]


def test_a_changed_preference_takes_over_after_its_cycle():
    case = pop.Case(("lists", likes_lists), change_at=2, after=("long", likes_long))
    assert [case.population(c, 0).groups[0].name for c in (1, 2, 3, 4)] == ["lists", "lists", "long", "long"]
    attacked = pop.Case(("lists", likes_lists), change_at=1, after=("long", likes_long), attacker_share=0.5)
    assert attacked.population(2, 0).groups[-1].rater("q", "- a list") is False  # its agenda does not change
    assert list(case.measured()) == ["lists", "long"]
    assert case.describe()["change_at"] == 2 and case.describe()["after"] == "long"


def test_case_measures_every_preference_cleanly_and_names_itself():
    case = pop.Case(("lists", likes_lists), (("long", likes_long, 0.3),), flip=0.4, rate_prob=0.5,
                    attacker_share=0.3, attacker_identities=50)
    m = case.measured()
    assert list(m) == ["lists", "long", "attacker (not lists)"]
    assert m["lists"] is likes_lists and m["long"] is likes_long  # no noise in what is measured
    assert m["attacker (not lists)"]("q", "- x") is False
    assert case.name == "lists70+long30"
    d = case.describe()
    assert d["minorities"] == {"long": 0.3} and d["attacker"] == "attacker (not lists)"
    assert d["attacker_identities"] == 50 and d["flip"] == 0.4 and d["rate_prob"] == 0.5
    assert pop.Case(("lists", likes_lists)).describe()["attacker"] is None
    assert pop.max_answers(400, case) == 2400 and pop.max_answers(400, pop.Case(("l", likes_lists))) == 1200


@pytest.mark.parametrize("kwargs,says", [
    ({"flip": 0.5}, "--flip"), ({"flip": -0.1}, "--flip"), ({"rate_prob": 0.0}, "--rate-prob"),
    ({"rate_prob": 1.5}, "--rate-prob"), ({"change_at": 2}, "go together"),
    ({"after": ("long", likes_long)}, "go together"), ({"attacker_share": 1.0}, "--attacker-share"),
    ({"attacker_share": 0.2, "attacker_identities": 0}, "--attacker-identities"),
    ({"change_at": 1, "after": ("lists", likes_long)}, "must differ"),
])
def test_case_refuses_bad_options(kwargs, says):
    with pytest.raises(SimulationError, match=says):
        pop.Case(("lists", likes_lists), **kwargs)


def test_parse_mix():
    assert pop.parse_mix("concise:0.7,bullets:0.3") == [("concise", 0.7), ("bullets", 0.3)]
    assert pop.parse_mix("app.sim.raters:plain:0.5, my.py:f:0.5") == [("app.sim.raters:plain", 0.5), ("my.py:f", 0.5)]
    for bad, says in [("concise:0.7", "at least two"), ("concise:0.7,bullets:0.2", "sum to 1"),
                      ("concise,bullets:1", "RATER:SHARE"), ("concise:x,bullets:0.3", "RATER:SHARE"),
                      ("concise:1.0,bullets:0", "RATER:SHARE"), ("a:0.5,a:0.5", "twice")]:
        with pytest.raises(SimulationError, match=says):
            pop.parse_mix(bad)


def test_shares_of_a_snapshot():
    users = ["sim-attacker-0"] * 3 + ["sim-attacker-1"] * 2 + [f"sim-x-{i}" for i in range(15)]
    s = pop.shares(users)
    assert s["n"] == 20 and s["attacker_share"] == 0.25
    assert (s["top_identity"], s["top_identity_share"]) == ("sim-attacker-0", 0.15)
    assert pop.shares([])["attacker_share"] is None
    assert pop.shares(["a", "b"], ["1.2.3.4", "1.2.3.4"])["top_address_share"] == 1.0


# ---------------------------------------------------------------- collection with identities and addresses


class CannedClient:
    """Stands in for vLLM only: a list when the prompt says 'list', else a long sentence."""

    def stream_chat(self, messages, model, sampling, kind="user"):
        yield "- a\n- b\n- c" if "list" in messages[-1]["content"] else "word " * 30


class Registry:
    def current(self) -> str:
        return "base"


@pytest.fixture
def store(tmp_path):
    from feedback_store import FeedbackStore

    s = FeedbackStore(tmp_path / "f.duckdb")
    yield s
    s.close()


def service_for(store, ratings_per_minute: int = 1000):
    from app.web.chat import ChatService

    return ChatService(store, CannedClient(), Registry(), system_prompt=lambda: "", sampling=lambda: {},
                       max_chars=4000, ratings_per_minute=ratings_per_minute)


def test_collect_through_a_population_records_who_rated(store, tmp_path):
    case = pop.Case(("lists", likes_lists), (("long", likes_long, 0.4),), attacker_share=0.3, attacker_identities=4)
    prompts = ["give me a list", "explain tides", "another list", "why is the sky blue"]
    stats, _ = sim.collect(service_for(store), prompts, case.population(1, seed=0), 60, cursor=0, tag="t",
                           workers=4)
    assert stats["ratings"] == 60 and stats["up"] + stats["down"] == 60
    groups = stats["by_group"]
    assert set(groups) == {"lists", "long", "attacker"}
    assert sum(g["up"] + g["down"] for g in groups.values()) == 60
    snap = tmp_path / "snap.parquet"
    store.export_snapshot(snap)
    src = sim.snapshot_sources(snap)
    n_attacker = groups["attacker"]["up"] + groups["attacker"]["down"]
    assert src["n"] == 60 and src["attacker_share"] == pytest.approx(n_attacker / 60) and n_attacker > 5
    # the attacker rated the opposite of the honest main preference on every answer it got
    import pyarrow.parquet as pq

    rows = pq.read_table(snap).to_pylist()
    for r in rows:
        if r["user_id"].startswith("sim-attacker-"):
            assert r["label"] is (not r["completion"].startswith("- "))
    assert sim.snapshot_sources(tmp_path / "absent.parquet") == {}


def test_collect_counts_refused_ratings_instead_of_stopping(store):
    """One attacker identity rating fast hits the per-identity rating budget: counted as refused, collection goes on
    with the honest users."""
    case = pop.Case(("lists", likes_lists), attacker_share=0.5, attacker_identities=1)
    stats, _ = sim.collect(service_for(store, ratings_per_minute=3), ["a list", "prose"],
                           case.population(1, seed=0), 40, cursor=0, tag="t", workers=4)
    assert stats["ratings"] == 40 and stats["refused"] > 0
    assert stats["by_group"]["attacker"]["refused"] == stats["refused"]
    assert stats["by_group"]["attacker"]["up"] + stats["by_group"]["attacker"]["down"] == 3


def test_collect_counts_refused_chats_instead_of_stopping(store):
    """The attacker's one address runs out of its message budget: those chats are refused and counted."""
    from app.web.chat import ChatService, Limits

    service = ChatService(store, CannedClient(), Registry(), system_prompt=lambda: "", sampling=lambda: {},
                          max_chars=4000, ratings_per_minute=1000, limits=Limits(address_messages_per_minute=2))
    case = pop.Case(("lists", likes_lists), attacker_share=0.5, attacker_identities=10)
    stats, _ = sim.collect(service, ["a list", "prose"], case.population(1, seed=0), 30, cursor=0, tag="t",
                           workers=4)
    attacker = stats["by_group"]["attacker"]
    assert stats["ratings"] == 30 and attacker["refused"] > 0 and attacker["up"] + attacker["down"] == 2
    assert stats["answers"] == 30 + stats["refused"] + stats["not_rated"]


def test_collect_with_rating_probability_still_fills_the_cycle(store):
    case = pop.Case(("lists", likes_lists), rate_prob=0.25)
    stats, cursor = sim.collect(service_for(store), ["a list", "prose"], case.population(1, seed=1), 30, cursor=0,
                                tag="t", workers=4, max_answers=pop.max_answers(30, case))
    assert stats["ratings"] == 30 and stats["not_rated"] > 30  # about three unrated answers for each rating
    assert cursor == stats["answers"] == 30 + stats["not_rated"]
