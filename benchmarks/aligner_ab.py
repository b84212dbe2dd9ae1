"""A/B of aligner flags on one snapshot: the same aligner subprocess the app runs, arms interleaved, medians.

    .venv/bin/python -m benchmarks.aligner_ab --snapshot RUN_DIR/snapshot.parquet \\
        --arm every-step="--trim-every 1" --arm phases-only="--trim-every 0" [--steps 24] [--repeats 2] --out OUT.json

Each arm adds its flags to `--max-steps S --checkpoints 0 --anchor-weight 2` (the anchor term is what the simulator
runs). With two arms the order is ABBA over `--repeats` pairs, so a drift in machine load hits both; with more, it
rotates. Per run: the manifest's phase seconds, training seconds per step, wall time, CPU seconds (user + sys) and
peak RSS from wait4. Medians per arm and ratios of each arm to the first. The result file is rewritten after every
run, so a cut-short bench keeps its data.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app.config import config_from
from benchmarks.harness import machine, write_result

KEYS = ("wall_s", "train_s_per_step", "cpu_s", "user_s", "sys_s", "peak_rss_mib")


def align(snapshot: Path, model_dir: Path, flags: list[str]) -> dict:
    """One aligner subprocess; its manifest's timings plus wall time, CPU seconds and peak RSS from wait4."""
    with tempfile.TemporaryDirectory() as tmp:
        out, log = Path(tmp) / "adapter", Path(tmp) / "stdout"
        cmd = [sys.executable, "-m", "aligner", "--snapshot", str(snapshot), "--out", str(out), "--model-dir",
               str(model_dir), "--checkpoints", "0", "--progress-json", *flags]
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True)
            _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        text = log.read_text()
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"aligner {shlex.join(flags)} failed: {text[-800:]}")
        m = json.loads((out / "manifest.json").read_text())
    steps = [json.loads(x) for x in text.splitlines() if x.startswith('{"event": "progress"')]
    phases = m["phase_seconds"]
    return {"flags": flags, "wall_s": round(wall, 1), "phase_seconds": phases, "steps": len(steps),
            "train_s_per_step": round(phases["train"] / max(1, len(steps)), 3),
            "first_loss": steps[0]["loss"] if steps else None, "last_loss": steps[-1]["loss"] if steps else None,
            "load_avg_before": load_before, "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "user_s": round(usage.ru_utime, 1), "sys_s": round(usage.ru_stime, 1),
            "minor_faults": usage.ru_minflt, "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def medians(runs: list[dict], arms: list[str]) -> dict:
    out = {}
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        if mine:
            out[arm] = {k: statistics.median(r[k] for r in mine) for k in KEYS}
            for phase in mine[0]["phase_seconds"]:
                out[arm][f"{phase}_s"] = round(statistics.median(r["phase_seconds"][phase] for r in mine), 2)
    return out


def order(arms: list[str], repeats: int) -> list[str]:
    if len(arms) == 2:
        return [a for k in range(repeats) for a in (arms if k % 2 == 0 else arms[::-1])]
    return [arms[(k + i) % len(arms)] for k in range(repeats) for i in range(len(arms))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshot", type=Path, required=True)
    ap.add_argument("--arm", action="append", required=True, metavar="NAME=FLAGS",
                    help="an arm: a name and the aligner flags it adds (quoted); give two or more")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-examples", type=int, default=400)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    arms = dict(a.split("=", 1) for a in args.arm)
    if len(arms) < 2 or any("=" not in a for a in args.arm):
        ap.error("give at least two --arm NAME=FLAGS with different names")
    t_all = time.perf_counter()
    model_dir = args.model_dir or config_from().resolved().model_dir
    base = ["--max-steps", str(args.steps), "--anchor-weight", "2", "--max-examples", str(args.max_examples)]
    names = list(arms)
    result: dict = {"benchmark": "aligner_ab", "machine": machine(), "snapshot": str(args.snapshot),
                    "steps": args.steps, "common_flags": base, "arms": arms}
    runs: list[dict] = []
    for arm in order(names, args.repeats):
        runs.append({"arm": arm, **align(args.snapshot, model_dir, base + shlex.split(arms[arm]))})
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
        med = medians(runs, names)
        result.update(runs=runs, median=med)
        if names[0] in med:
            result["ratios_to_" + names[0]] = {
                a: {k: round(med[a][k] / med[names[0]][k], 3) for k in KEYS + ("reference_s",)
                    if med[names[0]].get(k)} for a in names[1:] if a in med}
        write_result(result, args.out, t_all)
    print(json.dumps({"median": result["median"], "ratios": result.get("ratios_to_" + names[0])}, indent=1))


if __name__ == "__main__":
    main()
