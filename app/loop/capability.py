"""Capability probe and the promotion gate's capability guard.

KTO's held-out margin only says the new adapter separates liked from disliked answers; it cannot see the model
forgetting what it knew. On this project's 2-core runs an adapter trained on a length preference reached a held-out
margin of +80 while answering "What is the capital of France?" with "The answer is not provided." (capability
27% of base, benchmarks/results/simulate_concise_unstratified_lr5e-4.json). The guard asks the shipped factual questions
(all answered correctly by the base model) to the candidate and to the served version at temperature 0 and refuses
a candidate that loses more than the allowed share. The simulator reports the same probe after every cycle.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.admission import Admission

DEFAULT_CAPABILITY = Path(__file__).parent / "data" / "capability.jsonl"
CAPABILITY_MAX_TOKENS = 64


class CapabilityError(ValueError):
    """The capability file is missing or malformed."""


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...]


def load_capability(path: str | Path = DEFAULT_CAPABILITY) -> list[Question]:
    path = Path(path)
    if not path.is_file():
        raise CapabilityError(f"capability file not found: {path}")
    items = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append(Question(str(row["question"]), tuple(str(a) for a in row["answers"])))
        except (ValueError, KeyError, TypeError) as e:
            raise CapabilityError(f"{path}:{i}: expected {{'question': str, 'answers': [str, ...]}} ({e})") from None
    if not items:
        raise CapabilityError(f"no questions in {path}")
    return items


def is_correct(answer: str, accepted: Sequence[str]) -> bool:
    """An accepted answer appears as a whole word/phrase (case-insensitive): "8" does not match "18"."""
    low = answer.lower()
    return any(re.search(r"(?<!\w)" + re.escape(a.lower()) + r"(?!\w)", low) for a in accepted)


Ask = Callable[[str, str], str]  # (model, question) -> answer text, greedy


@dataclass
class ProbeResult:
    model: str
    correct: int
    n: int
    wrong: list[dict[str, str]]

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


def probe(ask: Ask, model: str, questions: Sequence[Question], workers: int = 0) -> ProbeResult:
    """Ask every question of `model` concurrently; count whole-word matches of an accepted answer.

    `workers` = 0 sends all questions at once: vLLM batches them into the same engine steps. On the 2-core EPYC
    the 33 questions took 19.6 s this way against 37.3 s eight at a time (probe_priority_bench.json, idle server).
    """
    with cf.ThreadPoolExecutor(max(1, workers or len(questions))) as ex:
        answers = list(ex.map(lambda q: ask(model, q.question), questions))
    wrong = [{"question": q.question, "answer": a[:200]} for q, a in zip(questions, answers, strict=True)
             if not is_correct(a, q.answers)]
    return ProbeResult(model, len(questions) - len(wrong), len(questions), wrong)


class CapabilityGuard:
    """`guard(candidate, served) -> (ok, reason)`: the candidate may lose at most `max_drop` (a share of the
    questions, e.g. 0.05) against the base model when `base` (its served name) is given, else against the served
    version.

    Why the base model and not the served version: against the served version the bound is per cycle, and a loop
    that keeps realigning could lose one question a cycle for ever (a ratchet); against the base model it holds
    over any number of cycles, and it is the measure the product promises ("capability ≥ 95% of base"). Nor is the
    floor the better of the two: a greedy probe of 33 questions moves by a question when the weights move a little,
    so a served adapter that once scored above the base would raise the bar by luck. On the 2-core EPYC a concise
    run's final adapter (31/33, 96.9% of the base's 32/33) was refused only because the served checkpoint had
    scored 33/33 (benchmarks/results/simulate_concise_anchor7_lr1e-3_k15_r300_seed1_avx512bf16.json, cycle 2).
    The served version is still probed, for the record. Probes are cached: the served version's while it is
    served, the base model's for good."""

    def __init__(self, ask: Ask, questions: Sequence[Question], max_drop: float, workers: int = 0,
                 base: str | None = None) -> None:
        if not questions:
            raise CapabilityError("the capability guard needs at least one question")
        self.ask, self.questions, self.max_drop, self.workers = ask, list(questions), max_drop, workers
        self.base = base
        self._served: dict[str, ProbeResult] = {}
        self._base: ProbeResult | None = None
        self.last: dict[str, Any] | None = None

    def __call__(self, candidate: str, served: str) -> tuple[bool, str]:
        old = self._served.get(served) or probe(self.ask, served, self.questions, self.workers)
        self._served = {served: old}
        if self.base is not None and self._base is None:
            self._base = old if served == self.base else probe(self.ask, self.base, self.questions, self.workers)
        new = probe(self.ask, candidate, self.questions, self.workers)
        self._served[candidate] = new  # becomes the served one if promoted
        floor = old if self._base is None else self._base
        ok = new.accuracy >= floor.accuracy - self.max_drop - 1e-9
        self.last = {"candidate": candidate, "served": served, "candidate_correct": new.correct,
                     "served_correct": old.correct, "n": new.n, "max_drop": self.max_drop, "ok": ok,
                     "candidate_wrong": new.wrong}
        what = f"capability probe {new.correct}/{new.n} vs {floor.correct}/{floor.n} for {floor.model}"
        if floor.model != served:
            self.last["base_correct"] = floor.correct
            what += f", served {served} {old.correct}/{old.n}"
        what += f" (allowed drop {self.max_drop:.0%})"
        return ok, (what if ok else f"not promoted: {what}")


def http_ask(base_url: str, system_prompt: Callable[[], str | None] | None = None,
             timeout: float = 120.0, priority: int | None = None, admission: Admission | None = None) -> Ask:
    """An `Ask` over vLLM's OpenAI-compatible API: greedy, CAPABILITY_MAX_TOKENS, the app's system prompt.

    `priority`: vLLM request priority (serving.server.PRIORITY_BACKGROUND on a priority-scheduled server: behind
    users' chats in the waiting queue, though not once running, see serving.server); None sends none.
    `admission`: the app's serving.admission.Admission; each question is a "background" request, sent a few at a
    time while people chat.
    """
    import httpx

    from serving.admission import slot

    def ask(model: str, question: str) -> str:
        sp = system_prompt() if system_prompt else None
        messages = ([{"role": "system", "content": sp}] if sp else []) + [{"role": "user", "content": question}]
        body = {"model": model, "messages": messages, "temperature": 0.0, "max_tokens": CAPABILITY_MAX_TOKENS}
        if priority is not None:
            body["priority"] = priority
        with slot(admission, "background"):
            r = httpx.post(f"{base_url.rstrip('/')}/v1/chat/completions", timeout=timeout, json=body)
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"] or ""

    return ask
