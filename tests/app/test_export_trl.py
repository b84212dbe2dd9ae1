"""`kto-loop export --format kto|dpo` gives files TRL trains on as they are: each is loaded with `datasets` and one
step of TRL's own KTOTrainer / DPOTrainer runs on it (tiny random model, CPU). The DPO export prints and writes the
same through the running app's admin API and from the file once the app has stopped."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from app.cli import main
from feedback_store import FeedbackStore
from tests.app.test_cli_operator import RunningApp

trl = pytest.importorskip("trl")

TOPICS = ["bread", "rivers", "chess", "bees", "tea", "owls"]


def rate_siblings(store: FeedbackStore) -> None:
    """Per topic, a first answer and a regeneration one user rates opposite ways (a DPO pair), and a lone rated
    answer (KTO data only)."""
    for i, topic in enumerate(TOPICS):
        user = f"u{i % 3}"
        conv = store.new_conversation(user, system_prompt="Be brief.")
        q = f"Tell me about {topic}."
        msg = store.add_user_message(conv, q)
        prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]
        good = store.add_answer(conv, msg, prompt, f"Sure! {topic.capitalize()} have a long history.")
        bad = store.add_answer(conv, msg, prompt, "No.")
        store.rate(user, good, "up", comment="friendly" if i % 2 else None)
        store.rate(user, bad, "down", reason="unhelpful", comment="curt")
        follow = store.add_user_message(conv, "Thanks!", parent_id=good)
        lone = store.add_answer(conv, follow, [*prompt, {"role": "assistant", "content": "Sure!"},
                                               {"role": "user", "content": "Thanks!"}], "You're welcome.")
        store.rate(user, lone, "up" if i % 2 else "down")


def export(capsys, data: Path, fmt: str, out: Path) -> dict:
    assert main(["export", "--format", fmt, "--out", str(out), "--data-dir", str(data)]) == 0
    return json.loads(capsys.readouterr().out)


def test_dpo_export_is_the_same_through_the_app_and_from_the_file(tmp_path, capsys):
    data = tmp_path / "data"
    running = RunningApp(data, tmp_path / "model", []).start()
    try:
        rate_siblings(running.store)
        via_app = export(capsys, data, "dpo", tmp_path / "app" / "pairs.jsonl")
    finally:
        running.stop()
    via_file = export(capsys, data, "dpo", tmp_path / "file" / "pairs.jsonl")
    assert {**via_app, "out": None} == {**via_file, "out": None}
    assert (via_app["n_pairs"], via_app["n_chosen"], via_app["n_rejected"]) == (6, 6, 6)
    assert (tmp_path / "app" / "pairs.jsonl").read_bytes() == (tmp_path / "file" / "pairs.jsonl").read_bytes()


@pytest.mark.parametrize("fmt", ["kto", "dpo"])
def test_trl_trains_one_step_on_the_export(fmt, tiny_model_dir, tmp_path, capsys):
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "data"
    data.mkdir()
    with FeedbackStore(data / "feedback.duckdb") as store:
        rate_siblings(store)
    suffix = ".parquet" if fmt == "dpo" else ".jsonl"   # one of each encoding; the store tests show they agree
    out = tmp_path / f"{fmt}{suffix}"
    summary = export(capsys, data, fmt, out)
    assert summary["n_pairs" if fmt == "dpo" else "n_examples"] == (6 if fmt == "dpo" else 18)
    ds = load_dataset("parquet" if suffix == ".parquet" else "json", data_files=str(out), split="train")
    row = ds[0]
    assert row["prompt"][-1]["role"] == "user"
    if fmt == "kto":
        assert row["completion"][0]["role"] == "assistant" and "reason" in ds.column_names
    else:
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        assert row["rejected_reason"] == "unhelpful"

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    common = dict(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=1, max_length=128,
                  report_to=[], use_cpu=True, bf16=False, save_strategy="no", logging_steps=1)
    if fmt == "kto":
        trainer = trl.KTOTrainer(model=model, args=trl.KTOConfig(**common), train_dataset=ds, processing_class=tok)
    else:
        trainer = trl.DPOTrainer(model=model, args=trl.DPOConfig(**common), train_dataset=ds, processing_class=tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = trainer.train()
    assert result.global_step == 1 and math.isfinite(result.training_loss)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters()), "nothing trained"
