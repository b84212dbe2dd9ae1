"""Scaled adapters: does shrinking a LoRA's update keep facts better than stopping the run early?

When the capability guard refuses a run's final adapter, the realign path falls back to earlier checkpoints of
the same run. Another way back toward the base model is weight-space interpolation, W = W₀ + α·ΔW with
0 < α < 1: for fine-tuned image models it kept more of the base model's robustness per unit of the fine-tuning
gain than early stopping (WiSE-FT, Wortsman et al., CVPR 2022). For a LoRA adapter ΔW = s·B·A, so α·ΔW is the
same adapter with B multiplied by α: no training, the same rank, a ~10 MB file.

This script builds such copies of the adapters given (`--adapter DIR`, repeatable) at each `--alpha`, serves all
of them from one real vLLM server and measures each with the simulator's own `measure()` (held-out desirable rate
under the rater, capability probe at temperature 0, the product's default system prompt), with the base model and
the unscaled adapters alongside. `--extra DIR` adds adapters measured unscaled only (e.g. the run's checkpoints).

Run: `.venv/bin/python benchmarks/adapter_scaling.py --rater examples \
        --adapter /tmp/sim-ex400/examples/adapters/kto-v2 --alpha 0.8 0.6 0.4`
Writes benchmarks/results/adapter_scaling_<rater>.json (override with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safetensors.torch import load_file, save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lr_sweep import DEFAULT_MODEL, measure_adapters  # noqa: E402

from app.sim import run as sim  # noqa: E402
from app.sim.raters import EXAMPLE_RATERS  # noqa: E402


def scaled_copy(src: Path, alpha: float, out: Path) -> Path:
    """`src` with every lora_B weight multiplied by `alpha`: the adapter's update ΔW scaled by exactly `alpha`."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "adapter_model.safetensors":
            shutil.copy2(f, out / f.name)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    n_b = sum("lora_B" in k for k in tensors)
    if n_b == 0:
        raise SystemExit(f"{src}: no lora_B weights")
    save_file({k: (v * alpha if "lora_B" in k else v).contiguous() for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rater", required=True, choices=sorted(EXAMPLE_RATERS))
    ap.add_argument("--adapter", type=Path, action="append", required=True)
    ap.add_argument("--alpha", type=float, nargs="*", default=[0.8, 0.6, 0.4], help="none: the adapters as they are")
    ap.add_argument("--extra", type=Path, action="append", default=[])
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/adapter-scaling"))
    ap.add_argument("--holdout-limit", type=int, default=0, help="0 = every held-out prompt (as simulate does)")
    ap.add_argument("--samples-per-prompt", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out_json = args.out or Path(__file__).parent / "results" / f"adapter_scaling_{args.rater}.json"

    work = args.work_dir / args.rater
    work.mkdir(parents=True, exist_ok=True)
    models: list[dict] = []
    for i, a in enumerate(args.adapter):
        models.append({"adapter": str(a), "alpha": 1.0, "path": a})
        for alpha in args.alpha:
            models.append({"adapter": str(a), "alpha": alpha, "path": scaled_copy(a, alpha, work / f"a{i}-{alpha}")})
    models += [{"adapter": str(e), "alpha": 1.0, "path": e, "extra": True} for e in args.extra]

    load0, t_start = os.getloadavg()[0], time.perf_counter()
    base, evals = measure_adapters(args.model_dir, work / "vllm.log", args.rater, [Path(m["path"]) for m in models],
                                   holdout_limit=args.holdout_limit, samples=args.samples_per_prompt,
                                   max_tokens=args.max_tokens)
    for m, e in zip(models, evals, strict=True):
        m["eval"], m["path"] = e, str(m["path"])
    doc = {"benchmark": "adapter_scaling", "rater": args.rater,
           "machine": {**sim.machine_info(), "load_avg_at_start": load0, "load_avg_at_end": os.getloadavg()[0]},
           "settings": {"holdout_limit": args.holdout_limit, "samples_per_prompt": args.samples_per_prompt,
                        "max_tokens": args.max_tokens, "temperature": 0.7, "top_p": 0.95},
           "wall_seconds": round(time.perf_counter() - t_start, 1), "base": base, "models": models,
           "ratios": {f"{Path(m['adapter']).name}×{m['alpha']}": {
               "desirable_gain_points": 100 * (m["eval"]["desirable_rate"] - base["desirable_rate"]),
               "capability_of_base": m["eval"]["capability_correct"] / max(1, base["capability_correct"])}
               for m in models}}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["ratios"], indent=1))


if __name__ == "__main__":
    main()
