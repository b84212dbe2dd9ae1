"""What should a second cycle train? Retrain a finished simulator run's cycle 2 several ways, measure side by side.

The simulator's cycle 2 continues the served adapter (kto-v1) on the ratings of its own answers, with the base
model as the reference. For `bullets` that bought list formatting with facts: every candidate was refused by
the capability guard. This script takes the run directory of such a simulation (`--sim-dir`, one rater's
`--work-dir` subdirectory: its `adapters/` and `runs/` hold both snapshots and both adapters), trains cycle 2's
alternatives with the real aligner subprocess, then serves all of them from one real vLLM server and measures each
with the simulator's own `measure()` (held-out desirable rate under the rater, capability probe at temperature 0):

- `served`            kto-v1, what users have after cycle 1 (measured again here, same server as the others);
- `continue`          the run's own cycle-2 candidate (kto-v2: continue kto-v1, reference base, the run's lr);
- `continue-lr/2`     the same at half the learning rate;
- `continue-ref-prev` continue kto-v1 with kto-v1 frozen as the reference (`--reference previous`);
- `fresh`             a new adapter from the base model on cycle 2's snapshot (what `--align-mode fresh` trains
                      with `--max-examples` = that snapshot's rows, e.g. 200);
- `fresh-all`         a new adapter from the base model on both cycles' ratings (`fresh` with `--max-examples` =
                      both snapshots' rows, e.g. 400 for a run of 200 ratings a cycle);
- `served-after`      the version the run's registry served at its end (e.g. a cycle-2 checkpoint the gate fell
                      back to), measured again next to the others.

Run: `.venv/bin/python benchmarks/cycle2_sweep.py --sim-dir /tmp/sim-be/bullets --rater bullets`
Writes benchmarks/results/cycle2_sweep_<rater>.json (override with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lr_sweep import DEFAULT_MODEL, measure_adapters, train  # noqa: E402

from app.sim import run as sim  # noqa: E402
from app.sim.raters import EXAMPLE_RATERS  # noqa: E402

VARIANTS = ("served", "continue", "continue-lr/2", "continue-ref-prev", "fresh", "fresh-all", "served-after")


def run_layout(sim_dir: Path) -> dict:
    """kto-v1 and kto-v2 of a simulator run, with the snapshots and settings they were trained on."""
    v1, v2 = sim_dir / "adapters" / "kto-v1", sim_dir / "adapters" / "kto-v2"
    m1, m2 = (json.loads((v / "manifest.json").read_text()) for v in (v1, v2))
    if m1.get("resume_from") or Path(m2.get("resume_from") or "") != v1:
        raise SystemExit(f"{sim_dir}: expected kto-v1 trained from base and kto-v2 continuing it")
    registry = json.loads((sim_dir / "adapters" / "registry.json").read_text())
    return {"v1": v1, "v2": v2, "snap1": Path(m1["snapshot"]), "snap2": Path(m2["snapshot"]),
            "current": Path(registry["versions"][registry["current"]]["path"]),
            "lr": float(m2["hyperparameters"]["lr"]), "epochs": int(m2["hyperparameters"]["epochs"])}


def merge_snapshots(paths: list[Path], out: Path) -> Path:
    """One snapshot of several (same schema, as the store writes them); the aligner takes the newest first."""
    pq.write_table(pa.concat_tables([pq.read_table(p) for p in paths]), out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sim-dir", type=Path, required=True, help="one rater's directory of a 2-cycle simulator run")
    ap.add_argument("--rater", required=True, choices=sorted(EXAMPLE_RATERS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/cycle2-sweep"))
    ap.add_argument("--holdout-limit", type=int, default=40)
    ap.add_argument("--samples-per-prompt", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out_json = args.out or Path(__file__).parent / "results" / f"cycle2_sweep_{args.rater}.json"

    lay = run_layout(args.sim_dir)
    work = args.work_dir / args.rater
    work.mkdir(parents=True, exist_ok=True)
    both = merge_snapshots([lay["snap1"], lay["snap2"]], work / "snapshot-both.parquet")
    n_snap2, n_both = (pq.read_metadata(p).num_rows for p in (lay["snap2"], both))
    base_args = ["--epochs", str(lay["epochs"]), "--checkpoints", "0"]
    recipes: dict[str, tuple[Path, list[str]]] = {
        "continue-lr/2": (lay["snap2"], ["--resume-from", str(lay["v1"]), "--reference", "base",
                                         "--lr", str(lay["lr"] / 2)]),
        "continue-ref-prev": (lay["snap2"], ["--resume-from", str(lay["v1"]), "--reference", "previous",
                                             "--lr", str(lay["lr"])]),
        "fresh": (lay["snap2"], ["--lr", str(lay["lr"]), "--max-examples", str(n_snap2)]),
        "fresh-all": (both, ["--lr", str(lay["lr"]), "--max-examples", str(n_both)]),
    }
    load0, t_start = os.getloadavg()[0], time.perf_counter()
    runs: list[dict] = []
    for name in args.variants:
        if name == "served":
            runs.append({"variant": name, "adapter": str(lay["v1"]), "train": None})
            continue
        if name == "served-after":
            runs.append({"variant": name, "adapter": str(lay["current"]), "train": None})
            continue
        if name == "continue":
            runs.append({"variant": name, "adapter": str(lay["v2"]), "train": {"reused": True, "lr": lay["lr"]}})
            continue
        snap, extra = recipes[name]
        out = work / name.replace("/", "_")
        if (out / "manifest.json").is_file():
            print(f"reusing {out}", file=sys.stderr)
            m = json.loads((out / "manifest.json").read_text())
            rec = {"reused": True, "train_seconds": m.get("train_seconds"), "n_D": m.get("n_desirable"),
                   "n_U": m.get("n_undesirable"), "lambda_D": m.get("lambda_d")}
        else:
            print(f"training {name} ...", file=sys.stderr, flush=True)
            rec = train(snap, out, args.model_dir, float(lay["lr"]), lay["epochs"], extra=base_args + extra)
        runs.append({"variant": name, "adapter": str(out), "snapshot": str(snap), "args": extra, "train": rec})

    base, evals = measure_adapters(args.model_dir, work / "vllm.log", args.rater, [Path(r["adapter"]) for r in runs],
                                   holdout_limit=args.holdout_limit, samples=args.samples_per_prompt,
                                   max_tokens=args.max_tokens)
    for r, e in zip(runs, evals, strict=True):
        r["eval"] = e
    doc = {"benchmark": "cycle2_sweep", "rater": args.rater, "sim_dir": str(args.sim_dir),
           "machine": {**sim.machine_info(), "load_avg_at_start": load0, "load_avg_at_end": os.getloadavg()[0]},
           "settings": {"holdout_limit": args.holdout_limit, "samples_per_prompt": args.samples_per_prompt,
                        "max_tokens": args.max_tokens, "temperature": 0.7, "top_p": 0.95, "lr": lay["lr"],
                        "epochs": lay["epochs"]},
           "wall_seconds": round(time.perf_counter() - t_start, 1), "base": base, "runs": runs}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(doc, indent=1))
    print(json.dumps([{"variant": r["variant"], **{x: r["eval"][x] for x in
                                                   ("desirable_rate", "ci95", "capability_correct")}}
                      for r in runs], indent=1))


if __name__ == "__main__":
    main()
