"""vLLM's native RMSNorm and rotary embedding against its C++ kernels in the eager (LoRA) server, side by side in
one run (serving/vllm_cpu/ops.py).

1. The functions alone at the default model's sizes (hidden 576; 9 query and 3 key heads of 64), 1 / 16 / 64
   rows: µs per call, calls interleaved native/C++; the largest difference between the two outputs, and each
   one's mean absolute error against the same computation in float64.
2. Two servers, started the same way but for KTO_LOOP_STOCK_OPS=1 on one: 1 and 16 chats decoding 64 tokens each
   (greedy, ignore_eos, the serving_bench prompts), on the base model and on a rank-16 adapter; rounds
   interleaved stock/ours/ours/stock (benchmarks/harness.py). Tokens/s; and how many of the 16 greedy answers
   come out the same on both servers (the kernels round differently from the native code, which can flip a
   near-tie between two tokens and the rest of the answer with it).

    .venv/bin/python -m benchmarks.cpu_ops_bench [--rounds 2] [--out benchmarks/results/cpu_ops_bench/<date>_<cpu>.json]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from app.config import config_from
from benchmarks.harness import (
    MAX_TOKENS,
    PROMPTS,
    ab_servers,
    interleaved,
    machine,
    median_tok_s,
    result_path,
    write_result,
)
from serving.client import ChatClient, SamplingParams
from serving.vllm_cpu import ops as cpu_ops

HIDDEN, HEADS, KV_HEADS, HEAD = 576, 9, 3, 64
EPS = 1e-5


def time_pair(native, cpp, calls: int, exact: tuple[torch.Tensor, ...]) -> dict:
    """Median µs of each, calls alternating; the outputs' largest absolute difference; each one's mean absolute
    error against `exact` (the same function in float64)."""
    for _ in range(20):
        native(), cpp()
    t_n, t_c = [], []
    for _ in range(calls):
        for f, ts in ((native, t_n), (cpp, t_c)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    a, b = native(), cpp()
    diff = max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b, strict=True))

    def error(out: tuple[torch.Tensor, ...]) -> float:
        return statistics.mean((o.double() - e).abs().mean().item() for o, e in zip(out, exact, strict=True))

    n, c = statistics.median(t_n) * 1e6, statistics.median(t_c) * 1e6
    return {"native_us": n, "cpp_us": c, "speedup": n / c, "max_abs_diff": diff, "native_err": error(a),
            "cpp_err": error(b)}


def rms_exact(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w.double()


def functions(rows: int, calls: int) -> dict:
    from vllm import ir
    from vllm.config import VllmConfig, set_current_vllm_config

    g = torch.Generator().manual_seed(rows)
    x = (3 * torch.randn(rows, HIDDEN, generator=g)).to(torch.bfloat16)
    res = (3 * torch.randn(rows, HIDDEN, generator=g)).to(torch.bfloat16)
    w = (torch.rand(HIDDEN, generator=g) + 0.5).to(torch.bfloat16)
    norm, fused = ir.ops.rms_norm.impls, ir.ops.fused_add_rms_norm.impls
    with set_current_vllm_config(VllmConfig()):
        from vllm.model_executor.layers.rotary_embedding import get_rope

        rope, rope64 = (get_rope(HEAD, max_position=2048, is_neox_style=True, dtype=dtype,
                                 rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
                        for dtype in (torch.bfloat16, torch.float64))
    qkv = torch.randn(rows, (HEADS + 2 * KV_HEADS) * HEAD, generator=g).to(torch.bfloat16)
    positions = torch.arange(200, 200 + rows)

    def rotary(method, dtype=torch.bfloat16):
        q, k, _ = qkv.clone().to(dtype).split([HEADS * HEAD, KV_HEADS * HEAD, KV_HEADS * HEAD], dim=-1)
        return method(positions, q, k)

    total = x.double() + res.double()

    return {
        "rms_norm": time_pair(lambda: (norm["native"].impl_fn(x, w, EPS),),
                              lambda: (norm[cpu_ops.PROVIDER].impl_fn(x, w, EPS),), calls, (rms_exact(x, w),)),
        # both on fresh copies, as the server's in-place call consumes its inputs
        "fused_add_rms_norm": time_pair(lambda: fused["native"].impl_fn(x.clone(), res.clone(), w, EPS),
                                        lambda: fused[cpu_ops.PROVIDER].impl_fn(x.clone(), res.clone(), w, EPS),
                                        calls, (rms_exact(total, w), total)),
        "rotary": time_pair(lambda: rotary(rope.forward_native), lambda: rotary(rope.forward_cpu), calls,
                            rotary(rope64.forward_native, torch.float64)),
    }


def load(client: ChatClient, model: str, chats: int) -> dict:
    sampling = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra={"ignore_eos": True})
    t0 = time.perf_counter()
    with ThreadPoolExecutor(chats) as ex:
        results = list(ex.map(lambda i: client.chat(PROMPTS[i % len(PROMPTS)], model, sampling), range(chats)))
    dt = time.perf_counter() - t0
    assert all(r.completion_tokens == MAX_TOKENS and r.model == model for r in results), "a chat came back short"
    return {"tok_s": chats * MAX_TOKENS / dt, "texts": [r.text for r in results]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of four passes: stock/ours/ours/stock, then the "
                    "mirror order")
    ap.add_argument("--calls", type=int, default=2000, help="function calls per kernel and row count")
    ap.add_argument("--out", type=Path, default=result_path("cpu_ops_bench"))
    args = ap.parse_args()
    t_all = time.perf_counter()
    model_dir = args.model_dir or config_from().resolved().model_dir
    assert cpu_ops.install(), "serving.vllm_cpu.ops did not install here (not a CPU build of vLLM?)"
    result: dict = {"benchmark": "cpu_ops_bench", "machine": machine(), "tokens": MAX_TOKENS,
                    "torch_threads": torch.get_num_threads(), "function": {}}
    ratios: dict[str, float] = {}
    for rows in (1, 16, 64):
        r = result["function"][str(rows)] = functions(rows, args.calls)
        for kernel, m in r.items():
            print(f"  {kernel:18s} {rows:2d} rows: native {m['native_us']:6.1f} µs, C++ {m['cpp_us']:5.1f} µs "
                  f"({m['speedup']:.1f}x), max diff {m['max_abs_diff']:.4f}, error against float64 native "
                  f"{m['native_err']:.5f} C++ {m['cpp_err']:.5f}", flush=True)
            ratios[f"function_speedup_{kernel}_{rows}"] = m["speedup"]

    def measure(name: str, r: int, client: ChatClient, adapter: str) -> dict:
        rec = {}
        for model, label in (("base", "base"), (adapter, "adapter")):
            for chats in (1, 16):
                m = rec[f"{label}_{chats}"] = load(client, model, chats)
                print(f"  round {r} {name:5s} {label:7s} x{chats:<2d}: {m['tok_s']:6.1f} tok/s", flush=True)
        return rec

    with tempfile.TemporaryDirectory() as tmp_s, \
            ab_servers(model_dir, Path(tmp_s), {"KTO_LOOP_STOCK_OPS": "1"}, "C++ RMSNorm and rotary kernels",
                       warm=lambda client: load(client, "base", 2)) as servers:
        runs = interleaved(servers, args.rounds, measure)
    result["server_runs"] = runs
    med = result["server_tok_s_median"] = median_tok_s(runs)
    ratios.update({f"server_tok_s_ours_over_stock_{key}": med["ours"][key] / med["stock"][key] for key in med["ours"]})
    for label in ("base", "adapter"):  # greedy answers of the first pass on each server, chat by chat
        a, b = runs["stock"][0][f"{label}_16"]["texts"], runs["ours"][0][f"{label}_16"]["texts"]
        result[f"same_greedy_answers_{label}_16"] = sum(x == y for x, y in zip(a, b, strict=True))
    result["ratios"] = ratios
    write_result(result, args.out, t_all)


if __name__ == "__main__":
    main()
