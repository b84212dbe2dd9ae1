"""Share caps on the training snapshot, and the client address they group by, on a real DuckDB file and a real
PostgreSQL database."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from datetime import datetime, timedelta

import pyarrow.parquet as pq
import pytest

from feedback_store import FeedbackStore, InvalidInput, InvalidRating
from feedback_store.caps import cap_shares, share_cap


def _clock():
    t = itertools.count()
    return lambda: datetime(2026, 1, 1) + timedelta(seconds=next(t))


def _answers(store: FeedbackStore, n: int) -> list[str]:
    conv = store.new_conversation("host")
    msg = store.add_user_message(conv, "hi")
    return [store.add_answer(conv, msg, [{"role": "user", "content": "hi"}], f"answer {i}") for i in range(n)]


# ---------------------------------------------------------------- the pure rule
@pytest.mark.parametrize("counts,share,singles", [
    ([100, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 0.1, 0), ([50, 40, 30, 5, 5, 5, 5, 5, 5, 5, 5, 5], 0.1, 0),
    ([1000], 0.2, 40), ([7, 7, 7, 7, 7], 0.2, 0), ([300, 200, 100] + [3] * 30, 0.05, 10)])
def test_share_cap_is_the_largest_count_that_keeps_every_group_under_the_share(counts, share, singles):
    c = share_cap(counts, share, singles)
    kept = [min(n, c) for n in counts] if c is not None else counts
    total = sum(kept) + singles
    assert max(kept) <= share * total + 1e-9
    if c is not None:   # one more row per capped group would break the share
        assert c + 1 > share * (sum(min(n, c + 1) for n in counts) + singles)


def test_share_cap_needs_nothing_when_no_group_is_over_and_cannot_apply_to_too_few_groups():
    assert share_cap([5, 5, 5, 5], 0.25) is None           # every group already at its share
    assert share_cap([100, 1], 0.1) is None                 # 2 groups cannot each hold <= 10 %


def test_cap_shares_keeps_each_over_cap_rater_s_most_recent_rows_and_reports_the_rest():
    users = ["eve"] * 30 + [f"u{i}" for i in range(20)]     # newest first: eve's first rows are her newest
    addrs = [None] * 50
    keep, report = cap_shares(users, addrs, 0.1, None)
    kept_eve = [i for i, u in enumerate(users) if u == "eve" and keep[i]]
    assert kept_eve == list(range(len(kept_eve)))            # a prefix: the most recent
    assert len(kept_eve) <= 0.1 * sum(keep) and report.user_cap == len(kept_eve)
    assert report.dropped_by_user == {"eve": 30 - len(kept_eve)} and report.n_kept == sum(keep)


def test_cap_shares_holds_both_caps_at_once_on_random_populations():
    rng = random.Random(7)
    for _ in range(50):
        n = rng.randint(50, 400)
        users = [f"u{min(int(rng.paretovariate(1.2)), 40)}" for _ in range(n)]
        addrs = [rng.choice([None, "10.0.0.1", "10.0.0.2"] + [f"a{i}" for i in range(20)]) for _ in range(n)]
        us, as_ = rng.choice([0.05, 0.1, 0.3]), rng.choice([0.1, 0.2, None])
        keep, report = cap_shares(users, addrs, us, as_)
        total = sum(keep)
        for keys, share, name in ((users, us, "user"), (addrs, as_, "addr")):
            if share is None or any(name in why for why in report.inactive):
                continue
            per = Counter(k for k, ok in zip(keys, keep, strict=True) if ok and k is not None)
            assert not per or max(per.values()) <= share * total + 1e-9
        dropped = sum(report.dropped_by_user.values()) + sum(report.dropped_by_addr.values())
        assert dropped == n - total == report.n_candidates - report.n_kept
        assert cap_shares(users, addrs, us, as_)[0] == keep          # deterministic


# ---------------------------------------------------------------- the store
def test_ratings_record_the_client_address_of_every_change(location):
    with FeedbackStore(location, clock=_clock()) as s:
        a, b, c = _answers(s, 3)
        s.rate("ann", a, "up", client_addr="203.0.113.7")
        s.rate_async("bob", a, "down", client_addr="2001:db8::1").result()
        s.rate_many([("cy", b, "up", None, None, "198.51.100.2"),
                     {"user_id": "dee", "answer_id": c, "value": "up", "client_addr": "198.51.100.3"}])
        s.rate("eli", c, "up")
        got = {r[0]: r[1] for r in s._read("SELECT user_id, client_addr FROM ratings")}
        assert got == {"ann": "203.0.113.7", "bob": "2001:db8::1", "cy": "198.51.100.2", "dee": "198.51.100.3",
                       "eli": None}
        s.rate("ann", a, "down", client_addr="192.0.2.9")       # a change from another network
        rid = s.get_rating("ann", a)["id"]
        assert [(h["value"], h["client_addr"]) for h in s.rating_history(rid)] == [
            ("up", "203.0.113.7"), ("down", "192.0.2.9")]
        assert s.get_rating("ann", a)["client_addr"] == "192.0.2.9"
        with pytest.raises(InvalidRating):
            s.rate("ann", a, "up", client_addr="")
    with FeedbackStore(location) as s:            # the cache and the file agree after reopening
        s.rate("ann", a, "up", client_addr="192.0.2.10")
        assert s.get_rating("ann", a)["client_addr"] == "192.0.2.10"


def _flood(s: FeedbackStore, n_honest: int = 40, n_sybils: int = 100) -> None:
    """40 honest raters on their own addresses, then 100 minted identities from one address, 3 ratings each."""
    answers = _answers(s, 60)
    s.rate_many([(f"h{i}", answers[i % 60], "up" if i % 3 else "down", None, None, f"10.1.0.{i}")
                 for i in range(n_honest)])
    s.rate_many([(f"sybil{i}", answers[(i + j) % 60], "down", None, None, "203.0.113.66")
                 for i in range(n_sybils) for j in range(3)])


def test_one_address_minting_100_identities_stays_under_the_address_cap(location, tmp_path):
    """The attack the per-identity cap cannot see: every sybil identity is small, their address is not."""
    with FeedbackStore(location, clock=_clock(), max_addr_share=0.2) as s:
        _flood(s)
        run = s.start_run("cli")
        info = s.export_snapshot(tmp_path / "snap.parquet", run_id=run)
        table = pq.read_table(tmp_path / "snap.parquet")
        sybil = sum(u.startswith("sybil") for u in table.column("user_id").to_pylist())
        assert 0 < sybil <= 0.2 * table.num_rows
        assert info.caps["dropped_by_addr"] == {"203.0.113.66": 300 - sybil}
        assert s.get_run(run)["snapshot_caps"]["dropped_by_addr"] == {"203.0.113.66": 300 - sybil}
        assert sorted(s.run_examples(run)) == sorted(table.column("example_id").to_pylist())
        assert s.training_counts() == (info.n_desirable, info.n_undesirable)
        assert "client_addr" not in table.column_names and "user_id" in table.column_names
        # without the cap the attacker is 300 of 340 examples
        assert s.training_counts(max_addr_share=None) == (26, 314)


def test_caps_are_off_by_default_and_per_call_overrides_the_store_setting(location):
    with FeedbackStore(location, clock=_clock()) as s:
        _flood(s)
        assert sum(s.training_counts()) == 340
        assert s.snapshot_table(max_user_share=None, max_addr_share=0.2).num_rows < 340
        s.set_share_caps(None, 0.2)
        assert sum(s.training_counts()) == s.snapshot_table().num_rows < 340
        with pytest.raises(InvalidInput):
            s.set_share_caps(1.5, None)
        with pytest.raises(InvalidInput):
            s.training_counts(max_user_share=0)


def test_snapshot_shares_lists_the_top_contributors_and_what_the_cap_drops(location):
    with FeedbackStore(location, clock=_clock()) as s:
        _flood(s)
        got = s.snapshot_shares(top=3, max_addr_share=0.2)
        json.dumps(got)                                           # the console can send it as is
        top = got["top_addrs"][0]
        assert top["client_addr"] == "203.0.113.66" and top["dropped"] == got["dropped_by_addr"]["203.0.113.66"]
        assert top["share"] <= 0.2 + 1e-9 and got["n_kept"] == got["n_candidates"] - top["dropped"]
        assert len(got["top_users"]) == 3 and all(u["share"] <= 3 / got["n_kept"] + 1e-9 for u in got["top_users"])
        open_ = s.snapshot_shares(max_addr_share=None)
        assert open_["top_addrs"][0]["share"] == pytest.approx(300 / 340) and open_["n_dropped"] == 0


def test_too_few_addresses_leave_the_cap_inactive_and_say_so(location):
    """A team behind one proxy: one address cannot be capped to 20 %, and dropping nearly everything would
    stop training; the report says why the cap did not apply."""
    with FeedbackStore(location, clock=_clock(), max_addr_share=0.2) as s:
        a = _answers(s, 5)
        s.rate_many([(f"u{i}", a[i % 5], "up", None, None, "10.0.0.1") for i in range(30)])
        got = s.snapshot_shares()
        assert got["n_kept"] == 30 and got["inactive"] and "needs at least 5" in got["inactive"][0]
