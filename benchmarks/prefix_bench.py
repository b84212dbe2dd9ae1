"""An adapter in every layer against one in the upper layers only (`--first-lora-layer K`), side by side.

With the adapter in layers K.. only, the K layers below compute the same thing for the policy and the reference
at every step: the reference pass keeps each sequence's layer-K input (aligner.model.Prefix) and every later pass
(z0's KL pass, the forward and backward with gradient, the held-out passes) runs layers K.. only. This runs the
aligner, the same subprocess the app runs, on one real snapshot with the product's flags cut to a few steps, once
per K in the order given, and reports per-step seconds (median), phase seconds and the ratios against K = 0:

    python benchmarks/prefix_bench.py --snapshot RUN_DIR/snapshot.parquet [--layers 0 15] [--max-steps 5]

Writes benchmarks/results/prefix_bench.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lr_sweep import train  # noqa: E402
from serving_bench import machine, write_result  # noqa: E402

from app.config import config_from  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshot", type=Path, required=True)
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--layers", type=int, nargs="+", default=[15, 0], help="first LoRA layers to compare (0 = all)")
    ap.add_argument("--max-steps", type=int, default=5)
    ap.add_argument("--max-examples", type=int, default=200)
    ap.add_argument("--anchor-weight", type=float, default=7.0, help="the product's γ in the #7 runs (0 = none)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prefix_bench.json")
    args = ap.parse_args()
    t_all = time.perf_counter()
    model_dir = args.model_dir or config_from().resolved().model_dir
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        anchor = ["--anchor-weight", f"{args.anchor_weight:g}", "--anchor-max-tokens", "24",
                  "--anchor-cache", str(Path(tmp) / "anchor-cache")] if args.anchor_weight > 0 else []
        for k in args.layers:
            out = Path(tmp) / f"adapter-{k}"
            run = train(args.snapshot, out, model_dir, 2.5e-4, 1,
                        ["--max-steps", str(args.max_steps), "--checkpoints", "0", "--max-examples",
                         str(args.max_examples), "--first-lora-layer", str(k), *anchor])
            m = json.loads((out / "manifest.json").read_text())
            steps = [r["seconds"] for r in m["log"]]
            runs[str(k)] = {**run, "step_seconds": steps, "step_median": statistics.median(steps[1:] or steps),
                            "kl_seconds_median": statistics.median([r["kl_seconds"] for r in m["log"][1:]] or [0]),
                            "prefix": m["prefix"], "final_loss": m["final_loss"]}
            print(f"K={k}: step median {runs[str(k)]['step_median']:.2f} s, phases {run['phase_seconds']}")
    base = runs.get("0")
    ratios = {}
    if base:
        for k, r in runs.items():
            if k == "0":
                continue
            ratios[f"K={k}"] = {
                "step_speedup": base["step_median"] / r["step_median"],
                **{f"{p}_speedup": base["phase_seconds"][p] / r["phase_seconds"][p]
                   for p in ("reference", "heldout_served", "heldout_new")
                   if base["phase_seconds"].get(p) and r["phase_seconds"].get(p)}}
    result = {"benchmark": "prefix_bench", "machine": machine(), "snapshot": str(args.snapshot),
              "layers": args.layers, "max_steps": args.max_steps, "max_examples": args.max_examples,
              "anchor_weight": args.anchor_weight, "note": "step medians leave out step 1 (no KL pass)",
              "runs": runs, "ratios": ratios}
    write_result(result, args.out, t_all)


if __name__ == "__main__":
    main()
