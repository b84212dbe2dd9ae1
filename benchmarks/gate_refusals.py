"""Adapters the promotion gate refused, measured the way the simulator measures served ones: was each refusal right?

The gate (app/loop/gate.py) decides on the aligner's held-out split, about a tenth of a run's ratings; under a
strong imbalance that split can hold one or two thumbs-up, so its margin rests on one or two answers. This serves
the base model and every adapter given from one real vLLM server and measures each with the simulator's own
`measure()` (held-out prompts never trained on, the rater's desirable rate, the capability probe), beside the
gate's own held-out numbers from the run's manifest:

    python benchmarks/gate_refusals.py --rater bullets --adapter final=RUN/adapter \
        --adapter step5=RUN/adapter/checkpoints/step-5 [--samples 2 --holdout-limit 0]

Writes benchmarks/results/gate_refusals.json (override with --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lr_sweep import DEFAULT_MODEL, measure_adapters  # noqa: E402
from serving_bench import machine, write_result  # noqa: E402


def gate_numbers(adapter: Path) -> dict | None:
    """The gate's held-out numbers for this adapter (its own manifest: a run's final adapter, or a checkpoint the
    gate evaluated), with the held-out class counts, which only the run's final manifest records."""
    own = adapter / "manifest.json"
    if not own.is_file():
        return None
    h = json.loads(own.read_text()).get("heldout") or {}
    run = adapter.parent.parent / "manifest.json"
    counts = (json.loads(run.read_text()).get("heldout") or {}) if adapter.parent.name == "checkpoints" else h
    new = h.get("new") or {}
    keep = ("margin", "reward_desirable", "reward_undesirable", "frac_correct_side")
    return {"n": h.get("n"), "n_desirable": counts.get("n_desirable"), "n_undesirable": counts.get("n_undesirable"),
            **{k: new.get(k) for k in keep}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rater", required=True)
    ap.add_argument("--adapter", action="append", required=True, help="LABEL=adapter directory")
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--holdout-limit", type=int, default=0, help="0 = every held-out prompt, as the #7 runs")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--capability-repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gate_refusals.json")
    args = ap.parse_args()
    t_all = time.perf_counter()
    labelled = [a.split("=", 1) for a in args.adapter]
    with tempfile.TemporaryDirectory() as tmp:
        base, evals = measure_adapters(args.model_dir, Path(tmp) / "vllm.log", args.rater,
                                       [Path(d) for _, d in labelled], holdout_limit=args.holdout_limit,
                                       samples=args.samples, max_tokens=args.max_tokens,
                                       capability_repeats=args.capability_repeats)
    adapters = {label: {"dir": d, "gate_heldout": gate_numbers(Path(d)), "measured": e}
                for (label, d), e in zip(labelled, evals, strict=True)}
    result = {"benchmark": "gate_refusals", "machine": machine(), "rater": args.rater,
              "protocol": {"holdout_limit": args.holdout_limit, "samples": args.samples,
                           "max_tokens": args.max_tokens, "capability_repeats": args.capability_repeats},
              "base": base, "adapters": adapters,
              "ratios": {label: {"desirable": a["measured"]["desirable_rate"],
                                 "gain_points": 100 * (a["measured"]["desirable_rate"] - base["desirable_rate"]),
                                 "capability_correct": a["measured"]["capability_correct"]}
                         for label, a in adapters.items()}}
    write_result(result, args.out, t_all)


if __name__ == "__main__":
    main()
