"""Closed-loop simulator: simulated users chat and rate through the real stack, the real realigner retrains and
hot-swaps, and every cycle is measured on held-out prompts.

Nothing here is a shortcut around the product: answers come from vLLM through `app.web.chat.ChatService` (the chat
page's own logic, model = the registry's current adapter), thumbs go into the FeedbackStore through the same
service, and each cycle ends with `Realigner.run("simulator")` (snapshot → aligner subprocess → promotion gate →
hot swap). Measurements call the same ChatClient directly and are never stored, so the model never trains on
held-out prompts or on its own evaluation.

Desirable rate = thumbs-up / rated answers on held-out prompts (several samples per prompt at the served
temperature), with a Wilson 95% interval (Wilson 1927; it stays inside [0, 1] and behaves at small counts, unlike
the normal approximation). Capability = share of the shipped factual questions answered correctly at
temperature 0; the set holds only questions the base model gets right, so base accuracy is ~100% by design.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import importlib
import importlib.util
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.loop import capability
from app.loop.capability import CAPABILITY_MAX_TOKENS, DEFAULT_CAPABILITY, Question, is_correct

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_PROMPTS = DATA_DIR / "prompts.jsonl"
DEFAULT_HOLDOUT = DATA_DIR / "holdout.jsonl"

Rater = Callable[[str, str], "bool | None"]
Log = Callable[[str], None]


class SimulationError(RuntimeError):
    """Bad input (prompts, rater) or a stage that did not run; the message says which."""


# ---------------------------------------------------------------- inputs

def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a .jsonl file ({"prompt": ...} per line) or a plain text file (one prompt per line)."""
    path = Path(path)
    if not path.is_file():
        raise SimulationError(f"prompt file not found: {path}")
    out: list[str] = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if path.suffix == ".jsonl":
            try:
                text = json.loads(line)["prompt"]
            except (ValueError, KeyError, TypeError) as e:
                raise SimulationError(f"{path}:{i}: expected a JSON object with a 'prompt' string ({e})") from None
            if not isinstance(text, str) or not text.strip():
                raise SimulationError(f"{path}:{i}: 'prompt' must be a non-empty string")
            line = text.strip()
        out.append(line)
    if not out:
        raise SimulationError(f"no prompts in {path}")
    return out


def evenly_spaced(items: Sequence[str], n: int) -> list[str]:
    """`n` items spread over the list (all when n <= 0 or n >= len), so every category of the file stays in."""
    return [items[i * len(items) // n] for i in range(n)] if 0 < n < len(items) else list(items)


def load_capability(path: str | Path = DEFAULT_CAPABILITY) -> list[Question]:
    try:
        return capability.load_capability(path)
    except capability.CapabilityError as e:
        raise SimulationError(str(e)) from None


def load_rater(spec: str) -> tuple[str, Rater]:
    """`concise` (an example rater), `package.module:function` or `path/to/file.py:function` → (name, fn)."""
    from app.sim import raters

    if spec in raters.EXAMPLE_RATERS:
        return spec, raters.EXAMPLE_RATERS[spec]
    target, sep, fn_name = spec.rpartition(":")
    if not sep or not target or not fn_name:
        raise SimulationError(f"bad rater {spec!r}: use one of {sorted(raters.EXAMPLE_RATERS)}, "
                              "MODULE:FUNCTION or FILE.py:FUNCTION")
    try:
        if target.endswith(".py") or os.sep in target:
            file = Path(target)
            if not file.is_file():
                raise SimulationError(f"rater file not found: {file}")
            mod_spec = importlib.util.spec_from_file_location(f"kto_rater_{file.stem}", file)
            assert mod_spec is not None and mod_spec.loader is not None
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except SimulationError:
        raise
    except Exception as e:
        raise SimulationError(f"cannot import rater {spec!r}: {type(e).__name__}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise SimulationError(f"rater {spec!r}: {fn_name!r} is not a function in {target}")
    return fn_name, fn


def call_rater(rater: Rater, prompt: str, answer: str) -> bool | None:
    try:
        verdict = rater(prompt, answer)
    except Exception as e:
        raise SimulationError(f"the rater raised {type(e).__name__}: {e} (prompt {prompt[:60]!r})") from e
    if verdict is None:
        return None
    if not isinstance(verdict, bool):
        raise SimulationError(f"the rater must return True, False or None, got {verdict!r}")
    return verdict


# ---------------------------------------------------------------- statistics

def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (95% by default); (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 and k = n the bounds are exactly 0 and 1; in floating point they come out a hair inside, and an
    # interval that misses its own estimate (1.0 not in [.., 0.9999999999999999]) breaks the plot's error bars.
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


@functools.cache
def machine_info() -> dict[str, Any]:
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


# ---------------------------------------------------------------- talking to the served model

def with_sampling(sampling: Any, **changes: Any) -> Any:
    """A copy of the served sampling parameters with a few fields changed (dataclass or dict)."""
    if dataclasses.is_dataclass(sampling):
        return dataclasses.replace(sampling, **changes)
    return {**dict(sampling), **changes}


def complete(client: Any, messages: list[dict[str, str]], model: str, sampling: Any, kind: str = "user") -> str:
    """The whole answer text from `ChatClient.stream_chat` (chunks are str; the final ChatResult is skipped)."""
    return "".join(part for part in client.stream_chat(messages, model, sampling, kind=kind)
                   if isinstance(part, str))


def _messages(system_prompt: str | None, user: str) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": user}]


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> list[Any]:
    """Concurrent chats, in order. On Ctrl-C or an error the queued ones are cancelled instead of waited for
    (a plain `with ThreadPoolExecutor` would finish every queued generation before letting go)."""
    ex = cf.ThreadPoolExecutor(workers)
    try:
        return list(ex.map(fn, items))
    finally:
        ex.shutdown(wait=False, cancel_futures=True)


def with_priority(sampling: Any, priority: int | None) -> Any:
    """The sampling parameters plus a vLLM request priority (None: unchanged). Scheduling only: the answers are
    sampled exactly as a user's would be."""
    if priority is None:
        return sampling
    if dataclasses.is_dataclass(sampling):
        return dataclasses.replace(sampling, extra={**sampling.extra, "priority": priority})
    return {**dict(sampling), "priority": priority}


def measure(client: Any, model: str, *, holdout: Sequence[str], rater: Rater, capability: Sequence[Question],
            sampling: Any, system_prompt: str | None, samples: int, workers: int = 16,
            priority: int | None = None, capability_repeats: int = 1) -> dict[str, Any]:
    """Held-out desirable rate (Wilson 95% CI) and capability accuracy of `model`, as served now.

    `capability_repeats`: the capability questions are asked this many times, spread through the held-out jobs,
    and accuracy is the mean. Greedy answers from vLLM on a bf16 CPU depend on what else shares the batch: the same
    model scored 31, 32 and 33 of 33 in repeated probes (benchmarks/results/probe_repeat.json), a swing as large as
    the one question the 95% goal allows. `capability_wrong` lists every question missed in any repeat.
    `priority`: the measurement is the product's own traffic; on a shared server it queues behind users. Its
    requests are also of kind "background": a client with an Admission sends them a few at a time while people chat.
    """
    if capability_repeats < 1:
        raise SimulationError(f"capability repeats must be at least 1, got {capability_repeats}")
    t0 = time.perf_counter()
    sampling = with_priority(sampling, priority)
    greedy = with_sampling(sampling, temperature=0.0, top_p=1.0, max_tokens=CAPABILITY_MAX_TOKENS)
    sampled: list[tuple[str, Any]] = [(p, sampling) for p in holdout for _ in range(samples)]
    # Repeat r goes in after (r+1)/k of the sampled jobs (the last one at the end, where a single probe always was).
    jobs: list[tuple[str, Any]] = []
    cap_at: list[int] = []
    done = 0
    for r in range(capability_repeats):
        cut = len(sampled) * (r + 1) // capability_repeats
        jobs += sampled[done:cut]
        done = cut
        cap_at.append(len(jobs))
        jobs += [(q.question, greedy) for q in capability]
    texts = parallel_map(lambda j: complete(client, _messages(system_prompt, j[0]), model, j[1], "background"),
                         jobs, workers)
    cap_pos = {i + k for i in cap_at for k in range(len(capability))}
    answers = [t for i, t in enumerate(texts) if i not in cap_pos]
    probes = [texts[i:i + len(capability)] for i in cap_at]
    verdicts = [call_rater(rater, p, a) for (p, _), a in zip(sampled, answers, strict=False)]
    rated = [v for v in verdicts if v is not None]
    ups = sum(rated)
    lo, hi = wilson(ups, len(rated))
    right = [[is_correct(a, q.answers) for q, a in zip(capability, probe, strict=True)] for probe in probes]
    runs = [sum(r) for r in right]
    mean_correct = sum(runs) / len(runs)
    words = [len(a.split()) for a in answers]
    wrong = []
    for i, q in enumerate(capability):
        missed = [probe[i] for probe, r in zip(probes, right, strict=True) if not r[i]]
        if missed:
            wrong.append({"question": q.question, "answer": missed[0][:200], "right": len(probes) - len(missed),
                          "of": len(probes)})
    return {
        "model": model, "desirable_rate": ups / len(rated) if rated else None, "ci95": [lo, hi],
        "n_rated": len(rated), "n_up": ups, "n_samples": len(answers),
        "capability_accuracy": mean_correct / len(capability) if capability else 0.0,
        "capability_correct": runs[0] if len(runs) == 1 else round(mean_correct, 2),
        "capability_runs": runs, "capability_n": len(capability), "mean_words": sum(words) / max(1, len(words)),
        "capability_wrong": wrong,
        "seconds": round(time.perf_counter() - t0, 1),
        "example_answer": {"prompt": sampled[0][0], "answer": answers[0]} if answers else None,
    }


def collect(service: Any, prompts: Sequence[str], rater: Rater, n_ratings: int, *, cursor: int, tag: str,
            workers: int = 16, max_answers: int | None = None) -> tuple[dict[str, Any], int]:
    """Simulated users chat and rate through ChatService until `n_ratings` thumbs are stored.

    Each answer comes from a fresh simulated user (one conversation, one rating), the way many real users give a
    few thumbs each; prompts are taken round-robin from `cursor`. Chats stream through `workers` threads: each
    answer is rated as it finishes and a new chat starts in its place while ratings are still missing, so answers
    the rater leaves unrated are made up at full concurrency instead of in a second, mostly idle round. No more
    chats are ever in flight than ratings still missing: every answer gets its chance to be rated. Returns (stats,
    next cursor).
    """
    t0 = time.perf_counter()
    max_answers = max_answers or 3 * n_ratings
    ups = downs = skipped = answers = 0

    def one(i: int, prompt: str) -> tuple[Any, str, str]:
        user = f"sim-{tag}-{i}"
        sess = service.session(user, user)
        texts = list(service.send(sess, prompt))  # the growing answer; the last item is the stored text
        return sess, prompt, texts[-1] if texts else ""

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
                sess, prompt, text = fut.result()  # a failed chat stops the collection, as in the UI's error path
                answers += 1
                verdict = call_rater(rater, prompt, text)
                if verdict is None:
                    skipped += 1
                    continue
                service.rate(sess, len(sess.turns) - 1, verdict)
                ups, downs = ups + verdict, downs + (not verdict)
    finally:  # on Ctrl-C or an error the queued chats are cancelled instead of waited for
        ex.shutdown(wait=False, cancel_futures=True)
    if ups + downs == 0:
        raise SimulationError(f"the rater rated none of {answers} answers")
    return {"answers": answers, "ratings": ups + downs, "up": ups, "down": downs, "not_rated": skipped,
            "desirable_rate": ups / (ups + downs), "seconds": round(time.perf_counter() - t0, 1)}, cursor


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
    # 2-core EPYC: 1.16× (base) and 1.21× (an adapter) faster at 128 than at 32 (collect_workers_bench.json).
    workers: int = 128


def _root_url(server: Any) -> str:
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
    return {"capability_correct": guard.get("candidate_correct"), "capability_ok": guard.get("ok")} if guard else {}


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

    r = httpx.post(_root_url(server) + "/v1/load_lora_adapter",
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

    def evaluate(model: str) -> dict[str, Any]:
        return measure(stack.client, model, holdout=spec.holdout, rater=spec.rater, capability=spec.capability,
                       sampling=sampling, system_prompt=system_prompt, samples=spec.samples_per_prompt,
                       workers=spec.workers, priority=request_priority(stack.server, "background"),
                       capability_repeats=spec.capability_repeats)

    log(f"[{spec.rater_name}] measuring the base model on {len(spec.holdout)} held-out prompts "
        f"× {spec.samples_per_prompt} and {len(spec.capability)} capability questions")
    base = evaluate(stack.registry.current())
    if checkpoint:
        checkpoint(_run_record(spec, base, []))
    log(f"[{spec.rater_name}] base: desirable {pct(base['desirable_rate'])} "
        f"[{pct(base['ci95'][0])}, {pct(base['ci95'][1])}], capability {pct(base['capability_accuracy'])} "
        f"({base['seconds']} s)")
    cycles: list[dict[str, Any]] = []
    cursor = 0
    for c in range(1, spec.cycles + 1):
        served_before = stack.registry.current()
        t0 = time.perf_counter()
        stats, cursor = collect(service, prompts, spec.rater, spec.ratings_per_cycle, cursor=cursor,
                                tag=f"{spec.rater_name}-c{c}", workers=spec.workers)
        log(f"[{spec.rater_name}] cycle {c}: {stats['ratings']} ratings ({stats['up']} up, {stats['down']} down) "
            f"from {served_before} in {stats['seconds']} s; realigning")
        t1 = time.perf_counter()
        outcome = stack.realigner.run("simulator", progress=_phase_logger(log, f"[{spec.rater_name}] cycle {c}"))
        t2 = time.perf_counter()
        rec = {"cycle": c, "served_before": served_before, "collect": stats, **_cycle_record(outcome),
               "realign_seconds": round(t2 - t1, 1), "cycle_seconds": round(t2 - t0, 1),
               "load_average": [round(x, 2) for x in os.getloadavg()]}
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
            f"{pct(e['capability_accuracy'])}; cycle took {rec['cycle_seconds']} s")
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
    return {"rater": spec.rater_name, "rater_doc": (getattr(spec.rater, "__doc__", None) or "").strip(),
            "seed": spec.seed, "base": base, "cycles": list(cycles), "summary": summarize(base, cycles)}


def _phase_logger(log: Log, prefix: str) -> Callable[[dict[str, Any]], None]:
    """A Realigner progress callback that logs each phase change once (snapshot, train, gate, promote)."""
    last = [""]

    def progress(ev: dict[str, Any]) -> None:
        phase = ev.get("phase")
        if phase and phase != last[0]:
            last[0] = phase
            log(f"{prefix}: {phase}")

    return progress


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def points(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1f}"


def summarize(base: dict[str, Any], cycles: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals per rater: +30 points within the cycles, capability ≥ 95% of base, cycles ≤ 10 min."""
    rates = [c["eval"]["desirable_rate"] for c in cycles if c["eval"]["desirable_rate"] is not None]
    b = base["desirable_rate"] or 0.0
    best = max(rates, default=b)
    cap_ratio = min((c["eval"]["capability_accuracy"] / base["capability_accuracy"] for c in cycles),
                    default=1.0) if base["capability_accuracy"] else None
    secs = [c["cycle_seconds"] for c in cycles]
    out = {"base_desirable_rate": base["desirable_rate"], "final_desirable_rate": rates[-1] if rates else None,
           "best_gain_points": round(100 * (best - b), 1), "min_capability_ratio": cap_ratio,
           "max_cycle_seconds": max(secs, default=None), "promotions": sum(c["promoted"] for c in cycles)}
    out["goals"] = {"gain_ge_30_points": out["best_gain_points"] >= 30,
                    "capability_ge_95pct_of_base": cap_ratio is not None and cap_ratio >= 0.95,
                    "cycles_le_10_min": bool(secs) and max(secs) <= 600}
    abl = [c["ablation_pinned"]["eval"]["desirable_rate"] for c in cycles if "ablation_pinned" in c]
    if abl:
        out["ablation_pinned_final_desirable_rate"] = abl[-1]
    return out


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
        d = Path(work_dir) / spec.rater_name
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


def document(cfg: Any, specs: Sequence[SimSpec], t0: float, runs: list[dict[str, Any]],
             code: str | None) -> dict[str, Any]:
    return {
        "kind": "kto-loop simulate", "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)),
        "wall_seconds": round(time.time() - t0, 1), "machine": machine_info(), "code": code,
        "raters": [s.rater_name for s in specs],
        "load_average_now": list(os.getloadavg()),  # other work on the machine slows every timing here
        "settings": {"model_dir": str(cfg.model_dir), "temperature": cfg.temperature, "top_p": cfg.top_p,
                     "max_tokens": cfg.max_tokens, "lora_rank": cfg.lora_rank, "beta": cfg.beta,
                     "anchor_weight": cfg.anchor_weight, "anchor_tokens": cfg.anchor_tokens,
                     "lr_generation_decay": cfg.lr_generation_decay,
                     "promote_min_gain": cfg.promote_min_gain,
                     "promote_max_capability_drop": cfg.promote_max_capability_drop,
                     "align_extra_args": cfg.align_extra_args, "align_mode": cfg.align_mode,
                     "max_examples": cfg.max_examples, "first_lora_layer": cfg.first_lora_layer,
                     "cycles": specs[0].cycles if specs else 0,
                     "ratings_per_cycle": specs[0].ratings_per_cycle if specs else 0,
                     "samples_per_prompt": specs[0].samples_per_prompt if specs else 0,
                     "capability_repeats": specs[0].capability_repeats if specs else 0,
                     "n_train_prompts": len(specs[0].prompts) if specs else 0,
                     "n_holdout_prompts": len(specs[0].holdout) if specs else 0,
                     "n_capability": len(specs[0].capability) if specs else 0,
                     "ablation": any(s.ablation for s in specs)},
        "runs": runs,
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
                summary = run.get("summary") or summarize(run["base"], run["cycles"])
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


def recipe_name(rater: str, group: str | None) -> str:
    """How the plot, the printout and the legend name one rater's recipe."""
    return f"{rater}, {group}" if group else rater


def _recipe(run: dict[str, Any]) -> str:
    """What makes two runs of one rater repeats of each other when the command line did not say."""
    return run.get("group") or json.dumps(run.get("settings") or {}, sort_keys=True, default=str)


def repeats(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs of one rater at one recipe (one `FILE=LABEL` label, or else identical settings) are repeats that differ
    by prompt order and unseeded sampling. On this CPU one run's gain moves by 20+ points from seed to seed, more
    than between settings (README, Results), so a recipe is quoted by its median over repeats and by how many
    repeats met every goal, never by its best run."""
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
            "final_gain_points": final_gains,
            "median_final_gain_points": statistics.median(final_gains) if final_gains else None,
            "median_desirable_rate_by_cycle": median_by_cycle,
            "runs_meeting_all_goals": sum(all(x["goals"].values()) for x in s),
            "min_capability_ratio": min(caps, default=None), "max_cycle_seconds": max(secs, default=None),
        })
    return out


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


def _jsonable(x: Any) -> Any:
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
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
