"""export_dpo on both engines: a pair only where one user's final ratings put 👍 and 👎 on sibling answers of the
same prompt; and the metadata (reason, comment) both TRL exports carry, from the final rating only."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pyarrow.parquet as pq
import pytest

from feedback_store import KTO_SCHEMA, FeedbackStore, InvalidInput
from feedback_store.files import DPO_SCHEMA

PROMPT = [{"role": "system", "content": "Be brief."}]


class Clock:
    def __init__(self) -> None:
        self.t = datetime(2025, 3, 1, 9, 0, 0)

    def __call__(self) -> datetime:
        self.t += timedelta(seconds=1)      # every write a second later: rated_at orders are exact
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


def siblings(store: FeedbackStore, question: str, texts: list[str], prompts: list[list[dict]] | None = None,
             owner: str = "alice") -> list[str]:
    """One user message and its answers (a first answer and regenerations), each with the given prompt."""
    conv = store.new_conversation(owner, system_prompt="Be brief.")
    msg = store.add_user_message(conv, question)
    prompt = [*PROMPT, {"role": "user", "content": question}]
    return [store.add_answer(conv, msg, (prompts[i] if prompts and prompts[i] else prompt), t)
            for i, t in enumerate(texts)]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def pairs_of(rows: list[dict]) -> set[tuple[str, str, str]]:
    return {(r["user_id"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows}


def test_a_pair_is_one_users_opposite_final_ratings_of_siblings(location, tmp_path, clock):
    with FeedbackStore(location, deployment="other", clock=clock) as other:   # another deployment's pair
        x1, x2 = siblings(other, "other?", ["x-good", "x-bad"])
        other.rate_many([("alice", x1, "up"), ("alice", x2, "down")])
    with FeedbackStore(location, deployment="prod", clock=clock) as store:
        a1, a2 = siblings(store, "plain?", ["a-good", "a-bad"])
        store.rate("alice", a1, "up", comment="clear")
        store.rate("alice", a2, "down", reason="wrong", comment="it is 4")
        store.rate("bob", a2, "up")                      # bob's opposite view of the same two answers
        store.rate("bob", a1, "down", reason="rude")
        b1, b2 = siblings(store, "two users?", ["b1", "b2"])
        store.rate("carol", b1, "up")                    # two users, one answer each: no pair
        store.rate("dave", b2, "down")
        c1, c2 = siblings(store, "same way?", ["c1", "c2"])
        store.rate_many([("erin", c1, "up"), ("erin", c2, "up")])
        d1, d2 = siblings(store, "changed?", ["d1", "d2"])
        store.rate_many([("frank", d1, "up"), ("frank", d2, "down")])
        store.rate("frank", d1, "down")                  # now both down: no pair
        e1, e2 = siblings(store, "changed back?", ["e-now-good", "e-bad"])
        store.rate("frank", e1, "down", reason="rude", comment="old view")
        store.rate("frank", e1, "up")                    # the old reason and comment go with the old thumb
        store.rate("frank", e2, "down", reason="wrong")
        f1, f2 = siblings(store, "withdrawn?", ["f1", "f2"])
        store.rate_many([("gina", f1, "up"), ("gina", f2, "down")])
        store.rate("gina", f2, None)
        g1, g2, g3 = siblings(store, "several?", ["g-up1", "g-up2", "g-down"])
        store.rate_many([("hank", g1, "up"), ("hank", g2, "up"), ("hank", g3, "down")])
        other_prompt = [{"role": "system", "content": "Be verbose."}, {"role": "user", "content": "context?"}]
        h1, h2 = siblings(store, "context?", ["h1", "h2"], prompts=[None, other_prompt])
        store.rate_many([("ivy", h1, "up"), ("ivy", h2, "down")])   # same parent, different context: no pair
        conv = store.new_conversation("judy")                        # different user messages: no pair
        k = [store.add_answer(conv, store.add_user_message(conv, "same words"), [{"role": "user",
                                                                                 "content": "same words"}], t)
             for t in ("k1", "k2")]
        store.rate_many([("judy", k[0], "up"), ("judy", k[1], "down")])

        info = store.export_dpo(tmp_path / "pairs.jsonl")
    rows = read_jsonl(info.path)
    assert pairs_of(rows) == {("alice", "a-good", "a-bad"), ("bob", "a-bad", "a-good"),
                              ("frank", "e-now-good", "e-bad"), ("hank", "g-up1", "g-down"),
                              ("hank", "g-up2", "g-down")}
    assert (info.n_pairs, info.n_chosen, info.n_rejected) == (5, 5, 4)
    by = {(r["user_id"], r["chosen"][0]["content"]): r for r in rows}
    alice = by[("alice", "a-good")]
    assert alice["prompt"] == [*PROMPT, {"role": "user", "content": "plain?"}]
    assert alice["chosen"] == [{"role": "assistant", "content": "a-good"}]
    assert (alice["chosen_answer_id"], alice["rejected_answer_id"]) == (a1, a2)
    assert (alice["chosen_reason"], alice["chosen_comment"]) == (None, "clear")
    assert (alice["rejected_reason"], alice["rejected_comment"]) == ("wrong", "it is 4")
    frank = by[("frank", "e-now-good")]
    assert (frank["chosen_reason"], frank["chosen_comment"]) == (None, None)
    assert frank["rejected_reason"] == "wrong"
    assert list(rows[0]) == DPO_SCHEMA.names
    rated = [datetime.fromisoformat(r["rated_at"]) for r in rows]
    assert rated == sorted(rated, reverse=True) and rated[0].tzinfo is not None


def test_dpo_since_limit_parquet_and_caps(location, tmp_path, clock):
    with FeedbackStore(location, clock=clock) as store:
        made = []
        for i in range(4):
            up, down = siblings(store, f"q{i}?", [f"good{i}", f"bad{i}"])
            store.rate_many([("alice", up, "up"), ("alice", down, "down")])
            made.append(clock.t)
        store.rate("alice", siblings(store, "q0?", ["other"])[0], "up")   # no rated sibling: no pair
        newest = store.export_dpo(tmp_path / "two.jsonl", max_examples=2)
        assert [r["chosen"][0]["content"] for r in read_jsonl(newest.path)] == ["good3", "good2"]
        since = store.export_dpo(tmp_path / "since.jsonl", since=made[1])
        assert pairs_of(read_jsonl(since.path)) == {("alice", "good2", "bad2"), ("alice", "good3", "bad3")}

        pq_info = store.export_dpo(tmp_path / "pairs.parquet")
        table = pq.read_table(pq_info.path)
        assert table.schema.equals(DPO_SCHEMA) and table.num_rows == 4
        as_json = read_jsonl(store.export_dpo(tmp_path / "pairs.jsonl").path)
        for r in as_json:
            r["rated_at"] = datetime.fromisoformat(r["rated_at"])
        assert table.to_pylist() == as_json                  # one content, two encodings

        up, down = siblings(store, "bob?", ["bob-good", "bob-bad"])
        store.rate_many([("bob", up, "up"), ("bob", down, "down")])
        capped = store.export_dpo(tmp_path / "capped.jsonl", max_user_share=0.5)   # alice keeps her newest one
        assert pairs_of(read_jsonl(capped.path)) == {("bob", "bob-good", "bob-bad"), ("alice", "good3", "bad3")}
        assert capped.caps["dropped_by_user"] == {"alice": 3}
        with pytest.raises(InvalidInput, match="jsonl or .parquet"):
            store.export_dpo(tmp_path / "pairs.csv")
        with pytest.raises(InvalidInput, match="max_examples"):
            store.export_dpo(tmp_path / "pairs.jsonl", max_examples=-1)


def test_kto_export_carries_the_final_ratings_reason_and_comment(location, tmp_path, clock):
    with FeedbackStore(location, clock=clock) as store:
        good, bad = siblings(store, "q?", ["good", "bad"])
        store.rate("alice", good, "down", reason="rude", comment="first look")
        store.rate("alice", good, "up", comment="on second thought, fine")
        store.rate("alice", bad, "down", reason="wrong")
        jsonl = read_jsonl(store.export_kto(tmp_path / "kto.jsonl").path)
        table = pq.read_table(store.export_kto(tmp_path / "kto.parquet").path)
    assert table.schema.equals(KTO_SCHEMA) and KTO_SCHEMA.names[:3] == ["prompt", "completion", "label"]
    got = {r["answer_id"]: (r["label"], r["user_id"], r["reason"], r["comment"]) for r in jsonl}
    assert got == {good: (True, "alice", None, "on second thought, fine"), bad: (False, "alice", "wrong", None)}
    first = table.column("rated_at").to_pylist()[0]
    assert first == datetime.fromisoformat(jsonl[0]["rated_at"]) and first.utcoffset() == timedelta(0)
