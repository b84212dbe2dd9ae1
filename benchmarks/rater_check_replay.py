"""The gate's rater check replayed on the final candidates simulations recorded, at two minimum answer counts.

Every simulate result keeps, per cycle, the final adapter's held-out metrics with their per-rater breakdown
(`gate_heldout`). Each is judged again here as the gate judges it (margin test, then the rater check) with the check
leaving out raters holding ≥ 1 held-out answer (the rule before) and ≥ 2 (the rule now), to show which verdicts the
minimum changes and whose identities they rested on (a simulated attacker's identities are named `sim-attacker-*`).

Run: `.venv/bin/python -m benchmarks.rater_check_replay [RESULTS_JSON ...]` (default: every simulate result in
benchmarks/results/simulate; a run found in several files, as combined files repeat them, counts once). Writes
benchmarks/results/rater_check_replay/<date>_<cpu>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from app.loop.gate import rater_check, should_promote
from benchmarks.harness import RESULTS, machine, result_path, write_result

MINIMA = (1, 2)


def verdicts(cycle: dict[str, Any], min_gain: float) -> dict[str, Any] | None:
    """One recorded final candidate judged at each minimum; None when it lacks a per-rater breakdown."""
    held = cycle.get("gate_heldout") or {}
    new, served = held.get("new"), held.get("served")
    if not isinstance((new or {}).get("per_rater"), dict) or not should_promote(new, served, min_gain)[0]:
        return None
    out: dict[str, Any] = {"n_heldout": held.get("n"), "raters": len(new["per_rater"])}
    for k in MINIMA:
        ok, _, rec = rater_check(new, served, min_gain, min_answers=k)
        out[f"min{k}"] = {"ok": ok, "judged": None if rec is None else rec["judged"],
                          "most_influential": None if rec is None else rec["most_influential"],
                          "n": None if rec is None else rec["n"],
                          "gain_without": None if rec is None else rec["gain_without"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="*", type=Path, help="simulate result files (default: all recorded)")
    ap.add_argument("--out", type=Path, help="result file (default: benchmarks/results/rater_check_replay/...)")
    args = ap.parse_args()
    t_all = time.perf_counter()
    files = args.results or sorted((RESULTS / "simulate").glob("*.json"))
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    for path in files:
        doc = json.loads(path.read_text())
        min_gain = float((doc.get("settings") or {}).get("promote_min_gain") or 0.0)
        for run in (r for r in doc.get("runs") or [] if isinstance(r, dict)):
            for cycle in (c for c in run.get("cycles") or [] if isinstance(c, dict)):
                key = cycle.get("run_id")
                if not key or key in seen:
                    continue
                seen.add(key)
                v = verdicts(cycle, min_gain)
                if v is not None:
                    rows.append({"file": path.name, "rater": run.get("rater"), "seed": run.get("seed"),
                                 "cycle": cycle.get("cycle"), **v})
    changed = [r for r in rows if r["min1"]["ok"] != r["min2"]["ok"]]
    refused = {f"min{k}": sum(not r[f"min{k}"]["ok"] for r in rows) for k in MINIMA}
    summary = {"judged_finals": len(rows), "refused": refused, "changed": len(changed),
               "changed_resting_on_attacker": sum(str(r["min1"]["most_influential"]).startswith("sim-attacker")
                                                  for r in changed),
               "changed_by_answers": {str(n): sum(r["min1"]["n"] == n for r in changed)
                                      for n in sorted({r["min1"]["n"] for r in changed})}}
    for r in changed:
        print(f"{r['file']} {r['rater']} seed {r['seed']} cycle {r['cycle']}: min1 refused on "
              f"{r['min1']['most_influential']} ({r['min1']['n']} of {r['n_heldout']}, gain without "
              f"{r['min1']['gain_without']:+.3f}); min2 {'passes' if r['min2']['ok'] else 'refuses'}")
    write_result({"kind": "rater_check_replay", "machine": machine(), "files": [p.name for p in files],
                  "ratios": summary, "rows": rows}, args.out or result_path("rater_check_replay"), t_all)


if __name__ == "__main__":
    main()
