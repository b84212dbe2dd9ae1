"""Learning-rate sweep on saved simulator snapshots: what lr keeps the capability probe while moving the rater?

The simulator runs the whole loop, which takes ~20 minutes per rater; this script isolates the one knob the loop
hinges on. For each (snapshot, lr) it trains an adapter with the real aligner subprocess (`python -m aligner`,
1 epoch, from the base model, exactly as the first simulator cycle does), then serves every adapter from one
real vLLM server and measures each with the simulator's own `measure()` (held-out desirable rate under the
snapshot's rater, capability probe at temperature 0).

Run: `.venv/bin/python benchmarks/lr_sweep.py --snapshot bullets=/path/snapshot.parquet --lr 1e-3 5e-4 2.5e-4`
(`--snapshot examples=/path/other.parquet@5e-4` sweeps only the listed rates for that snapshot)
Writes benchmarks/results/lr_sweep.json (override with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.sim import run as sim  # noqa: E402
from app.sim.raters import EXAMPLE_RATERS  # noqa: E402
from serving.client import ChatClient, SamplingParams  # noqa: E402
from serving.server import VLLMServer, VLLMServerSpec  # noqa: E402

DEFAULT_MODEL = Path.home() / ".cache" / "kto-loop" / "models" / "SmolLM2-135M-Instruct"


def train(snapshot: Path, out: Path, model_dir: Path, lr: float, epochs: int, extra: list[str] = ()) -> dict:
    """`extra`: further aligner flags; a repeated flag (e.g. --lr) overrides the one before it."""
    cmd = [sys.executable, "-m", "aligner", "--snapshot", str(snapshot), "--out", str(out), "--model-dir",
           str(model_dir), "--epochs", str(epochs), "--lr", str(lr), "--progress-json", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"aligner failed ({proc.returncode}): {proc.stderr[-800:]}")
    m = json.loads((out / "manifest.json").read_text())
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {"wall_seconds": round(time.perf_counter() - t0, 1), "train_seconds": m.get("train_seconds"),
            "total_seconds": m.get("total_seconds"), "phase_seconds": m.get("phase_seconds"),
            "phase_sequences": {e["phase"]: e["sequences"] for e in events if e.get("event") == "phase"},
            "n_D": m.get("n_desirable"), "n_U": m.get("n_undesirable"), "lambda_D": m.get("lambda_d"),
            "lambda_U": m.get("lambda_u"), "gate_heldout": m.get("heldout")}


def measure_adapters(model_dir: Path, log_path: Path, rater: str, adapters: list[Path], *, holdout_limit: int,
                     samples: int, max_tokens: int, capability_repeats: int = 1) -> tuple[dict, list[dict]]:
    """The base model and each adapter, served from one real vLLM server and measured with the simulator's own
    `measure()` (held-out desirable rate under `rater`, capability probe at temperature 0): (base, [per adapter])."""
    holdout = sim.evenly_spaced(sim.load_prompts(sim.DEFAULT_HOLDOUT), holdout_limit)  # as simulate picks
    capability = sim.load_capability()
    sampling = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=max_tokens)
    spec = VLLMServerSpec(model_dir=model_dir, log_path=log_path)
    with VLLMServer(spec) as server, ChatClient(server.base_url, read_timeout=600) as client:
        def evaluate(model: str) -> dict:
            return sim.measure(client, model, holdout=holdout, rater=EXAMPLE_RATERS[rater], capability=capability,
                               sampling=sampling, system_prompt="You are a helpful assistant.", samples=samples,
                               capability_repeats=capability_repeats)

        base = evaluate("base")
        print(f"base: desirable {sim.pct(base['desirable_rate'])}, capability "
              f"{base['capability_correct']}/{len(capability)}", file=sys.stderr, flush=True)
        evals = []
        for i, adapter in enumerate(adapters):
            sim.load_for_eval(server, Path(adapter), f"m{i}")
            evals.append(evaluate(f"m{i}"))
            print(f"{adapter}: desirable {sim.pct(evals[-1]['desirable_rate'])} {evals[-1]['ci95']}, capability "
                  f"{evals[-1]['capability_correct']}/{len(capability)}", file=sys.stderr, flush=True)
    return base, evals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshot", action="append", required=True,
                    help="RATER=path/to/snapshot.parquet, optionally @LR,LR,... to sweep other rates for this one")
    ap.add_argument("--lr", type=float, nargs="+", required=True)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/lr-sweep"))
    ap.add_argument("--holdout-limit", type=int, default=40)
    ap.add_argument("--samples-per-prompt", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lr_sweep.json")
    args = ap.parse_args()

    holdout = sim.evenly_spaced(sim.load_prompts(sim.DEFAULT_HOLDOUT), args.holdout_limit)  # as simulate picks
    capability = sim.load_capability()
    runs: list[dict] = []
    load0 = os.getloadavg()[0]
    t_start = time.perf_counter()
    for item in args.snapshot:
        rater, _, path = item.partition("=")
        path, _, lrs = path.partition("@")
        if rater not in EXAMPLE_RATERS or not Path(path).is_file():
            raise SystemExit(f"--snapshot {item!r}: expected RATER=FILE with RATER in {sorted(EXAMPLE_RATERS)}")
        for lr in [float(x) for x in lrs.split(",")] if lrs else args.lr:
            out = args.work_dir / f"{rater}-lr{lr:g}"
            if (out / "manifest.json").is_file():
                print(f"reusing {out}", file=sys.stderr)
                m = json.loads((out / "manifest.json").read_text())
                rec = {"reused": True, "train_seconds": m.get("train_seconds"), "n_D": m.get("n_desirable"),
                       "n_U": m.get("n_undesirable"), "lambda_D": m.get("lambda_d"), "gate_heldout": m.get("heldout")}
            else:
                print(f"training {rater} lr={lr:g} ...", file=sys.stderr, flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                rec = train(Path(path), out, args.model_dir, lr, args.epochs)
            runs.append({"rater": rater, "snapshot": path, "lr": lr, "epochs": args.epochs, "adapter": str(out),
                         "train": rec})

    sampling = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=args.max_tokens)
    spec = VLLMServerSpec(model_dir=args.model_dir, log_path=args.work_dir / "vllm.log")
    base: dict[str, dict] = {}
    with VLLMServer(spec) as server, ChatClient(server.base_url, read_timeout=600) as client:
        for i, r in enumerate(runs):
            rater_fn = EXAMPLE_RATERS[r["rater"]]

            def evaluate(model: str, rater_fn=rater_fn) -> dict:
                return sim.measure(client, model, holdout=holdout, rater=rater_fn, capability=capability,
                                   sampling=sampling, system_prompt="You are a helpful assistant.",
                                   samples=args.samples_per_prompt)

            if r["rater"] not in base:
                base[r["rater"]] = evaluate("base")
                print(f"base/{r['rater']}: desirable {sim.pct(base[r['rater']]['desirable_rate'])}, capability "
                      f"{base[r['rater']]['capability_correct']}/{len(capability)}", file=sys.stderr, flush=True)
            name = f"sweep-{i}"
            sim.load_for_eval(server, Path(r["adapter"]), name)
            r["eval"] = evaluate(name)
            print(f"{r['rater']} lr={r['lr']:g}: desirable {sim.pct(r['eval']['desirable_rate'])}, capability "
                  f"{r['eval']['capability_correct']}/{len(capability)}", file=sys.stderr, flush=True)
    doc = {"benchmark": "lr_sweep", "machine": {**sim.machine_info(), "load_avg_at_start": load0,
                                                 "load_avg_at_end": os.getloadavg()[0]},
           "settings": {"holdout_limit": args.holdout_limit, "samples_per_prompt": args.samples_per_prompt,
                        "max_tokens": args.max_tokens, "temperature": 0.7, "top_p": 0.95, "epochs": args.epochs},
           "wall_seconds": round(time.perf_counter() - t_start, 1), "base": base, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps([{k: (r[k] if k != "eval" else {x: r["eval"][x] for x in
                                                       ("desirable_rate", "ci95", "capability_correct")})
                       for k in ("rater", "lr", "eval")} for r in runs], indent=1))


if __name__ == "__main__":
    main()
