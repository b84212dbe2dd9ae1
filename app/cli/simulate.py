"""`kto-loop simulate`: simulated users chat, rate and realign through the real stack; JSON + PNG per cycle."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from app.config import Config

NAME = "simulate"
HELP = ("closed-loop simulation: simulated users chat and rate through the real stack, each cycle realigns and "
        "hot-swaps; measures held-out desirable rate and capability per cycle")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from app.sim import inputs
    from app.sim import run as sim

    parser.add_argument("--rater", action="append", metavar="RATER",
                        help="an example rater (concise, bullets, examples), MODULE:FUNCTION or FILE.py:FUNCTION "
                             "with rate(prompt, answer) -> True/False/None; repeat for several (each gets a fresh "
                             "store and server); default: the three example raters")
    parser.add_argument("--cycles", type=int, default=2, help="realignment cycles per rater")
    parser.add_argument("--ratings-per-cycle", type=int, default=400, help="thumbs collected before each cycle")
    parser.add_argument("--prompts", type=Path, default=inputs.DEFAULT_PROMPTS,
                        help="training prompts (.jsonl with 'prompt', or one per line)")
    parser.add_argument("--holdout", type=Path, default=inputs.DEFAULT_HOLDOUT,
                        help="held-out prompts, never sent during collection")
    parser.add_argument("--holdout-limit", type=int, default=0, help="use N evenly spaced held-out prompts (0 = all)")
    parser.add_argument("--capability", type=Path, default=inputs.DEFAULT_CAPABILITY,
                        help="capability probe (.jsonl with 'question' and accepted 'answers')")
    parser.add_argument("--samples-per-prompt", type=int, default=2,
                        help="answers sampled per held-out prompt at the served temperature")
    parser.add_argument("--capability-repeats", type=int, default=3,
                        help="capability probes per measurement, averaged: greedy answers on a bf16 CPU vary with "
                             "batching by about one question (benchmarks/results/probe_repeat.json)")
    parser.add_argument("--ablation", action="store_true",
                        help="also train λ_D = λ_U = 1 on each cycle's snapshot and measure it beside auto λ")
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of desirable rate per cycle (default: JSON's "
                                                                 "path with .png)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where each rater's fresh store/adapters go (default: DATA_DIR/simulations/<time>); "
                             "the production store is never touched")
    parser.add_argument("--workers", type=int, default=sim.SimSpec.workers,
                        help="concurrent simulated chats (128: 200 ratings collected 1.16x (base) and 1.21x (an "
                             "adapter) faster than with 32 on 2 cores, collect_workers_bench.json)")
    parser.add_argument("--seed", type=int, default=0, help="prompt order")
    parser.add_argument("--combine", nargs="+", metavar="RESULTS_JSON[=LABEL]",
                        help="simulate nothing: put the runs of these earlier results files into one JSON and one "
                             "plot (e.g. each rater at its own settings; each run keeps its file's settings); "
                             "=LABEL names the file's runs in the plot, and files given one label are repeats of "
                             "one recipe: their median gain and goal count are reported; =LABEL#RUN also names "
                             "the repeat (e.g. =\"K15#seed 3\"; default: its seed)")


def _report(doc: dict, json_path: Path, png: Path) -> None:
    from app.sim import report

    for r in doc["runs"]:
        s = r["summary"]
        print(f"{r.get('label', r['rater'])}: desirable {report.pct(s['base_desirable_rate'])} → "
              f"{report.pct(s['final_desirable_rate'])} (best gain {s['best_gain_points']} points), capability "
              f"≥ {report.pct(s['min_capability_ratio'])} of base, slowest cycle {s['max_cycle_seconds']} s")
    for g in doc.get("repeats", []):
        if g["n_runs"] > 1:
            name = report.recipe_name(g["rater"], g["group"])
            print(f"{name}: {g['n_runs']} repeats, gain median {g['median_best_gain_points']:+.1f} points "
                  f"(each {', '.join(f'{x:+.1f}' for x in g['best_gain_points'])}), final-cycle gain median "
                  f"{report.points(g['median_final_gain_points'])}, all goals met in {g['runs_meeting_all_goals']} "
                  f"of {g['n_runs']}")
    print(f"wrote {json_path} and {png}")


def _combine(args: argparse.Namespace, png: Path) -> int:
    import json

    from app.sim import inputs, report

    try:
        sources = []
        for arg in args.combine:
            path, label = arg, None
            if "=" in arg and not Path(arg).exists():
                path, label = arg.rsplit("=", 1)
            try:
                sources.append((path, json.loads(Path(path).read_text()), label.strip() or None if label else None))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise inputs.SimulationError(f"{path}: cannot read it as JSON ({e})") from e
        doc = report.combine(sources)
    except inputs.SimulationError as e:
        print(f"kto-loop simulate: {e}", file=sys.stderr)
        return 2
    report.write_json(doc, args.json)
    report.plot(doc, png)
    _report(doc, args.json, png)
    return 0


def run(args: argparse.Namespace, cfg: Config) -> int:
    from app.sim import inputs, report
    from app.sim import run as sim

    png = args.plot or args.json.with_suffix(".png")
    if args.combine:
        return _combine(args, png)
    try:
        for flag in ("cycles", "ratings_per_cycle", "samples_per_prompt", "capability_repeats", "workers"):
            if getattr(args, flag) < 1:
                raise inputs.SimulationError(f"--{flag.replace('_', '-')} must be at least 1")
        raters = [inputs.load_rater(r) for r in (args.rater or ["concise", "bullets", "examples"])]
        names = [n for n, _ in raters]
        if len(set(names)) != len(names):
            raise inputs.SimulationError(f"rater names must be distinct, got {names}")
        prompts = inputs.load_prompts(args.prompts)
        holdout = inputs.load_prompts(args.holdout)
        holdout = inputs.evenly_spaced(holdout, args.holdout_limit)
        overlap = set(prompts) & set(holdout)
        if overlap:
            raise inputs.SimulationError(f"{len(overlap)} held-out prompt(s) also in the training prompts, "
                                      f"e.g. {next(iter(overlap))!r}")
        capability = inputs.load_capability(args.capability)
    except inputs.SimulationError as e:
        print(f"kto-loop simulate: {e}", file=sys.stderr)
        return 2
    specs = [sim.SimSpec(name, fn, cycles=args.cycles, ratings_per_cycle=args.ratings_per_cycle, prompts=prompts,
                         holdout=holdout, capability=capability, samples_per_prompt=args.samples_per_prompt,
                         capability_repeats=args.capability_repeats, ablation=args.ablation, seed=args.seed,
                         workers=args.workers) for name, fn in raters]
    work_dir = args.work_dir or Path(cfg.data_dir) / "simulations" / time.strftime("%Y%m%d-%H%M%S")

    def save(doc: dict) -> None:  # after every measurement: an interrupted run still leaves its numbers
        report.write_json(doc, args.json)
        report.plot(doc, png)

    try:
        doc = sim.simulate(cfg, specs, work_dir, log=report.stderr_log, on_update=save)
    except inputs.SimulationError as e:
        print(f"kto-loop simulate: {e}", file=sys.stderr)
        return 1
    save(doc)
    _report(doc, args.json, png)
    return 0
