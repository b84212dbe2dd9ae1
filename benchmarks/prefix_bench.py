"""An adapter in every layer against one in the upper layers only (`--first-lora-layer K`), side by side.

With the adapter in layers K.. only, the K layers below compute the same thing for the policy and the reference
at every step: the reference pass keeps each sequence's layer-K input (aligner.model.Prefix) and every later pass
(z0's KL pass, the forward and backward with gradient, the held-out passes) runs layers K.. only. This runs the
aligner, the same subprocess the app runs, on one real snapshot with the product's flags cut to a few steps, once
per K in the order given, and reports per-step seconds (median), phase seconds and the ratios against K = 0:

    .venv/bin/python -m benchmarks.prefix_bench --snapshot RUN_DIR/snapshot.parquet [--layers 0 15] [--max-steps 5]

`--head-ab` also runs each K with `--no-shared-head` (every sequence from its first token instead of the chat
template's common head once per pass, model.SharedHead) and reports those ratios too (`K=k head`).

Writes benchmarks/results/prefix_bench/<date>_<cpu>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from app.config import config_from
from benchmarks.harness import machine, result_path, train, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshot", type=Path, required=True)
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--layers", type=int, nargs="+", default=[15, 0], help="first LoRA layers to compare (0 = all)")
    ap.add_argument("--max-steps", type=int, default=5)
    ap.add_argument("--max-examples", type=int, default=200)
    ap.add_argument("--anchor-weight", type=float, default=7.0, help="the product's γ in the #7 runs (0 = none)")
    ap.add_argument("--head-ab", action="store_true", help="each K also with --no-shared-head, right after it")
    ap.add_argument("--out", type=Path, default=result_path("prefix_bench"))
    args = ap.parse_args()
    t_all = time.perf_counter()
    model_dir = args.model_dir or config_from().resolved().model_dir
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        anchor = ["--anchor-weight", f"{args.anchor_weight:g}", "--anchor-max-tokens", "24",
                  "--anchor-cache", str(Path(tmp) / "anchor-cache")] if args.anchor_weight > 0 else []
        variants = [(str(k), ["--first-lora-layer", str(k)]) for k in args.layers]
        if args.head_ab:
            variants = [v for k, flags in variants
                        for v in ((k, flags), (f"{k}/no-head", [*flags, "--no-shared-head"]))]
        for name, flags in variants:
            out = Path(tmp) / f"adapter-{name.replace('/', '-')}"
            run = train(args.snapshot, out, model_dir, 2.5e-4, 1,
                        ["--max-steps", str(args.max_steps), "--checkpoints", "0", "--max-examples",
                         str(args.max_examples), *flags, *anchor])
            m = json.loads((out / "manifest.json").read_text())
            steps = [r["seconds"] for r in m["log"]]
            runs[name] = {**run, "step_seconds": steps, "step_median": statistics.median(steps[1:] or steps),
                          "kl_seconds_median": statistics.median([r["kl_seconds"] for r in m["log"][1:]] or [0]),
                          "prefix": m["prefix"], "final_loss": m["final_loss"]}
            print(f"K={name}: step median {runs[name]['step_median']:.2f} s, phases {run['phase_seconds']}")

    def speedups(slow: dict, fast: dict) -> dict:
        return {"step_speedup": slow["step_median"] / fast["step_median"],
                **{f"{p}_speedup": slow["phase_seconds"][p] / fast["phase_seconds"][p]
                   for p in ("reference", "heldout_served", "heldout_new", "train")
                   if slow["phase_seconds"].get(p) and fast["phase_seconds"].get(p)}}

    ratios = {f"K={k}": speedups(runs["0"], r) for k, r in runs.items()
              if "0" in runs and k != "0" and not k.endswith("/no-head")}
    ratios.update({f"K={k} head": speedups(runs[f"{k}/no-head"], r) for k, r in runs.items()
                   if f"{k}/no-head" in runs})
    result = {"benchmark": "prefix_bench", "machine": machine(), "snapshot": str(args.snapshot),
              "layers": args.layers, "max_steps": args.max_steps, "max_examples": args.max_examples,
              "anchor_weight": args.anchor_weight, "head_ab": args.head_ab,
              "note": "step medians leave out step 1 (no KL pass)",
              "runs": runs, "ratios": ratios}
    write_result(result, args.out, t_all)


if __name__ == "__main__":
    main()
