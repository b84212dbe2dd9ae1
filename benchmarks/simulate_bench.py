"""Closed-loop simulation on the default model: runs `kto-loop simulate` for the example raters (unless --report-only)
and prints, side by side per rater, the held-out desirable rate and capability before and after each cycle.

The measured figures live in the JSON the command writes (benchmarks/results/simulate_default.json, with the
machine description and load average) and its plot (.png beside it).

    python benchmarks/simulate_bench.py                      # the full run (long: see the README simulator section)
    python benchmarks/simulate_bench.py --report-only        # print the table of an existing results file
    python benchmarks/simulate_bench.py -- --ratings-per-cycle 200 --max-tokens 128   # extra simulate flags
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "simulate_default.json"


def table(doc: dict) -> str:
    def pct(x):
        return "  n/a" if x is None else f"{100 * x:5.1f}"

    lines = [f"{'rater':10} {'cycle':>5} {'served':>10} {'desirable %':>12} {'95% CI':>13} {'cap %':>6} "
             f"{'cap/base':>8} {'n_D':>4} {'n_U':>4} {'λ_D':>6} {'λ_U':>5} {'cycle s':>8} {'λ=1 desirable %':>16}"]
    for run in doc["runs"]:
        base = run["base"]
        rows = [(0, base, None)] + [(c["cycle"], c["eval"], c) for c in run["cycles"]]
        for i, ev, c in rows:
            ci = f"[{pct(ev['ci95'][0])},{pct(ev['ci95'][1])}]"
            ratio = ev["capability_accuracy"] / base["capability_accuracy"] if base["capability_accuracy"] else 0
            extra = ("", "", "", "", "", "")
            if c is not None:
                pinned = (c.get("ablation_pinned") or {}).get("eval") or {}
                extra = (c["n_D"], c["n_U"], f"{c['lambda_D']:.2f}" if c["lambda_D"] else "",
                         f"{c['lambda_U']:.2f}" if c["lambda_U"] else "", c["cycle_seconds"],
                         pct(pinned.get("desirable_rate")) if pinned else "")
            lines.append(f"{run['rater']:10} {i:>5} {ev['model']:>10} {pct(ev['desirable_rate']):>12} {ci:>13} "
                         f"{pct(ev['capability_accuracy']):>6} {ratio:8.2f} {extra[0]!s:>4} {extra[1]!s:>4} "
                         f"{extra[2]:>6} {extra[3]:>5} {extra[4]!s:>8} {extra[5]:>16}")
        s = run["summary"]
        lines.append(f"{'':10} gain {s['best_gain_points']:+.1f} points; goals {s['goals']}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("extra", nargs="*", help="flags passed to `kto-loop simulate` (after --)")
    args = ap.parse_args()
    if not args.report_only:
        from app.cli import main as cli

        rc = cli(["simulate", "--json", str(args.json), *args.extra])
        if rc != 0:
            return rc
    print(table(json.loads(args.json.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
