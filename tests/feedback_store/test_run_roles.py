"""Lineage tells trained ratings from held-out and dropped ones; the next run's keys match its snapshot; the
console's thumbs-down reasons per version. On both engines (the `store` fixture of test_store.py)."""

from __future__ import annotations

import pyarrow.parquet as pq

from tests.feedback_store.test_store import chat, clock, store  # noqa: F401  (fixtures)


def test_lineage_separates_trained_heldout_and_dropped(store, tmp_path):  # noqa: F811
    ratings = []
    for i in range(5):
        _, _, a = chat(store, question=f"q{i}")
        ratings.append(store.rate("alice", a, "up" if i % 2 else "down").rating_id)
    run = store.start_run("operator", {})
    store.export_snapshot(tmp_path / "s.parquet", run_id=run)
    store.finish_run(run, "promoted", dropped=[ratings[0]], heldout=[ratings[1], ratings[2]])
    store.register_adapter("kto-v1", tmp_path / "kto-v1", run_id=run)
    _, _, served = chat(store, adapter="kto-v1")
    detail = store.lineage_detail(served)
    assert detail["adapter"] == "kto-v1"
    (step,) = detail["adapters"]
    assert step["run_id"] == run and step["trained"] == sorted(ratings[3:])
    assert step["heldout"] == sorted(ratings[1:3]) and step["dropped"] == [ratings[0]]
    assert store.lineage(served) == sorted(ratings[3:]) == store.run_examples(run)  # held out: not trained on
    assert len(store.run_examples(run, include_dropped=True)) == 5


def test_snapshot_keys_are_the_snapshot_rows_in_order(store, tmp_path):  # noqa: F811
    for i in range(6):
        _, _, a = chat(store, question=f"q{i}")
        store.rate(f"u{i}", a, "up" if i % 3 else "down")
    keys = store.snapshot_keys(max_examples=4)
    snap = pq.read_table(store.export_snapshot(tmp_path / "s.parquet", max_examples=4).path)
    for col in ("example_id", "answer_id", "label"):
        assert keys.column(col).to_pylist() == snap.column(col).to_pylist()


def test_down_reasons_per_adapter(store):  # noqa: F811
    _, _, a = chat(store, adapter="base")
    _, _, b = chat(store, adapter="kto-v1")
    _, _, c = chat(store, adapter="kto-v1")
    store.rate("alice", a, "down", reason="wrong")
    store.rate("alice", b, "down", comment="too long")
    store.rate("alice", c, "down")
    rows = store.down_reasons()
    assert [r["answer_id"] for r in rows] == [b, a]
    only = store.down_reasons("kto-v1")
    assert [(r["answer_id"], r["comment"], r["answer"]) for r in only] == [(b, "too long", "4")]
