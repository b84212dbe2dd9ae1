"""The promotion gate: a trained adapter is served only if it beats the served one on the aligner's held-out set
(margin test) without resting on one rater's answers (rater check) and keeps the base model's factual answers
(capability guard) without looping on one sentence more often than the base model does (loop check); when a run's
final adapter fails, its earlier checkpoints are offered newest first (checkpoint
fallback). The decisions are pure functions; the I/O (asking vLLM, loading an adapter, evaluating checkpoints) is
passed in. Measurements behind the rules: docs/experiments/2026-11-23-simulator-defaults.md,
docs/experiments/2026-12-02-examples-learning-rate-seeds.md.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.admission import Admission

FRAC_TOLERANCE = 0.05
SIGN_TEST_ALPHA = 0.05
DEFAULT_CAPABILITY = Path(__file__).parent / "data" / "capability.jsonl"
CAPABILITY_MAX_TOKENS = 64
DEFAULT_OPEN_PROMPTS = Path(__file__).parent / "data" / "open_prompts.jsonl"
SENTENCE_OR_LINE = re.compile(r"(?<=[.!?])\s+|\n+")
LOOP_REPEATS = 3  # the same sentence this often in one answer: a loop, not emphasis
# one held-out answer weighs what any answer weighs: whether a gain rests on one answer is the sign test's question
RATER_CHECK_MIN_ANSWERS = 2


# ---------------------------------------------------------------- margin test

def sign_test_p(worse: int, better: int) -> float:
    """One-sided exact sign test: P(at least `worse` of the `worse + better` changed examples went the wrong way)
    if each change were a fair coin."""
    n = worse + better
    return sum(math.comb(n, k) for k in range(worse, n + 1)) / 2 ** n if n else 1.0


def _paired_sides(new: dict[str, Any], served: dict[str, Any]) -> tuple[int, int] | None:
    """(examples that moved to the wrong side, examples that moved to the right side), or None without lists."""
    a, b = new.get("correct_side"), served.get("correct_side")
    if not (isinstance(a, list) and isinstance(b, list) and a and len(a) == len(b)):
        return None
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in a + b):
        return None
    return sum(n < s for n, s in zip(a, b, strict=True)), sum(n > s for n, s in zip(a, b, strict=True))


def _num(d: dict[str, Any], key: str) -> float | None:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _score(d: dict[str, Any]) -> tuple[float | None, str]:
    """The number to compare and its name: the margin, or, when the held-out set holds one class only (heavy
    imbalance leaves no held-out thumbs-up, say), that class's mean reward oriented so that higher is better."""
    margin = _num(d, "margin")
    if margin is not None or d.get("margin") is not None:
        return margin, "margin"
    r_d, r_u = _num(d, "reward_desirable"), _num(d, "reward_undesirable")
    if d.get("reward_desirable") is None and r_u is not None:
        return -r_u, "−reward on held-out undesirable (no held-out desirable)"
    if d.get("reward_undesirable") is None and r_d is not None:
        return r_d, "reward on held-out desirable (no held-out undesirable)"
    return None, "margin"


def should_promote(new: dict[str, Any] | None, served: dict[str, Any] | None, min_gain: float,
                   frac_tolerance: float = FRAC_TOLERANCE, alpha: float = SIGN_TEST_ALPHA) -> tuple[bool, str]:
    """(promote?, reason) from the manifest's `heldout.new`/`heldout.served`: the score must gain more than
    `min_gain`, and no significantly more held-out examples may move to the wrong side than to the right one (an
    exact sign test on paired `correct_side` lists; a share tolerance for manifests without them). Nothing served:
    the base model, whose score against itself is 0, is the comparison."""
    if not new:
        return False, "not promoted: the new adapter has no held-out metrics"
    new_score, what = _score(new)
    if new_score is None:
        return False, ("not promoted: the new adapter's held-out margin is missing or not finite "
                       f"({new.get('margin')!r})")
    if not served:
        if new_score > min_gain:
            return True, f"promoted: held-out {what} {new_score:+.4f} > {min_gain:+.4f} (nothing served yet: base)"
        return False, f"not promoted: held-out {what} {new_score:+.4f} does not exceed {min_gain:+.4f} (vs base)"
    served_score, served_what = _score(served)
    if served_score is None or served_what != what:
        return False, f"not promoted: the served adapter's held-out {what} is missing ({served.get('margin')!r})"
    gain = new_score - served_score
    if not gain > min_gain:
        return False, (f"not promoted: {what} gain {gain:+.4f} (new {new_score:+.4f}, served {served_score:+.4f}) "
                       f"does not exceed {min_gain:+.4f}")
    paired = _paired_sides(new, served)
    if paired is not None:
        worse, better = paired
        p = sign_test_p(worse, better)
        if worse > better and p <= alpha:
            return False, (f"not promoted: {worse} held-out examples moved to the wrong side and {better} to the "
                           f"right one (sign test p = {p:.3f} <= {alpha}) despite {what} gain {gain:+.4f}")
        return True, (f"promoted: {what} gain {gain:+.4f} (new {new_score:+.4f}, served {served_score:+.4f}) "
                      f"> {min_gain:+.4f}; sides: {worse} worse, {better} better (p = {p:.2f})")
    new_frac, served_frac = _num(new, "frac_correct_side"), _num(served, "frac_correct_side")
    if new_frac is not None and served_frac is not None and new_frac < served_frac - frac_tolerance:
        return False, (f"not promoted: share on the correct side fell from {served_frac:.3f} to {new_frac:.3f} "
                       f"(tolerance {frac_tolerance:.2f}) despite {what} gain {gain:+.4f}")
    return True, (f"promoted: {what} gain {gain:+.4f} (new {new_score:+.4f}, served {served_score:+.4f}) "
                  f"> {min_gain:+.4f}")


# ---------------------------------------------------------------- one rater's weight

def _without(m: dict[str, Any], who: str) -> dict[str, Any] | None:
    """Held-out metrics as if `who` had rated none of the held-out answers (from the per-rater breakdown)."""
    me = (m.get("per_rater") or {}).get(who)
    n_d, n_u = m.get("n_desirable"), m.get("n_undesirable")
    if not isinstance(me, dict) or not isinstance(n_d, int) or not isinstance(n_u, int):
        return None

    def rest(kind: str, n: int) -> float | None:
        mine, mean_all, mean_me = me[f"n_{kind}"], _num(m, f"reward_{kind}"), me.get(f"reward_{kind}")
        if n - mine <= 0:
            return None
        if mine == 0:
            return mean_all
        return (mean_all * n - mean_me * mine) / (n - mine) if mean_all is not None and mean_me is not None else None

    r_d, r_u = rest("desirable", n_d), rest("undesirable", n_u)
    return {"margin": r_d - r_u if r_d is not None and r_u is not None else None,
            "reward_desirable": r_d, "reward_undesirable": r_u}


def _gain(new: dict[str, Any] | None, served: dict[str, Any] | None) -> float | None:
    if new is None:
        return None
    new_score, what = _score(new)
    if not served:
        return new_score
    served_score, served_what = _score(served)
    return None if new_score is None or served_score is None or served_what != what else new_score - served_score


def rater_check(new: dict[str, Any] | None, served: dict[str, Any] | None, min_gain: float,
                min_answers: int = RATER_CHECK_MIN_ANSWERS) -> tuple[bool, str, dict[str, Any] | None]:
    """Rule: with held-out answers from two or more raters, the gain must still exceed `min_gain` when the
    rater whose removal lowers it most is left out (a gain that needs one identity is that identity's taste).
    Only raters holding `min_answers` or more held-out answers are left out: a one-answer rater's
    "taste" cannot be told from one noisy reward (docs/experiments/2026-12-07-rater-check-one-answer.md).
    Returns (ok, reason if refused, record); the record is None when the breakdown is missing, has one rater, or
    no rater holds enough answers."""
    raters = (new or {}).get("per_rater")
    if not isinstance(raters, dict) or len(raters) < 2 or (served and not isinstance(served.get("per_rater"), dict)):
        return True, "", None
    judged = [who for who, r in raters.items() if r["n"] >= min_answers]
    if not judged:
        return True, "", None
    gains = {who: _gain(_without(new, who), _without(served, who) if served else None) for who in judged}
    who = min(gains, key=lambda w: -math.inf if gains[w] is None else gains[w])
    left, n = gains[who], sum(r["n"] for r in raters.values())
    record = {"raters": len(raters), "judged": len(judged), "most_influential": who, "n": raters[who]["n"],
              "n_heldout": n, "gain": _gain(new, served), "gain_without": left, "min_gain": min_gain,
              "ok": left is not None and left > min_gain}
    if record["ok"]:
        return True, "", record
    shown = "not measurable" if left is None else f"{left:+.4f}, not above {min_gain:+.4f}"
    return False, (f"not promoted: the held-out gain rests on one rater: without {who}'s {raters[who]['n']} of "
                   f"{n} held-out answers it is {shown}"), record


# ---------------------------------------------------------------- capability guard

class CapabilityError(ValueError):
    """The capability file is missing or malformed."""


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...]


def _read_jsonl(path: str | Path, what: str, shape: str, parse: Callable[[dict], Any]) -> list[Any]:
    """One item per non-blank JSON line, with the file and line named in every error: the gate's data files."""
    path = Path(path)
    if not path.is_file():
        raise CapabilityError(f"{what} file not found: {path}")
    items = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(parse(json.loads(line)))
        except (ValueError, KeyError, TypeError) as e:
            raise CapabilityError(f"{path}:{i}: expected {shape} ({e})") from None
    if not items:
        raise CapabilityError(f"no {what} items in {path}")
    return items


def load_capability(path: str | Path = DEFAULT_CAPABILITY) -> list[Question]:
    """The factual questions (all answered correctly by the base model) a candidate must keep answering."""
    return _read_jsonl(path, "capability", "{'question': str, 'answers': [str, ...]}",
                       lambda row: Question(str(row["question"]), tuple(str(a) for a in row["answers"])))


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


def ask_all(ask: Ask, model: str, prompts: Sequence[str], workers: int = 0) -> list[str]:
    """Ask every prompt of `model` at once (`workers` = 0): vLLM batches them into the same engine steps,
    about twice as fast as eight at a time on 2 cores (docs/experiments/2026-11-30-probe-priority-and-admission.md)."""
    with cf.ThreadPoolExecutor(max(1, workers or len(prompts))) as ex:
        return list(ex.map(lambda p: ask(model, p), prompts))


def probe(ask: Ask, model: str, questions: Sequence[Question], workers: int = 0) -> ProbeResult:
    """Every question, greedy, counted right or wrong."""
    answers = ask_all(ask, model, [q.question for q in questions], workers)
    wrong = [{"question": q.question, "answer": a[:200]} for q, a in zip(questions, answers, strict=True)
             if not is_correct(a, q.answers)]
    return ProbeResult(model, len(questions) - len(wrong), len(questions), wrong)


def capability_ok(candidate: ProbeResult, floor: ProbeResult, max_drop: float) -> bool:
    """The held-out margin cannot see forgetting; a candidate may lose at most `max_drop` of the questions."""
    return candidate.accuracy >= floor.accuracy - max_drop - 1e-9


def repeats_itself(text: str) -> bool:
    """The answer says one sentence or line of three words or more at least LOOP_REPEATS times: the degenerate loop
    a preference met by form alone (one paragraph, a length) can reward, and a probe of short facts does not see."""
    seen: dict[str, int] = {}
    for piece in SENTENCE_OR_LINE.split(text):
        key = " ".join(piece.lower().split())
        if len(key.split()) >= 3:
            seen[key] = seen.get(key, 0) + 1
    return max(seen.values(), default=0) >= LOOP_REPEATS


def load_open_prompts(path: str | Path = DEFAULT_OPEN_PROMPTS) -> list[str]:
    """Open requests (explain, advise, write a poem) whose answers the loop check reads: long enough to loop."""
    return _read_jsonl(path, "open prompts", "{'prompt': str}", lambda row: str(row["prompt"]))


@dataclass
class LoopProbe:
    model: str
    loops: int
    n: int
    examples: list[dict[str, str]]


def loop_probe(ask: Ask, model: str, prompts: Sequence[str], workers: int = 0) -> LoopProbe:
    """Answer every open prompt as users are answered (served sampling) and count the answers that loop."""
    answers = ask_all(ask, model, prompts, workers)
    looped = [{"prompt": p, "answer": a[:300]} for p, a in zip(prompts, answers, strict=True) if repeats_itself(a)]
    return LoopProbe(model, len(looped), len(prompts), looped)


def loops_ok(candidate: LoopProbe, floor: LoopProbe, max_increase: float) -> bool:
    """A candidate may loop on at most `max_increase` of the open prompts more than the floor model does."""
    return candidate.loops <= floor.loops + max_increase * candidate.n + 1e-9


class CapabilityGuard:
    """`guard(candidate, served) -> (ok, reason)`, the registry's check between loading and switching. The floor is
    the base model's score when `base` is given (a per-cycle floor against the served version would ratchet down a
    question a cycle, and a lucky served score would raise it); the served version is probed for the record.
    Probes are cached: the served version's while it is served, the base model's for good."""

    def __init__(self, ask: Ask, questions: Sequence[Question], max_drop: float, workers: int = 0,
                 base: str | None = None, sample: Ask | None = None, open_prompts: Sequence[str] = (),
                 max_loop_increase: float = -1.0) -> None:
        if not questions:
            raise CapabilityError("the capability guard needs at least one question")
        self.ask, self.questions, self.max_drop, self.workers = ask, list(questions), max_drop, workers
        self.base = base
        self._served: dict[str, ProbeResult] = {}
        self._base: ProbeResult | None = None
        # The loop check (off unless `sample`, prompts and max_loop_increase >= 0 are all given).
        self.sample, self.open_prompts = sample, list(open_prompts)
        self.max_loop_increase = max_loop_increase
        self._loops: dict[str, LoopProbe] = {}  # the floor model's, kept for good
        self.last: dict[str, Any] | None = None

    @property
    def checks_loops(self) -> bool:
        return self.sample is not None and bool(self.open_prompts) and self.max_loop_increase >= 0

    def _loop_verdict(self, candidate: str, floor_model: str) -> tuple[bool, str, dict[str, Any]]:
        """Loops of the candidate against the floor model (the base model, or the served one without a base)."""
        assert self.sample is not None
        floor = self._loops.get(floor_model) or loop_probe(self.sample, floor_model, self.open_prompts, self.workers)
        self._loops = {floor_model: floor}
        new = loop_probe(self.sample, candidate, self.open_prompts, self.workers)
        ok = loops_ok(new, floor, self.max_loop_increase)
        record = {"candidate_loops": new.loops, "floor_loops": floor.loops, "floor_model": floor_model,
                  "loops_n": new.n, "max_loop_increase": self.max_loop_increase, "loops_ok": ok,
                  "candidate_loop_examples": new.examples}
        what = (f"loops on {new.loops}/{new.n} open prompts vs {floor.loops}/{floor.n} for {floor_model} "
                f"(allowed {self.max_loop_increase:.0%} more)")
        return ok, what, record

    def __call__(self, candidate: str, served: str) -> tuple[bool, str]:
        old = self._served.get(served) or probe(self.ask, served, self.questions, self.workers)
        self._served = {served: old}
        if self.base is not None and self._base is None:
            self._base = old if served == self.base else probe(self.ask, self.base, self.questions, self.workers)
        new = probe(self.ask, candidate, self.questions, self.workers)
        self._served[candidate] = new  # becomes the served one if promoted
        floor = old if self._base is None else self._base
        ok = capability_ok(new, floor, self.max_drop)
        self.last = {"candidate": candidate, "served": served, "candidate_correct": new.correct,
                     "served_correct": old.correct, "n": new.n, "max_drop": self.max_drop, "ok": ok,
                     "candidate_wrong": new.wrong}
        what = f"capability probe {new.correct}/{new.n} vs {floor.correct}/{floor.n} for {floor.model}"
        if floor.model != served:
            self.last["base_correct"] = floor.correct
            what += f", served {served} {old.correct}/{old.n}"
        what += f" (allowed drop {self.max_drop:.0%})"
        if self.checks_loops and ok:  # a candidate the probe refused needs no more generating
            loops_fine, loops_what, record = self._loop_verdict(candidate, self.base or served)
            self.last.update(record)
            self.last["ok"] = ok = ok and loops_fine
            what += f"; {loops_what}"
        return ok, (what if ok else f"not promoted: {what}")


def http_ask(base_url: str, system_prompt: Callable[[], str | None] | None = None,
             timeout: float = 120.0, priority: int | None = None, admission: Admission | None = None,
             api_key: str | None = None, sampling: Mapping[str, Any] | None = None) -> Ask:
    """An `Ask` over vLLM's OpenAI API: greedy, CAPABILITY_MAX_TOKENS, the app's system prompt; `priority` and
    `admission` keep the probe behind users' chats (serving.server, serving.admission); `api_key` is the server's.
    With `sampling` (a served request's sampling fields) it answers as users are answered instead."""
    import httpx

    from serving.admission import slot
    from serving.server import auth_header

    headers = auth_header(api_key)

    def ask(model: str, question: str) -> str:
        sp = system_prompt() if system_prompt else None
        messages = ([{"role": "system", "content": sp}] if sp else []) + [{"role": "user", "content": question}]
        body: dict[str, Any] = {"model": model, "messages": messages, "temperature": 0.0,
                                "max_tokens": CAPABILITY_MAX_TOKENS}
        if sampling is not None:  # no seed: it crashes vLLM's CPU sampler (serving.client.SamplingParams)
            body.update(sampling)
        if priority is not None:
            body["priority"] = priority
        with slot(admission, "background"):
            r = httpx.post(f"{base_url.rstrip('/')}/v1/chat/completions", timeout=timeout, json=body,
                           headers=headers)
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"] or ""

    return ask


# ---------------------------------------------------------------- checkpoint fallback

@dataclass
class Candidate:
    """One adapter a run offers: its final one, or a checkpoint whose held-out metrics may still be pending."""
    name: str
    step: int | None
    dir: Path
    heldout_new: dict[str, Any] | None
    pending: bool = False


@dataclass
class Attempt:
    """What loading one candidate gave: the version it serves as (None if refused), the refusal, the probe record."""
    version: str | None
    refused: str | None = None
    guard: dict[str, Any] | None = None


@dataclass
class GateResult:
    promoted: bool
    reason: str
    version: str | None
    candidates: list[dict[str, Any]] = field(default_factory=list)  # every verdict, for the run record
    capability_guard: dict[str, Any] | None = None
    rater_check: dict[str, Any] | None = None
    promoted_checkpoint: dict[str, Any] | None = None


def candidates(out: Path, manifest: dict[str, Any]) -> list[Candidate]:
    """The run's final adapter, then its saved checkpoints newest first (a run that moved too far has usually
    passed a safe point on the way)."""
    final = Candidate("final", None, out, (manifest.get("heldout") or {}).get("new"))
    earlier = [Candidate(f"step {c['step']}/{c['steps']}", c["step"], out / c["path"], c.get("heldout_new"),
                         bool(c.get("heldout_pending")))
               for c in reversed(manifest.get("checkpoints") or []) if (out / c["path"]).is_dir()]
    return [final, *earlier]


def decide(cands: Sequence[Candidate], manifest: dict[str, Any], min_gain: float,
           attempt: Callable[[Candidate], Attempt],
           evaluate_pending: Callable[[list[Candidate]], None]) -> GateResult:
    """Offer each candidate in turn to the margin test and the rater check and, if it passes both, to `attempt`
    (load, capability guard, switch); the first served one wins. `evaluate_pending` fills the checkpoints' metrics,
    once, only when a checkpoint is reached (a promoted final adapter never pays for them)."""
    served_metrics = (manifest.get("heldout") or {}).get("served")
    pending = [c for c in cands if c.pending]
    verdicts: list[dict[str, Any]] = []
    result = GateResult(False, "", None, verdicts)
    for cand in cands:
        if cand.pending:
            evaluate_pending(pending)
        ok, reason = should_promote(cand.heldout_new, served_metrics, min_gain)
        if cand.heldout_new is None and manifest.get("checkpoint_eval_error"):
            reason = f"not promoted: {manifest['checkpoint_eval_error']}"
        verdict: dict[str, Any] = {"candidate": cand.name, "step": cand.step, "promoted": False}
        verdicts.append(verdict)
        if ok:
            ok, why, raters = rater_check(cand.heldout_new, served_metrics, min_gain)
            if raters is not None:
                verdict["rater_check"] = result.rater_check = raters
            if not ok:
                reason = why
        tried = Attempt(None)
        if ok:
            tried = attempt(cand)
            if tried.refused is not None:
                ok, reason = False, tried.refused
            guard = tried.guard
            if guard is not None:
                verdict["capability_guard"] = result.capability_guard = guard
                if ok:
                    reason += (f"; capability probe {guard['candidate_correct']}/{guard['n']} "
                               f"(served {guard['served_correct']}/{guard['n']})")
                    if "candidate_loops" in guard:
                        reason += (f"; loops on {guard['candidate_loops']}/{guard['loops_n']} open prompts "
                                   f"({guard['floor_loops']} for {guard['floor_model']})")
        # a refused candidate keeps the name it was loaded under (vLLM cannot forget it): record that too
        verdict.update(reason=reason, promoted=ok, version=tried.version or (tried.guard or {}).get("candidate"))
        if ok:
            if cand is not cands[0]:
                result.promoted_checkpoint = {"step": cand.step, "heldout_new": cand.heldout_new}
                verdict["reason"] = (f"{reason} [checkpoint {cand.name} of the run; the final adapter was refused: "
                                     f"{verdicts[0]['reason']}]")
            result.promoted, result.reason, result.version = True, verdict["reason"], verdict["version"]
            return result
    result.reason = verdicts[0]["reason"]
    if len(verdicts) > 1:
        result.reason += f" (so were the run's {len(verdicts) - 1} earlier checkpoint{'s' * (len(verdicts) > 2)})"
    return result
