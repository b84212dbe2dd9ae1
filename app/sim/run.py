"""The closed loop through the real stack: simulated users chat and rate via ChatService, the real Realigner
retrains and hot-swaps, and each cycle is measured on held-out prompts."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import os
import random
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.loop.gate import Question
from app.sim.inputs import Log, Rater, SimulationError, call_rater
from app.sim.measure import measure
from app.sim.population import Case, Population, max_answers, shares
from app.sim.report import code_version, document, pct, summarize


def collect(service: Any, prompts: Sequence[str], who: Rater | Population, n_ratings: int, *, cursor: int,
            tag: str, workers: int = 16, max_answers: int | None = None) -> tuple[dict[str, Any], int]:
    """Simulated users chat and rate through ChatService until `n_ratings` thumbs are stored; returns (stats, cursor).

    Each answer comes from a fresh simulated user (one conversation, one rating); prompts go round-robin from
    `cursor`; `who` is one rater or a Population (identity, address, noise per chat). `workers` threads stream
    chats, rating each as it ends, never more in flight than ratings still missing. A refusal is counted, not fatal.
    """
    from app.web.chat import RatingError, Refused

    t0 = time.perf_counter()
    max_answers = max_answers or 3 * n_ratings
    ups = downs = skipped = answers = refused = 0
    by_group: dict[str, dict[str, int]] = {}

    def one(i: int, prompt: str) -> tuple[Any, str, str | None, str, Rater]:
        key = f"sim-{tag}-{i}"
        if isinstance(who, Population):
            u = who.user(i, tag)
            group, rater, sess = u.group, u.rater, service.session(key, u.user_id, u.addr)
        else:
            group, rater, sess = "", who, service.session(key, key)
        try:
            texts = list(service.send(sess, prompt))  # the growing answer; the last item is the stored text
        except Refused:
            return sess, prompt, None, group, rater
        return sess, prompt, texts[-1] if texts else "", group, rater

    ex = cf.ThreadPoolExecutor(workers)
    pending: set[cf.Future] = set()
    try:
        while True:
            while (len(pending) < workers and ups + downs + len(pending) < n_ratings
                   and answers + len(pending) < max_answers):
                pending.add(ex.submit(one, cursor, prompts[cursor % len(prompts)]))
                cursor += 1
            if not pending:
                break
            done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                sess, prompt, text, group, rater = fut.result()  # a failed chat stops the collection, as in the UI
                answers += 1
                g = by_group.setdefault(group, {"up": 0, "down": 0, "not_rated": 0, "refused": 0})
                verdict = None if text is None else call_rater(rater, prompt, text)
                if text is None:
                    refused += 1
                    g["refused"] += 1
                    continue
                if verdict is None:
                    skipped += 1
                    g["not_rated"] += 1
                    continue
                try:
                    service.rate(sess, len(sess.turns) - 1, verdict)
                except RatingError:
                    refused += 1
                    g["refused"] += 1
                    continue
                ups, downs = ups + verdict, downs + (not verdict)
                g["up" if verdict else "down"] += 1
    finally:  # on Ctrl-C or an error the queued chats are cancelled instead of waited for
        ex.shutdown(wait=False, cancel_futures=True)
    if ups + downs == 0:
        raise SimulationError(f"the rater rated none of {answers} answers")
    stats = {"answers": answers, "ratings": ups + downs, "up": ups, "down": downs, "not_rated": skipped,
             "refused": refused, "desirable_rate": ups / (ups + downs), "seconds": round(time.perf_counter() - t0, 1)}
    if isinstance(who, Population):
        stats["by_group"] = by_group
    return stats, cursor


# ---------------------------------------------------------------- one rater, end to end

@dataclass
class SimSpec:
    rater_name: str
    rater: Rater
    cycles: int = 2
    ratings_per_cycle: int = 400
    prompts: Sequence[str] = ()
    holdout: Sequence[str] = ()
    capability: Sequence[Question] = ()
    samples_per_prompt: int = 2
    capability_repeats: int = 3  # probes per measurement, averaged (see measure)
    ablation: bool = False
    seed: int = 0
    # concurrent simulated chats: bigger engine batches, more tokens per second on a small CPU. 200 ratings on the
    # 2-core EPYC: 1.16× (base) and 1.21× (an adapter) faster at 128 than at 32
    # (docs/experiments/2026-12-02-shorter-cycles.md).
    workers: int = 128
    case: Case | None = None  # who rates (noise, rating probability, mix, change, attacker); None: `rater` alone

    def the_case(self) -> Case:
        """The robustness case of this run; the plain one when none was given."""
        return self.case or Case((self.rater_name, self.rater))


def run_dir_name(spec: SimSpec, specs: Sequence[SimSpec]) -> str:
    """A run's folder under the work dir: its rater, plus its seed when the same rater runs several seeds."""
    repeated = sum(s.rater_name == spec.rater_name for s in specs) > 1
    return f"{spec.rater_name}-seed{spec.seed}" if repeated else spec.rater_name


def _root_url(server: Any) -> str:
    """vLLM's root URL: the adapter endpoints live outside /v1."""
    return str(server.base_url).rstrip("/").removesuffix("/v1")


def _cycle_record(outcome: Any) -> dict[str, Any]:
    m = outcome.manifest or {}
    return {
        "run_id": outcome.run_id, "status": outcome.status, "promoted": bool(outcome.promoted),
        "reason": outcome.reason, "version": outcome.version,
        "n_D": m.get("n_desirable"), "n_U": m.get("n_undesirable"),  # trained on (the gate's held-out share aside)
        "n_gate_heldout": (m.get("heldout") or {}).get("n"), "n_dropped": len(m.get("dropped_examples") or []),
        # answers the aligner moved from training into the held-out slice to reach its per-kind minimum
        "n_gate_floor_added": len(m.get("heldout_floor_added") or []),
        "lambda_D": m.get("lambda_d"), "lambda_U": m.get("lambda_u"),
        "z0_pre_clamp": m.get("z0_pre_clamp_mean"), "z0": m.get("z0_mean"),
        "train_seconds": m.get("train_seconds"), "checkpoint_seconds": m.get("checkpoint_seconds"),
        "checkpoint_eval_seconds": m.get("checkpoint_eval_seconds"),  # lazy checkpoints, only if the gate needed them
        "aligner_phase_seconds": m.get("phase_seconds"),  # load, reference, held-out passes, train, checkpoints
        # the base model's anchor answers: built in this run (phase "anchor") or read from the machine's cache
        "anchor_from_cache": (m.get("anchor") or {}).get("from_cache"),
        "gate_heldout": m.get("heldout"),
        "capability_guard": m.get("capability_guard"),  # None when the gate refused first or the guard is off
        # every adapter of the run offered to the gate (final first, then earlier checkpoints), with its verdict
        "candidates": [{k: c.get(k) for k in ("candidate", "step", "version", "promoted", "reason")}
                       | _guard_counts(c.get("capability_guard")) for c in m.get("candidates") or []],
        "promoted_step": (m.get("promoted_checkpoint") or {}).get("step"),  # None: the final adapter (or nothing)
    }


def _guard_counts(guard: dict[str, Any] | None) -> dict[str, Any]:
    """The guard's verdict in a line: facts kept, and open prompts looped on (absent when not checked)."""
    if not guard:
        return {}
    return {"capability_correct": guard.get("candidate_correct"), "capability_ok": guard.get("ok"),
            **{k: guard[k] for k in ("candidate_loops", "floor_loops", "loops_ok") if k in guard}}


def train_pinned(stack: Any, run_id: str, cycle: int, log: Log,
                 resume_from: str | None = None) -> tuple[Path, dict[str, Any], float]:
    """Ablation: train again on the very snapshot of run `run_id`, from the same starting adapter, with
    λ_D = λ_U = 1 pinned."""
    rl = stack.realigner
    snapshot = Path(rl.work_dir) / f"run-{run_id}" / "snapshot.parquet"
    if not snapshot.is_file():
        raise SimulationError(f"ablation: snapshot of run {run_id} not found at {snapshot}")
    out = Path(rl.work_dir) / f"run-{run_id}" / "adapter-pinned-lambda"
    cmd = rl.command(snapshot, out, None, Path(resume_from) if resume_from else None) + [
        "--lambda-d", "1", "--lambda-u", "1"]
    log(f"cycle {cycle}: ablation run (λ_D = λ_U = 1) on the same snapshot")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if proc.returncode != 0:
        raise SimulationError(f"ablation aligner run failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return out, json.loads((out / "manifest.json").read_text()), time.perf_counter() - t0


def load_for_eval(server: Any, adapter_dir: Path, name: str) -> None:
    """Load an adapter into the running vLLM under `name` without touching the registry's served pointer."""
    import httpx

    from serving.server import auth_header

    r = httpx.post(_root_url(server) + "/v1/load_lora_adapter", headers=auth_header(getattr(server, "api_key", None)),
                   json={"lora_name": name, "lora_path": str(adapter_dir)}, timeout=300)
    if r.status_code != 200:
        raise SimulationError(f"vLLM refused adapter {adapter_dir} (as {name}): {r.status_code} {r.text[:300]}")


def simulate_one(stack: Any, spec: SimSpec, log: Log = print,
                 checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measure, then `cycles` × (collect ratings → realign → measure) on one stack; returns the JSON record.
    `checkpoint(partial record)` is called after every measurement, so a long run leaves results as it goes."""
    from app.main import sampling_for
    from app.web.chat import ChatService
    from serving.server import request_priority

    cfg = stack.cfg
    system_prompt = stack.settings.load().system_prompt
    sampling = sampling_for(cfg)
    service = ChatService(stack.store, stack.client, stack.registry, system_prompt=lambda: system_prompt,
                          sampling=lambda: sampling, max_chars=cfg.max_message_chars,
                          ratings_per_minute=cfg.ratings_per_minute)
    prompts = list(spec.prompts)
    random.Random(spec.seed).shuffle(prompts)
    case = spec.the_case()
    measured = case.measured()

    def evaluate(model: str) -> dict[str, Any]:
        return measure(stack.client, model, holdout=spec.holdout, rater=case.main[1], capability=spec.capability,
                       sampling=sampling, system_prompt=system_prompt, samples=spec.samples_per_prompt,
                       workers=spec.workers, priority=request_priority(stack.server, "background"),
                       capability_repeats=spec.capability_repeats, also=measured if len(measured) > 1 else None)

    log(f"[{spec.rater_name}] measuring the base model on {len(spec.holdout)} held-out prompts "
        f"× {spec.samples_per_prompt} and {len(spec.capability)} capability questions")
    base = evaluate(stack.registry.current())
    if checkpoint:
        checkpoint(_run_record(spec, base, []))
    log(f"[{spec.rater_name}] base: desirable {pct(base['desirable_rate'])} "
        f"[{pct(base['ci95'][0])}, {pct(base['ci95'][1])}], capability {pct(base['capability_accuracy'])}, stops "
        f"mid-sentence {pct(base['stops_mid_sentence'])}, cut at max_tokens {pct(base['cut_at_max_tokens'])}, "
        f"repeats itself {pct(base.get('repeats_itself'))} ({base['seconds']} s)")
    cycles: list[dict[str, Any]] = []
    cursor = 0
    for c in range(1, spec.cycles + 1):
        served_before = stack.registry.current()
        t0 = time.perf_counter()
        who = case.population(c, spec.seed) if spec.case is not None else spec.rater
        stats, cursor = collect(service, prompts, who, spec.ratings_per_cycle, cursor=cursor,
                                tag=f"{spec.rater_name}-c{c}", workers=spec.workers,
                                max_answers=max_answers(spec.ratings_per_cycle, case))
        log(f"[{spec.rater_name}] cycle {c}: {stats['ratings']} ratings ({stats['up']} up, {stats['down']} down) "
            f"from {served_before} in {stats['seconds']} s; realigning")
        t1 = time.perf_counter()
        outcome = stack.realigner.run("simulator", progress=_phase_logger(log, f"[{spec.rater_name}] cycle {c}"))
        t2 = time.perf_counter()
        rec = {"cycle": c, "served_before": served_before, "collect": stats, **_cycle_record(outcome),
               "realign_seconds": round(t2 - t1, 1), "cycle_seconds": round(t2 - t0, 1),
               "load_average": [round(x, 2) for x in os.getloadavg()],
               "snapshot_sources": snapshot_sources(Path(stack.realigner.work_dir) / f"run-{outcome.run_id}"
                                                    / "snapshot.parquet")}
        if case.attacker_share > 0:
            log(f"[{spec.rater_name}] cycle {c}: the attacker's share of the training snapshot: "
                f"{pct(rec['snapshot_sources'].get('attacker_share'))}")
        log(f"[{spec.rater_name}] cycle {c}: run {outcome.status}: {outcome.reason}")
        served = stack.registry.current()
        rec["served_after"] = served
        if spec.ablation and outcome.status != "failed":
            out, manifest, secs = train_pinned(stack, outcome.run_id, c, log,
                                               (outcome.manifest or {}).get("resume_from"))
            name = f"ablation-pinned-c{c}-{outcome.run_id}"
            load_for_eval(stack.server, out, name)
            rec["ablation_pinned"] = {
                "lambda_D": manifest.get("lambda_d"), "lambda_U": manifest.get("lambda_u"),
                "z0_pre_clamp": manifest.get("z0_pre_clamp_mean"), "z0": manifest.get("z0_mean"),
                "train_seconds": manifest.get("train_seconds"), "wall_seconds": round(secs, 1),
                "gate_heldout": manifest.get("heldout"), "eval": evaluate(name)}
        rec["eval"] = evaluate(served)
        refused = refused_candidate(rec)
        if refused:
            # The guard loaded and refused it; vLLM still holds it under its name. Measuring it shows what the
            # preference bought and what it cost, which the served model alone cannot tell.
            rec["refused_candidate_eval"] = evaluate(refused)
            r = rec["refused_candidate_eval"]
            log(f"[{spec.rater_name}] cycle {c}: refused candidate {refused}: desirable {pct(r['desirable_rate'])}, "
                f"capability {pct(r['capability_accuracy'])}")
        e = rec["eval"]
        log(f"[{spec.rater_name}] cycle {c}: served {served} (promoted={rec['promoted']}): desirable "
            f"{pct(e['desirable_rate'])} [{pct(e['ci95'][0])}, {pct(e['ci95'][1])}], capability "
            f"{pct(e['capability_accuracy'])}, stops mid-sentence {pct(e['stops_mid_sentence'])}, cut at max_tokens "
            f"{pct(e['cut_at_max_tokens'])}, repeats itself {pct(e.get('repeats_itself'))}; cycle took "
            f"{rec['cycle_seconds']} s")
        if "ablation_pinned" in rec:
            a = rec["ablation_pinned"]["eval"]
            log(f"[{spec.rater_name}] cycle {c}: ablation λ=1: desirable {pct(a['desirable_rate'])}, "
                f"capability {pct(a['capability_accuracy'])}")
        cycles.append(rec)
        if checkpoint:
            checkpoint(_run_record(spec, base, cycles))
    return _run_record(spec, base, cycles)


def refused_candidate(rec: dict[str, Any]) -> str | None:
    """The run's final adapter if the capability guard loaded and refused it, even when an earlier checkpoint of
    the run was promoted instead (None when the gate refused before loading, or the final adapter was promoted)."""
    cands = rec.get("candidates")
    if cands:
        first = cands[0]
        return first.get("version") if first.get("capability_ok") is False else None
    guard = rec.get("capability_guard") or {}  # records from before checkpoints existed
    return guard.get("candidate") if not rec.get("promoted") and guard.get("ok") is False else None


def _run_record(spec: SimSpec, base: dict[str, Any], cycles: list[dict[str, Any]]) -> dict[str, Any]:
    from app.sim.raters import HELDOUT_RATERS

    case = spec.the_case().describe()
    return {"rater": spec.rater_name, "rater_doc": (getattr(spec.rater, "__doc__", None) or "").strip(),
            "rater_heldout": spec.rater_name in HELDOUT_RATERS,  # a preference never used for tuning
            "seed": spec.seed, "case": case, "base": base, "cycles": list(cycles),
            "summary": summarize(base, cycles, case)}


def snapshot_sources(path: Path) -> dict[str, Any]:
    """Who the run's training snapshot came from (attacker share, largest identity's share), read from the very
    file the aligner trained on; empty when the run wrote none."""
    if not path.is_file():
        return {}
    import pyarrow.parquet as pq

    return shares(pq.read_table(path, columns=["user_id"]).column("user_id").to_pylist())


def _phase_logger(log: Log, prefix: str) -> Callable[[dict[str, Any]], None]:
    """A Realigner progress callback that logs each phase change once (snapshot, train, gate, promote)."""
    last = [""]

    def progress(ev: dict[str, Any]) -> None:
        phase = ev.get("phase")
        if phase and phase != last[0]:
            last[0] = phase
            log(f"{prefix}: {phase}")

    return progress


# ---------------------------------------------------------------- several raters, each on a fresh stack

def fresh_config(cfg: Any, data_dir: Path) -> Any:
    """`cfg` pointed at an empty data directory (own store, adapters, runs) and a free vLLM port."""
    return dataclasses.replace(cfg, data_dir=data_dir, db_path=data_dir / "feedback.duckdb",
                               adapter_dir=data_dir / "adapters", vllm_port=0, schedule_interval_minutes=0,
                               schedule_cron="")


def simulate(cfg: Any, specs: Sequence[SimSpec], work_dir: Path, log: Log = print,
             build_stack: Callable[[Any], Any] | None = None,
             on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every spec on its own fresh stack under `work_dir/<rater>`; returns the whole JSON document.
    `on_update(document so far)` is called after every measurement (the command rewrites JSON + plot)."""
    if build_stack is None:
        from app.main import build_stack
    t0 = time.time()
    code = code_version()  # once: results committed while a long run goes on must not rename the code that ran
    runs = []
    for spec in specs:
        d = Path(work_dir) / run_dir_name(spec, specs)
        if d.exists() and any(d.iterdir()):
            raise SimulationError(f"{d} is not empty: a simulation needs a fresh store; pick another --work-dir")
        d.mkdir(parents=True, exist_ok=True)
        def partial(rec: dict[str, Any], d: Path = d) -> None:
            if on_update:
                on_update(document(cfg, specs, t0, runs + [dict(rec, data_dir=str(d), complete=False)], code))

        with build_stack(fresh_config(cfg, d)) as stack:
            rec = simulate_one(stack, spec, log, checkpoint=partial)
            rec["evidence"] = evidence(stack)
        rec["data_dir"], rec["complete"] = str(d), True
        runs.append(rec)
        if on_update:
            on_update(document(cfg, specs, t0, runs, code))
    return document(cfg, specs, t0, runs, code)



def evidence(stack: Any) -> dict[str, Any]:
    """What the store and the server say happened: proof that each stage ran for real."""
    runs = stack.store.runs()
    return {
        "store_counts": stack.store.counts(),
        "counts_by_adapter": [{k: r.get(k) for k in ("adapter", "up", "down", "approval")}
                              for r in stack.store.counts_by_adapter()],
        "runs": [{k: r.get(k) for k in ("id", "trigger", "status", "n_desirable", "n_undesirable", "adapter_version")}
                 for r in runs],
        "adapters": [{k: a.get(k) for k in ("version", "path", "promoted_at", "run_id")}
                     for a in stack.store.adapters()],
        "served": stack.registry.current(),
        "loaded_on_server": stack.client.models(),
    }

