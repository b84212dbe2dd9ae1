"""Where one aligner training step's time goes on this CPU: the torch profiler's share of `aten::mm`, beside the
GEMM rate a matrix of the model's MLP shape reaches alone, in one run.

One forward + backward of `completion_logps` (the aligner's hot path) on 8 random sequences shaped like the
simulator's snapshots (40 prompt tokens, 60-127 answer tokens), base weights in the dtype `--dtype auto` picks.

    .venv/bin/python -m benchmarks.step_profile [--out benchmarks/results/step_profile/<date>_<cpu>.json]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from app.config import config_from
from benchmarks.harness import machine, result_path, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=result_path("step_profile"))
    args = ap.parse_args()
    t_all = time.perf_counter()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from aligner.model import completion_logps, load_policy, resolve_dtype

    model_dir = args.model_dir or config_from().resolved().model_dir
    dtype = resolve_dtype("auto")
    model = load_policy(model_dir, dtype=dtype)
    rng = random.Random(0)
    seqs = [([rng.randrange(1000, 20000) for _ in range(40)],
             [rng.randrange(1000, 20000) for _ in range(rng.randrange(60, 128))]) for _ in range(8)]

    def step() -> None:
        completion_logps(model, seqs, 0).sum().backward()
        model.zero_grad(set_to_none=True)

    step()  # warm
    times = []
    for _ in range(3):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(ops.values())
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:8]
    a, w = torch.randn(1280, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
    for _ in range(3):
        torch.nn.functional.linear(a, w)
    gemm = []
    for _ in range(20):
        t = time.perf_counter()
        torch.nn.functional.linear(a, w)
        gemm.append(time.perf_counter() - t)
    gflops = 2 * 1280 * 576 * 1536 / statistics.median(gemm) / 1e9
    result = {"benchmark": "step_profile", "machine": machine(), "dtype": str(dtype).removeprefix("torch."),
              "threads": torch.get_num_threads(), "step_seconds_median": statistics.median(times),
              "padded_tokens": 8 * max(len(p) + len(c) for p, c in seqs),
              "self_cpu_share": {k: v / total for k, v in top}, "gemm_gflops_mlp_shape": gflops,
              "ratios": {"mm_share_of_step": ops.get("aten::mm", 0.0) / total, "gemm_gflops": gflops}}
    write_result(result, args.out, t_all)


if __name__ == "__main__":
    main()
