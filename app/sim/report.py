"""What a simulation found, in a form people can check: goal summaries, provenance, the JSON document, the plot,
and several results files combined into one."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.sim import goals
from app.sim.inputs import SimulationError

if TYPE_CHECKING:
    from app.sim.run import SimSpec


@functools.cache
def machine_info() -> dict[str, Any]:
    """The machine and library versions, since every timing and some results depend on them."""
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    for mod in ("torch", "vllm", "transformers", "peft"):
        try:
            info[mod] = importlib.import_module(mod).__version__
        except Exception:
            pass
    from serving.server import cpu_has_native_bf16, vllm_dtype

    info["native_bf16"], info["served_dtype"] = cpu_has_native_bf16(), vllm_dtype("auto")  # speed hinges on it
    return info


SOURCE_ROOT = Path(__file__).resolve().parents[2]


def code_version(root: Path = SOURCE_ROOT) -> str | None:
    """`git describe --always --dirty` of the source tree, so a results file names the code that made it (a
    behaviour such as the capability guard's floor can change between runs with the same flags); None outside
    a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None

def pct(x: float | None) -> str:
    """A rate as a percentage, n/a when nothing was rated."""
    return "n/a" if x is None else f"{100 * x:.1f}%"


def points(x: float | None) -> str:
    """A signed gain in percentage points, n/a when unknown."""
    return "n/a" if x is None else f"{x:+.1f}"


def summarize(base: dict[str, Any], cycles: Sequence[dict[str, Any]],
              case: dict[str, Any] | None = None) -> dict[str, Any]:
    """One run in a few numbers (gain, capability ratio, slowest cycle) and its goals (app.sim.goals), so a results
    file answers "did it work?" without re-reading every cycle."""
    rates = [c["eval"]["desirable_rate"] for c in cycles if c["eval"]["desirable_rate"] is not None]
    b = base["desirable_rate"] or 0.0
    best = max(rates, default=b)
    cap_ratio = min((c["eval"]["capability_accuracy"] / base["capability_accuracy"] for c in cycles),
                    default=1.0) if base["capability_accuracy"] else None
    secs = [c["cycle_seconds"] for c in cycles]
    out = {"base_desirable_rate": base["desirable_rate"], "final_desirable_rate": rates[-1] if rates else None,
           "best_gain_points": round(100 * (best - b), 1), "min_capability_ratio": cap_ratio,
           "max_cycle_seconds": max(secs, default=None), "promotions": sum(c["promoted"] for c in cycles),
           "goals": goals.check(base, cycles, case)}
    names = list(base.get("by_rater") or {})
    if names:  # each preference of the case, base then after every cycle: the majority's and minority's apart
        out["rates_by_rater"] = {n: [goals.rate_of(e, n) for e in [base] + [c["eval"] for c in cycles]]
                                 for n in names}
    shares = [(c.get("snapshot_sources") or {}).get("attacker_share") for c in cycles]
    if (case or {}).get("attacker"):
        out["attacker_share_by_cycle"] = shares
    abl = [c["ablation_pinned"]["eval"]["desirable_rate"] for c in cycles if "ablation_pinned" in c]
    if abl:
        out["ablation_pinned_final_desirable_rate"] = abl[-1]
    return out


def document(cfg: Any, specs: Sequence[SimSpec], t0: float, runs: list[dict[str, Any]],
             code: str | None) -> dict[str, Any]:
    """The results file: runs with the settings, machine and code that made them, so a figure can be traced."""
    return {
        "kind": "kto-loop simulate", "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)),
        "wall_seconds": round(time.time() - t0, 1), "machine": machine_info(), "code": code,
        "raters": [s.rater_name for s in specs],
        "load_average_now": list(os.getloadavg()),  # other work on the machine slows every timing here
        "settings": {"model_dir": str(cfg.model_dir), "temperature": cfg.temperature, "top_p": cfg.top_p,
                     "max_tokens": cfg.max_tokens, "lora_rank": cfg.lora_rank, "beta": cfg.beta,
                     "anchor_weight": cfg.anchor_weight, "anchor_max_tokens": cfg.anchor_max_tokens,
                     "lr_generation_decay": cfg.lr_generation_decay,
                     "promote_min_gain": cfg.promote_min_gain,
                     "promote_max_capability_drop": cfg.promote_max_capability_drop,
                     "promote_max_loop_increase": getattr(cfg, "promote_max_loop_increase", None),
                     "align_extra_args": cfg.align_extra_args, "align_mode": cfg.align_mode,
                     "max_examples": cfg.max_examples, "first_lora_layer": cfg.first_lora_layer,
                     "max_user_share": getattr(cfg, "max_user_share", None),  # the snapshot's share caps
                     "max_addr_share": getattr(cfg, "max_addr_share", None),
                     "cycles": specs[0].cycles if specs else 0,
                     "ratings_per_cycle": specs[0].ratings_per_cycle if specs else 0,
                     "samples_per_prompt": specs[0].samples_per_prompt if specs else 0,
                     "capability_repeats": specs[0].capability_repeats if specs else 0,
                     "n_train_prompts": len(specs[0].prompts) if specs else 0,
                     "n_holdout_prompts": len(specs[0].holdout) if specs else 0,
                     "n_capability": len(specs[0].capability) if specs else 0,
                     "ablation": any(s.ablation for s in specs)},
        "runs": runs, "repeats": repeats([r for r in runs if "summary" in r]),
    }


def combine(sources: Sequence[tuple[str, dict[str, Any], str | None]]) -> dict[str, Any]:
    """One document (and so one plot) from several simulation results (file name, document, optional label
    "GROUP" or "GROUP#RUN": files of one GROUP are repeats of a recipe, RUN names one in the legend), e.g.
    each example rater at the settings that suit it. Each run keeps its own file's settings, machine and code
    version, since those differ between the files. A run is named "rater, GROUP (RUN)"; repeats without a RUN
    name are told apart by their seed, else by their file."""
    runs: list[dict[str, Any]] = []
    for name, doc, label in sources:
        if not isinstance(doc, dict) or doc.get("kind") != "kto-loop simulate" or not isinstance(doc.get("runs"), list):
            raise SimulationError(f"{name}: not a `kto-loop simulate` results file")
        for run in doc["runs"]:
            if not isinstance(run, dict) or not {"rater", "base", "cycles"} <= run.keys():
                raise SimulationError(f"{name}: a run without rater, base and cycles")
            try:  # an interrupted run's file may lack the summary
                summary = run.get("summary") or summarize(run["base"], run["cycles"], run.get("case"))
            except (KeyError, TypeError, ZeroDivisionError) as e:
                raise SimulationError(f"{name}: a run whose measurements cannot be read ({e!r})") from e
            # a run from a combined file already carries its own file's context: that wins
            context = {k: doc.get(k) for k in ("settings", "machine", "started_at", "code")} | {"source": name}
            group, _, member = (label or "").partition("#")
            runs.append(context | run | {"summary": summary, "group": group.strip() or run.get("group"),
                                         "member": member.strip() or run.get("member"), "label": None})
    if not runs:
        raise SimulationError("nothing to combine: no runs in the given files")
    raters = [r["rater"] for r in runs]
    groups = [(r["rater"], r["group"]) for r in runs]
    for r in runs:
        name = recipe_name(r["rater"], r["group"])
        if r["member"]:
            name += f" ({r['member']})"
        elif groups.count((r["rater"], r["group"])) > 1:  # repeats: told apart by seed, else by file
            seed = r.get("seed")
            name += f" (seed {seed})" if seed is not None else f" ({Path(r['source']).stem})"
        r["label"] = name
    return {"kind": "kto-loop simulate", "combined_from": [name for name, _, _ in sources],
            "raters": raters, "runs": runs, "repeats": repeats(runs)}


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """The printout: per run its gain, capability and slowest cycle, each preference's rate by cycle, the attacker's
    share of training and its goals; per rater over seeds the minimum, median and per-seed gains and whether each
    goal held in every seed."""
    lines = []
    repeated = {r["rater"] for r in doc["runs"]} if len(doc["runs"]) > 1 else set()
    repeated = {n for n in repeated if sum(r["rater"] == n for r in doc["runs"]) > 1}
    for r in doc["runs"]:
        s = r["summary"]
        name = r.get("label") or (f"{r['rater']} (seed {r.get('seed')})" if r["rater"] in repeated else r["rater"])
        lines.append(f"{name}: desirable {pct(s['base_desirable_rate'])} → {pct(s['final_desirable_rate'])} (best "
                     f"gain {s['best_gain_points']} points), capability ≥ {pct(s['min_capability_ratio'])} of base, "
                     f"slowest cycle {s['max_cycle_seconds']} s")
        for pref, rates in (s.get("rates_by_rater") or {}).items():
            lines.append(f"  {pref}: " + " → ".join(pct(x) for x in rates))
        if s.get("attacker_share_by_cycle"):
            lines.append("  attacker's share of the training snapshot by cycle: "
                         + ", ".join(pct(x) for x in s["attacker_share_by_cycle"]))
        if isinstance(s.get("goals"), dict) and "gain_ge_30_points" not in s["goals"]:  # older files: other goals
            lines.append(f"  goals: {goals.describe(s['goals'])}")
    for g in doc.get("repeats", []):
        if g["n_runs"] > 1:
            name = recipe_name(g["rater"], g["group"])
            each = ", ".join(f"{x:+.1f}" for x in g["best_gain_points"])
            line = (f"{name}: {g['n_runs']} repeats, gain median {g['median_best_gain_points']:+.1f} points "
                    f"(each {each}), final-cycle gain median {points(g['median_final_gain_points'])}, all goals "
                    f"met in {g['runs_meeting_all_goals']} of {g['n_runs']}")
            if "min_best_gain_points" in g:
                line += (f"; minimum gain {g['min_best_gain_points']:+.1f}, minimum final-cycle gain "
                         f"{points(g['min_final_gain_points'])}")
            lines.append(line)
            if g.get("goals_in_every_seed"):
                lines.append(f"  in every seed: {goals.describe(g['goals_in_every_seed'])}")
            if p := g.get("attacker_pooled"):
                lo, hi = p["by_cycle"][-1]["ci95"]
                lines.append(f"  {p['attacker']}, pooled over {p['n_runs']} repeats: "
                             + " → ".join(pct(c["rate"]) for c in p["by_cycle"])
                             + f" (last 95% interval {pct(lo)}–{pct(hi)}): "
                             + ("moved toward the attacker" if p["moved_toward_attacker"] else "did not move")
                             + f"; higher at the end in {p['runs_toward_attacker']} of {p['n_runs']}")
    return lines


def recipe_name(rater: str, group: str | None) -> str:
    """How the plot, the printout and the legend name one rater's recipe."""
    return f"{rater}, {group}" if group else rater


def _recipe(run: dict[str, Any]) -> str:
    """What makes two runs of one rater repeats of each other when the command line did not say."""
    return run.get("group") or json.dumps(run.get("settings") or {}, sort_keys=True, default=str)


def repeats(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs of one rater at one recipe (one `FILE=LABEL` label, or else identical settings) are repeats: a run's gain
    moves by more from seed to seed than between settings, so a recipe is quoted by its minimum and median over
    repeats and by how many met every goal, never by its best run."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["rater"], _recipe(r)), []).append(r)
    out = []
    for (rater, _), members in groups.items():
        s = [m["summary"] for m in members]
        gains = [x["best_gain_points"] for x in s]
        final_gains = [round(100 * (x["final_desirable_rate"] - (x["base_desirable_rate"] or 0.0)), 1)
                       for x in s if x["final_desirable_rate"] is not None]
        caps = [x["min_capability_ratio"] for x in s if x["min_capability_ratio"] is not None]
        secs = [x["max_cycle_seconds"] for x in s if x["max_cycle_seconds"] is not None]
        by_cycle = [[e["desirable_rate"] for e in [m["base"]] + [c["eval"] for c in m["cycles"]]] for m in members]
        median_by_cycle = [statistics.median(col) if None not in col else None
                           for col in zip(*by_cycle, strict=False)]  # up to the shortest (an interrupted) run
        out.append({
            "rater": rater, "group": members[0].get("group"), "n_runs": len(members),
            "labels": [m.get("label") for m in members], "seeds": [m.get("seed") for m in members],
            "codes": sorted({str(m.get("code")) for m in members}),
            "best_gain_points": gains, "median_best_gain_points": statistics.median(gains),
            "min_best_gain_points": min(gains), "final_gain_points": final_gains,
            "median_final_gain_points": statistics.median(final_gains) if final_gains else None,
            "min_final_gain_points": min(final_gains, default=None),
            "median_desirable_rate_by_cycle": median_by_cycle,
            "runs_meeting_all_goals": sum(goals.all_held(x["goals"]) for x in s),
            "goals_in_every_seed": goals.every_seed([x["goals"] for x in s]),
            "min_capability_ratio": min(caps, default=None), "max_cycle_seconds": max(secs, default=None),
            "attacker_pooled": goals.pooled_toward_attacker(members) if len(members) > 1 else None,
        })
    return out


def _jsonable(x: Any) -> Any:
    """Dataclasses, paths and tuples as plain JSON, so any record can be written."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, str | int | float | bool) or x is None:
        return x
    return str(x)


# ---------------------------------------------------------------- outputs

def write_json(doc: dict[str, Any], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(doc), indent=2) + "\n")
    tmp.replace(path)


def plot(doc: dict[str, Any], path: Path) -> None:
    """Desirable rate per cycle (Wilson 95% error bars) per rater, and capability accuracy, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    for i, run in enumerate(doc["runs"]):
        color = f"C{i}"
        evals = [run["base"]] + [c["eval"] for c in run["cycles"]]
        xs = list(range(len(evals)))
        ys = [100 * (e["desirable_rate"] or 0) for e in evals]
        err = [[max(0.0, y - 100 * e["ci95"][0]) for y, e in zip(ys, evals, strict=True)],
               [max(0.0, 100 * e["ci95"][1] - y) for y, e in zip(ys, evals, strict=True)]]
        name = run.get("label", run["rater"])
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=color, label=f"{name} (auto λ)")
        pinned = [c["ablation_pinned"]["eval"] for c in run["cycles"] if "ablation_pinned" in c]
        if pinned:
            py = [ys[0]] + [100 * (e["desirable_rate"] or 0) for e in pinned]
            ax.plot(range(len(py)), py, linestyle="--", marker="x", color=color, alpha=0.7,
                    label=f"{name} (λ_D = λ_U = 1)")
        main = (run.get("case") or {}).get("main")
        for j, pref in enumerate(p for p in (run["base"].get("by_rater") or {}) if p != main):
            ys_pref = [100 * (goals.rate_of(e, pref) or 0) for e in evals]  # the other preferences of the case
            ax.plot(xs, ys_pref, linestyle=[":", "-.", (0, (1, 3))][j % 3], marker=".", color=color, alpha=0.8,
                    label=f"{name}: {pref}")
        ax2.plot(xs, [100 * e["capability_accuracy"] for e in evals], marker="o", color=color, label=name)
        refused = [(c["cycle"], c["refused_candidate_eval"]) for c in run["cycles"] if "refused_candidate_eval" in c]
        if refused:  # hollow markers: what the guard kept from users, and what it would have cost
            rx = [x for x, _ in refused]
            ax.plot(rx, [100 * (e["desirable_rate"] or 0) for _, e in refused], linestyle="none", marker="o",
                    markerfacecolor="none", color=color, label=f"{name}: refused by the capability guard")
            ax2.plot(rx, [100 * e["capability_accuracy"] for _, e in refused], linestyle="none", marker="o",
                     markerfacecolor="none", color=color)
    for j, g in enumerate(x for x in doc.get("repeats", []) if x["n_runs"] > 1):  # a recipe, by its median
        ys = [100 * y for y in g["median_desirable_rate_by_cycle"] if y is not None]
        name = recipe_name(g["rater"], g["group"])
        ax.plot(range(len(ys)), ys, color="black", linewidth=2.5, alpha=0.6, linestyle=["-", "--", ":", "-."][j % 4],
                label=f"{name}: median of {g['n_runs']}")
    ax.set_xlabel("cycle (0 = base model)")
    ax.set_ylabel("held-out desirable rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Simulated users: desirable rate per cycle (95% Wilson CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax2.set_xlabel("cycle")
    ax2.set_ylabel("capability accuracy (%)")
    ax2.set_ylim(0, 105)
    ax2.set_title("Capability probe")
    ax2.grid(alpha=0.3)
    n = max((len(r["cycles"]) for r in doc["runs"]), default=0)
    for a in (ax, ax2):
        a.set_xticks(range(n + 1))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def stderr_log(msg: str) -> None:
    """Progress with a clock, on stderr so stdout keeps only the summary."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
