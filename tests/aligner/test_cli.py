"""The `align` entry point end to end on the tiny model: outputs, manifest, bad input, divergence, resume."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from aligner import cli
from aligner import train as train_mod
from aligner.model import resolve_dtype
from tests.aligner.support import synthetic_rows, write_snapshot

FAST = ["--max-length", "128", "--batch-size", "4", "--epochs", "1", "--holdout-fraction", "0.2"]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return write_snapshot(tmp_path_factory.mktemp("snap") / "s.parquet", synthetic_rows(14, 10, seed=3))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, snapshot, tiny_model_dir):
    out = tmp_path_factory.mktemp("runs") / "v1"
    rc = cli.main(["--snapshot", str(snapshot), "--out", str(out), "--model-dir", str(tiny_model_dir), *FAST])
    assert rc == 0
    return out


def test_writes_vllm_compatible_adapter_and_manifest(trained, snapshot):
    cfg = json.loads((trained / "adapter_config.json").read_text())
    assert cfg["bias"] == "none" and not cfg.get("modules_to_save") and not cfg.get("use_dora")
    assert cfg["r"] == 16 and set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"}
    weights = load_file(trained / "adapter_model.safetensors")
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k), "training moved the adapter"
    m = json.loads((trained / "manifest.json").read_text())
    for key in ["n_desirable", "n_undesirable", "lambda_d", "lambda_u", "beta", "hyperparameters", "data_sha256",
                "reference", "git_commit", "train_seconds", "z0_pre_clamp_mean", "z0_mean", "dropped_examples",
                "heldout"]:
        assert key in m, key
    assert m["reference"] == "base" and m["beta"] == 0.1
    assert min(m["lambda_d"], m["lambda_u"]) == 1.0
    assert 1.0 <= m["lambda_d"] * m["n_desirable"] / (m["lambda_u"] * m["n_undesirable"]) <= 4 / 3 + 1e-9
    import hashlib
    assert m["data_sha256"] == hashlib.sha256(snapshot.read_bytes()).hexdigest()
    h = m["heldout"]
    assert h["n"] + m["n_desirable"] + m["n_undesirable"] == 24
    for side in ("new", "served"):
        assert set(h[side]) >= {"margin", "frac_correct_side", "loss"}
    assert h["served"]["margin"] == 0.0 and h["served"]["frac_correct_side"] == 0.5  # base is served
    assert not [p for p in trained.parent.iterdir() if ".tmp-" in p.name], "no temporary directory left behind"
    phases = m["phase_seconds"]  # where the run's time went
    assert set(phases) == {"load", "reference", "heldout_served", "anchor", "train", "checkpoints", "heldout_new"}
    assert m["anchor"]["weight"] == 7.0  # the shipped recipe: the anchor term is on by default
    assert all(v >= 0 for v in phases.values()) and phases["train"] > 0 and phases["reference"] > 0
    assert phases["train"] == pytest.approx(m["train_seconds"], abs=1e-2)
    assert sum(phases.values()) <= m["total_seconds"] + 1e-2
    steps = m["log"]  # and each step's, its KL pass (z0's no-grad forward) within it
    assert all(0 <= r["kl_seconds"] <= r["seconds"] for r in steps) and all(r["seconds"] > 0 for r in steps)
    assert sum(r["seconds"] for r in steps) <= phases["train"] + 1e-2


def test_checkpoint_steps_are_evenly_spaced_in_cumulative_learning_rate():
    assert train_mod.checkpoint_steps([1.0] * 8, 3) == [2, 4, 6]  # constant rate: evenly spaced in steps
    decay = [train_mod._lr_at(s, 22, 2) for s in range(22)]  # warm-up 2, then linear decay (the default shape)
    steps = train_mod.checkpoint_steps(decay, 3)
    assert steps == [4, 8, 12]
    for k, s in enumerate(steps, 1):  # the first step at or past k/4 of the total push
        assert sum(decay[:s]) >= k / 4 * sum(decay) > sum(decay[:s - 1])
    assert train_mod.checkpoint_steps([1.0, 0.67, 0.33], 3) == [1, 2]  # never the last step; duplicates collapse
    assert train_mod.checkpoint_steps([1.0], 3) == [] and train_mod.checkpoint_steps(decay, 0) == []


def test_keeps_earlier_checkpoints_that_vllm_can_load_with_their_own_heldout_metrics(trained, snapshot,
                                                                                     tiny_model_dir, tmp_path):
    import shutil

    from serving.registry import AdapterRegistry

    m = json.loads((trained / "manifest.json").read_text())
    total = m["hyperparameters"]["steps"]
    assert total >= 4  # enough steps for the default 3 checkpoints to be distinct
    warmup = int(0.1 * total)
    assert [c["step"] for c in m["checkpoints"]] == train_mod.checkpoint_steps(
        [train_mod._lr_at(s, total, warmup) for s in range(total)], 3)
    assert len(m["checkpoints"]) == 3 and m["checkpoint_seconds"] > 0  # timed apart from training
    assert m["hyperparameters"]["dtype"] == str(resolve_dtype("auto")).removeprefix("torch.")
    # lazy (the default): saved, their held-out pass left until the gate needs one
    assert all(c["heldout_new"] is None and c["heldout_pending"] for c in m["checkpoints"])

    lazy = tmp_path / "lazy"
    shutil.copytree(trained, lazy)
    proc = subprocess.run([sys.executable, "-m", "aligner.checkpoints", str(lazy)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1])["evaluated"] == [c["step"] for c in m["checkpoints"]]
    m = json.loads((lazy / "manifest.json").read_text())
    assert m["checkpoint_eval_seconds"] > 0 and not any(c["heldout_pending"] for c in m["checkpoints"])
    assert train_mod.evaluate_checkpoints(lazy) == m  # nothing left to do: unchanged

    # the same run with eager checkpoints: the lazy metrics are the ones the run itself would have written
    eager = tmp_path / "eager"
    assert cli.main(["--snapshot", str(snapshot), "--out", str(eager), "--model-dir", str(tiny_model_dir), *FAST,
                     "--checkpoint-eval", "eager"]) == 0
    me = json.loads((eager / "manifest.json").read_text())
    for c, ce in zip(m["checkpoints"], me["checkpoints"], strict=True):
        assert c["step"] == ce["step"] and not ce["heldout_pending"]
        assert c["heldout_new"]["correct_side"] == ce["heldout_new"]["correct_side"]
        for k in ("margin", "loss", "z0_pre_clamp", "frac_correct_side"):
            assert c["heldout_new"][k] == pytest.approx(ce["heldout_new"][k], abs=1e-5), k

    registry = AdapterRegistry("http://127.0.0.1:9", tmp_path / "state.json", max_lora_rank=16,
                               base_model_dir=tiny_model_dir)
    final = load_file(lazy / "adapter_model.safetensors")
    for c in m["checkpoints"]:
        d = lazy / c["path"]
        registry.validate(d)  # the gate may promote it: it must be servable on its own
        assert set(c["heldout_new"]) >= {"margin", "frac_correct_side", "correct_side"}
        assert len(c["heldout_new"]["correct_side"]) == m["heldout"]["n"]
        own = json.loads((d / "manifest.json").read_text())
        assert own["checkpoint"] == c and own["heldout"]["served"] == m["heldout"]["served"]
        assert own["heldout"]["new"] == c["heldout_new"]
        w = load_file(d / "adapter_model.safetensors")
        assert any(v.abs().sum() > 0 for k, v in w.items() if "lora_B" in k), f"step {c['step']} moved the adapter"
        assert any(not torch.equal(w[k], final[k]) for k in final), f"step {c['step']} differs from the final"
    assert not [p for p in trained.parent.iterdir() if ".ckpt-" in p.name], "no staging directory left behind"


def test_checkpoint_evaluation_refuses_a_changed_snapshot(trained, tmp_path):
    import shutil

    lazy = tmp_path / "lazy"
    shutil.copytree(trained, lazy)
    m = json.loads((lazy / "manifest.json").read_text())
    m["data_sha256"] = "0" * 64
    (lazy / "manifest.json").write_text(json.dumps(m))
    proc = subprocess.run([sys.executable, "-m", "aligner.checkpoints", str(lazy)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "changed since the run" in proc.stderr
    assert all(c["heldout_pending"] for c in json.loads((lazy / "manifest.json").read_text())["checkpoints"])
    proc = subprocess.run([sys.executable, "-m", "aligner.checkpoints", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no manifest.json" in proc.stderr


def test_heldout_floor_is_recorded_and_rebuilt_for_lazy_checkpoints(tiny_model_dir, tmp_path):
    """16 thumbs-up, none in the 20% hash slice: the run holds 3 out to reach the floor, says which, and the
    lazy checkpoint evaluation rebuilds that same split (it refuses a split of another size)."""
    from aligner.data import answer_hash, is_heldout

    outside = [a for a in (f"ans-{i}" for i in range(200)) if not is_heldout(a, 0.2)]
    rows = [dict(r, answer_id=outside.pop(0) if r["label"] else r["answer_id"])
            for r in synthetic_rows(16, 12, seed=4)]
    snap = write_snapshot(tmp_path / "s.parquet", rows)
    out = tmp_path / "v1"
    assert cli.main(["--snapshot", str(snap), "--out", str(out), "--model-dir", str(tiny_model_dir), *FAST,
                     "--max-steps", "4", "--heldout-min", "3"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    up = sorted((r["answer_id"] for r in rows if r["label"]), key=answer_hash)
    assert m["heldout_floor_added"] == up[:3] and m["heldout"]["n_desirable"] == 3
    assert m["n_desirable"] == 13 and m["hyperparameters"]["heldout_min"] == 3
    assert m["checkpoints"] and all(c["heldout_pending"] for c in m["checkpoints"])
    m = train_mod.evaluate_checkpoints(out)
    assert all(c["heldout_new"] and not c["heldout_pending"] for c in m["checkpoints"])


def test_no_checkpoints_when_asked_for_none(snapshot, tiny_model_dir, tmp_path):
    out = tmp_path / "v0"
    assert cli.main(["--snapshot", str(snapshot), "--out", str(out), "--model-dir", str(tiny_model_dir), *FAST,
                     "--max-steps", "2", "--checkpoints", "0", "--dtype", "float32"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["checkpoints"] == [] and m["checkpoint_seconds"] == 0
    assert not (out / "checkpoints").exists()
    assert m["hyperparameters"]["dtype"] == "float32"  # the resolved dtype, not the flag


def test_target_modules_adapt_only_those_layers(snapshot, tiny_model_dir, tmp_path):
    out = tmp_path / "attn"
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cli.main(["--snapshot", str(snapshot), "--out", str(out), "--model-dir", str(tiny_model_dir), *FAST,
                     "--max-steps", "2", "--checkpoints", "0", "--target-modules", *attn]) == 0
    assert set(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == set(attn)
    weights = load_file(out / "adapter_model.safetensors")
    layers = {k.split(".lora_")[0].rsplit(".", 1)[1] for k in weights}
    assert layers == set(attn), layers
    assert json.loads((out / "manifest.json").read_text())["hyperparameters"]["target_modules"] == sorted(attn)
    # Continuing it with the same flag (what `--align-extra-args` repeats every cycle) is accepted.
    again = tmp_path / "attn2"
    assert cli.main(["--snapshot", str(snapshot), "--out", str(again), "--model-dir", str(tiny_model_dir), *FAST,
                     "--max-steps", "1", "--checkpoints", "0", "--resume-from", str(out),
                     "--target-modules", *reversed(attn)]) == 0
    assert set(json.loads((again / "adapter_config.json").read_text())["target_modules"]) == set(attn)


@pytest.mark.parametrize("flags, message", [
    (["--target-modules", "q_proj", "lm_head"], "--target-modules must be among"),
    (["--target-modules", "q_proj", "--resume-from", "RESUME"], "differs from the layers the --resume-from")])
def test_bad_target_modules_exit_2(flags, message, trained, snapshot, tiny_model_dir, tmp_path, capsys):
    flags = [str(trained) if f == "RESUME" else f for f in flags]
    rc = cli.main(["--snapshot", str(snapshot), "--out", str(tmp_path / "o"), "--model-dir", str(tiny_model_dir),
                   *FAST, *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_progress_json_and_resume_with_previous_reference(trained, snapshot, tiny_model_dir, tmp_path):
    out = tmp_path / "v2"
    proc = subprocess.run([sys.executable, "-m", "aligner", "--snapshot", str(snapshot), "--out", str(out),
                           "--model-dir", str(tiny_model_dir), "--resume-from", str(trained), "--reference",
                           "previous", "--served-adapter", str(trained), "--progress-json", "--max-steps", "2",
                           *FAST], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2] and all(e["total"] == 2 for e in progress)
    assert all({"loss", "z0", "z0_pre_clamp"} <= set(e) for e in progress)
    assert events[-1] == {"event": "done", "out": str(out)}
    m = json.loads((out / "manifest.json").read_text())
    assert m["reference"] == "previous" and m["resume_from"] == str(trained)
    # The served adapter is v1 itself: its held-out numbers equal v1's own "new" numbers.
    v1 = json.loads((trained / "manifest.json").read_text())["heldout"]["new"]
    assert m["heldout"]["served"]["margin"] == pytest.approx(v1["margin"], abs=1e-3)
    # With the previous adapter as reference, the first step starts at reward 0 exactly.
    first = m["log"][0]
    assert first["z0_pre_clamp"] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("case", ["missing_column", "empty", "one_class", "unreadable", "no_file"])
def test_bad_input_exits_2_with_one_line(case, tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "s.parquet"
    if case == "missing_column":
        write_snapshot(path, synthetic_rows(4, 4), drop_columns=("completion",))
    elif case == "empty":
        write_snapshot(path, [])
    elif case == "one_class":
        write_snapshot(path, synthetic_rows(10, 0))
    elif case == "unreadable":
        path.write_text("hello")
    out = tmp_path / "out"
    rc = cli.main(["--snapshot", str(path), "--out", str(out), "--model-dir", str(tiny_model_dir), *FAST])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("align: error:"), err
    assert not out.exists()


def test_trim_every_returns_the_heap_at_that_cadence_and_changes_nothing_else(snapshot, tiny_model_dir, tmp_path,
                                                                              monkeypatch):
    losses = {}
    for every, step_trims in [(1, 3), (2, 1), (0, 0)]:
        calls = []
        monkeypatch.setattr(train_mod, "_trim_heap", lambda calls=calls: calls.append(1))
        out = tmp_path / f"out{every}"
        rc = cli.main(["--snapshot", str(snapshot), "--out", str(out), "--model-dir", str(tiny_model_dir), *FAST,
                       "--max-steps", "3", "--checkpoints", "0", "--trim-every", str(every)])
        assert rc == 0
        assert len(calls) == 1 + step_trims  # once after the reference pass, then every `every` steps
        losses[every] = [r["loss"] for r in json.loads((out / "manifest.json").read_text())["log"]]
    assert len(losses[1]) == 3 and losses[1] == losses[2] == losses[0]


def test_negative_trim_every_exits_2(snapshot, tiny_model_dir, tmp_path, capsys):
    rc = cli.main(["--snapshot", str(snapshot), "--out", str(tmp_path / "o"), "--model-dir", str(tiny_model_dir),
                   *FAST, "--trim-every", "-1"])
    assert rc == 2 and "--trim-every must be 0 or more" in capsys.readouterr().err


def test_refuses_non_empty_output(tmp_path, snapshot, tiny_model_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli.main(["--snapshot", str(snapshot), "--out", str(out), "--model-dir", str(tiny_model_dir)]) == 2
    assert (out / "keep.txt").read_text() == "x"


def test_nan_fails_cleanly(tmp_path, snapshot, tiny_model_dir, monkeypatch, capsys):
    real = train_mod.kto_loss

    def poisoned(*a, **k):
        out = real(*a, **k)
        return out._replace(losses=out.losses * torch.tensor(float("nan")))

    monkeypatch.setattr(train_mod, "kto_loss", poisoned)
    out = tmp_path / "out"
    rc = cli.main(["--snapshot", str(snapshot), "--out", str(out), "--model-dir", str(tiny_model_dir), *FAST])
    err = capsys.readouterr().err
    assert rc == 1 and "non-finite" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_each_continued_generation_trains_at_a_decayed_learning_rate(trained, snapshot, tiny_model_dir, tmp_path):
    assert json.loads((trained / "manifest.json").read_text())["generation"] == 0
    parent = trained
    for gen in (1, 2):  # v2 continues v1, v3 continues v2: lr × 0.5, then × 0.25
        out = tmp_path / f"v{gen + 1}"
        rc = cli.main(["--snapshot", str(snapshot), "--out", str(out), "--model-dir", str(tiny_model_dir), *FAST,
                       "--resume-from", str(parent), "--lr", "1e-3", "--lr-generation-decay", "0.5",
                       "--max-steps", "3"])
        assert rc == 0
        m = json.loads((out / "manifest.json").read_text())
        assert m["generation"] == gen and train_mod.adapter_generation(out) == gen
        assert m["hyperparameters"]["lr_effective"] == pytest.approx(1e-3 * 0.5 ** gen)
        warmup = int(0.1 * 3)
        assert [r["lr"] for r in m["log"]] == pytest.approx([1e-3 * 0.5 ** gen * train_mod._lr_at(s, 3, warmup)
                                                             for s in range(3)])
        parent = out
    rc = cli.main(["--snapshot", str(snapshot), "--out", str(tmp_path / "same"), "--model-dir", str(tiny_model_dir),
                   *FAST, "--resume-from", str(trained), "--lr", "1e-3", "--max-steps", "1"])  # default: no decay
    assert rc == 0
    assert json.loads((tmp_path / "same" / "manifest.json").read_text())["hyperparameters"]["lr_effective"] == 1e-3


def test_adapter_generation_follows_resume_from_in_older_manifests(tmp_path):
    def adapter(name: str, manifest: dict | None) -> str:
        (tmp_path / name).mkdir()
        if manifest is not None:
            (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
        return str(tmp_path / name)

    a = adapter("a", {"resume_from": None})                     # fresh, before manifests recorded a generation
    b = adapter("b", {"resume_from": a})
    c = adapter("c", {"checkpoint": {"step": 2}, "resume_from": b})  # a checkpoint of a run that continued b
    d = adapter("d", {"generation": 5, "resume_from": c})       # a recorded generation wins
    e = adapter("e", {"resume_from": d})
    assert [train_mod.adapter_generation(x) for x in (a, b, c, d, e)] == [0, 1, 2, 5, 6]
    assert train_mod.adapter_generation(adapter("external", None)) == 0  # made elsewhere: counts as fresh
    assert train_mod.adapter_generation(adapter("loop", {"resume_from": str(tmp_path / "loop")})) == 1
    assert train_mod.adapter_generation(None) == 0


def test_lr_generation_decay_outside_0_1_exits_2(snapshot, tiny_model_dir, tmp_path, capsys):
    rc = cli.main(["--snapshot", str(snapshot), "--out", str(tmp_path / "o"), "--model-dir", str(tiny_model_dir),
                   *FAST, "--lr-generation-decay", "1.5"])
    assert rc == 2 and "--lr-generation-decay must be in (0, 1]" in capsys.readouterr().err


def test_every_flag_is_built_from_its_trainconfig_field():
    from dataclasses import MISSING

    from aligner.config import SETTINGS

    parser = cli.build_parser()
    args = parser.parse_args(["--snapshot", "s", "--out", "o", "--model-dir", "m"])
    values = vars(args)
    assert values.pop("progress_json") is False
    assert values == {n: f.default for n, f in SETTINGS.items() if f.default is not MISSING} | {
        "snapshot": "s", "out": "o", "model_dir": "m"}
    assert train_mod.TrainConfig(**values) == train_mod.TrainConfig(snapshot="s", out="o", model_dir="m")
    flags = ["--snapshot", "s", "--out", "o", "--model-dir", "m"]
    assert parser.parse_args([*flags, "--no-shared-head"]).shared_head is False  # bools: --x / --no-x
    assert parser.parse_args([*flags, "--shared-head"]).shared_head is True
    assert parser.parse_args([*flags, "--holdout-fraction", "0.3"]).heldout_fraction == 0.3  # the older spelling
    assert parser.parse_args([*flags, "--target-modules", "q_proj", "v_proj"]).target_modules == ["q_proj", "v_proj"]
    assert parser.parse_args([*flags, "--first-lora-layer", "50%"]).first_lora_layer == "50%"
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "o", "--model-dir", "m"])  # a field without a default is a required flag
    with pytest.raises(SystemExit):
        parser.parse_args([*flags, "--reference", "other"])  # choices come from the field
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: 2048)" in text and "50% = the upper half" in text


@pytest.mark.parametrize("flags, message", [
    (["--max-length", "16"], "--max-length must be ≥ 32"),
    (["--checkpoints", "21"], "--checkpoints must be in [0, 20]"),
    (["--heldout-fraction", "1"], "--heldout-fraction must be in [0, 1)"),
    (["--beta", "0"], "--beta must be > 0"),
    (["--anchor-max-tokens", "513"], "--anchor-max-tokens must be in [1, 512]"),
    (["--lora-rank", "32"], "--lora-rank must be in [1, --max-lora-rank]")])
def test_declared_ranges_refuse_before_any_training(flags, message, snapshot, tiny_model_dir, tmp_path, capsys):
    rc = cli.main(["--snapshot", str(snapshot), "--out", str(tmp_path / "o"), "--model-dir", str(tiny_model_dir),
                   *flags])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
