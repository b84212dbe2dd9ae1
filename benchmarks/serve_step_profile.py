"""Where a served decode step goes, timed inside vLLM's worker (benchmarks/serve_step_launch.py), with vLLM's
native RMSNorm and rotary (KTO_LOOP_STOCK_OPS=1) and with the C++ kernels serving/vllm_cpu/ops.py puts in, one run.

Two servers, both up, passes interleaved stock/ours/ours/stock (benchmarks/harness.py). A pass serves 16 chats
decoding 64 tokens each (greedy, ignore_eos, the serving_bench prompts), first on the base model, then on a
rank-16 adapter, for --seconds each; the worker's timing windows (100 forwards each) that fall inside a phase are
kept, and the medians over all of a server's windows are quoted, per category in ms a step. Derived:
`between_steps` (a step's wall time outside execute_model: scheduling, IPC, detokenizing, streaming) and
`forward_glue` (the model's forward outside the leaf categories timed: residual adds, views, the layers' Python).

    .venv/bin/python -m benchmarks.serve_step_profile [--seconds 30] [--rounds 2] [--out ...serve_step_profile.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from app.config import config_from
from benchmarks.harness import MAX_TOKENS, PROMPTS, ab_servers, interleaved, machine, result_path, write_result
from serving.client import ChatClient, SamplingParams

LINEAR = ("MergedQKVParallelLinearWithLoRA", "MergedColumnParallelLinearWithLoRA", "RowParallelLinearWithLoRA")
LEAVES = {"linear_with_lora (incl. GEMM)": [f"module:{c}" for c in LINEAR], "attention_layer": ["module:Attention"],
          "rms_norm": ["module:RMSNorm"], "rotary": ["module:RotaryEmbedding"], "silu_and_mul": ["module:SiluAndMul"],
          "embedding": ["module:VocabParallelEmbeddingWithLoRA"]}


def phase(client: ChatClient, model: str, seconds: float) -> dict:
    """16 chats at a time, rounds of 64 greedy tokens each, until `seconds` have passed."""
    sampling = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra={"ignore_eos": True})
    start, rounds, t0 = time.time(), [], time.perf_counter()
    with ThreadPoolExecutor(16) as ex:
        while time.perf_counter() - t0 < seconds:
            t = time.perf_counter()
            results = list(ex.map(lambda p: client.chat(p, model, sampling), PROMPTS))
            assert all(r.completion_tokens == MAX_TOKENS for r in results)
            rounds.append(16 * MAX_TOKENS / (time.perf_counter() - t))
    return {"start": start, "end": time.time(), "tok_s_timed": statistics.median(rounds), "rounds": len(rounds)}


def breakdown(windows: list[dict]) -> dict:
    """Median per category over the windows, plus the derived between_steps and forward_glue."""
    def med(f) -> float:
        return statistics.median(f(w) for w in windows)

    out = {"windows": len(windows), "tokens_per_forward": med(lambda w: w["tokens_per_forward"]),
           "step_wall": med(lambda w: w["wall_per_forward_ms"])}
    for key in windows[0]["ms"]:
        out[key] = med(lambda w, k=key: w["ms"].get(k, 0.0))
    for name, keys in LEAVES.items():
        out[name] = med(lambda w, ks=keys: sum(w["ms"].get(k, 0.0) for k in ks))
    out["between_steps"] = med(lambda w: w["wall_per_forward_ms"] - w["ms"]["execute_model"])
    out["forward_glue"] = med(lambda w: w["ms"]["forward"] - sum(w["ms"].get(k, 0.0) for ks in LEAVES.values()
                                                                 for k in ks))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each phase of a pass")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of four passes: stock/ours/ours/stock, then the "
                    "mirror order")
    ap.add_argument("--out", type=Path, default=result_path("serve_step_profile"))
    args = ap.parse_args()
    t_all = time.perf_counter()
    model_dir = args.model_dir or config_from().resolved().model_dir
    result: dict = {"benchmark": "serve_step_profile", "machine": machine(), "tokens": MAX_TOKENS, "chats": 16,
                    "unit": "ms per step (one forward), medians over timing windows of 100 forwards",
                    "servers": {"stock": "KTO_LOOP_STOCK_OPS=1: vLLM's native RMSNorm and rotary",
                                "ours": "serving/vllm_cpu/ops.py: vLLM's C++ RMSNorm and rotary"}}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)

        def timing(name: str) -> Path:
            return tmp / f"timing-{name}.jsonl"

        def measure(name: str, r: int, client: ChatClient, adapter: str) -> dict:
            rec = {}
            for label, model in (("base", "base"), ("adapter", adapter)):
                p = phase(client, model, args.seconds)
                windows = [w for w in map(json.loads, timing(name).read_text().splitlines())
                           if w["start"] >= p["start"] and w["end"] <= p["end"]]
                assert windows, f"{name} {label}: no timing window inside the phase (is the launcher timing?)"
                rec[label] = {"windows": windows, "tok_s_timed": p["tok_s_timed"]}
                print(f"  round {r} {name:5s} {label:7s}: {p['tok_s_timed']:6.1f} tok/s (timed), step "
                      f"{statistics.median(w['wall_per_forward_ms'] for w in windows):.1f} ms", flush=True)
            return rec

        with ab_servers(model_dir, tmp, {"KTO_LOOP_STOCK_OPS": "1"}, "C++ RMSNorm and rotary kernels",
                        warm=lambda client: phase(client, "base", 5), launcher="benchmarks.serve_step_launch",
                        env_of=lambda name: {"KTO_STEP_TIMING_OUT": str(timing(name))}) as servers:
            runs = interleaved(servers, args.rounds, measure)
    for name, recs in runs.items():
        result[name] = {}
        for label in ("base", "adapter"):
            b = result[name][label] = breakdown([w for rec in recs for w in rec[label]["windows"]])
            b["tok_s_timed"] = statistics.median(rec[label]["tok_s_timed"] for rec in recs)
            print(f"  {name:5s} {label:7s}: step {b['step_wall']:.1f} ms ({b['tokens_per_forward']:.1f} tokens), "
                  f"forward {b['forward']:.1f}, GEMM {b['op:gemm']:.1f}, attention layer {b['attention_layer']:.1f}, "
                  f"norm {b['rms_norm']:.1f}, rotary {b['rotary']:.1f}, glue {b['forward_glue']:.1f}, "
                  f"between steps {b['between_steps']:.1f}", flush=True)
    result["idle_server_cpu_share"] = {name: [rec["idle_server_cpu_share"] for rec in recs]
                                       for name, recs in runs.items()}
    result["ratios"] = {f"step_stock_over_ours_{label}": result["stock"][label]["step_wall"] /
                        result["ours"][label]["step_wall"] for label in ("base", "adapter")}
    write_result(result, args.out, t_all)


if __name__ == "__main__":
    main()
