"""bf16 against float32 on this CPU, one run: the evidence behind `--dtype auto` / `--vllm-dtype auto`.

1. a GEMM the size of SmolLM2's MLP (512 x 576 @ 576 x 1536): GFLOP/s in each dtype;
2. one aligner training step's forward + backward (completion_logps on 4 sequences of ~180 tokens, the default
   model with a rank-16 adapter): bf16 base weights under bf16 autocast against float32;
3. vLLM (our LoRA-enabled server, as served) in each dtype: time to the first token of a new 37-token chat prompt,
   the median gap between streamed tokens of one chat, and tokens/s with 16 concurrent chats of 48 tokens.

Run alone: `.venv/bin/python -m benchmarks.dtype_bench` (about 6-10 minutes on 2 cores, most of it the emulated
bf16 step where bf16 is not native). Writes
benchmarks/results/dtype_bench/<date>_<cpu>.json with the machine description.
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

import httpx
import torch

from aligner.model import completion_logps, load_policy, resolve_dtype
from benchmarks.harness import machine, result_path
from serving.server import VLLMServer, VLLMServerSpec

DTYPES = (torch.float32, torch.bfloat16)


def gemm_gflops(dtype: torch.dtype, n: int = 20) -> float:
    a, b = torch.randn(512, 576).to(dtype), torch.randn(576, 1536).to(dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(n):
        a @ b
    return 2 * 512 * 576 * 1536 * n / (time.perf_counter() - t) / 1e9


def train_step_s(model_dir: Path, dtype: torch.dtype) -> float:
    rng = random.Random(0)
    seqs = [([rng.randrange(1000, 20000) for _ in range(60)], [rng.randrange(1000, 20000) for _ in range(120)])
            for _ in range(4)]
    model = load_policy(model_dir, dtype=dtype)
    completion_logps(model, seqs[:1], 0).sum().backward()  # warm-up: first-call allocations
    t = time.perf_counter()
    completion_logps(model, seqs, 0).sum().backward()
    return time.perf_counter() - t


def vllm_figures(model_dir: Path, dtype: str, log_dir: Path) -> dict:
    spec = VLLMServerSpec(model_dir=model_dir, dtype=dtype, log_path=log_dir / f"vllm-{dtype}.log",
                          auto_restart=False)
    with VLLMServer(spec) as server:
        url = server.base_url

        def stream(prompt: str, n: int) -> list[float]:
            body = {"model": "base", "messages": [{"role": "user", "content": prompt}], "max_tokens": n,
                    "temperature": 0.0, "stream": True, "ignore_eos": True}
            t0, times = time.perf_counter(), []
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600,
                              headers=server.auth_headers()) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line.startswith("data:") and line.strip() != "data: [DONE]":
                        d = json.loads(line[5:])
                        if d.get("choices") and d["choices"][0].get("delta", {}).get("content"):
                            times.append(time.perf_counter() - t0)
            return times

        stream("Warm up, please.", 4)
        ttft = [stream(f"Name a color, any color, number {i}.", 4)[0] for i in range(3)]  # new prompts: no cache
        one = stream("Write a story number 1.", 48)
        gap = statistics.median(b - a for a, b in zip(one, one[1:], strict=False))
        t = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            tokens = sum(len(x) for x in pool.map(lambda i: stream(f"Write a story number {100 + i}.", 48),
                                                  range(16)))
        return {"ttft_s": statistics.median(ttft), "ttft_runs": ttft, "decode_gap_ms_1": 1000 * gap,
                "tok_s_16": tokens / (time.perf_counter() - t)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path,
                    default=Path("~/.cache/kto-loop/models/SmolLM2-135M-Instruct").expanduser())
    ap.add_argument("--out", type=Path, default=result_path("dtype_bench"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    res: dict = {"benchmark": "dtype", "machine": machine(), "auto_picks": str(resolve_dtype("auto"))}
    for dt in DTYPES:
        name = str(dt).removeprefix("torch.")
        res.setdefault("gemm_gflops", {})[name] = gemm_gflops(dt)
        print(f"GEMM {name}: {res['gemm_gflops'][name]:.1f} GFLOP/s", flush=True)
    for dt in DTYPES:
        name = str(dt).removeprefix("torch.")
        res.setdefault("train_step_s", {})[name] = train_step_s(args.model_dir, dt)
        print(f"training step fwd+bwd, 4 sequences, {name}: {res['train_step_s'][name]:.1f} s", flush=True)
    for name in ("float32", "bfloat16"):
        res.setdefault("vllm", {})[name] = vllm_figures(args.model_dir, name, Path(tempfile.gettempdir()))
        print(f"vLLM {name}: {res['vllm'][name]}", flush=True)
    f, b = "float32", "bfloat16"
    res["ratios_float32_over_bfloat16"] = {
        "gemm_gflops": res["gemm_gflops"][f] / res["gemm_gflops"][b],
        "train_step_speed": res["train_step_s"][b] / res["train_step_s"][f],
        "vllm_ttft_speed": res["vllm"][b]["ttft_s"] / res["vllm"][f]["ttft_s"],
        "vllm_tok_s_16": res["vllm"][f]["tok_s_16"] / res["vllm"][b]["tok_s_16"],
        "vllm_decode_speed_1": res["vllm"][b]["decode_gap_ms_1"] / res["vllm"][f]["decode_gap_ms_1"]}
    args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res["ratios_float32_over_bfloat16"], indent=2), f"-> {args.out}")


if __name__ == "__main__":
    main()
