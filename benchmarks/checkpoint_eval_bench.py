"""What a gate fallback costs with lazy checkpoint evaluation, on real runs of the default model.

A lazy run (`--checkpoint-eval lazy`, the default) saves its earlier checkpoints without held-out metrics; only
when the gate refuses the final adapter does the realigner run `python -m aligner.checkpoints RUN/adapter`. This
copies each given run's adapter directory (the run itself is left as it is), runs that same command on the copy,
and sets its cost beside what eager evaluation pays in every run: one held-out pass per checkpoint, estimated as
the checkpoints' count × the run's own final held-out pass (`phase_seconds.heldout_new`, same pairs):

    .venv/bin/python -m benchmarks.checkpoint_eval_bench RUN_DIR/adapter [RUN_DIR/adapter ...]

Writes benchmarks/results/checkpoint_eval_bench/<date>_<cpu>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import machine, result_path, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapters", type=Path, nargs="+", help="adapter directories of lazy runs (checkpoints pending)")
    ap.add_argument("--out", type=Path, default=result_path("checkpoint_eval_bench"))
    args = ap.parse_args()
    t_all = time.perf_counter()
    runs = []
    for adapter in args.adapters:
        m = json.loads((adapter / "manifest.json").read_text())
        pending = [c["step"] for c in m.get("checkpoints") or [] if c.get("heldout_pending")]
        if not pending:
            raise SystemExit(f"{adapter}: no pending checkpoint (an eager run, or already evaluated)")
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "adapter"
            shutil.copytree(adapter, copy)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "aligner.checkpoints", str(copy)], capture_output=True,
                                  text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(f"{adapter}: exit {proc.returncode}: {proc.stderr[-800:]}")
            done = json.loads((copy / "manifest.json").read_text())
        eager = len(pending) * m["phase_seconds"]["heldout_new"]
        runs.append({"adapter": str(adapter), "checkpoints": pending, "heldout_n": m["heldout"]["n"],
                     "prefix_layers": (m.get("prefix") or {}).get("layers", 0),
                     "fallback_wall_seconds": round(wall, 1),
                     "checkpoint_eval_seconds": done["checkpoint_eval_seconds"],
                     "eager_estimate_seconds": round(eager, 1), "run_total_seconds": m["total_seconds"],
                     "margins": [round(c["heldout_new"]["margin"], 3) for c in done["checkpoints"]
                                 if c["heldout_new"] and c["heldout_new"]["margin"] is not None]})
        print(f"{adapter}: fallback {wall:.1f} s wall, eager would have paid ~{eager:.1f} s in every run")
    result = {"benchmark": "checkpoint_eval_bench", "machine": machine(), "runs": runs,
              "ratios": {"fallback_over_eager_median": statistics.median(
                  r["fallback_wall_seconds"] / r["eager_estimate_seconds"] for r in runs)}}
    write_result(result, args.out, t_all)


if __name__ == "__main__":
    main()
