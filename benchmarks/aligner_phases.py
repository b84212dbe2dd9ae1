"""Where one aligner run's time goes, phase by phase, on a real snapshot and the default model.

Runs the aligner (the same subprocess command the app runs) on a saved simulator snapshot for a few steps and
writes the manifest's `phase_seconds` with seconds per sequence for each forward-only pass, so the cost of a full
run's reference pass (matched + KL pairs) can be read off without a 25-minute run:

    .venv/bin/python -m benchmarks.aligner_phases --snapshot RUN_DIR/snapshot.parquet [--max-steps 3]

Writes benchmarks/results/aligner_phases/<date>_<cpu>.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from app.config import config_from
from benchmarks.harness import machine, result_path, train, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshot", type=Path, required=True)
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=result_path("aligner_phases"))
    args = ap.parse_args()
    t_all = time.perf_counter()
    model_dir = args.model_dir or config_from().resolved().model_dir
    with tempfile.TemporaryDirectory() as tmp:  # the product's defaults (lr 2.5e-4, 1 epoch), cut to a few steps
        run = train(args.snapshot, Path(tmp) / "adapter", model_dir, 2.5e-4, 1,
                    ["--max-steps", str(args.max_steps), "--checkpoints", "0"])
    phases, sequences = run["phase_seconds"], run["phase_sequences"]
    per_seq = {k: phases[k] / sequences[k] for k in ("reference", "heldout_served", "heldout_new") if sequences.get(k)}
    result = {"benchmark": "aligner_phases", "machine": machine(), "snapshot": str(args.snapshot),
              "max_steps": args.max_steps, "n_train": run["n_D"] + run["n_U"],
              "phase_seconds": phases, "total_seconds": run["total_seconds"], "sequences": sequences,
              "ratios": {"seconds_per_sequence": per_seq}}
    write_result(result, args.out, t_all)


if __name__ == "__main__":
    main()
