"""A training step that keeps its LM-head log-softmax for the backward against one that recomputes it, side by side.

The gradient pass projects every completion position through SmolLM2's 49k-token LM head. Recomputing each tile's
logits in the backward (activation checkpointing) bounds memory but is a third LM-head GEMM per pass; a forward
over at most `aligner.model.LM_HEAD_KEEP_POSITIONS` completion positions now keeps them instead. This runs the real
aligner (`aligner.train.run`, in this process, the product's flags cut to a few steps) on one snapshot, alternating
the two settings, and reports per-step seconds (median, step 1 left out: it has no KL pass) and the ratio:

    .venv/bin/python -m benchmarks.lm_head_bench --snapshot RUN_DIR/snapshot.parquet [--first-lora-layer 15] \
        [--rounds 1]

Writes benchmarks/results/lm_head_bench/<date>_<cpu>.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from aligner import model as model_mod
from aligner.train import TrainConfig, run
from app.config import config_from
from benchmarks.harness import machine, result_path, write_result

SETTINGS = {"keep": 1 << 30, "recompute": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshot", type=Path, required=True)
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--first-lora-layer", default="15")
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--max-examples", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--anchor-weight", type=float, default=7.0)
    ap.add_argument("--out", type=Path, default=result_path("lm_head_bench"))
    args = ap.parse_args()
    t_all = time.perf_counter()
    model_dir = args.model_dir or config_from().resolved().model_dir
    steps: dict[str, list[float]] = {k: [] for k in SETTINGS}
    losses: dict[str, list[list[float]]] = {k: [] for k in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, keep in SETTINGS.items():
                model_mod.LM_HEAD_KEEP_POSITIONS = keep
                cfg = TrainConfig(snapshot=str(args.snapshot), out=str(Path(tmp) / f"{name}-{r}"),
                                  model_dir=str(model_dir), max_steps=args.max_steps, checkpoints=0,
                                  max_examples=args.max_examples, first_lora_layer=args.first_lora_layer,
                                  anchor_weight=args.anchor_weight, anchor_max_tokens=24,
                                  anchor_cache=str(Path(tmp) / "anchor-cache"))
                m = run(cfg)
                steps[name] += [row["seconds"] for row in m["log"][1:]]
                losses[name].append([row["loss"] for row in m["log"]])
                print(f"{name} round {r}: step median {statistics.median(steps[name]):.2f} s")
    med = {k: statistics.median(v) for k, v in steps.items()}
    same = all(a == b for a, b in zip(losses["keep"], losses["recompute"], strict=True))
    result = {"benchmark": "lm_head_bench", "machine": machine(), "snapshot": str(args.snapshot),
              "first_lora_layer": args.first_lora_layer, "max_steps": args.max_steps,
              "max_examples": args.max_examples, "rounds": args.rounds, "anchor_weight": args.anchor_weight,
              "note": "step medians leave out step 1 (no KL pass)", "step_seconds": steps,
              "step_median": med, "losses_identical": same,
              "ratios": {"step_speedup_keep_vs_recompute": med["recompute"] / med["keep"]}}
    write_result(result, args.out, t_all)


if __name__ == "__main__":
    main()
