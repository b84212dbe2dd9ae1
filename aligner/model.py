"""Model loading, LoRA set-up and the one hot path: summed log-probs of completion tokens.

The vocabulary (49k) dwarfs the hidden size (576), so projecting every position through the LM head is most of
the work of a naive forward. We run the backbone, gather the hidden states at completion positions only, and
project and normalise just those, in tiles so the [tokens, vocab] logits never exist all at once.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from aligner import attention
from aligner.layers import first_layer

# Every linear layer of a Llama block: what vLLM's LoRA kernels support and what the paper-style runs adapt.
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LM_HEAD_TILE = 1024  # completion positions projected through the LM head at once
# With gradient, a forward over at most this many completion positions keeps its log-softmax for the backward
# (4096 × 49k vocabulary × 4 bytes: 0.8 GB for SmolLM2) instead of recomputing each tile's logits there: the
# recompute is a third LM-head GEMM per training pass. Longer forwards recompute, so memory stays bounded.
LM_HEAD_KEEP_POSITIONS = 4096


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 at full speed (AVX512-BF16 or AMX tiles), for `--device cpu`.

    Without them oneDNN emulates bf16 GEMMs, far slower than float32
    (measured: docs/experiments/2026-11-29-two-kinds-of-cpu.md).
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # what vLLM's CPU platform asks too
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_device(name: str) -> torch.device:
    """`auto` (cuda when a CUDA GPU is visible, else cpu), `cpu` or `cuda`; cuda without a GPU is refused here,
    before anything is loaded, rather than failing deep inside the first forward."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is visible to this process (torch.cuda.is_available() is "
                             f"False; torch {torch.__version__}, CUDA build {torch.version.cuda})")
        return torch.device("cuda")
    raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """`auto` (bf16 where the device multiplies it natively: `native_bf16()` on CPU, a bf16-capable GPU on cuda;
    else float32), `bfloat16` or `float32`."""
    if name == "auto":
        if device is not None and device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if native_bf16() else torch.float32
    if name in ("bfloat16", "float32"):
        return getattr(torch, name)
    raise ValueError(f"dtype must be auto, bfloat16 or float32, got {name!r}")


def autocast_on(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device`'s type (the float32 adapters over bf16 base weights need it), or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def model_device(model: Any) -> torch.device:
    """Where the model's weights are: every tensor a pass creates goes there."""
    return _backbone_and_head(model)[1].weight.device


def load_tokenizer(model_dir: str | Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_policy(model_dir: str | Path, *, lora_rank: int = 16, lora_alpha: float | None = None,
                resume_from: str | Path | None = None, dtype: torch.dtype | None = None,
                target_modules: Sequence[str] | None = None, attention_backward: str = "matmul",
                first_lora_layer: int | str = 0, device: torch.device | str = "cpu") -> Any:
    """The base model (frozen, in `dtype`; default `resolve_dtype("auto")`) wrapped as a PEFT LoRA model whose
    adapter weights train in float32 (the optimiser needs full precision only for those).

    `target_modules` defaults to LLAMA_LINEAR; `attention_backward` picks how attention's gradient is computed
    (aligner/attention.py); `first_lora_layer` k > 0 puts a fresh adapter in decoder layers k.. only (PEFT's
    `layers_to_transform`; see `Prefix`); `device` is where the model lives and computes.
    """
    dtype = resolve_dtype("auto") if dtype is None else dtype
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype,
                                                attn_implementation=attention.implementation(attention_backward))
    base.config.use_cache = False
    base.to(device)  # a no-op on cpu; the adapter's weights are created beside the base layers
    if resume_from is not None:
        model = PeftModel.from_pretrained(base, str(resume_from), is_trainable=True)
    else:
        n_layers = base.config.num_hidden_layers
        k = first_layer(first_lora_layer, n_layers)  # an index or a share of the depth, in range
        cfg = LoraConfig(r=lora_rank, lora_alpha=lora_alpha if lora_alpha is not None else 2 * lora_rank,
                         lora_dropout=0.0, bias="none", target_modules=list(target_modules or LLAMA_LINEAR),
                         layers_to_transform=list(range(k, n_layers)) if k else None,
                         task_type="CAUSAL_LM")
        model = get_peft_model(base, cfg)
    if dtype != torch.float32:  # under bf16 autocast: skip PEFT's bf16→fp32 copy of every adapter input
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    _use_fast_lora_forward(model)
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
            if "lora_" not in n:
                raise RuntimeError(f"unexpected trainable parameter {n}: the adapter must hold LoRA weights only")
    return model.to(device)  # a resumed adapter's weights may have been loaded elsewhere


def _fast_lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """base(x) + (x Aᵀ)(s·B)ᵀ: the LoRA scale multiplies the [out, r] weight, not the [tokens, out] output.

    Same math as PEFT's Linear.forward with one fewer full-size element-wise op per adapted layer and none of its
    per-call bookkeeping (about 210 calls per forward on SmolLM2). With s a power of two (alpha = 2 × rank, our
    default) it is bit-identical in bf16. Anything unusual (adapter disabled or switched, merged, dropout,
    variants, extra arguments) takes PEFT's own path.
    """
    if (args or kwargs or self.disable_adapters or self.merged or self.active_adapters != ["default"]
            or "default" in self.lora_variant or not isinstance(self.lora_dropout["default"], torch.nn.Identity)):
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    a, b = self.lora_A["default"].weight, self.lora_B["default"].weight
    return F.linear(x, base.weight, base.bias) + F.linear(F.linear(x, a), b * self.scaling["default"])


def _use_fast_lora_forward(model: Any) -> None:
    from peft.tuners.lora.layer import Linear as LoraLinear

    for module in model.modules():
        if type(module) is LoraLinear and type(module.base_layer) is torch.nn.Linear:
            module.forward = _fast_lora_forward.__get__(module)


def adapter_rank(model: Any, name: str = "default") -> int:
    return int(model.peft_config[name].r)


def pad_batch(seqs: Sequence[tuple[list[int], list[int]]], pad_id: int, device: torch.device | str = "cpu",
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids plus the flat (row, position) of every completion-predicting position and its target,
    on `device` (built on the CPU, copied once).

    Right padding under a causal mask means no real token ever attends to a pad, so no attention mask is needed
    and SDPA can take its causal fast path.
    """
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    rows, cols, targets = [], [], []
    for b, (p, c) in enumerate(seqs):
        ids[b, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        rows += [b] * len(c)
        cols += range(len(p) - 1, len(p) + len(c) - 1)
        targets += c
    out = ids, torch.tensor(rows), torch.tensor(cols), torch.tensor(targets)
    return out if torch.device(device).type == "cpu" else tuple(t.to(device, non_blocking=True) for t in out)


def _backbone_and_head(model: Any) -> tuple[Any, Any]:
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm.model, lm.get_output_embeddings()


def _tile_logps(head: Any, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(h).float(), targets, reduction="none")


# ---------------------------------------------------------------------------------------------- shared prefix
def shared_prefix_layers(model: Any) -> int:
    """How many leading decoder layers hold no LoRA module of any loaded adapter.

    Their output is the same for policy, reference and every adapter, so `Prefix` computes it once per sequence.
    Checked at each use: an adapter reaching lower (a resumed or served one) runs the whole model.
    """
    backbone, _ = _backbone_and_head(model)
    for i, layer in enumerate(backbone.layers):
        if any("lora_" in n for n, _ in layer.named_parameters()):
            return i
    return len(backbone.layers)


class Prefix:
    """Hidden states entering decoder layer `layers`, one [len, H] tensor per sequence key, within a byte budget.

    Why: with the adapter in the upper layers only, a training step needs the lower layers' output of each
    sequence but never their gradient; the reference pass computes it anyway. Keeping it turns every later
    forward into a (L − k)/L-layer one and the backward stops at layer k.
    """

    def __init__(self, layers: int, budget_bytes: int) -> None:
        self.layers, self.budget, self.used = layers, budget_bytes, 0
        self.hidden: dict[Any, torch.Tensor] = {}

    def usable(self, model: Any) -> bool:
        return self.layers > 0 and shared_prefix_layers(model) >= self.layers

    def get(self, keys: Sequence[Any]) -> list[torch.Tensor] | None:
        """The cached states of all `keys`, or None if any is missing (that batch runs the whole model)."""
        if not keys or any(k not in self.hidden for k in keys):
            return None
        return [self.hidden[k] for k in keys]

    def put(self, keys: Sequence[Any], hidden: Sequence[torch.Tensor]) -> None:
        for k, h in zip(keys, hidden, strict=True):
            size = h.numel() * h.element_size()
            if k not in self.hidden and self.used + size <= self.budget:
                self.hidden[k] = h
                self.used += size


# ---------------------------------------------------------------------------------------------- shared head
class SharedHead:
    """The tokens every sequence of a run starts with (the chat template's system turn and the user tag), run once.

    A pass runs the head as a one-row batch, keeping its keys and values per layer, and the rows from the end of the
    head on, attending to them as to their own (`_HeadKV`): log-probs are the whole sequence's to float rounding.
    The head's keys and values are recomputed in every pass under its weights (with gradient where it has one), so
    nothing about the policy is cached across steps. Measured: docs/experiments/2026-12-02-shorter-cycles.md.
    """

    def __init__(self, ids: Sequence[int]) -> None:
        self.ids = list(ids)
        self.below: dict[int, torch.Tensor] = {}  # layer k → the head's layer-k input [1, P, H] (frozen layers)

    def fits(self, seqs: Sequence[tuple[list[int], list[int]]]) -> bool:
        """Every sequence starts with the head and has a prompt token after it (the first completion-predicting
        position must be a batch row's, not the head's)."""
        n = len(self.ids)
        return n > 0 and all(len(p) > n and p[:n] == self.ids for p, _ in seqs)


def common_head(prompts: Sequence[Sequence[int]]) -> list[int]:
    """The longest token prefix of all `prompts`, one token short of the shortest (see SharedHead.fits)."""
    if not prompts:
        return []
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return list(first[:max(n, 0)])


def set_shared_head(model: Any, ids: Sequence[int] | None) -> SharedHead | None:
    """Make every later pass of `model` over sequences that start with `ids` run them once (SharedHead); None or
    an empty prefix turns it off."""
    backbone, _ = _backbone_and_head(model)
    backbone.kto_shared_head = SharedHead(ids) if ids else None
    return backbone.kto_shared_head


class _HeadKV:
    """What the attention layers see as `past_key_values`: recording the head's keys and values (one row), then
    handing them, expanded over the batch, in front of each batch's own."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.recording = True

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.recording:
            self.keys[layer_idx], self.values[layer_idx] = k, v
            return k, v
        hk, hv = self.keys[layer_idx], self.values[layer_idx]
        b = k.shape[0]
        return (torch.cat([hk.expand(b, -1, -1, -1), k], dim=2), torch.cat([hv.expand(b, -1, -1, -1), v], dim=2))


def _run_layers(backbone: Any, x: torch.Tensor, first: int, offset: int, kv: _HeadKV,
                keep: tuple[int, list[torch.Tensor]] | None = None, last: int | None = None) -> torch.Tensor:
    """Decoder layers first..last-1 (default: all, then the final norm) on x [B, T, H] at positions offset..;
    with offset > 0 each row attends to the head's recorded keys and values first. `keep=(k, out)` appends the
    layer-k input to `out`."""
    last = len(backbone.layers) if last is None else last
    positions = torch.arange(offset, offset + x.shape[1], device=x.device).unsqueeze(0)
    pe = backbone.rotary_emb(x, position_ids=positions)
    t = x.shape[1]
    # True = attend: the whole head, then causal within the row. Exact for right-padded rows (no real token
    # attends to a pad). Our attention (aligner.attention) reads `kto_head` and builds the same mask itself.
    mask = attention.head_mask(t, offset, x.device)[None, None] if offset else None
    for i in range(first, last):
        if keep is not None and i == keep[0]:
            keep[1].append(x)
        x = backbone.layers[i](x, attention_mask=mask, position_ids=positions, past_key_values=kv,
                               position_embeddings=pe, kto_head=offset)
    return backbone.norm(x) if last == len(backbone.layers) else x


def _head_hidden(backbone: Any, head: SharedHead, ids: torch.Tensor, lengths: Sequence[int], first: int,
                 states: Sequence[torch.Tensor] | None, capture: tuple[int, list[torch.Tensor]] | None,
                 ) -> torch.Tensor:
    """The backbone's output [B, T − P, H] for right-padded `ids` [B, T] (rows of `lengths` tokens) that all start
    with the head (P tokens), from decoder layer `first` (with `states`, the rows' full-length layer-`first`
    inputs) or from the embeddings. `capture=(k, out)` appends each row's full-length layer-k input, head
    included."""
    n = len(head.ids)
    kv = _HeadKV()
    assert capture is None or first == 0, "capture runs from the embeddings"
    if first > 0:
        h0 = head.below.get(first)
        if h0 is None:  # frozen layers: the same for every pass of the run
            with torch.no_grad():
                emb = backbone.embed_tokens(torch.tensor([head.ids], device=ids.device))
                h0 = head.below[first] = _run_layers(backbone, emb, 0, 0, _HeadKV(), last=first).detach()
        _run_layers(backbone, h0, first, 0, kv)
        x = states[0].new_zeros(ids.shape[0], ids.shape[1] - n, states[0].shape[-1])
        for b, h in enumerate(states):
            x[b, :h.shape[0] - n] = h[n:]
    else:
        head_keep: list[torch.Tensor] = []
        _run_layers(backbone, backbone.embed_tokens(torch.tensor([head.ids], device=ids.device)), 0, 0, kv,
                    keep=(capture[0], head_keep) if capture is not None else None)
        x = backbone.embed_tokens(ids[:, n:])
    kv.recording = False
    if capture is None:
        return _run_layers(backbone, x, first, n, kv)
    k, out = capture
    rows: list[torch.Tensor] = []
    hidden = _run_layers(backbone, x, first, n, kv, keep=(k, rows))
    if first == 0:
        head.below[k] = head_keep[0].detach()
    h_head = head.below[k][0]
    out.extend(torch.cat([h_head, rows[0][b, :m - n]]) for b, m in enumerate(lengths))
    return hidden


@contextlib.contextmanager
def _layers_from(backbone: Any, k: int):
    """The backbone with its decoder layers k.. only (its forward takes the layer-k input as `inputs_embeds`)."""
    layers = backbone.layers
    backbone.layers = layers[k:]
    try:
        yield
    finally:
        backbone.layers = layers


@contextlib.contextmanager
def _layers_below(backbone: Any, k: int):
    """The backbone with decoder layers 0..k-1 only and no final norm: its output is the layer-k input."""
    layers, norm = backbone.layers, backbone.norm
    backbone.layers, backbone.norm = layers[:k], torch.nn.Identity()
    try:
        yield
    finally:
        backbone.layers, backbone.norm = layers, norm


def prefix_states(model: Any, seqs: Sequence[tuple[list[int], list[int]]], pad_id: int, k: int,
                  autocast: bool | None = None) -> list[torch.Tensor]:
    """Each sequence's layer-k input, [len, H], from layers 0..k-1 alone (no gradient; not inference tensors, so
    passes with gradient may start from them). For sequences no log-prob pass needs first (the anchors)."""
    backbone, head = _backbone_and_head(model)
    if autocast is None:
        autocast = head.weight.dtype == torch.bfloat16
    device = head.weight.device
    ids, _, _, _ = pad_batch(seqs, pad_id, device)
    with torch.no_grad(), autocast_on(device, autocast):
        with _layers_below(backbone, k):
            h = backbone(input_ids=ids, use_cache=False).last_hidden_state
    return [h[b, :len(p) + len(c)].clone() for b, (p, c) in enumerate(seqs)]


def _completion_hidden(model: Any, seqs: Sequence[tuple[list[int], list[int]]], pad_id: int,
                       autocast: bool | None, start: tuple[int, Sequence[torch.Tensor]] | None = None,
                       capture: tuple[int, list[torch.Tensor]] | None = None,
                       ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """(LM head, hidden states at the completion-predicting positions [N, H], their rows, their targets, the
    autocast context the head must run under). `autocast` (bf16) defaults to on when the base weights are bf16,
    which the float32 adapters need, else off.

    `start=(k, states)`: run from decoder layer k on these per-sequence layer-k inputs (see `Prefix`).
    `capture=(k, out)`: append each sequence's layer-k input to `out` (call under no_grad, not inference mode:
    the states are reused in passes with gradient).
    """
    backbone, head = _backbone_and_head(model)
    if autocast is None:
        autocast = head.weight.dtype == torch.bfloat16
    device = head.weight.device
    ids, rows, cols, targets = pad_batch(seqs, pad_id, device)
    ctx = functools.partial(autocast_on, device, autocast)
    shared: SharedHead | None = getattr(backbone, "kto_shared_head", None)
    if shared is not None and shared.fits(seqs):
        lengths = [len(p) + len(c) for p, c in seqs]
        first, states = start if start is not None else (0, None)
        with ctx():
            hidden = _head_hidden(backbone, shared, ids, lengths, first, states, capture)
        return head, hidden[rows, cols - len(shared.ids)], rows, targets, ctx
    with ctx():
        if start is not None:
            k, states = start
            x = states[0].new_zeros(ids.shape[0], ids.shape[1], states[0].shape[-1])  # right padding, as ids
            for b, h in enumerate(states):
                x[b, :h.shape[0]] = h
            with _layers_from(backbone, k):
                hidden = backbone(inputs_embeds=x, use_cache=False).last_hidden_state
        elif capture is not None:
            k, out = capture
            lengths = [len(p) + len(c) for p, c in seqs]

            def keep(_module: Any, _args: Any, output: Any) -> None:
                h = output[0] if isinstance(output, tuple) else output
                out.extend(h[b, :n].clone() for b, n in enumerate(lengths))

            hook = backbone.layers[k - 1].register_forward_hook(keep)
            try:
                hidden = backbone(input_ids=ids, use_cache=False).last_hidden_state
            finally:
                hook.remove()
        else:
            hidden = backbone(input_ids=ids, use_cache=False).last_hidden_state
    return head, hidden[rows, cols], rows, targets, ctx


def completion_logps(model: Any, seqs: Sequence[tuple[list[int], list[int]]], pad_id: int,
                     autocast: bool | None = None, start: tuple[int, Sequence[torch.Tensor]] | None = None,
                     capture: tuple[int, list[torch.Tensor]] | None = None) -> torch.Tensor:
    """Σ log π(y_t | x, y_<t) over completion tokens, one float32 value per (prompt, completion) pair.
    `start` / `capture`: see _completion_hidden."""
    head, picked, rows, targets, ctx = _completion_hidden(model, seqs, pad_id, autocast, start, capture)
    token_logps = []
    recompute = torch.is_grad_enabled() and picked.shape[0] > LM_HEAD_KEEP_POSITIONS
    with ctx():
        for s in range(0, picked.shape[0], LM_HEAD_TILE):
            h, t = picked[s:s + LM_HEAD_TILE], targets[s:s + LM_HEAD_TILE]
            if recompute:  # the tile's logits are computed again in backward instead of kept
                token_logps.append(checkpoint(_tile_logps, head, h, t, use_reentrant=False))
            else:
                token_logps.append(_tile_logps(head, h, t))
    token_logp = torch.cat(token_logps)
    out = torch.zeros(len(seqs), dtype=torch.float32, device=token_logp.device)
    return out.index_add(0, rows, token_logp)


def completion_log_softmax(model: Any, seqs: Sequence[tuple[list[int], list[int]]], pad_id: int,
                           autocast: bool | None = None,
                           start: tuple[int, Sequence[torch.Tensor]] | None = None) -> torch.Tensor:
    """log π(· | x, y_<t) over the whole vocabulary at every completion position, [N positions, V], float32.

    For the anchor term (aligner/anchor.py), which compares whole next-token distributions; kept to short
    sequences, so the [N, V] tensor is small (4 answers of 64 tokens: 256 × 49k floats, ~50 MB).
    """
    head, picked, _, _, ctx = _completion_hidden(model, seqs, pad_id, autocast, start)
    with ctx():
        logits = head(picked)
    return F.log_softmax(logits.float(), dim=-1)
