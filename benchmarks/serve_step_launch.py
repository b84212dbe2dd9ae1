"""`python -m benchmarks.serve_step_launch ARGS` = `python -m serving.vllm_cpu.launch ARGS` with wall-clock timers in
vLLM's worker: where a served step's time goes (benchmarks/serve_step_profile.py starts servers this way).

Timed, inclusive, summed per step: vLLM-cpu's oneDNN GEMM, attention and KV-cache-write calls (its
`_custom_ops` functions, looked up at call time), the forward of every module of the model by class
(a LoRA linear layer's time includes its GEMM), and the worker's `execute_model` / `sample_tokens`.
Every REPORT_EVERY forwards the worker appends one JSON line to $KTO_STEP_TIMING_OUT: per-forward means in ms,
the wall time per forward, tokens per forward and the window's start and end (time.time()).
The timers cost two perf_counter calls each, ~400 a step: they add about a tenth to a step, so compare steps
timed the same way, not these against untimed tokens/s.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict

from serving.vllm_cpu import launch as vllm_launch

REPORT_EVERY = 100
OUT = os.environ.get("KTO_STEP_TIMING_OUT")
_acc: dict[str, float] = defaultdict(float)
_window = {"forwards": 0, "tokens": 0, "start": time.time(), "t0": time.perf_counter()}


def _timed(fn, key: str):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _acc[key] += time.perf_counter() - t0

    wrapper.__wrapped__ = fn
    return wrapper


def _report() -> None:
    n = _window["forwards"]
    now = time.perf_counter()
    line = {"forwards": n, "tokens_per_forward": _window["tokens"] / n,
            "wall_per_forward_ms": 1e3 * (now - _window["t0"]) / n, "start": _window["start"], "end": time.time(),
            "ms": {k: 1e3 * v / n for k, v in sorted(_acc.items())}}
    with open(OUT, "a") as f:
        f.write(json.dumps(line) + "\n")
    _acc.clear()
    _window.update(forwards=0, tokens=0, start=time.time(), t0=now)


def _instrument(model) -> None:
    seen: set[int] = set()
    for m in model.modules():
        if m is model or id(m) in seen or type(m).__name__ == "ModuleList":
            continue
        seen.add(id(m))
        m.forward = _timed(m.forward, "module:" + type(m).__name__)  # an instance attribute: this module only


def install() -> None:
    import vllm._custom_ops as ops
    from vllm.model_executor.models import llama
    from vllm.v1.worker import gpu_model_runner as runner

    for name, key in (("onednn_mm", "op:gemm"), ("cpu_attention_with_kv_cache", "op:attention"),
                      ("cpu_attn_reshape_and_cache", "op:kv_cache_write")):
        setattr(ops, name, _timed(getattr(ops, name), key))
    cls = runner.GPUModelRunner
    cls.execute_model = _timed(cls.execute_model, "execute_model")
    if hasattr(cls, "sample_tokens"):
        cls.sample_tokens = _timed(cls.sample_tokens, "sample_tokens")
    stock = llama.LlamaForCausalLM.forward

    def forward(self, input_ids=None, positions=None, *args, **kwargs):
        if not getattr(self, "_kto_timed", False):
            _instrument(self)
            self._kto_timed = True
            _window.update(start=time.time(), t0=time.perf_counter())
        t0 = time.perf_counter()
        out = stock(self, input_ids, positions, *args, **kwargs)
        _acc["forward"] += time.perf_counter() - t0
        _window["forwards"] += 1
        _window["tokens"] += positions.numel() if positions is not None else 0
        if _window["forwards"] >= REPORT_EVERY:
            _report()
        return out

    llama.LlamaForCausalLM.forward = forward


if OUT:
    install()

if __name__ == "__main__":
    vllm_launch.main()
