"""The capability probe and the promotion gate's capability guard (app/loop/gate.py), with scripted answers."""

from __future__ import annotations

import threading

import httpx
import pytest

from app.loop.gate import (
    CapabilityError,
    CapabilityGuard,
    Question,
    http_ask,
    is_correct,
    load_capability,
    load_open_prompts,
    probe,
    repeats_itself,
)

QUESTIONS = [Question(f"What is the capital of country {i}?", (f"City{i}",)) for i in range(20)]


def scripted(known: dict[str, int], calls: list[tuple[str, str]] | None = None):
    """A model `m` knows the first known[m] answers and says something vague otherwise."""
    def ask(model: str, question: str) -> str:
        if calls is not None:
            calls.append((model, question))
        i = int(question.split()[-1].rstrip("?"))
        return f"It is City{i}." if i < known[model] else "The answer to this question is not provided."
    return ask


def test_shipped_questions_load_and_match_whole_words():
    qs = load_capability()
    assert len(qs) == 33 and all(q.answers for q in qs)
    assert is_correct("The capital of France is Paris.", ("Paris",)) and not is_correct("It is 18.", ("8",))


def test_probe_counts_and_lists_the_misses():
    r = probe(scripted({"m": 15}), "m", QUESTIONS)
    assert (r.correct, r.n, r.accuracy) == (15, 20, 0.75)
    assert [w["question"] for w in r.wrong] == [q.question for q in QUESTIONS[15:]]


def test_probe_sends_every_question_at_once():
    """All questions in flight together (vLLM batches them): with fewer workers the barrier would time out."""
    barrier = threading.Barrier(len(QUESTIONS), timeout=10)
    base = scripted({"m": 20})

    def ask(model: str, question: str) -> str:
        barrier.wait()
        return base(model, question)

    assert probe(ask, "m", QUESTIONS).correct == 20


@pytest.mark.parametrize("priority", [1, None])
def test_http_ask_is_greedy_and_sends_the_priority_it_is_given(monkeypatch, priority):
    sent = []

    def post(url, timeout, json, headers):
        sent.append((url, json, headers))
        return httpx.Response(200, json={"choices": [{"message": {"content": "Paris."}}]},
                              request=httpx.Request("POST", url))

    monkeypatch.setattr(httpx, "post", post)
    ask = http_ask("http://127.0.0.1:9/", lambda: "Be brief.", priority=priority, api_key="k3y")
    assert ask("kto-v2", "What is the capital of France?") == "Paris."
    url, body, headers = sent[0]
    assert headers == {"Authorization": "Bearer k3y"}  # vLLM refuses the probe without the server's key
    assert url == "http://127.0.0.1:9/v1/chat/completions" and body["model"] == "kto-v2"
    assert body["temperature"] == 0.0 and body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body.get("priority") == priority and (priority is not None or "priority" not in body)


@pytest.mark.parametrize("candidate,ok", [(20, True), (19, True), (18, False), (5, False)])
def test_guard_allows_at_most_the_configured_drop(candidate, ok):
    guard = CapabilityGuard(scripted({"kto-v2": candidate, "kto-v1": 20}), QUESTIONS, max_drop=0.05)
    verdict, reason = guard("kto-v2", "kto-v1")  # 0.05 of 20 questions: one may be lost, not two
    assert verdict is ok
    assert reason.startswith("not promoted: capability probe") != ok
    assert f"{candidate}/20 vs 20/20 for kto-v1" in reason
    assert guard.last["ok"] is ok and guard.last["candidate_correct"] == candidate
    assert len(guard.last["candidate_wrong"]) == 20 - candidate


def test_guard_compares_with_the_served_version_not_an_absolute_bar():
    guard = CapabilityGuard(scripted({"base": 10, "kto-v1": 10}), QUESTIONS, max_drop=0.0)
    assert guard("kto-v1", "base")[0]  # a weak served model does not block an equally weak candidate


def test_guard_asks_the_served_version_once_while_it_stays_served():
    calls: list[tuple[str, str]] = []
    guard = CapabilityGuard(scripted({"base": 20, "kto-v1": 20, "kto-v2": 20, "kto-v3": 20}, calls), QUESTIONS,
                            max_drop=0.05)
    guard("kto-v1", "base")
    guard("kto-v2", "base")     # kto-v1 was refused elsewhere (e.g. the gate): base is still served
    guard("kto-v3", "kto-v2")   # kto-v2 was promoted: its probe is reused
    asked = [m for m, _ in calls]
    assert asked.count("base") == 20 and asked.count("kto-v2") == 20 and asked.count("kto-v3") == 20


def test_bad_capability_file_is_a_clear_error(tmp_path):
    with pytest.raises(CapabilityError, match="not found"):
        load_capability(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q?"}\n')
    with pytest.raises(CapabilityError, match="bad.jsonl:1"):
        load_capability(bad)
    with pytest.raises(CapabilityError, match="at least one"):
        CapabilityGuard(lambda m, q: "", [], 0.05)


def test_guard_bounds_the_loss_against_the_base_model_over_many_cycles():
    calls: list[tuple[str, str]] = []
    guard = CapabilityGuard(scripted({"base": 20, "kto-v1": 19, "kto-v2": 18, "kto-v3": 19}, calls), QUESTIONS,
                            max_drop=0.05, base="base")
    assert guard("kto-v1", "base")[0]          # one question lost against the base: allowed
    assert "for base" in guard("kto-v1", "base")[1] and "base_correct" not in guard.last
    ok, reason = guard("kto-v2", "kto-v1")     # one more against kto-v1, but two against the base
    assert not ok and reason == ("not promoted: capability probe 18/20 vs 20/20 for base, served kto-v1 19/20 "
                                 "(allowed drop 5%)")
    assert guard.last["base_correct"] == 20 and guard.last["served_correct"] == 19
    assert guard("kto-v3", "kto-v1")[0]        # level with the served version, one below the base
    assert [m for m, _ in calls].count("base") == 20  # the base model is probed once, then remembered
    # without `base` the same step would pass: the per-cycle bound alone is a ratchet
    assert CapabilityGuard(scripted({"kto-v1": 19, "kto-v2": 18}), QUESTIONS, max_drop=0.05)("kto-v2", "kto-v1")[0]


def test_guard_probes_the_base_model_even_when_an_adapter_was_served_first():
    calls: list[tuple[str, str]] = []
    guard = CapabilityGuard(scripted({"base": 20, "kto-v4": 20, "kto-v5": 19}, calls), QUESTIONS, max_drop=0.05,
                            base="base")
    assert guard("kto-v5", "kto-v4")[0] and guard.last["base_correct"] == 20  # e.g. after an app restart
    assert sorted({m for m, _ in calls}) == ["base", "kto-v4", "kto-v5"]


def test_a_served_version_that_scored_above_the_base_does_not_raise_the_bar():
    # the concise seed-1 run's cycle 2 in miniature: base 19/20, the served checkpoint happened to score 20/20
    guard = CapabilityGuard(scripted({"base": 19, "kto-v1": 20, "kto-v2": 18, "kto-v3": 17}), QUESTIONS,
                            max_drop=0.05, base="base")
    ok, reason = guard("kto-v2", "kto-v1")
    assert ok and reason == "capability probe 18/20 vs 19/20 for base, served kto-v1 20/20 (allowed drop 5%)"
    assert guard.last["served_correct"] == 20 and guard.last["base_correct"] == 19
    ok, reason = guard("kto-v3", "kto-v1")  # two below the base: more than 5% of the questions
    assert not ok and reason.startswith("not promoted: capability probe 17/20 vs 19/20 for base")


# ---------------------------------------------------------------- the loop check

PROMPTS = [f"Tell me about topic {i}." for i in range(40)]
LOOP = "It is best to have a plan. " * 6


def looping(loops: dict[str, int], calls: list[str] | None = None):
    """A sampler where model `m` loops on the first loops[m] prompts and answers plainly otherwise."""
    def sample(model: str, prompt: str) -> str:
        if calls is not None:
            calls.append(model)
        i = int(prompt.split()[-1].rstrip("."))
        return LOOP if i < loops[model] else f"Topic {i} is interesting. Here is one fact about it. That is all."
    return sample


@pytest.mark.parametrize("text, loops", [
    ("It's best to have a plan. It's best to have a plan. It's best to have  a PLAN.", True),
    ("A cup of tea,\na cup of tea,\nA cup of tea,\nand then some.", True),
    ("Mix it well. Bake it. Mix it well. Serve it warm. Mix it well again.", False),
    ("- Yes.\n- Yes.\n- Yes.", False), ("Go. Go. Go. Go.", False), ("", False)])
def test_an_answer_that_loops_on_one_sentence_is_counted(text, loops):
    assert repeats_itself(text) is loops


def test_shipped_open_prompts_load_and_are_not_the_simulators():
    from app.sim.inputs import DEFAULT_HOLDOUT, DEFAULT_PROMPTS, load_prompts

    prompts = load_open_prompts()
    assert len(prompts) == len(set(prompts)) == 64
    assert not set(prompts) & set(load_prompts(DEFAULT_HOLDOUT) + load_prompts(DEFAULT_PROMPTS))


@pytest.mark.parametrize("candidate, ok", [(1, True), (3, True), (4, False), (20, False)])
def test_loop_check_allows_at_most_the_configured_increase_over_the_base_model(candidate, ok):
    guard = CapabilityGuard(scripted({"base": 20, "kto-v1": 20}), QUESTIONS, max_drop=0.05, base="base",
                            sample=looping({"base": 1, "kto-v1": candidate}), open_prompts=PROMPTS,
                            max_loop_increase=0.05)   # 0.05 of 40 prompts: two more than the base's one
    verdict, reason = guard("kto-v1", "base")
    assert verdict is ok and guard.last["ok"] is ok and guard.last["loops_ok"] is ok
    assert f"loops on {candidate}/40 open prompts vs 1/40 for base" in reason
    assert reason.startswith("not promoted") != ok
    assert len(guard.last["candidate_loop_examples"]) == candidate


def test_loop_check_samples_the_base_model_once_and_skips_a_candidate_the_probe_refused():
    calls: list[str] = []
    guard = CapabilityGuard(scripted({"base": 20, "kto-v1": 20, "kto-v2": 20, "kto-v3": 10}), QUESTIONS,
                            max_drop=0.05, base="base", sample=looping({"base": 0, "kto-v1": 0, "kto-v2": 2}, calls),
                            open_prompts=PROMPTS, max_loop_increase=0.05)
    assert guard("kto-v1", "base")[0] and guard("kto-v2", "kto-v1")[0]
    ok, reason = guard("kto-v3", "kto-v2")    # lost half its facts: refused before any open prompt is sent
    assert not ok and "loops" not in reason and "loops_ok" not in guard.last
    assert calls.count("base") == 40 and calls.count("kto-v1") == 40 and calls.count("kto-v2") == 40
    assert "kto-v3" not in calls


@pytest.mark.parametrize("sample, increase", [(None, 0.05), ("looping", -1.0)])
def test_loop_check_is_off_without_a_sampler_or_with_a_negative_increase(sample, increase):
    guard = CapabilityGuard(scripted({"base": 20, "kto-v1": 20}), QUESTIONS, max_drop=0.05, base="base",
                            sample=looping({"base": 0, "kto-v1": 40}) if sample else None, open_prompts=PROMPTS,
                            max_loop_increase=increase)
    ok, reason = guard("kto-v1", "base")
    assert ok and "loops" not in reason and not guard.checks_loops


def _answer_every_chat(monkeypatch, content: str) -> list[dict]:
    """httpx.post answers every chat request with `content`; returns the request bodies, in order."""
    sent: list[dict] = []

    def post(url, timeout, json, headers):
        sent.append(json)
        return httpx.Response(200, json={"choices": [{"message": {"content": content}}]},
                              request=httpx.Request("POST", url))

    monkeypatch.setattr(httpx, "post", post)
    return sent


def test_http_ask_with_sampling_answers_as_users_are_answered(monkeypatch):
    sent = _answer_every_chat(monkeypatch, "A poem.")
    ask = http_ask("http://127.0.0.1:9", sampling={"temperature": 0.7, "top_p": 0.95, "max_tokens": 128})
    assert ask("kto-v2", "Write a poem.") == "A poem."
    assert (sent[0]["temperature"], sent[0]["top_p"], sent[0]["max_tokens"]) == (0.7, 0.95, 128)
    assert "seed" not in sent[0]  # a seed crashes vLLM's CPU sampler


def test_the_app_wires_the_loop_check_with_the_served_sampling(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from app.config import Config
    from app.main import default_settings, promotion_guard
    from app.operator_settings import SettingsStore

    sent = _answer_every_chat(monkeypatch, "Paris.")
    server = SimpleNamespace(base_url="http://127.0.0.1:9", api_key=None, served_model_name="base")

    def guard_for(**kw):
        cfg = Config(data_dir=tmp_path / "data", model_dir=tmp_path / "model", max_tokens=96, **kw).resolved()
        return promotion_guard(cfg, server, SettingsStore(cfg.data_dir, default_settings(cfg)))

    guard = guard_for()
    assert guard.checks_loops and guard.max_loop_increase == 0.05 and len(guard.open_prompts) == 64
    guard.sample("base", "Write a poem.")
    assert sent[-1]["max_tokens"] == 96 and sent[-1]["temperature"] == Config().temperature
    assert not guard_for(promote_max_loop_increase=-1.0).checks_loops
    assert guard_for(promote_max_capability_drop=-1.0) is None
