"""Snapshot validation, tokenisation (completion + end-of-turn only), truncation, held-out split, the plan."""

from __future__ import annotations

import json

import pytest

from aligner.data import (
    SnapshotError,
    answer_hash,
    build_dataset,
    is_heldout,
    plan_epoch,
    read_snapshot,
    tokenize_pair,
)
from aligner.model import load_tokenizer
from tests.aligner.support import synthetic_rows, write_snapshot


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_reads_valid_snapshot(tmp_path):
    rows = read_snapshot(write_snapshot(tmp_path / "s.parquet", synthetic_rows(3, 2)))
    assert len(rows) == 5 and isinstance(rows[0]["messages"], list)


@pytest.mark.parametrize("case", ["missing", "empty", "garbage", "absent", "bad_json"])
def test_bad_snapshots(tmp_path, case):
    path = tmp_path / "s.parquet"
    if case == "missing":
        write_snapshot(path, synthetic_rows(2, 2), drop_columns=("label",))
    elif case == "empty":
        write_snapshot(path, [])
    elif case == "garbage":
        path.write_bytes(b"not a parquet file at all")
    elif case == "bad_json":
        rows = synthetic_rows(2, 2)
        rows[1]["messages"] = "{oops"
        write_snapshot(path, rows)
    with pytest.raises(SnapshotError) as e:
        read_snapshot(path)
    assert "\n" not in str(e.value)


def test_completion_tokens_end_with_end_of_turn(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    p, c = tokenize_pair(tok, msgs, "Hello there")
    assert tok.decode(p).endswith("<|im_start|>assistant\n")
    assert tok.decode(c) == "Hello there<|im_end|>"
    assert c[-1] == tok.eos_token_id


def test_an_answer_that_did_not_end_is_trained_without_end_of_turn(tmp_path, tok):
    """A cut or stopped answer was sampled without an end-of-turn: adding one would teach stopping mid-sentence."""
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    _, cut = tokenize_pair(tok, msgs, "Hello there, this answer was cut", ended=False)
    assert tok.decode(cut) == "Hello there, this answer was cut" and tok.eos_token_id not in cut

    rows = synthetic_rows(3, 3)
    for i, row in enumerate(rows):
        row["ended"] = i % 2 == 0
    ds = build_dataset(write_snapshot(tmp_path / "s.parquet", rows), tok, heldout_fraction=0.0)
    by_id = {ex.example_id: ex for ex in ds.train}
    assert len(by_id) == 6
    for row in rows:
        ids = by_id[row["example_id"]].completion_ids
        assert (ids[-1] == tok.eos_token_id) is row["ended"]
        assert tok.decode(ids).removesuffix("<|im_end|>") == row["completion"]

    old = build_dataset(write_snapshot(tmp_path / "old.parquet", synthetic_rows(3, 3)), tok, heldout_fraction=0.0)
    assert all(ex.completion_ids[-1] == tok.eos_token_id for ex in old.train)   # no column: every answer ended


def test_truncation_and_drop_are_reported(tmp_path, tok):
    rows = synthetic_rows(12, 12, long_every=7)
    long_prompt = json.loads(rows[0]["messages"])
    long_prompt[-1]["content"] = "please " * 300
    rows[0]["messages"] = json.dumps(long_prompt)
    rows[0]["completion"] = "Fine."
    ds = build_dataset(write_snapshot(tmp_path / "s.parquet", rows), tok, max_length=128, heldout_fraction=0.0)
    assert {d["example_id"] for d in ds.dropped} == {r["example_id"] for r in synthetic_rows(12, 12, long_every=7)
                                                     if r["completion"].startswith("word")}
    assert all(d["reason"] for d in ds.dropped)
    kept = {ex.example_id: ex for ex in ds.train}
    first = kept[rows[0]["example_id"]]
    assert first.prompt_truncated > 0 and len(first.prompt_ids) + len(first.completion_ids) == 128
    assert tok.decode(first.completion_ids) == "Fine.<|im_end|>"
    assert len(ds.train) + len(ds.dropped) == 24


def test_heldout_split_is_deterministic_and_by_answer():
    ids = [f"ans-{i}" for i in range(5000)]
    held = [a for a in ids if is_heldout(a, 0.1)]
    assert held == [a for a in ids if is_heldout(a, 0.1)]
    assert 400 < len(held) < 600
    assert set(held) <= {a for a in ids if is_heldout(a, 0.2)}, "growing the fraction only adds answers"
    assert not any(is_heldout(a, 0.0) for a in ids)


def test_heldout_answers_never_trained(tmp_path, tok):
    rows = synthetic_rows(40, 40)
    rows += [dict(r, example_id=r["example_id"] + "-dup", label=not r["label"]) for r in rows[:20]]  # 2nd rater
    ds = build_dataset(write_snapshot(tmp_path / "s.parquet", rows), tok, heldout_fraction=0.3)
    assert ds.heldout and ds.train
    assert not {e.answer_id for e in ds.train} & {e.answer_id for e in ds.heldout}


def test_a_kind_held_out_entirely_is_trained_on_instead(tmp_path, tok):
    """Both thumbs-up hashed into the held-out slice: the run trains on them (whole answers, a second rater's
    thumbs-down on the same answer included) instead of failing for want of a kind the data has."""
    held = [a for a in (f"ans-{i}" for i in range(400)) if is_heldout(a, 0.25)]
    kept = [a for a in (f"ans-{i}" for i in range(400)) if not is_heldout(a, 0.25)]
    rows = sorted(synthetic_rows(2, 10), key=lambda r: not r["label"])  # the 2 thumbs-up first
    rows = [dict(r, answer_id=a) for r, a in zip(rows, held[:2] + kept[:6] + held[2:6], strict=True)]
    rows.append(dict(rows[0], example_id="second-rater", label=False))
    ds = build_dataset(write_snapshot(tmp_path / "s.parquet", rows), tok, heldout_fraction=0.25)
    assert ds.unheld == sorted(held[:2])
    assert sum(e.desirable for e in ds.train) == 2 and "second-rater" in {e.example_id for e in ds.train}
    assert {e.answer_id for e in ds.heldout} == set(held[2:6])
    assert not {e.answer_id for e in ds.train} & {e.answer_id for e in ds.heldout}

    rows[1]["answer_id"] = kept[6]  # one thumbs-up outside the slice: the plain hash split stands
    ds = build_dataset(write_snapshot(tmp_path / "t.parquet", rows), tok, heldout_fraction=0.25)
    assert ds.unheld == [] and {e.answer_id for e in ds.heldout} == {held[0], *held[2:6]}


def _scarce_rows(n_desirable: int, n_undesirable: int, outside: int) -> list[dict]:
    """Rows whose thumbs-up answers all hash outside a 10% slice (the first `outside` such ids, in id order)."""
    ids = (f"ans-{i}" for i in range(10_000))
    up = [a for a in ids if not is_heldout(a, 0.1)][:outside][:n_desirable]
    rows = sorted(synthetic_rows(n_desirable, n_undesirable), key=lambda r: not r["label"])
    return [dict(r, answer_id=up[k] if r["label"] else f"down-{k}") for k, r in enumerate(rows)]


def test_heldout_floor_tops_up_a_scarce_kind(tmp_path, tok):
    """20 thumbs-up, none in the 10% hash slice: the gate would have no held-out thumbs-up. The floor holds out
    the 3 lowest-hash ones (whole answers, a second rater's thumbs-down on one included), trains on the rest;
    0 turns it off; a kind of 8 gives at most a quarter (2)."""
    rows = _scarce_rows(20, 80, outside=20)
    up = sorted({r["answer_id"] for r in rows if r["label"]}, key=answer_hash)
    rows.append(dict(next(r for r in rows if r["answer_id"] == up[0]), example_id="second-rater", label=False))
    ds = build_dataset(write_snapshot(tmp_path / "s.parquet", rows), tok, heldout_fraction=0.1, heldout_min=3)
    assert ds.floor_added == up[:3]
    assert sorted(e.answer_id for e in ds.heldout if e.desirable) == sorted(up[:3])
    assert "second-rater" in {e.example_id for e in ds.heldout}
    assert sum(e.desirable for e in ds.train) == 17
    assert not {e.answer_id for e in ds.train} & {e.answer_id for e in ds.heldout}
    assert sum(not e.desirable for e in ds.heldout) >= 3, "thumbs-down: the slice alone already has enough"

    off = build_dataset(write_snapshot(tmp_path / "s.parquet", rows), tok, heldout_fraction=0.1, heldout_min=0)
    assert off.floor_added == [] and not any(e.desirable for e in off.heldout)
    none = build_dataset(write_snapshot(tmp_path / "s.parquet", rows), tok, heldout_fraction=0.0, heldout_min=3)
    assert none.heldout == [] and none.floor_added == []

    few = build_dataset(write_snapshot(tmp_path / "f.parquet", _scarce_rows(8, 40, outside=8)), tok,
                        heldout_fraction=0.1, heldout_min=3)
    assert sum(e.desirable for e in few.heldout) == 2 and sum(e.desirable for e in few.train) == 6


def test_heldout_floor_never_holds_out_what_an_earlier_run_trained_on(tmp_path, tok):
    """The snapshot grows from 20 to 40 thumbs-up: the later run's held-out thumbs-up are among the earlier
    run's held-out ones or new, so a served adapter is never judged on an answer it trained on."""
    small = _scarce_rows(20, 80, outside=40)
    big = _scarce_rows(40, 80, outside=40)
    assert {r["answer_id"] for r in small if r["label"]} < {r["answer_id"] for r in big if r["label"]}
    a = build_dataset(write_snapshot(tmp_path / "a.parquet", small), tok, heldout_fraction=0.1, heldout_min=3)
    b = build_dataset(write_snapshot(tmp_path / "b.parquet", big), tok, heldout_fraction=0.1, heldout_min=3)
    trained_before = {e.answer_id for e in a.train if e.desirable}
    held_now = {e.answer_id for e in b.heldout if e.desirable}
    assert len(held_now) == 3 and not held_now & trained_before


@pytest.mark.parametrize("n,bs", [(2, 8), (9, 4), (33, 8), (100, 3)])
def test_plan_epoch_covers_each_example_once(n, bs):
    lengths = [(i * 37) % 101 + 5 for i in range(n)]
    plan = plan_epoch(lengths, bs, seed=1, epoch=0)
    seen = [i for mb in plan for i in mb.examples]
    assert sorted(seen) == list(range(n))
    for mb in plan:
        assert len(mb.examples) >= 2
        assert all(i != j for i, j in zip(mb.examples, mb.partners, strict=True))
        assert sorted(mb.partners) == sorted(mb.examples), "KL partners come from the same micro-batch"
    again = plan_epoch(lengths, bs, seed=1, epoch=0)
    assert [mb.examples for mb in again] == [mb.examples for mb in plan]
    if n > bs:
        other = plan_epoch(lengths, bs, seed=1, epoch=1)
        assert [mb.partners for mb in other] != [mb.partners for mb in plan], "pairs rebuilt each epoch"


@pytest.mark.parametrize("n,bs,n_d", [(183, 8, 21), (40, 8, 3), (9, 4, 2), (6, 2, 1), (50, 2, 25), (17, 8, 17)])
def test_stratified_plan_spreads_each_class_over_the_batches(n, bs, n_d):
    """A length-preferring rater makes the short answers the desirable ones: length grouping alone would put
    them all in the same few batches. With labels every batch gets its share of each class."""
    lengths = [20 + i for i in range(n)]
    labels = [i < n_d for i in range(n)]  # desirable = the shortest, as with the `concise` rater
    plan = plan_epoch(lengths, bs, seed=3, epoch=0, labels=labels)
    assert sorted(i for mb in plan for i in mb.examples) == list(range(n))
    # the plain plan's batch sizes (equal sizes keep accumulation and multi-process runs exact)
    plain_sizes = sorted(len(mb.examples) for mb in plan_epoch(lengths, bs, seed=3, epoch=0))
    assert sorted(len(mb.examples) for mb in plan) == plain_sizes
    per_batch = [sum(labels[i] for i in mb.examples) for mb in plan]
    assert max(per_batch) - min(per_batch) <= 2  # proportional shares
    for mb in plan:
        assert len(mb.examples) >= 2 and sorted(mb.partners) == sorted(mb.examples)
        assert all(i != j for i, j in zip(mb.examples, mb.partners, strict=True))
    # the unstratified plan on the same data segregates the classes (what the labels fix)
    if bs <= n_d < n and n > 2 * bs:
        plain = plan_epoch(lengths, bs, seed=3, epoch=0)
        assert max(sum(labels[i] for i in mb.examples) for mb in plain) >= bs
    assert [mb.partners for mb in plan_epoch(lengths, bs, seed=3, epoch=1, labels=labels)] != [
        mb.partners for mb in plan] or n <= 2


def test_stratified_plan_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="labels"):
        plan_epoch([5, 6, 7], 2, seed=0, epoch=0, labels=[True])
