"""Does the gate's loop check refuse an adapter that loops, and pass ones that do not? Real vLLM, real adapters.

Each repeat answers the shipped open prompts (app/loop/data/open_prompts.jsonl) with the base model and every
adapter given, interleaved, with the served sampling (temperature 0.7, top-p 0.95, 128 tokens, the app's system
prompt), counts the answers that loop (`app.loop.gate.repeats_itself`) and applies the check
(`app.loop.gate.loops_ok`) against that repeat's base count, as the gate does.

Run: `.venv/bin/python -m benchmarks.loop_check_bench --adapter NAME=DIR ... [--repeats 3]`. Writes
benchmarks/results/loop_check_bench/<date>_<cpu>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from app.config import Config
from app.loop.gate import http_ask, load_open_prompts, loop_probe, loops_ok
from benchmarks.harness import DEFAULT_MODEL, machine, result_path, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", action="append", required=True, metavar="NAME=DIR", help="an adapter to check")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from serving.server import VLLMServer, VLLMServerSpec, auth_header

    cfg = Config()
    allowed = cfg.promote_max_loop_increase
    sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}
    adapters = dict(a.split("=", 1) for a in args.adapter)
    prompts = load_open_prompts()
    t_all = time.perf_counter()
    result = {"question": __doc__.split("\n")[0], "machine": machine(), "sampling": sampling,
              "max_loop_increase": allowed, "n_prompts": len(prompts), "adapters": adapters, "repeats": []}
    with tempfile.TemporaryDirectory() as tmp:
        spec = VLLMServerSpec(model_dir=args.model_dir, log_path=Path(tmp) / "vllm.log", auto_restart=False)
        with VLLMServer(spec) as server:
            for name, path in adapters.items():
                r = httpx.post(f"{server.base_url}/v1/load_lora_adapter", timeout=120,
                               json={"lora_name": name, "lora_path": str(Path(path).expanduser())},
                               headers=auth_header(server.api_key))
                r.raise_for_status()
            ask = http_ask(server.base_url, lambda: cfg.system_prompt, api_key=server.api_key, sampling=sampling)
            for i in range(args.repeats):
                base = loop_probe(ask, spec.served_model_name, prompts)
                rep = {"base": base.loops}
                for name in adapters:
                    got = loop_probe(ask, name, prompts)
                    rep[name] = {"loops": got.loops, "passes": loops_ok(got, base, allowed),
                                 "example": got.examples[0] if got.examples else None}
                result["repeats"].append(rep)
                print(f"repeat {i + 1}: base {base.loops}/{len(prompts)}; " + ", ".join(
                    f"{n} {rep[n]['loops']} ({'passes' if rep[n]['passes'] else 'refused'})" for n in adapters))
    reps = result["repeats"]
    result["summary"] = {"base_loops_median": statistics.median(r["base"] for r in reps), **{
        name: {"loops_median": statistics.median(r[name]["loops"] for r in reps),
               "refused": sum(not r[name]["passes"] for r in reps), "of": len(reps)} for name in adapters}}
    result["ratios"] = result["summary"]
    write_result(result, args.out or result_path("loop_check_bench"), t_all)
    print(json.dumps(result["summary"]))


if __name__ == "__main__":
    main()
