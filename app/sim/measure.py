"""Held-out desirable rate (Wilson 95% interval) and capability of a served model, never stored, so the model
never trains on its own evaluation."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from app.loop.gate import CAPABILITY_MAX_TOKENS, Question, is_correct, repeats_itself
from app.sim.inputs import Rater, SimulationError, call_rater

LIST_ITEM = re.compile(r"([-*•]|\d+[.)])\s")
SENTENCE_END = '.!?:;"\')]*`»…”’'  # what an answer may end on without stopping mid-sentence


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for k of n (95% by default; Wilson 1927): stays inside [0, 1] at small counts, unlike
    the normal approximation; (0, 1) when n = 0."""
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



def with_sampling(sampling: Any, **changes: Any) -> Any:
    """A copy of the served sampling parameters with a few fields changed (dataclass or dict)."""
    if dataclasses.is_dataclass(sampling):
        return dataclasses.replace(sampling, **changes)
    return {**dict(sampling), **changes}


def complete(client: Any, messages: list[dict[str, str]], model: str, sampling: Any,
             kind: str = "user") -> tuple[str, str | None]:
    """The whole answer text from `ChatClient.stream_chat` and vLLM's finish reason (the stream's ChatResult)."""
    stream = client.stream_chat(messages, model, sampling, kind=kind)
    text = "".join(stream)
    return text, getattr(getattr(stream, "result", None), "finish_reason", None)


def stops_mid_sentence(text: str, finish: str | None) -> bool:
    """The model ended the answer itself (not cut at max_tokens) but not at the end of a sentence, list item,
    quotation or code block: the fluency loss a capability probe of short facts does not see. A list's last item
    needs no full stop."""
    last = text.rstrip().rsplit("\n", 1)[-1].lstrip()
    return finish == "stop" and last[-1:] not in SENTENCE_END and not LIST_ITEM.match(last)


def _messages(system_prompt: str | None, user: str) -> list[dict[str, str]]:
    """The request a new chat would send, with the served system prompt."""
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


def rate_answers(rater: Rater, prompts: Sequence[str], answers: Sequence[str]) -> dict[str, Any]:
    """One preference's desirable rate over answers, with its Wilson interval."""
    rated = [v for v in (call_rater(rater, p, a) for p, a in zip(prompts, answers, strict=True)) if v is not None]
    ups = sum(rated)
    return {"desirable_rate": ups / len(rated) if rated else None, "ci95": list(wilson(ups, len(rated))),
            "n_rated": len(rated), "n_up": ups}


def measure(client: Any, model: str, *, holdout: Sequence[str], rater: Rater, capability: Sequence[Question],
            sampling: Any, system_prompt: str | None, samples: int, workers: int = 16,
            priority: int | None = None, capability_repeats: int = 1,
            also: Mapping[str, Rater] | None = None) -> dict[str, Any]:
    """Held-out desirable rate (Wilson 95% CI) and capability accuracy of `model`, as served now.

    The capability questions are asked `capability_repeats` times, spread through the sampled jobs, and averaged:
    greedy answers from vLLM on a bf16 CPU depend on what shares the batch. `capability_wrong` lists every question
    missed in any repeat. Requests are of kind "background" at `priority`, so they queue behind people chatting.
    `also`: more preferences rated on the same answers (a mix's minority, a changed preference, an attacker's), in
    `by_rater`, so they are compared on one sample.
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
    done_jobs = parallel_map(lambda j: complete(client, _messages(system_prompt, j[0]), model, j[1], "background"),
                             jobs, workers)
    texts = [t for t, _ in done_jobs]
    cap_pos = {i + k for i in cap_at for k in range(len(capability))}
    answers = [t for i, t in enumerate(texts) if i not in cap_pos]
    finishes = [f for i, (_, f) in enumerate(done_jobs) if i not in cap_pos]
    probes = [texts[i:i + len(capability)] for i in cap_at]
    verdicts = [call_rater(rater, p, a) for (p, _), a in zip(sampled, answers, strict=False)]
    rated = [v for v in verdicts if v is not None]
    ups = sum(rated)
    lo, hi = wilson(ups, len(rated))
    by_rater = {name: rate_answers(r, [p for p, _ in sampled], answers) for name, r in (also or {}).items()}
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
        "cut_at_max_tokens": sum(f == "length" for f in finishes) / max(1, len(finishes)),
        "stops_mid_sentence": sum(stops_mid_sentence(a, f) for a, f in zip(answers, finishes, strict=True))
        / max(1, len(finishes)),
        "repeats_itself": sum(map(repeats_itself, answers)) / max(1, len(answers)),
        "capability_wrong": wrong, **({"by_rater": by_rater} if also else {}),
        "seconds": round(time.perf_counter() - t0, 1),
        "example_answer": {"prompt": sampled[0][0], "answer": answers[0]} if answers else None,
    }

