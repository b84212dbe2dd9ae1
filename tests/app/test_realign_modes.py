"""Realignment modes on the real store and the real aligner subprocess (tiny model): "continue" resumes the served
adapter on the ratings it has not seen, with the base model as reference; "fresh" retrains on everything.

The adapter registry is a stand-in that records promotions (vLLM is not under test here; tests/e2e/test_simulate_e2e.py
and tests/serving/test_live.py cover the real swap)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import app.loop.gate
from aligner import config as aligner_config
from app.loop.gate import Candidate, rater_check, should_promote
from app.loop.realign import Realigner
from feedback_store import FeedbackStore
from tests.app.doubles import PointerRegistry

TRAIN_ARGS = ["--max-steps", "1", "--batch-size", "4", "--holdout-fraction", "0.25"]
LR = aligner_config.default("lr")  # the shipped learning rate


Registry = PointerRegistry


def _rate(store: FeedbackStore, tag: str, n: int, adapter: str) -> list[str]:
    """n answers by `adapter`, alternately thumbs-up and thumbs-down; returns the answer ids."""
    conv = store.new_conversation(f"user-{tag}")
    ids = []
    for i in range(n):
        q = f"Question {tag}-{i}: name a colour."
        m = store.add_user_message(conv, q)
        a = store.add_answer(conv, m, [{"role": "user", "content": q}], f"Blue, answer {tag}-{i}.", adapter=adapter)
        store.rate(f"user-{tag}", a, "up" if i % 2 == 0 else "down")
        ids.append(a)
    return ids


@pytest.fixture(autouse=True)
def _gate_always_promotes(monkeypatch):
    """A random tiny model has nothing to learn, so the real gate may say no; the gate has its own tests."""
    import app.loop.gate

    monkeypatch.setattr(app.loop.gate, "should_promote", lambda new, served, min_gain: (True, "promoted: test"))
    monkeypatch.setattr(app.loop.gate, "rater_check", lambda new, served, min_gain: (True, "", None))


def _realigner(store, registry, tiny_model_dir: Path, tmp_path: Path, mode: str, **kw) -> Realigner:
    return Realigner(store, registry, model_dir=tiny_model_dir, work_dir=tmp_path / "runs", min_gain=-1e9,
                     extra_args=TRAIN_ARGS, mode=mode, lora_rank=8, **kw)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_continue_mode_resumes_the_served_adapter_on_unseen_ratings(tiny_model_dir: Path, tmp_path: Path):
    store, reg = FeedbackStore(tmp_path / "f.duckdb"), Registry()
    rl = _realigner(store, reg, tiny_model_dir, tmp_path, "continue", lr_generation_decay=0.5)
    _rate(store, "a", 12, "base")
    first = rl.run("operator")
    assert first.promoted and first.version == "kto-v1", first.reason
    assert first.manifest["resume_from"] is None  # base served: a new adapter on everything
    assert first.manifest["generation"] == 0 and first.manifest["hyperparameters"]["lr_effective"] == LR
    run1 = store.get_run(first.run_id)
    assert run1["n_desirable"] + run1["n_undesirable"] <= 12

    later = _rate(store, "b", 8, "kto-v1")
    second = rl.run("operator")
    assert second.promoted and second.version == "kto-v2", second.reason
    m = second.manifest
    assert m["resume_from"] == str(reg.paths["kto-v1"]) and m["reference"] == "base"
    assert m["generation"] == 1 and m["hyperparameters"]["lr_effective"] == pytest.approx(LR * 0.5)
    # only the 8 ratings kto-v1 has not seen reached the aligner
    used = set(store.run_examples(second.run_id, include_dropped=True))
    assert len(used) <= 8 and used.isdisjoint(store.run_examples(first.run_id, include_dropped=True))
    params = store.get_run(second.run_id)["params"]
    params = json.loads(params) if isinstance(params, str) else params
    assert params["mode"] == "continue" and params["resume_from"] == "kto-v1" and params["reference"] == "base"
    assert params["lr_generation_decay"] == 0.5
    # lineage: an answer served by kto-v2 was shaped by the ratings of both runs (parent chain)
    v2 = next(a for a in store.adapters() if a["version"] == "kto-v2")
    assert v2["parent"] == "kto-v1"
    conv = store.new_conversation("reader")
    q = store.add_user_message(conv, "hi")
    answer = store.add_answer(conv, q, [{"role": "user", "content": "hi"}], "hello", adapter="kto-v2")
    both = set(store.lineage(answer, include_ancestors=True))
    assert set(store.run_examples(first.run_id)) | set(store.run_examples(second.run_id)) == both
    assert set(store.lineage(answer)) == set(store.run_examples(second.run_id))
    assert later  # the new answers exist and were rated
    store.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fresh_mode_retrains_from_base_on_all_ratings(tiny_model_dir: Path, tmp_path: Path):
    store, reg = FeedbackStore(tmp_path / "f.duckdb"), Registry()
    rl = _realigner(store, reg, tiny_model_dir, tmp_path, "fresh")
    _rate(store, "a", 8, "base")
    first = rl.run("operator")
    assert first.promoted, first.reason
    _rate(store, "b", 8, "kto-v1")
    second = rl.run("operator")
    assert second.promoted and second.manifest["resume_from"] is None, second.reason
    assert len(store.run_examples(second.run_id, include_dropped=True)) == 16
    v2 = next(a for a in store.adapters() if a["version"] == "kto-v2")
    assert v2["parent"] is None  # trained from the base model, not from kto-v1
    store.close()


def test_unknown_mode_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="continue"):
        Realigner(None, Registry(), model_dir=tmp_path, work_dir=tmp_path, mode="sideways")
    with pytest.raises(ValueError, match="anchor weight must be a finite number ≥ 0"):
        Realigner(None, Registry(), model_dir=tmp_path, work_dir=tmp_path, anchor_weight=-1.0)
    with pytest.raises(ValueError, match="anchor tokens must be in"):
        Realigner(None, Registry(), model_dir=tmp_path, work_dir=tmp_path, anchor_weight=2.0, anchor_max_tokens=0)
    for bad_decay in (0.0, 1.5):
        with pytest.raises(ValueError, match="learning-rate decay per generation must be in"):
            Realigner(None, Registry(), model_dir=tmp_path, work_dir=tmp_path, lr_generation_decay=bad_decay)
    for bad in (-1, "100%", "top half"):
        with pytest.raises(ValueError, match="first LoRA layer must be a layer index N ≥ 0 or a share of the depth"):
            Realigner(None, Registry(), model_dir=tmp_path, work_dir=tmp_path, first_lora_layer=bad)


@pytest.mark.timeout(600)
def test_first_lora_layer_reaches_a_new_adapter_and_a_continued_one_keeps_its_layers(tiny_model_dir: Path,
                                                                                     tmp_path: Path):
    store, reg = FeedbackStore(tmp_path / "f.duckdb"), Registry()
    rl = Realigner(store, reg, model_dir=tiny_model_dir, work_dir=tmp_path / "runs", min_gain=-1e9,
                   extra_args=TRAIN_ARGS, first_lora_layer="50%")  # of the tiny model's 2 layers: layer 1
    # 8 of each kind: whatever the random answer ids, the held-out floor keeps ≥ 2 examples, so there are metrics
    # (with 4 of each, all 4 of one kind hashed out and returned to training left 1 in about 0.5% of runs)
    _rate(store, "a", 16, "base")
    first = rl.run("operator")
    assert first.promoted, first.reason
    # the run record keeps the aligner's per-rater breakdown of the held-out metrics
    held = store.get_run(first.run_id)["metrics"]["heldout"]["new"]
    assert set(held["per_rater"]) == {"user-a"} and held["per_rater"]["user-a"]["n"] == len(held["correct_side"])
    assert first.manifest["prefix"]["layers"] == 1 and first.manifest["prefix"]["sequences"] > 0
    assert first.manifest["hyperparameters"]["first_lora_layer"] == 1
    _rate(store, "b", 8, "kto-v1")
    second = rl.run("operator")  # continue: resumes kto-v1, whose adapter starts at layer 1 already
    assert second.promoted, second.reason
    assert second.manifest["prefix"]["layers"] == 1
    assert "--first-lora-layer" not in rl.command(tmp_path / "s.parquet", tmp_path / "o", None, tmp_path / "v1")
    params = [store.get_run(r.run_id)["params"] for r in (first, second)]
    params = [json.loads(p) if isinstance(p, str) else p for p in params]
    assert params[0]["first_lora_layer"] == "50%" and params[1]["first_lora_layer"] is None
    every = Realigner(None, reg, model_dir=tiny_model_dir, work_dir=tmp_path, first_lora_layer="0%")
    cmd = every.command(tmp_path / "s.parquet", tmp_path / "o", None)  # every layer, said, not left to the default
    assert cmd[cmd.index("--first-lora-layer") + 1] == "0%"
    store.close()


@pytest.mark.timeout(600)
def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_anchor_weight_reaches_the_aligner_and_the_run_record(tiny_model_dir: Path, tmp_path: Path):
    """The operator's `anchor_weight` and `anchor_max_tokens` settings train with the anchor term (on the shipped anchor
    prompts, along that many tokens of each base-model answer) and are recorded with the run. The operator's 0 (and
    every layer) reaches the aligner as such: left out, the aligner would train its own default, the shipped recipe."""
    shipped = _realigner(None, Registry(), tiny_model_dir, tmp_path, "fresh").command(
        tmp_path / "s.parquet", tmp_path / "o", None)
    assert _flag(shipped, "--anchor-weight") == "7" and _flag(shipped, "--first-lora-layer") == "50%"
    plain = Realigner(None, Registry(), model_dir=tiny_model_dir, work_dir=tmp_path / "p", anchor_weight=0.0,
                      first_lora_layer="0").command(tmp_path / "s.parquet", tmp_path / "o", None)
    assert _flag(plain, "--anchor-weight") == "0" and "--anchor-max-tokens" not in plain
    assert _flag(plain, "--first-lora-layer") == "0"
    resumed = Realigner(None, Registry(), model_dir=tiny_model_dir, work_dir=tmp_path / "p", anchor_weight=0.0,
                        ).command(tmp_path / "s.parquet", tmp_path / "o", None, resume_dir=tmp_path / "v1")
    assert _flag(resumed, "--lr-generation-decay") == "1" and "--first-lora-layer" not in resumed
    store, reg = FeedbackStore(tmp_path / "f.duckdb"), Registry()
    rl = Realigner(store, reg, model_dir=tiny_model_dir, work_dir=tmp_path / "runs", min_gain=-1e9,
                   extra_args=TRAIN_ARGS, lora_rank=8, anchor_weight=2.5, anchor_max_tokens=8)
    _rate(store, "a", 8, "base")
    out = rl.run("operator")
    assert out.promoted, out.reason
    anchor = out.manifest["anchor"]
    assert anchor["weight"] == 2.5 and anchor["prompts"].endswith("anchor_prompts.jsonl") and anchor["n_answers"] >= 32
    assert "anchor_kl" in out.manifest["log"][0] and not anchor["from_cache"]
    assert len(list((tmp_path / "runs" / "anchor-cache").glob("anchors-*.pt"))) == 1  # the next run reuses them
    params = store.get_run(out.run_id)["params"]
    params = json.loads(params) if isinstance(params, str) else params
    assert params["anchor_weight"] == 2.5 and params["anchor_max_tokens"] == 8
    assert out.manifest["hyperparameters"]["anchor_max_tokens"] == 8
    assert anchor["answer_tokens"] <= 8 * anchor["n_answers"]  # every base-model anchor answer cut at 8 tokens
    store.close()
    # another data directory (a new deployment, a simulation) given the same cache: the answers are not rebuilt
    store2 = FeedbackStore(tmp_path / "g.duckdb")
    other = Realigner(store2, Registry(), model_dir=tiny_model_dir, work_dir=tmp_path / "elsewhere", min_gain=-1e9,
                      extra_args=TRAIN_ARGS, lora_rank=8, anchor_weight=2.5, anchor_max_tokens=8,
                      anchor_cache=tmp_path / "runs" / "anchor-cache")
    _rate(store2, "a", 8, "base")
    again = other.run("operator")
    assert again.promoted, again.reason
    assert again.manifest["anchor"]["from_cache"] and not (tmp_path / "elsewhere" / "anchor-cache").exists()
    store2.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_capability_guard_refusal_keeps_the_served_version_and_is_recorded(tiny_model_dir: Path, tmp_path: Path):
    from app.loop.gate import CapabilityGuard, Question

    questions = [Question(f"Capital of land {i}?", (f"Town{i}",)) for i in range(10)]
    knows = {"base": 10, "kto-v1": 6}  # the candidate forgot 4 of 10 answers

    def ask(model: str, question: str) -> str:
        i = int(question.split()[-1].rstrip("?"))
        return f"Town{i}." if i < knows[model] else "The answer is not provided."

    store, reg = FeedbackStore(tmp_path / "f.duckdb"), Registry()
    rl = Realigner(store, reg, model_dir=tiny_model_dir, work_dir=tmp_path / "runs", min_gain=-1e9,
                   extra_args=TRAIN_ARGS, lora_rank=8, capability_guard=CapabilityGuard(ask, questions, 0.05))
    _rate(store, "a", 8, "base")
    out = rl.run("operator")
    assert out.status == "rejected" and not out.promoted and out.version is None, out.reason
    assert out.reason == "not promoted: capability probe 6/10 vs 10/10 for base (allowed drop 5%)"
    assert reg.current() == "base"
    run = store.get_run(out.run_id)
    assert run["status"] == "rejected"
    metrics = run["metrics"] if isinstance(run["metrics"], dict) else json.loads(run["metrics"])
    guard = metrics["capability_guard"]
    assert (guard["candidate_correct"], guard["served_correct"], guard["ok"]) == (6, 10, False)

    knows["kto-v2"] = 10  # a second run whose adapter keeps every answer is promoted, and says why
    _rate(store, "b", 8, "base")
    ok = rl.run("operator")
    assert ok.promoted and ok.version == "kto-v2" and ok.reason.endswith("capability probe 10/10 (served 10/10)"), \
        ok.reason
    store.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_promoted_final_adapter_never_pays_for_its_checkpoints(tiny_model_dir: Path, tmp_path: Path):
    store, reg = FeedbackStore(tmp_path / "f.duckdb"), Registry()
    rl = Realigner(store, reg, model_dir=tiny_model_dir, work_dir=tmp_path / "runs", min_gain=-1e9, lora_rank=8,
                   extra_args=["--max-steps", "3", "--batch-size", "2", "--holdout-fraction", "0.25"])
    _rate(store, "a", 20, "base")
    out = rl.run("operator")
    assert out.promoted and out.version == "kto-v1", out.reason
    m = out.manifest
    assert len(m["checkpoints"]) == 2 and all(c["heldout_pending"] and c["heldout_new"] is None
                                              for c in m["checkpoints"])
    assert "checkpoint_eval_seconds" not in m and [c["candidate"] for c in m["candidates"]] == ["final"]
    assert not (tmp_path / "runs" / f"run-{out.run_id}" / "checkpoints_eval.log").exists()
    store.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_refused_final_adapter_falls_back_to_the_newest_safe_checkpoint(tiny_model_dir: Path, tmp_path: Path):
    """The final adapter forgot facts; the run's earlier checkpoints are offered newest first, each loaded under a
    new name and probed; the first that keeps the facts is served and the record says which and why."""
    from app.loop.gate import CapabilityGuard, Question

    questions = [Question(f"Capital of land {i}?", (f"Town{i}",)) for i in range(10)]
    # run 1 loads kto-v1 (final), kto-v2 (step 2/3), kto-v3 (step 1/3); run 2 loads kto-v4, kto-v5, kto-v6
    knows = {"base": 10, "kto-v1": 6, "kto-v2": 7, "kto-v3": 5, "kto-v4": 6, "kto-v5": 8, "kto-v6": 10}

    def ask(model: str, question: str) -> str:
        i = int(question.split()[-1].rstrip("?"))
        return f"Town{i}." if i < knows[model] else "The answer is not provided."

    store, reg = FeedbackStore(tmp_path / "f.duckdb"), Registry()
    rl = Realigner(store, reg, model_dir=tiny_model_dir, work_dir=tmp_path / "runs", min_gain=-1e9, lora_rank=8,
                   extra_args=["--max-steps", "3", "--batch-size", "2", "--holdout-fraction", "0.25"],
                   capability_guard=CapabilityGuard(ask, questions, 0.05))
    _rate(store, "a", 20, "base")  # so a random held-out split leaves ≥ 3 steps
    refused = rl.run("operator")
    assert refused.status == "rejected" and reg.current() == "base", refused.reason
    assert refused.reason == ("not promoted: capability probe 6/10 vs 10/10 for base (allowed drop 5%) "
                              "(so were the run's 2 earlier checkpoints)")
    cands = refused.manifest["candidates"]
    assert [(c["candidate"], c["version"], c["promoted"]) for c in cands] == [
        ("final", "kto-v1", False), ("step 2/3", "kto-v2", False), ("step 1/3", "kto-v3", False)]
    # the refusal made the checkpoints worth evaluating: one child evaluated both, before the first was offered;
    # answer ids are random, so the hash split may leave < 2 held-out examples: then there is nothing to evaluate
    if refused.manifest["heldout"]["n"] >= 2:
        assert refused.manifest["checkpoint_eval_seconds"] > 0
        assert all(c["heldout_new"] and not c["heldout_pending"] for c in refused.manifest["checkpoints"])
    else:
        assert "checkpoint_eval_seconds" not in refused.manifest
        assert not any(c["heldout_pending"] for c in refused.manifest["checkpoints"])

    _rate(store, "b", 20, "base")
    out = rl.run("operator")
    assert out.promoted and out.version == "kto-v6" and reg.current() == "kto-v6", out.reason
    adapter = tmp_path / "runs" / f"run-{out.run_id}" / "adapter"
    assert reg.paths["kto-v4"] == adapter and reg.paths["kto-v6"] == adapter / "checkpoints" / "step-1"
    assert "[checkpoint step 1/3 of the run; the final adapter was refused: not promoted: capability probe 6/10" \
        in out.reason and "capability probe 10/10 (served 10/10)" in out.reason
    run = store.get_run(out.run_id)
    metrics = run["metrics"] if isinstance(run["metrics"], dict) else json.loads(run["metrics"])
    assert metrics["promoted_checkpoint"]["step"] == 1 and metrics["capability_guard"]["candidate"] == "kto-v6"
    assert [c["capability_guard"]["candidate_correct"] for c in metrics["candidates"]] == [6, 8, 10]
    served = next(a for a in store.adapters() if a["version"] == "kto-v6")
    import hashlib
    weights = (adapter / "checkpoints" / "step-1" / "adapter_model.safetensors").read_bytes()
    assert served["sha256"] == hashlib.sha256(weights).hexdigest()  # the checkpoint's own weights are recorded
    store.close()


def test_a_failed_checkpoint_evaluation_is_recorded_and_offers_nothing(tmp_path: Path):
    """The child that evaluates checkpoints fails (here: the run directory lost its manifest): the reason is kept,
    the candidates stay without metrics, so the gate refuses them with that reason instead of guessing."""
    store = FeedbackStore(tmp_path / "f.duckdb")
    rl = Realigner(store, Registry(), model_dir=tmp_path, work_dir=tmp_path / "runs")
    out = tmp_path / "runs" / "run-x" / "adapter"
    out.mkdir(parents=True)
    manifest: dict = {}
    earlier = [Candidate(f"step {s}/3", s, out / f"checkpoints/step-{s}", None, pending=True) for s in (2, 1)]
    rl._evaluate_checkpoints(out, manifest, earlier, None)
    err = manifest["checkpoint_eval_error"]
    assert err.startswith("checkpoint evaluation failed: exit code 2") and "holds no manifest.json" in err
    assert all(c.heldout_new is None and not c.pending for c in earlier)  # tried once, not per candidate
    assert (out.parent / "checkpoints_eval.log").is_file()
    store.close()


def test_aligner_children_run_at_the_configured_niceness(tmp_path: Path):
    """Training and checkpoint evaluation both yield the CPU to chats (nice 10 by default); 0 means as is."""
    import shutil
    import sys

    store = FeedbackStore(tmp_path / "f.duckdb")
    snap, out = tmp_path / "s.parquet", tmp_path / "adapter"
    niced = Realigner(store, Registry(), model_dir=tmp_path, work_dir=tmp_path / "runs")
    assert niced.command(snap, out, None)[:4] == [shutil.which("nice"), "-n", "10", sys.executable]
    plain = Realigner(store, Registry(), model_dir=tmp_path, work_dir=tmp_path / "runs", niceness=0,
                      extra_args=["--max-steps", "2"])
    cmd = plain.command(snap, out, None)
    assert cmd[:3] == [sys.executable, "-m", "aligner"] and cmd[-2:] == ["--max-steps", "2"]
    store.close()


def test_lr_generation_decay_reaches_only_a_continued_run(tmp_path: Path):
    """A continued adapter is told the decay, the default 1 too (the aligner reads its generation from the
    manifests); a fresh one passes nothing."""
    snap, out, served = tmp_path / "s.parquet", tmp_path / "o", tmp_path / "kto-v1"
    decayed = Realigner(None, Registry(), model_dir=tmp_path, work_dir=tmp_path, lr_generation_decay=0.5)
    cmd = decayed.command(snap, out, served, resume_dir=served)
    assert cmd[cmd.index("--lr-generation-decay") + 1] == "0.5"
    assert "--lr-generation-decay" not in decayed.command(snap, out, served)  # fresh: a new adapter, generation 0
    plain = Realigner(None, Registry(), model_dir=tmp_path, work_dir=tmp_path)
    cmd = plain.command(snap, out, served, resume_dir=served)
    assert cmd[cmd.index("--lr-generation-decay") + 1] == "1"


@pytest.mark.parametrize("raw", ["0", "1.5", "-0.5", "nan"])
def test_bad_lr_generation_decay_setting_stops_the_app_with_one_line(raw):
    from app.config import config_from

    with pytest.raises(SystemExit, match="lr_generation_decay must be in"):
        config_from(None, {"KTO_LOOP_LR_GENERATION_DECAY": raw})
    assert config_from(None, {"KTO_LOOP_LR_GENERATION_DECAY": "0.5"}).lr_generation_decay == 0.5


def test_a_gain_resting_on_one_rater_is_refused_and_the_record_keeps_the_breakdown(tmp_path: Path, monkeypatch):
    """Wiring: the aligner's manifest (here a stand-in's, hand-made) → the gate's rater check → the run record."""
    monkeypatch.setattr(app.loop.gate, "should_promote", should_promote)
    monkeypatch.setattr(app.loop.gate, "rater_check", rater_check)

    def per(n_d, r_d, n_u, r_u):
        return {"n": n_d + n_u, "n_desirable": n_d, "n_undesirable": n_u, "reward_desirable": r_d,
                "reward_undesirable": r_u, "frac_correct_side": 0.5}

    new = {"margin": 2.0, "reward_desirable": 1.0, "reward_undesirable": -1.0, "n_desirable": 4, "n_undesirable": 4,
           "per_rater": {"ann": per(3, 0.0, 3, 0.0), "mallory": per(1, 4.0, 1, -4.0)}}
    base = {"n_desirable": 4, "n_undesirable": 4, "margin": 0.0, "reward_desirable": 0.0, "reward_undesirable": 0.0,
            "per_rater": {"ann": per(3, 0.0, 3, 0.0), "mallory": per(1, 0.0, 1, 0.0)}}

    def fake_train(snapshot, out, *a, **k):
        out.mkdir(parents=True)
        (out / "manifest.json").write_text(json.dumps({"heldout": {"n": 8, "new": new, "served": base}}))

    store, reg = FeedbackStore(tmp_path / "f.duckdb"), Registry()
    rl = Realigner(store, reg, model_dir=tmp_path, work_dir=tmp_path / "runs")
    monkeypatch.setattr(rl, "_train", fake_train)
    _rate(store, "a", 4, "base")
    out = rl.run("operator")
    assert out.status == "rejected" and reg.current() == "base" and reg.paths == {}, out.reason  # never loaded
    assert out.reason.startswith("not promoted: the held-out gain rests on one rater: without mallory's 2 of 8")
    metrics = store.get_run(out.run_id)["metrics"]
    assert metrics["rater_check"]["most_influential"] == "mallory" and not metrics["rater_check"]["ok"]
    assert metrics["heldout"]["new"]["per_rater"]["mallory"]["n"] == 2
    store.close()
