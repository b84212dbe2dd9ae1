"""A short closed-loop simulation on the tiny model through the real stack: vLLM, DuckDB store, aligner
subprocess, gate, hot swap. Checks the JSON's structure and that every stage left real traces."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest

from app.config import config_from
from app.sim import inputs, report
from app.sim import run as sim

CYCLE_KEYS = {"cycle", "n_D", "n_U", "lambda_D", "lambda_U", "z0_pre_clamp", "z0", "train_seconds", "promoted",
              "eval", "collect", "run_id", "status", "cycle_seconds", "served_before", "served_after"}
EVAL_KEYS = {"desirable_rate", "ci95", "n_rated", "capability_accuracy", "capability_n", "model"}


def coin_rater(prompt: str, answer: str) -> bool | None:
    """Deterministic on the text, roughly balanced on a random model's gibberish; skips one prompt."""
    if prompt.startswith("Skip"):
        return None
    return hashlib.sha256(answer.encode()).digest()[0] < 100  # ~40% up


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_short_simulation_end_to_end(tiny_model_dir: Path, tmp_path: Path):
    cfg = config_from(argparse.Namespace(), environ={
        "KTO_LOOP_HOME": str(tmp_path / "home"), "KTO_LOOP_MODEL_DIR": str(tiny_model_dir),
        "KTO_LOOP_MAX_TOKENS": "24", "KTO_LOOP_VLLM_KVCACHE_GB": "1",
        # the gate is not under test here (a random model has no real preference to learn): always promote, and no
        # capability probe (tests/e2e/test_browser.py promotes through it, tests/app/test_realign_modes.py refuses)
        "KTO_LOOP_PROMOTE_MIN_GAIN": "-1e9", "KTO_LOOP_PROMOTE_MAX_CAPABILITY_DROP": "-1",
        "KTO_LOOP_ALIGN_EXTRA_ARGS": "--max-steps 2 --batch-size 4 --holdout-fraction 0.4",
        "KTO_LOOP_FIRST_LORA_LAYER": "50%",  # the upper half of the tiny model's 2 layers: layer 1
    })
    prompts = [f"Tell me about topic number {i}." for i in range(12)] + ["Skip this one, please."]
    spec = sim.SimSpec("coin", coin_rater, cycles=1, ratings_per_cycle=32, prompts=prompts,
                       holdout=["Say something nice.", "What is a tree?"],
                       capability=inputs.load_capability()[:3], samples_per_prompt=2, capability_repeats=2,
                       ablation=True, workers=4, seed=3)
    logs: list[str] = []
    updates: list[dict] = []
    doc = sim.simulate(cfg, [spec], tmp_path / "work", log=logs.append, on_update=updates.append)
    # partial documents after the base measurement and after the cycle, then the complete one
    assert [len(u["runs"][0]["cycles"]) for u in updates] == [0, 1, 1]
    assert [u["runs"][0]["complete"] for u in updates] == [False, False, True]
    report.write_json(doc, tmp_path / "r.json")
    report.plot(doc, tmp_path / "r.png")
    doc = json.loads((tmp_path / "r.json").read_text())  # what is checked is what was written

    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert doc["machine"]["cores"] and doc["settings"]["ratings_per_cycle"] == 32
    (run,) = doc["runs"]
    assert run["seed"] == 3  # repeats of one recipe are told apart by it (simulate --combine)
    assert EVAL_KEYS <= set(run["base"]) and run["base"]["n_samples"] == 4 and run["base"]["capability_n"] == 3
    assert doc["settings"]["first_lora_layer"] == "50%"
    assert doc["settings"]["capability_repeats"] == 2 and len(run["base"]["capability_runs"]) == 2
    assert run["base"]["capability_accuracy"] == sum(run["base"]["capability_runs"]) / (2 * 3)
    # a random model rarely ends within 24 tokens: vLLM's "length" reaches the measurement and the training data
    assert run["base"]["cut_at_max_tokens"] > 0.5 and 0 <= run["base"]["stops_mid_sentence"] <= 1
    import pyarrow.parquet as pq
    ended = [e for f in Path(run["data_dir"]).glob("runs/*/snapshot.parquet")
             for e in pq.read_table(f).column("ended").to_pylist()]
    assert len(ended) == 32 and ended.count(False) > 16
    (cycle,) = run["cycles"]
    assert CYCLE_KEYS <= set(cycle), CYCLE_KEYS - set(cycle)
    # a random model has nothing to learn, so the gate's sign test can still say no: both outcomes are the real
    # product path; what is served is checked for each below
    assert cycle["status"] in ("promoted", "rejected"), cycle["reason"]
    assert cycle["reason"].startswith("promoted" if cycle["status"] == "promoted" else "not promoted")
    # every stored thumb reached the aligner: trained on, held out for the gate, or dropped (with a reason)
    assert cycle["collect"]["ratings"] == 32
    assert cycle["n_D"] + cycle["n_U"] + cycle["n_gate_heldout"] + cycle["n_dropped"] == 32
    assert cycle["n_D"] > 0 and cycle["n_U"] > 0 and cycle["n_gate_heldout"] >= 2
    assert 0 <= cycle["n_gate_floor_added"] <= cycle["n_gate_heldout"]
    # auto-balanced λ obeys the product's rule; the pinned ablation trained with λ = 1 on the same snapshot
    ratio = cycle["lambda_D"] * cycle["n_D"] / (cycle["lambda_U"] * cycle["n_U"])
    assert 1 - 1e-6 <= ratio <= 4 / 3 + 1e-6 and min(cycle["lambda_D"], cycle["lambda_U"]) == 1
    assert cycle["z0"] >= 0 and cycle["z0"] >= cycle["z0_pre_clamp"] - 1e-6  # the clamp only ever raises z0
    assert cycle["train_seconds"] > 0 and cycle["aligner_phase_seconds"]["train"] > 0
    pinned = cycle["ablation_pinned"]
    assert pinned["lambda_D"] == 1 and pinned["lambda_U"] == 1 and EVAL_KEYS <= set(pinned["eval"])
    assert pinned["eval"]["model"].startswith("ablation-")
    # every stage ran for real: ratings in the store, a run record, an adapter served by vLLM
    ev = run["evidence"]
    assert ev["store_counts"]["up"] == cycle["collect"]["up"] and ev["store_counts"]["down"] == cycle["collect"]["down"]
    assert ev["runs"][0]["n_desirable"] == cycle["n_D"] and ev["runs"][0]["n_undesirable"] == cycle["n_U"]
    assert [r["adapter"] for r in ev["counts_by_adapter"]] == ["base"]
    assert [(r["trigger"], r["status"]) for r in ev["runs"]] == [("simulator", cycle["status"])]
    assert pinned["eval"]["model"] in ev["loaded_on_server"] and pinned["eval"]["n_samples"] == 4
    assert cycle["served_before"] == "base"
    if cycle["promoted"]:
        assert cycle["served_after"] == cycle["version"] != "base" and cycle["eval"]["model"] == cycle["version"]
        assert ev["served"] == cycle["version"] and cycle["version"] in ev["loaded_on_server"]
        assert any(a["version"] == cycle["version"] and Path(a["path"]).is_dir() for a in ev["adapters"])
        assert run["summary"]["promotions"] == 1
    else:
        assert cycle["served_after"] == ev["served"] == "base" and cycle["eval"]["model"] == "base"
    assert any("realigning" in m for m in logs) and any("train" in m for m in logs)
    # KTO_LOOP_FIRST_LORA_LAYER=50% reached the aligner: every adapter the run trained sits in layer 1 only
    configs = [json.loads(p.read_text()) for p in (tmp_path / "work").rglob("adapter_config.json")]
    assert configs and all(c["layers_to_transform"] == [1] for c in configs)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_attacker_is_held_to_the_stores_share_cap_through_the_real_loop(tiny_model_dir: Path, tmp_path: Path):
    """Most chats come from an attacker with five identities on one address, rating against the honest rater; the
    real store's per-address cap bounds what the real aligner trained on, and the results say so."""
    from app.sim.population import Case

    cfg = config_from(argparse.Namespace(), environ={
        "KTO_LOOP_HOME": str(tmp_path / "home"), "KTO_LOOP_MODEL_DIR": str(tiny_model_dir),
        "KTO_LOOP_MAX_TOKENS": "16", "KTO_LOOP_VLLM_KVCACHE_GB": "1", "KTO_LOOP_PROMOTE_MIN_GAIN": "-1e9",
        "KTO_LOOP_PROMOTE_MAX_CAPABILITY_DROP": "-1",
        "KTO_LOOP_ALIGN_EXTRA_ARGS": "--max-steps 1 --batch-size 4 --holdout-fraction 0.4",
        "KTO_LOOP_MAX_ADDR_SHARE": "0.2", "KTO_LOOP_MAX_USER_SHARE": "0.1",
    })
    case = Case(("coin", coin_rater), attacker_share=0.6, attacker_identities=5)
    spec = sim.SimSpec("coin", coin_rater, cycles=1, ratings_per_cycle=40,
                       prompts=[f"Tell me about topic number {i}." for i in range(12)], holdout=["What is a tree?"],
                       capability=inputs.load_capability()[:1], samples_per_prompt=2, capability_repeats=1,
                       workers=4, case=case)
    doc = sim.simulate(cfg, [spec], tmp_path / "work", log=lambda m: None)
    (run,) = doc["runs"]
    (cycle,) = run["cycles"]
    collected = cycle["collect"]["by_group"]["attacker"]
    assert (collected["up"] + collected["down"]) / cycle["collect"]["ratings"] > 0.4  # it sent most of the thumbs
    trained = cycle["snapshot_sources"]
    assert 0 < trained["attacker_share"] <= 0.2 + 1e-9  # ... and supplied at most the cap of what was trained on
    assert trained["n"] < cycle["collect"]["ratings"]
    assert run["summary"]["attacker_share_by_cycle"] == [trained["attacker_share"]]
    assert set(run["base"]["by_rater"]) == {"coin", "attacker (not coin)"}
    assert doc["settings"]["max_addr_share"] == 0.2
