"""The optional anchor term: its KL math, its prompt file, and that it really holds the policy near the base."""

from __future__ import annotations

import json

import pytest
import torch

from aligner import anchor, cli
from aligner.data import SnapshotError
from aligner.loss import bucket_kl, rest_logp
from aligner.model import load_policy, load_tokenizer
from tests.aligner.support import synthetic_rows, write_snapshot

FAST = ["--max-length", "128", "--batch-size", "4", "--epochs", "1", "--holdout-fraction", "0.2",
        "--checkpoints", "0", "--dtype", "float32"]


def _full_kl(ref: torch.Tensor, pol: torch.Tensor) -> torch.Tensor:
    return (ref.exp() * (ref - pol)).sum(-1)


def _bucketed(ref: torch.Tensor, pol: torch.Tensor, k: int) -> torch.Tensor:
    top, ids = ref.topk(k, dim=-1)
    pol_top = pol.gather(-1, ids)
    return bucket_kl(top, rest_logp(top), pol_top, rest_logp(pol_top))


def test_bucket_kl_is_zero_at_the_reference_bounded_by_the_full_kl_and_exact_with_every_token():
    g = torch.Generator().manual_seed(0)
    ref = torch.log_softmax(torch.randn(5, 50, generator=g) * 2, -1)
    pol_raw = torch.log_softmax(torch.randn(5, 50, generator=g) * 2, -1).requires_grad_(True)
    full = _full_kl(ref, pol_raw)
    for k in (1, 5, 20):
        part = _bucketed(ref, pol_raw, k)
        assert torch.all(part <= full + 1e-6) and torch.all(part >= -1e-6)
    assert torch.allclose(_bucketed(ref, pol_raw, 50), full, atol=1e-5)
    # At the reference: zero, and zero gradient (the term resists drift, it does not pull anywhere).
    same = ref.clone().requires_grad_(True)
    kl = _bucketed(ref, same, 10).sum()
    kl.backward()
    assert abs(kl.item()) < 1e-5 and same.grad.abs().max().item() < 1e-5


def test_shipped_anchor_prompts_are_disjoint_from_what_we_measure():
    """The anchor set must not contain the capability probe's questions, the held-out prompts or the simulator's
    training prompts: anchoring them would inflate (or fight) exactly what the gate and the simulator report."""
    from app.sim.inputs import DEFAULT_HOLDOUT, DEFAULT_PROMPTS, load_capability, load_prompts

    anchors = {p.strip().lower() for p in anchor.load_prompts(None)}
    assert len(anchors) >= 32
    probe = {q.question.strip().lower() for q in load_capability()}
    held = {p.strip().lower() for p in load_prompts(DEFAULT_HOLDOUT)}
    trained = {p.strip().lower() for p in load_prompts(DEFAULT_PROMPTS)}
    assert not anchors & probe and not anchors & held and not anchors & trained
    assert not any("capital" in p for p in anchors)


@pytest.mark.parametrize("text, message", [
    (None, "cannot read anchor prompts"),
    ('{"prompt": "a"}\n{"text": "b"}\n', ':2: each line must be a JSON object with a non-empty "prompt"'),
    ('{"prompt": "only one"}\n', "at least 2 anchor prompts"),
    ("not json\n", ':1: each line')])
def test_bad_anchor_file_is_a_clear_error(text, message, tmp_path):
    path = tmp_path / "a.jsonl"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SnapshotError, match=message):
        anchor.load_prompts(path)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return write_snapshot(tmp_path_factory.mktemp("snap") / "s.parquet", synthetic_rows(14, 10, seed=3))


@pytest.fixture(scope="module")
def anchor_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("anchor") / "anchor.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                            ["How many legs does a spider have?", "Name three colours.", "What is 2 plus 2?",
                             "Say hello."]))
    return path


def _anchor_kl(model_dir, adapter, anchor_file) -> float:
    """Mean bucketed KL(base ‖ adapter) per anchor token, measured the way training measures it."""
    tok = load_tokenizer(model_dir)
    model = load_policy(model_dir, resume_from=adapter, dtype=torch.float32)
    model.eval()
    anchors = anchor.build(model, tok, anchor.load_prompts(anchor_file), 16)
    with torch.no_grad():
        idx = list(range(len(anchors.seqs)))
        return (anchor.kl_sum(model, anchors, idx, tok.pad_token_id) / anchors.n_tokens(idx)).item()


def test_anchor_term_is_logged_and_holds_the_policy_near_the_base(snapshot, anchor_file, tiny_model_dir, tmp_path):
    common = ["--snapshot", str(snapshot), "--model-dir", str(tiny_model_dir), *FAST, "--max-steps", "4",
              "--lr", "5e-3", "--anchor-prompts", str(anchor_file), "--anchor-max-tokens", "16",
              "--anchor-per-step", "2", "--first-lora-layer", "0"]
    plain, anchored = tmp_path / "plain", tmp_path / "anchored"
    assert cli.main([*common, "--out", str(plain), "--anchor-weight", "0"]) == 0
    assert cli.main([*common, "--out", str(anchored), "--anchor-weight", "200"]) == 0

    m0 = json.loads((plain / "manifest.json").read_text())
    assert m0["anchor"] is None and all("anchor_kl" not in r for r in m0["log"])
    m = json.loads((anchored / "manifest.json").read_text())
    assert m["anchor"]["weight"] == 200 and m["anchor"]["n_answers"] == 4 and m["anchor"]["per_step"] == 2
    assert m["anchor"]["answer_tokens"] > 0 and "anchor" in m["phase_seconds"]
    kls = [r["anchor_kl"] for r in m["log"]]
    assert len(kls) == 4 and abs(kls[0]) < 1e-5  # a fresh adapter starts as the reference
    assert kls[1] > 0
    # The same run, data and seed, with and without the term: the anchored adapter drifted less on the anchors.
    drift_plain = _anchor_kl(tiny_model_dir, plain, anchor_file)
    drift_anchored = _anchor_kl(tiny_model_dir, anchored, anchor_file)
    assert drift_anchored < 0.3 * drift_plain, (drift_anchored, drift_plain)


def test_anchor_cache_is_reused_gives_the_same_run_and_survives_a_corrupt_file(snapshot, anchor_file,
                                                                                 tiny_model_dir, tmp_path):
    """A later run reads the base model's anchors from the cache instead of building them, and trains exactly as
    the run that built them; another answer length is another entry; a broken file is rebuilt, not fatal."""
    cache = tmp_path / "cache"
    common = ["--snapshot", str(snapshot), "--model-dir", str(tiny_model_dir), *FAST, "--max-steps", "3",
              "--lr", "5e-3", "--anchor-prompts", str(anchor_file), "--anchor-per-step", "2",
              "--anchor-weight", "10", "--anchor-cache", str(cache)]

    def run(name: str, *flags: str) -> dict:
        assert cli.main([*common, "--out", str(tmp_path / name), "--anchor-max-tokens", "16", *flags]) == 0
        return json.loads((tmp_path / name / "manifest.json").read_text())

    first, second = run("a"), run("b")
    assert not first["anchor"]["from_cache"] and second["anchor"]["from_cache"]
    assert len(list(cache.glob("anchors-*.pt"))) == 1
    assert [r["anchor_kl"] for r in second["log"]] == [r["anchor_kl"] for r in first["log"]]
    assert [r["loss"] for r in second["log"]] == [r["loss"] for r in first["log"]]

    assert cli.main([*common, "--out", str(tmp_path / "c"), "--anchor-max-tokens", "8"]) == 0
    assert not json.loads((tmp_path / "c" / "manifest.json").read_text())["anchor"]["from_cache"]
    assert len(list(cache.glob("anchors-*.pt"))) == 2

    for f in cache.glob("anchors-*.pt"):
        f.write_bytes(b"not a torch file")
    rebuilt = run("d")
    assert not rebuilt["anchor"]["from_cache"]
    assert [r["anchor_kl"] for r in rebuilt["log"]] == [r["anchor_kl"] for r in first["log"]]
    assert run("e")["anchor"]["from_cache"]


@pytest.mark.parametrize("flags, message", [
    (["--anchor-weight", "-1"], "--anchor-weight must be a finite number ≥ 0"),
    (["--anchor-weight", "nan"], "--anchor-weight must be a finite number ≥ 0"),
    (["--anchor-weight", "1", "--anchor-prompts", "/nonexistent.jsonl"], "is not a file"),
    (["--anchor-per-step", "0"], "--anchor-per-step must be ≥ 1")])
def test_bad_anchor_flags_exit_2(flags, message, snapshot, tiny_model_dir, tmp_path, capsys):
    rc = cli.main(["--snapshot", str(snapshot), "--out", str(tmp_path / "x"), "--model-dir", str(tiny_model_dir),
                   *FAST, *flags])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("raw", ["-0.5", "inf", "nan"])
def test_bad_anchor_weight_setting_stops_the_app_with_one_line(raw):
    from app.config import config_from

    with pytest.raises(SystemExit, match="anchor_weight must be a finite number ≥ 0"):
        config_from(None, {"KTO_LOOP_ANCHOR_WEIGHT": raw})
    assert config_from(None, {"KTO_LOOP_ANCHOR_WEIGHT": "3"}).anchor_weight == 3.0


@pytest.mark.parametrize("raw", ["0", "-3", "513"])
def test_bad_anchor_max_tokens_setting_stops_the_app_with_one_line(raw):
    from app.config import config_from

    with pytest.raises(SystemExit, match=r"anchor_max_tokens must be in \[1, 512\]"):
        config_from(None, {"KTO_LOOP_ANCHOR_MAX_TOKENS": raw})
    with pytest.raises(SystemExit, match=r"anchor_max_tokens must be in \[1, 512\]"):
        config_from(None, {"KTO_LOOP_ANCHOR_TOKENS": raw})  # the earlier name still reads
    assert config_from(None, {"KTO_LOOP_ANCHOR_TOKENS": "16"}).anchor_max_tokens == 16
    assert config_from(None, {}).anchor_max_tokens == 24
