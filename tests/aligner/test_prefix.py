"""An adapter in the upper layers only: the layers below run once per sequence, and that changes no number
(beyond float32 rounding: the cached states sit at other addresses, and oneDNN may block differently).

The tiny model has 2 decoder layers, so `--first-lora-layer 1` puts the adapter in layer 1 and the reference pass
keeps every sequence's layer-1 input (model.Prefix) for the passes after it.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from aligner import cli
from aligner import train as train_mod
from aligner.model import completion_logps, load_policy, load_tokenizer, prefix_states, shared_prefix_layers
from tests.aligner.support import synthetic_rows, write_snapshot

# float32 on every CPU: these runs compare whole training trajectories, and bf16 (the default where it is native)
# rounds by the shape of each product, a difference a few Adam steps amplify (see test_aligner_head for bf16).
FAST = ["--max-length", "128", "--batch-size", "4", "--epochs", "1", "--holdout-fraction", "0.2", "--dtype",
        "float32"]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return write_snapshot(tmp_path_factory.mktemp("snap") / "s.parquet", synthetic_rows(14, 10, seed=5))


def _align(snapshot, model_dir, out, *flags) -> dict:
    assert cli.main(["--snapshot", str(snapshot), "--out", str(out), "--model-dir", str(model_dir), *FAST,
                     *flags]) == 0
    return json.loads((out / "manifest.json").read_text())


def _close(a: float | None, b: float | None) -> bool:
    """Equal up to float32 rounding; None (a class absent from the batch) only matches None."""
    return (a is None and b is None) or (a is not None and b is not None and a == pytest.approx(b, rel=1e-4, abs=1e-5))


METRICS = ("loss", "z0_pre_clamp", "reward_desirable", "reward_undesirable", "margin")


def test_starting_at_the_first_adapted_layer_gives_the_same_logps_and_gradients(tiny_model_dir):
    assert shared_prefix_layers(load_policy(tiny_model_dir)) == 0
    model = load_policy(tiny_model_dir, first_lora_layer=1, dtype=torch.float32)
    assert shared_prefix_layers(model) == 1
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)  # a trained-looking adapter, so a wrong layer would show
    tok = load_tokenizer(tiny_model_dir)
    seqs = [(tok.encode("Tell me about bees."), tok.encode(" Bees make honey and pollinate flowers.")),
            (tok.encode("Hi"), tok.encode(" Hello!"))]
    model.eval()
    states: list[torch.Tensor] = []
    with torch.no_grad():
        full = completion_logps(model, seqs, tok.pad_token_id, capture=(1, states))
    assert [s.shape[0] for s in states] == [len(p) + len(c) for p, c in seqs]
    with torch.no_grad():
        from_layer_1 = completion_logps(model, seqs, tok.pad_token_id, start=(1, states))
    torch.testing.assert_close(from_layer_1, full, rtol=0, atol=1e-5)
    for alone, captured in zip(prefix_states(model, seqs, tok.pad_token_id, 1), states, strict=True):
        torch.testing.assert_close(alone, captured, rtol=1e-5, atol=1e-6)  # layer 0 alone gives the same input

    grads = []
    for start in (None, (1, states)):
        model.zero_grad()
        completion_logps(model, seqs, tok.pad_token_id, start=start).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and all(".layers.1." in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6)


def test_prefix_cache_changes_no_number_and_the_adapter_holds_only_its_layers(snapshot, tiny_model_dir, tmp_path):
    cached = _align(snapshot, tiny_model_dir, tmp_path / "cached", "--first-lora-layer", "1")
    plain = _align(snapshot, tiny_model_dir, tmp_path / "plain", "--first-lora-layer", "1", "--prefix-cache-mb", "0",
                   "--checkpoint-eval", "eager")
    assert cached["prefix"]["layers"] == plain["prefix"]["layers"] == 1
    assert cached["prefix"]["sequences"] > 0 and cached["prefix"]["mb"] > 0
    assert plain["prefix"]["sequences"] == 0  # no memory for it: every pass ran the whole model
    for a, b in zip(cached["log"], plain["log"], strict=True):
        for k in ("loss", "z0_pre_clamp", "reward_desirable", "reward_undesirable", "grad_norm"):
            assert _close(a[k], b[k]), (a["step"], k, a[k], b[k])
    assert cached["heldout"]["n"] >= 2
    assert cached["heldout"]["new"]["correct_side"] == plain["heldout"]["new"]["correct_side"]
    for k in METRICS:
        assert _close(cached["heldout"]["new"][k], plain["heldout"]["new"][k]), k
    # lazy checkpoint evaluation (its own process in the product) starts at layer 1 too, with the same numbers
    evaluated = train_mod.evaluate_checkpoints(tmp_path / "cached")
    for c, ce in zip(evaluated["checkpoints"], plain["checkpoints"], strict=True):
        for k in METRICS:
            assert _close(c["heldout_new"][k], ce["heldout_new"][k]), (c["step"], k)

    config = json.loads((tmp_path / "cached" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1]
    weights = load_file(tmp_path / "cached" / "adapter_model.safetensors")
    assert weights and all(".layers.1." in k for k in weights), sorted(weights)[:4]
    a, b = weights, load_file(tmp_path / "plain" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_anchor_term_starts_at_the_first_adapted_layer_with_the_same_numbers(snapshot, tiny_model_dir, tmp_path):
    runs = {}
    for mb in ("2048", "0"):
        runs[mb] = _align(snapshot, tiny_model_dir, tmp_path / f"a-{mb}", "--max-steps", "4", "--checkpoints", "0",
                          "--first-lora-layer", "1", "--anchor-weight", "2", "--anchor-max-tokens", "8",
                          "--prefix-cache-mb", mb)
    n_anchors = runs["2048"]["anchor"]["n_answers"]
    assert runs["2048"]["prefix"]["sequences"] >= n_anchors > 0 and runs["0"]["prefix"]["sequences"] == 0
    for a, b in zip(runs["2048"]["log"], runs["0"]["log"], strict=True):
        for k in ("anchor_kl", "loss", "grad_norm"):
            assert _close(a[k], b[k]), (a["step"], k, a[k], b[k])
    assert runs["2048"]["log"][-1]["anchor_kl"] > 0  # the policy moved, and the term saw it


def test_a_served_or_resumed_adapter_reaching_lower_layers_runs_the_whole_model(snapshot, tiny_model_dir, tmp_path):
    """The cache is checked at each use: an adapter in layer 0 (served here) must not start at layer 1."""
    everywhere = tmp_path / "all"
    _align(snapshot, tiny_model_dir, everywhere, "--max-steps", "3", "--checkpoints", "0", "--first-lora-layer", "0")
    upper = tmp_path / "upper"  # "50%" of the tiny model's 2 layers: layer 1
    first = _align(snapshot, tiny_model_dir, upper, "--max-steps", "3", "--checkpoints", "0",
                   "--first-lora-layer", "50%")
    assert first["hyperparameters"]["first_lora_layer"] == 1 and first["prefix"]["layers"] == 1
    assert json.loads((upper / "adapter_config.json").read_text())["layers_to_transform"] == [1]
    runs = {}
    for mb in ("2048", "0"):
        runs[mb] = _align(snapshot, tiny_model_dir, tmp_path / f"v2-{mb}", "--max-steps", "2", "--checkpoints", "0",
                          "--resume-from", str(upper), "--served-adapter", str(everywhere), "--prefix-cache-mb", mb)
    assert runs["2048"]["prefix"]["layers"] == 1 and runs["2048"]["prefix"]["sequences"] > 0
    served, served_plain = runs["2048"]["heldout"]["served"], runs["0"]["heldout"]["served"]
    assert served["z0_pre_clamp"] != 0.0  # the served adapter moved the held-out log-probs
    for k in METRICS:
        assert _close(served[k], served_plain[k]), k
        assert _close(runs["2048"]["heldout"]["new"][k], runs["0"]["heldout"]["new"][k]), k
    # resuming an adapter of every layer: it decides, whatever --first-lora-layer says
    resumed = _align(snapshot, tiny_model_dir, tmp_path / "v2-all", "--max-steps", "1", "--checkpoints", "0",
                     "--resume-from", str(everywhere), "--first-lora-layer", "1")
    assert {k: resumed["prefix"][k] for k in ("layers", "sequences", "mb")} == {"layers": 0, "sequences": 0, "mb": 0.0}


@pytest.mark.parametrize("flags, message", [
    (["--first-lora-layer", "2"], "first LoRA layer must be in [0, 1]"),
    (["--first-lora-layer", "-1"], "first LoRA layer must be a layer index N ≥ 0 or a share of the depth P%"),
    (["--first-lora-layer", "100%"], "0 ≤ P < 100 (e.g. 15 or 50%), got '100%'"),
    (["--first-lora-layer", "half"], "got 'half'"),
    (["--prefix-cache-mb", "-1"], "--prefix-cache-mb must be 0 or more")])
def test_bad_prefix_flags_exit_2_with_one_line(flags, message, snapshot, tiny_model_dir, tmp_path, capsys):
    rc = cli.main(["--snapshot", str(snapshot), "--out", str(tmp_path / "o"), "--model-dir", str(tiny_model_dir),
                   *FAST, *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
