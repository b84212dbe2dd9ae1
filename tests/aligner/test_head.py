"""The shared head (model.SharedHead): the tokens every sequence starts with run once per pass, and that changes
no log-prob and no gradient beyond float32 rounding, whether the adapter sits in every layer (the head's keys and
values then carry gradient) or above a cached prefix of layers (model.Prefix).

The identities are checked in float32, which every CPU computes alike. Where bf16 is native the aligner runs in
bf16 (model.resolve_dtype), whose rounding depends on the shape of each product (a one-row head pass against a
full batch), so there the head path is checked against bf16's own error instead: how far bf16 is from float32."""

from __future__ import annotations

import pytest
import torch

from aligner import attention
from aligner import model as model_mod
from aligner import train as train_mod
from aligner.model import common_head, completion_logps, load_policy, load_tokenizer, set_shared_head
from tests.aligner.support import synthetic_rows, write_snapshot
from tests.aligner.test_prefix import METRICS, _align, _close


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return write_snapshot(tmp_path_factory.mktemp("snap") / "s.parquet", synthetic_rows(14, 10, seed=5))


def _chat_seqs(tok) -> list[tuple[list[int], list[int]]]:
    """Three rated answers as the aligner builds them: chat template, so every prompt starts with the system turn."""
    out = []
    for q, a in [("Tell me about bees.", "Bees make honey and pollinate flowers."), ("Hi", "Hello! How can I help?"),
                 ("What is 2 + 2?", "4.")]:
        p = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        out.append((tok(p, add_special_tokens=False)["input_ids"], tok(a + "<|im_end|>", add_special_tokens=False)
                    ["input_ids"]))
    return out


def _trained_looking(model) -> None:
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)  # non-zero, so a layer that skipped the adapter would show


def test_common_head_is_the_shared_prefix_one_short_of_the_shortest_prompt():
    assert common_head([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 3, 4, 7]]) == [1, 2, 3]
    assert common_head([[1, 2, 3], [1, 2, 3, 4]]) == [1, 2]  # the shortest keeps a token of its own
    assert common_head([[1, 2], [2, 1]]) == []
    assert common_head([]) == []


@pytest.mark.parametrize("first_layer", [0, 1])
def test_shared_head_gives_the_same_logps_and_gradients(tiny_model_dir, first_layer, monkeypatch):
    calls = []
    real = model_mod._head_hidden
    monkeypatch.setattr(model_mod, "_head_hidden", lambda *a: calls.append(a[4]) or real(*a))
    model = load_policy(tiny_model_dir, first_lora_layer=first_layer, dtype=torch.float32)
    _trained_looking(model)
    tok = load_tokenizer(tiny_model_dir)
    seqs = _chat_seqs(tok)
    head = common_head([p for p, _ in seqs])
    assert len(head) >= 20  # SmolLM2's system turn and user tag
    pad = tok.pad_token_id

    def run(shared: bool) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        set_shared_head(model, head if shared else None)
        model.eval()
        states: list[torch.Tensor] = []
        with torch.no_grad():
            lp = completion_logps(model, seqs, pad, capture=(1, states)) if first_layer else \
                completion_logps(model, seqs, pad)
            lp_start = completion_logps(model, seqs, pad, start=(1, states)) if first_layer else lp
        model.zero_grad()
        start = (1, states) if first_layer else None
        completion_logps(model, seqs, pad, start=start).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return lp, states, lp_start, grads

    plain, plain_states, _, plain_grads = run(False)
    assert calls == []
    lp, states, lp_start, grads = run(True)
    assert calls == ([0, 1, 1] if first_layer else [0, 0])  # every pass took the head path, from its layer
    torch.testing.assert_close(lp, plain, rtol=0, atol=2e-5)
    torch.testing.assert_close(lp_start, plain, rtol=0, atol=2e-5)
    for a, b in zip(states, plain_states, strict=True):  # full-length layer-1 inputs, head rows included
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert grads.keys() == plain_grads.keys() and grads
    if first_layer == 0:  # layer 0's adapter reaches the batch only through the head's keys and values, too
        assert any(".layers.0." in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], plain_grads[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("first_layer", [0, 1])
def test_in_bf16_the_head_path_is_as_close_to_float32_as_whole_sequences_are(tiny_model_dir, first_layer):
    """Measured on the tiny model (AVX512-BF16 EPYC): both bf16 paths are 0.004-0.013 from float32 on log-probs of
    33-108 nats and 1.0-1.7% off in each gradient's norm; the bounds leave 3-4x room for other CPUs' rounding."""
    tok = load_tokenizer(tiny_model_dir)
    seqs = _chat_seqs(tok)
    head = common_head([p for p, _ in seqs])

    def run(model, shared: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        set_shared_head(model, head if shared else None)
        model.eval()
        model.zero_grad()
        lp = completion_logps(model, seqs, tok.pad_token_id)
        lp.sum().backward()
        return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    f32 = load_policy(tiny_model_dir, first_lora_layer=first_layer, dtype=torch.float32)
    _trained_looking(f32)
    bf16 = load_policy(tiny_model_dir, first_lora_layer=first_layer, dtype=torch.bfloat16)
    adapter = {n: p for n, p in f32.named_parameters() if "lora_" in n}
    for n, p in bf16.named_parameters():
        if "lora_" in n:
            p.data.copy_(adapter[n])  # the same float32 adapter on both
    truth, truth_grads = run(f32, False)
    for shared in (False, True):
        lp, grads = run(bf16, shared)
        torch.testing.assert_close(lp, truth, rtol=5e-4, atol=0)
        assert grads.keys() == truth_grads.keys()
        for n, g in grads.items():
            err = ((g - truth_grads[n]).norm() / truth_grads[n].norm()).item()
            assert err < 0.05, (shared, n, err)


def test_a_batch_not_all_starting_with_the_head_runs_whole_sequences(tiny_model_dir):
    model = load_policy(tiny_model_dir)
    _trained_looking(model)
    tok = load_tokenizer(tiny_model_dir)
    seqs = _chat_seqs(tok)
    other = (tok.encode("No template here."), tok.encode(" Fine."))
    set_shared_head(model, common_head([p for p, _ in seqs]))
    with torch.no_grad():
        torch.testing.assert_close(completion_logps(model, seqs, tok.pad_token_id)[:1],
                                   completion_logps(model, seqs[:1], tok.pad_token_id), rtol=0, atol=2e-5)
        mixed = completion_logps(model, [*seqs, other], tok.pad_token_id)
        set_shared_head(model, None)
        plain = completion_logps(model, [*seqs, other], tok.pad_token_id)
    torch.testing.assert_close(mixed, plain, rtol=0, atol=2e-5)


def test_head_attention_gradient_matches_autograd_of_the_masked_softmax():
    torch.manual_seed(0)
    b, h, h_kv, t, p, d = 2, 4, 2, 7, 5, 8
    q = torch.randn(b, h, t, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, h_kv, p + t, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, h_kv, p + t, d, dtype=torch.float64, requires_grad=True)
    g = torch.randn(b, h, t, d, dtype=torch.float64)
    out = attention.CausalAttention.apply(q, k, v, 0.3, 2, p)
    ours = torch.autograd.grad((out * g).sum(), (q, k, v))
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.3).masked_fill(~attention.head_mask(t, p), float("-inf"))
    ref_out = torch.softmax(s, -1) @ v.repeat_interleave(2, 1)
    ref = torch.autograd.grad((ref_out * g).sum(), (q, k, v))
    torch.testing.assert_close(out, ref_out)
    for a, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, r)


def test_a_run_with_the_shared_head_has_the_numbers_of_one_without(snapshot, tiny_model_dir, tmp_path):
    """Reference pass, z0, steps with gradient, anchors, held-out metrics and lazily evaluated checkpoints: all
    the same with and without the head, and the manifest says how many tokens it held."""
    flags = ("--first-lora-layer", "1", "--anchor-weight", "2", "--anchor-max-tokens", "8")
    head = _align(snapshot, tiny_model_dir, tmp_path / "head", *flags)
    plain = _align(snapshot, tiny_model_dir, tmp_path / "plain", *flags, "--no-shared-head",
                   "--checkpoint-eval", "eager")
    assert head["prefix"]["head_tokens"] >= 10 and plain["prefix"]["head_tokens"] == 0
    assert head["hyperparameters"]["shared_head"] is True and plain["hyperparameters"]["shared_head"] is False
    for a, b in zip(head["log"], plain["log"], strict=True):
        for k in ("loss", "z0_pre_clamp", "reward_desirable", "reward_undesirable", "grad_norm", "anchor_kl"):
            assert _close(a[k], b[k]), (a["step"], k, a[k], b[k])
    assert head["log"][-1]["z0_pre_clamp"] != 0.0  # the policy moved: the comparison had something to compare
    for k in METRICS:
        assert _close(head["heldout"]["new"][k], plain["heldout"]["new"][k]), k
    evaluated = train_mod.evaluate_checkpoints(tmp_path / "head")  # its own process in the product
    assert evaluated["checkpoints"]
    for c, ce in zip(evaluated["checkpoints"], plain["checkpoints"], strict=True):
        for k in METRICS:
            assert _close(c["heldout_new"][k], ce["heldout_new"][k]), (c["step"], k)
