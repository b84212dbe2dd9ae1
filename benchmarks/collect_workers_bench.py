"""How many simulated chats to keep in flight while collecting ratings (`SimSpec.workers`), side by side.

A simulation cycle starts by collecting its ratings: simulated users chat through the app's ChatService (real
vLLM, the served version, ratings into the real DuckDB store), `workers` at a time (app/sim/run.collect). On a
small CPU each vLLM engine step is dominated by GEMMs over the running batch, and a bigger batch uses the same
weight reads for more tokens: more chats in flight, more tokens per second, until the tail of the collection
(the last few answers alone) eats the gain. This runs the real `collect` for the base model and for an adapter
(the cycle-2 case), at each worker count in turn, the counts' order reversed each repeat, and reports the
collection wall time (median over repeats) and its ratio against the first count.

    .venv/bin/python -m benchmarks.collect_workers_bench [--workers 32 64 128] [--ratings 200] [--repeats 2]
                                               [--adapter ADAPTER_DIR] [--max-tokens 128]

Writes benchmarks/results/collect_workers_bench/<date>_<cpu>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from app.config import config_from
from app.sim import inputs
from app.sim import run as sim
from benchmarks.harness import machine, make_adapter, result_path, write_result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--ratings", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rater", default="concise")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--adapter", type=Path, default=None,
                    help="adapter to serve for the second half (default: a random rank-16 all-linear one)")
    ap.add_argument("--out", type=Path, default=result_path("collect_workers_bench"))
    args = ap.parse_args()
    t_all = time.perf_counter()
    from app.main import build_stack, sampling_for
    from app.web.chat import ChatService

    rater_name, rater = inputs.load_rater(args.rater)
    prompts = inputs.load_prompts(inputs.DEFAULT_PROMPTS)
    result: dict = {"benchmark": "collect_workers", "machine": machine(), "rater": rater_name,
                    "ratings": args.ratings, "max_tokens": args.max_tokens, "workers": args.workers,
                    "repeats": args.repeats, "quoted": "median collection seconds over repeats", "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = sim.fresh_config(dataclasses.replace(config_from(), max_tokens=args.max_tokens), Path(tmp) / "data")
        adapter = args.adapter or make_adapter(cfg.model_dir, Path(tmp) / "adapter", seed=1)
        with build_stack(cfg) as stack:
            system_prompt = stack.settings.load().system_prompt
            sampling = sampling_for(cfg)
            service = ChatService(stack.store, stack.client, stack.registry, system_prompt=lambda: system_prompt,
                                  sampling=lambda: sampling, max_chars=cfg.max_message_chars,
                                  ratings_per_minute=cfg.ratings_per_minute)
            cursor = 0
            for served in ("base", "adapter"):
                if served == "adapter":
                    stack.registry.promote(adapter)
                runs: dict[str, list] = {str(w): [] for w in args.workers}
                for rep in range(args.repeats):
                    order = args.workers if rep % 2 == 0 else list(reversed(args.workers))
                    for w in order:
                        stats, cursor = sim.collect(service, prompts, rater, args.ratings, cursor=cursor,
                                                    tag=f"bench-{served}-{w}-{rep}", workers=w)
                        print(f"{served} workers={w} rep={rep}: {stats['seconds']} s, {stats['answers']} answers",
                              flush=True)
                        runs[str(w)].append(stats)
                med = {w: statistics.median(s["seconds"] for s in r) for w, r in runs.items()}
                first = str(args.workers[0])
                result["runs"][served] = {
                    "model": stack.registry.current(), "collect": runs, "median_seconds": med,
                    "ratio_vs_first": {w: round(med[first] / m, 3) for w, m in med.items()}}
    result["ratios"] = {f"{served}_collect_speedup_vs_{args.workers[0]}": r["ratio_vs_first"]
                        for served, r in result["runs"].items()}
    write_result(result, args.out, t_all)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
