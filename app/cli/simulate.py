"""`kto-loop simulate`: simulated users chat, rate and realign through the real stack; JSON + PNG per cycle."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from app.config import Config

if TYPE_CHECKING:
    from app.sim.inputs import Rater
    from app.sim.population import Case

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
                             "batching by up to two questions "
                             "(docs/experiments/2026-12-01-capability-probe-repeatability.md)")
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
                             "adapter) faster than with 32 on 2 cores, docs/experiments/2026-12-02-shorter-cycles.md)")
    parser.add_argument("--seed", type=int, default=0, help="prompt order and every simulated rater's draws")
    parser.add_argument("--seeds", type=int, default=1,
                        help="repeats per rater (seeds SEED..SEED+N-1, each on a fresh stack): the summary gives the "
                             "minimum, median and per-seed gain and whether each goal held in every seed")
    robust = parser.add_argument_group("robustness cases (who rates; held-out rates always use the clean preferences)")
    robust.add_argument("--flip", type=float, default=0.0, metavar="P",
                        help="label noise: each thumb is turned over with probability P (seeded)")
    robust.add_argument("--rate-prob", type=float, default=1.0, metavar="P",
                        help="raters rate only this share of answers; collection runs until the cycle's ratings "
                             "are in")
    robust.add_argument("--mix", metavar="RATER:SHARE,...",
                        help="a population of rater kinds (e.g. concise:0.7,bullets:0.3) instead of --rater; the "
                             "largest share is the majority; each kind's held-out rate is reported")
    robust.add_argument("--change-at", type=int, default=0, metavar="N",
                        help="after cycle N the (majority's) preference becomes --rater-after (for continue mode)")
    robust.add_argument("--rater-after", metavar="RATER", help="the preference from cycle N+1 on")
    robust.add_argument("--attacker-share", type=float, default=0.0, metavar="S",
                        help="share of chats from an attacker who rates the opposite way of the honest raters, "
                             "every answer, from one client address")
    robust.add_argument("--attacker-identities", type=int, default=1, metavar="N",
                        help="identities the attacker mints (all from its one address)")
    parser.add_argument("--combine", nargs="+", metavar="RESULTS_JSON[=LABEL]",
                        help="simulate nothing: put the runs of these earlier results files into one JSON and one "
                             "plot (e.g. each rater at its own settings; each run keeps its file's settings); "
                             "=LABEL names the file's runs in the plot, and files given one label are repeats of "
                             "one recipe: their median gain and goal count are reported; =LABEL#RUN also names "
                             "the repeat (e.g. =\"K15#seed 3\"; default: its seed)")


def _report(doc: dict, json_path: Path, png: Path) -> None:
    from app.sim import report

    print("\n".join(report.summary_lines(doc)))
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


def _cases(args: argparse.Namespace) -> list[tuple[str, Rater, Case | None]]:
    """(run name, main rater, case) per run from the options; the case is None when no robustness option is set, so
    a plain run is exactly what it was."""
    from app.sim import inputs
    from app.sim.population import Case, parse_mix

    robust = (args.flip, args.rate_prob, args.mix, args.change_at, args.attacker_share) != (0.0, 1.0, None, 0, 0.0)
    if args.change_at and args.change_at >= args.cycles:
        raise inputs.SimulationError(f"--change-at {args.change_at} leaves no cycle after the change: use "
                                     f"--cycles {args.change_at + 2} to see whether it is followed in 2 cycles")
    after = inputs.load_rater(args.rater_after) if args.rater_after else None
    knobs = {"flip": args.flip, "rate_prob": args.rate_prob, "change_at": args.change_at, "after": after,
             "attacker_share": args.attacker_share, "attacker_identities": args.attacker_identities}
    if args.mix:
        if args.rater:
            raise inputs.SimulationError("--mix names the raters: leave out --rater")
        kinds = sorted(parse_mix(args.mix), key=lambda kv: -kv[1])  # the majority first
        loaded = [(inputs.load_rater(spec), share) for spec, share in kinds]
        (main, _), rest = loaded[0], loaded[1:]
        case = Case(main, tuple((name, fn, share) for (name, fn), share in rest), **knobs)
        return [(case.name, main[1], case)]
    raters = [inputs.load_rater(r) for r in (args.rater or ["concise", "bullets", "examples"])]
    names = [n for n, _ in raters]
    if len(set(names)) != len(names):
        raise inputs.SimulationError(f"rater names must be distinct, got {names}")
    return [(name, fn, Case((name, fn), **knobs) if robust or after else None) for name, fn in raters]


def run(args: argparse.Namespace, cfg: Config) -> int:
    from app.sim import inputs, report
    from app.sim import run as sim

    png = args.plot or args.json.with_suffix(".png")
    if args.combine:
        return _combine(args, png)
    try:
        for flag in ("cycles", "ratings_per_cycle", "samples_per_prompt", "capability_repeats", "workers", "seeds"):
            if getattr(args, flag) < 1:
                raise inputs.SimulationError(f"--{flag.replace('_', '-')} must be at least 1")
        cases = _cases(args)
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
                         capability_repeats=args.capability_repeats, ablation=args.ablation, seed=seed,
                         workers=args.workers, case=case)
             for name, fn, case in cases for seed in range(args.seed, args.seed + args.seeds)]
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
