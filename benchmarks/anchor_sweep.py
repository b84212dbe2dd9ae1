"""Does the anchor term (aligner/anchor.py) keep the facts that a format preference costs? One snapshot, side by side.

Takes a simulator run's snapshot and the adapter that run trained on it (`--control`, e.g. the plain-KTO
`bullets` 400-rating cycle that reached +41.6 but lost 8 of 32 facts; its own γ is recorded), trains the same run
again with the anchor term at each `--weights` γ (same data, seed and flags, `--checkpoints 0`: the final adapter is
what is judged; `--lr` changes the learning rate of these runs only),
then serves the control and every anchored adapter from one real vLLM server and measures each with the
simulator's own `measure()` (held-out desirable rate under the rater, capability probe at temperature 0). Also
reports each adapter's drift on the anchor prompts (mean KL(base ‖ adapter) per anchor token).

Run: `.venv/bin/python benchmarks/anchor_sweep.py --snapshot RUN/snapshot.parquet --control RUN/adapter
      --rater bullets --weights 3 10 --holdout-limit 0 --samples-per-prompt 3`
Writes benchmarks/results/anchor_sweep_<rater>.json (override with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lr_sweep import DEFAULT_MODEL, measure_adapters, train  # noqa: E402

from app.sim import run as sim  # noqa: E402
from app.sim.raters import EXAMPLE_RATERS  # noqa: E402


def anchor_drift(model_dir: Path, adapters: list[Path], max_tokens: int = 64) -> list[float]:
    """Mean bucketed KL(base ‖ adapter) per token along the base model's greedy answers to the anchor prompts."""
    import torch

    from aligner import anchor
    from aligner.model import load_policy, load_tokenizer

    tok = load_tokenizer(model_dir)
    out = []
    anchors = None
    for a in adapters:
        model = load_policy(model_dir, resume_from=a, dtype=torch.float32)
        model.eval()
        if anchors is None:  # the adapter is disabled while they are built: the same for every adapter
            anchors = anchor.build(model, tok, anchor.load_prompts(None), max_tokens)
        idx = list(range(len(anchors.seqs)))
        with torch.no_grad():
            kl = sum(anchor.kl_sum(model, anchors, idx[s:s + 8], tok.pad_token_id).item()
                     for s in range(0, len(idx), 8))
        out.append(round(kl / anchors.n_tokens(idx), 5))
        del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshot", type=Path, required=True)
    ap.add_argument("--control", type=Path, required=True, help="the adapter plain KTO trained on this snapshot")
    ap.add_argument("--rater", required=True, choices=sorted(EXAMPLE_RATERS))
    ap.add_argument("--weights", type=float, nargs="+", required=True, help="anchor weights γ to train")
    ap.add_argument("--lr", type=float, default=None, help="learning rate of the anchored runs (default: the "
                                                            "control's)")
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/anchor-sweep"))
    ap.add_argument("--holdout-limit", type=int, default=0)
    ap.add_argument("--samples-per-prompt", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--anchor-max-tokens", type=int, default=24,
                    help="length of the base model's anchor answers in the anchored runs (the aligner's flag)")
    ap.add_argument("--capability-repeats", type=int, default=3, help="capability probes per model (mean)")
    ap.add_argument("--skip-control", action="store_true",
                    help="measure only the anchored adapters (the control's numbers are in an earlier result)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out_json = args.out or Path(__file__).parent / "results" / f"anchor_sweep_{args.rater}.json"

    control = json.loads((args.control / "manifest.json").read_text())
    hp = control["hyperparameters"]
    n_rows = pq.read_metadata(args.snapshot).num_rows
    flags = ["--checkpoints", "0", "--max-examples", str(hp.get("max_examples") or n_rows),
             "--lora-rank", str(hp["lora_rank"]), "--beta", str(hp["beta"]), "--seed", str(hp["seed"])]
    work = args.work_dir / args.rater
    work.mkdir(parents=True, exist_ok=True)
    flags += ["--anchor-cache", str(args.work_dir / "anchor-cache")]  # the base model's anchors: built once
    load0, t_start = os.getloadavg()[0], time.perf_counter()
    runs: list[dict] = [{"anchor_weight": float(hp.get("anchor_weight") or 0.0), "lr": float(hp["lr"]),
                         "adapter": str(args.control), "train": {
        "reused": True, "train_seconds": control.get("train_seconds"), "phase_seconds": control.get("phase_seconds"),
        "n_D": control.get("n_desirable"), "n_U": control.get("n_undesirable"), "lambda_D": control.get("lambda_d")}}]
    if args.skip_control:
        runs = []
    lr = float(args.lr if args.lr is not None else hp["lr"])
    for g in args.weights:
        out = work / (f"anchor-{g:g}" + ("" if lr == float(hp["lr"]) else f"-lr{lr:g}")
                      + f"-t{args.anchor_max_tokens}")
        if (out / "manifest.json").is_file():
            print(f"reusing {out}", file=sys.stderr)
            m = json.loads((out / "manifest.json").read_text())
            rec = {"reused": True, "train_seconds": m.get("train_seconds"), "phase_seconds": m.get("phase_seconds")}
        else:
            print(f"training anchor weight {g:g} ...", file=sys.stderr, flush=True)
            rec = train(args.snapshot, out, args.model_dir, lr, int(hp["epochs"]),
                        extra=[*flags, "--anchor-weight", f"{g:g}", "--anchor-max-tokens",
                               str(args.anchor_max_tokens)])
            m = json.loads((out / "manifest.json").read_text())
        rec["anchor"] = m.get("anchor")
        runs.append({"anchor_weight": g, "anchor_max_tokens": args.anchor_max_tokens, "lr": lr, "adapter": str(out),
                     "train": rec})

    print("anchor drift ...", file=sys.stderr, flush=True)
    for r, kl in zip(runs, anchor_drift(args.model_dir, [Path(r["adapter"]) for r in runs]), strict=True):
        r["anchor_kl_per_token"] = kl
    base, evals = measure_adapters(args.model_dir, work / "vllm.log", args.rater, [Path(r["adapter"]) for r in runs],
                                   holdout_limit=args.holdout_limit, samples=args.samples_per_prompt,
                                   max_tokens=args.max_tokens, capability_repeats=args.capability_repeats)
    for r, e in zip(runs, evals, strict=True):
        r["eval"] = e
        r["gain_points"] = round(100 * (e["desirable_rate"] - base["desirable_rate"]), 1)
    doc = {"benchmark": "anchor_sweep", "rater": args.rater, "snapshot": str(args.snapshot), "n_rows": n_rows,
           "machine": {**sim.machine_info(), "load_avg_at_start": load0, "load_avg_at_end": os.getloadavg()[0]},
           "settings": {"holdout_limit": args.holdout_limit, "samples_per_prompt": args.samples_per_prompt,
                        "max_tokens": args.max_tokens, "capability_repeats": args.capability_repeats,
                        "anchor_max_tokens": args.anchor_max_tokens, "temperature": 0.7, "top_p": 0.95, "lr": hp["lr"],
                        "epochs": hp["epochs"], "aligner_flags": flags},
           "wall_seconds": round(time.perf_counter() - t_start, 1), "base": base, "runs": runs}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(doc, indent=1))
    print(json.dumps([{"anchor_weight": r["anchor_weight"], "gain_points": r["gain_points"],
                       "anchor_kl": r["anchor_kl_per_token"],
                       **{x: r["eval"][x] for x in ("desirable_rate", "ci95", "capability_correct")}}
                      for r in runs], indent=1))


if __name__ == "__main__":
    main()
