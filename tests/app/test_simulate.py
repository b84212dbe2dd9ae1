"""Simulator pieces that need no model: statistics, inputs, shipped data, collection into a real store, outputs."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.cli import simulate as cmd
from app.config import config_from
from app.loop import gate
from app.sim import inputs, measure, report
from app.sim import run as sim
from serving.client import SamplingParams
from serving.server import VLLMServerSpec, request_priority

# ---------------------------------------------------------------- statistics


def test_wilson_known_values():
    lo, hi = measure.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = measure.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert measure.wilson(0, 0) == (0.0, 1.0)
    assert measure.wilson(4, 4)[1] == 1.0 and measure.wilson(0, 4)[0] == 0.0  # exactly, not 0.9999999999999999


@given(st.integers(1, 5000), st.data())
def test_wilson_contains_estimate_and_shrinks_with_n(n, data):
    k = data.draw(st.integers(0, n))
    lo, hi = measure.wilson(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0  # exactly: the plot's error bars are estimate minus/plus bound
    lo4, hi4 = measure.wilson(4 * k, 4 * n)
    assert hi4 - lo4 < hi - lo


def test_is_correct_matches_whole_words_only():
    assert gate.is_correct("The capital of France is Paris.", ["Paris"])
    assert gate.is_correct("5 + 3 = 8.", ["8", "eight"])
    assert not gate.is_correct("It is 18.", ["8"])
    assert not gate.is_correct("Parisian food is great.", ["Paris"])
    assert gate.is_correct("It is made of H2O molecules", ["h2o"])


# ---------------------------------------------------------------- inputs


def test_load_rater_forms(tmp_path):
    name, fn = inputs.load_rater("concise")
    assert name == "concise" and fn("q", "short answer") is True
    name, fn = inputs.load_rater("app.sim.raters:bullets")
    assert name == "bullets" and fn("How?", "- a\n- b\n- c") is True
    f = tmp_path / "my_rater.py"
    f.write_text("def likes_paris(prompt, answer):\n    return 'Paris' in answer\n")
    name, fn = inputs.load_rater(f"{f}:likes_paris")
    assert name == "likes_paris" and fn("q", "Paris!") is True and fn("q", "Rome") is False
    for bad in ["nope", "app.sim.raters:missing", "no_such_module_xyz:f", f"{tmp_path}/absent.py:f"]:
        with pytest.raises(inputs.SimulationError):
            inputs.load_rater(bad)


def test_call_rater_rejects_non_bool_and_wraps_errors():
    assert inputs.call_rater(lambda p, a: None, "p", "a") is None
    with pytest.raises(inputs.SimulationError, match="True, False or None"):
        inputs.call_rater(lambda p, a: 1, "p", "a")
    with pytest.raises(inputs.SimulationError, match="ZeroDivisionError"):
        inputs.call_rater(lambda p, a: 1 / 0, "p", "a")


def test_load_prompts_jsonl_and_text(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text('{"prompt": "Hello?"}\n\n{"prompt": " Why? ", "category": "x"}\n')
    assert inputs.load_prompts(j) == ["Hello?", "Why?"]
    t = tmp_path / "p.txt"
    t.write_text("one\n\ntwo\n")
    assert inputs.load_prompts(t) == ["one", "two"]
    j.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(inputs.SimulationError, match=r"p.jsonl:2"):
        inputs.load_prompts(j)
    with pytest.raises(inputs.SimulationError, match="not found"):
        inputs.load_prompts(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- shipped data


def test_shipped_prompts_are_many_diverse_and_disjoint_from_holdout():
    train, hold = inputs.load_prompts(inputs.DEFAULT_PROMPTS), inputs.load_prompts(inputs.DEFAULT_HOLDOUT)
    assert len(train) >= 300 and len(hold) >= 40
    assert len(set(train)) == len(train) and len(set(hold)) == len(hold)
    assert not set(train) & set(hold)
    cats = [json.loads(line)["category"] for line in inputs.DEFAULT_PROMPTS.read_text().splitlines()]
    assert len(set(cats)) >= 8 and max(cats.count(c) for c in set(cats)) < 0.25 * len(cats)


def test_shipped_split_is_reproducible():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_prompts", inputs.DATA_DIR / "build_prompts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.all_prompts()
    assert [r["prompt"] for r in rows if not mod.is_holdout(r["prompt"])] == inputs.load_prompts(inputs.DEFAULT_PROMPTS)
    assert [r["prompt"] for r in rows if mod.is_holdout(r["prompt"])] == inputs.load_prompts(inputs.DEFAULT_HOLDOUT)


def test_shipped_capability_set():
    qs = inputs.load_capability()
    assert 20 <= len(qs) <= 40
    assert len({q.question for q in qs}) == len(qs)
    assert all(q.answers and all(a.strip() for a in q.answers) for q in qs)


# ---------------------------------------------------------------- collection through the real ChatService + store


@dataclass
class FakeRegistry:
    name: str = "base"

    def current(self) -> str:
        return self.name


class CannedClient:
    """Stands in for vLLM only: answers with a list when the prompt says 'list', else one long sentence."""

    def __init__(self):
        self.calls: list[tuple[str, str, object]] = []
        self.kinds: list[str] = []

    def stream_chat(self, messages, model, sampling, kind="user"):
        self.calls.append((messages[-1]["content"], model, sampling))
        self.kinds.append(kind)
        q = messages[-1]["content"]
        if q in {"What is the capital of France?"}:
            text = "The capital of France is Paris."
        elif "list" in q:
            text = "- a\n- b\n- c"
        else:
            text = "word " * 80
        return CannedStream([text[: len(text) // 2], text[len(text) // 2:]],
                            "length" if text.startswith("word") else "stop")


class CannedStream:
    """Like serving.client.ChatStream: text chunks, then `.result` with vLLM's finish reason."""

    def __init__(self, parts, finish):
        self.result = None
        self._gen = self._run(parts, finish)

    def _run(self, parts, finish):
        yield from parts
        self.result = SimpleNamespace(finish_reason=finish)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._gen)


@pytest.fixture
def store(tmp_path):
    from feedback_store import FeedbackStore

    s = FeedbackStore(tmp_path / "f.duckdb")
    yield s
    s.close()


def test_collect_stores_answers_and_ratings_like_the_ui(store, tmp_path):
    from app.web.chat import ChatService

    client = CannedClient()
    service = ChatService(store, client, FakeRegistry("kto-v3"), system_prompt=lambda: "Be nice.",
                          sampling=lambda: {"temperature": 0.7}, max_chars=4000, ratings_per_minute=60)
    prompts = ["give me a list", "explain tides", "another list please", "Write a haiku about rain."]

    def rater(prompt, answer):  # skips haiku, likes lists
        return None if "haiku" in prompt else answer.startswith("- ")

    stats, cursor = sim.collect(service, prompts, rater, 7, cursor=0, tag="t", workers=4)
    assert stats["ratings"] == 7 and stats["up"] + stats["down"] == 7
    assert stats["not_rated"] >= 1 and stats["answers"] == 7 + stats["not_rated"]
    assert cursor == stats["answers"]
    counts = store.counts()
    assert counts["up"] == stats["up"] and counts["down"] == stats["down"]
    by_adapter = store.counts_by_adapter()
    assert [r["adapter"] for r in by_adapter] == ["kto-v3"]
    assert all(model == "kto-v3" for _, model, _ in client.calls)
    assert set(client.kinds) == {"user"}  # simulated users chat as users
    snap = store.export_snapshot(tmp_path / "snap.parquet")  # what the aligner would train on
    assert snap.n_desirable == stats["up"] and snap.n_undesirable == stats["down"]


def test_measure_rates_and_capability():
    client = CannedClient()
    caps = [gate.Question("What is the capital of France?", ("Paris",)), gate.Question("2+2?", ("4",))]
    out = measure.measure(client, "kto-v1", holdout=["a list", "no"], rater=lambda p, a: a.startswith("- "),
                      capability=caps, sampling={"temperature": 0.7, "top_p": 0.95, "max_tokens": 256},
                      system_prompt="sys", samples=3, workers=2)
    assert out["n_samples"] == 6 and out["n_rated"] == 6 and out["n_up"] == 3
    assert out["desirable_rate"] == 0.5 and out["ci95"] == list(measure.wilson(3, 6))
    assert out["capability_accuracy"] == 0.5 and out["capability_n"] == 2
    greedy = [s for q, _, s in client.calls if q.endswith("?")]
    assert all(s["temperature"] == 0.0 and s["max_tokens"] == gate.CAPABILITY_MAX_TOKENS for s in greedy)
    assert all(m == "kto-v1" for _, m, _ in client.calls)
    assert client.kinds == ["background"] * 8  # the product's own traffic: gives way to people chatting
    assert out["cut_at_max_tokens"] == 0.5 and out["stops_mid_sentence"] == 0.0 and out["repeats_itself"] == 0.0


@pytest.mark.parametrize("text, finish, mid", [
    ("It is blue.", "stop", False), ("It is blue", "stop", True), ("It is blue", "length", False),
    ("Steps:\n- mix\n- bake", "stop", False), ("1. mix\n2) bake", "stop", False),
    ("You can even organize a bake sale\n", "stop", True), ('He said "go."', "stop", False),
    ("Use `x`", "stop", False), ("It is", None, False)])
def test_an_answer_the_model_ended_mid_sentence_is_counted(text, finish, mid):
    assert measure.stops_mid_sentence(text, finish) is mid


def test_measure_averages_repeated_capability_probes_spread_through_the_sampling():
    class FlakyClient(CannedClient):
        """Like vLLM on a bf16 CPU: one greedy answer changes from one probe to the next."""

        def __init__(self):
            super().__init__()
            self.asked_red = 0

        def stream_chat(self, messages, model, sampling, kind="user"):
            q = messages[-1]["content"]
            if q == "Which planet is the Red Planet?":
                self.calls.append((q, model, sampling))
                self.kinds.append(kind)
                self.asked_red += 1
                yield "Mars." if self.asked_red != 2 else "The Red Planet is a planet."
                return
            yield from super().stream_chat(messages, model, sampling, kind)

    client = FlakyClient()
    caps = [gate.Question("What is the capital of France?", ("Paris",)),
            gate.Question("Which planet is the Red Planet?", ("Mars",)), gate.Question("2+2?", ("4",))]
    out = measure.measure(client, "kto-v1", holdout=["a list", "no"], rater=lambda p, a: a.startswith("- "),
                      capability=caps, sampling={"temperature": 0.7}, system_prompt=None, samples=3, workers=1,
                      capability_repeats=3)
    # workers=1 keeps the order: each probe follows a third of the 6 sampled answers
    order = [q for q, _, _ in client.calls]
    assert order == ["a list", "a list"] + [c.question for c in caps] + ["a list", "no"] + \
        [c.question for c in caps] + ["no", "no"] + [c.question for c in caps]
    assert out["n_samples"] == 6 and out["n_up"] == 3  # the probes are not rated as held-out answers
    assert out["capability_runs"] == [2, 1, 2] and out["capability_correct"] == round(5 / 3, 2)
    assert out["capability_accuracy"] == pytest.approx(5 / 9)
    assert out["capability_wrong"] == [
        {"question": "Which planet is the Red Planet?", "answer": "The Red Planet is a planet.", "right": 2, "of": 3},
        {"question": "2+2?", "answer": ("word " * 80)[:200], "right": 0, "of": 3}]
    with pytest.raises(inputs.SimulationError, match="at least 1"):
        measure.measure(client, "kto-v1", holdout=["no"], rater=lambda p, a: True, capability=caps, sampling={},
                    system_prompt=None, samples=1, capability_repeats=0)


def test_measure_sends_its_priority_without_changing_the_sampling():
    client = CannedClient()
    caps = [gate.Question("2+2?", ("4",))]
    measure.measure(client, "kto-v1", holdout=["a list"], rater=lambda p, a: True, capability=caps,
                sampling={"temperature": 0.7, "top_p": 0.95, "max_tokens": 256}, system_prompt=None, samples=2,
                workers=2, priority=1)
    sent = [s for _, _, s in client.calls]
    assert len(sent) == 3 and all(s["priority"] == 1 for s in sent)
    assert sorted(s["temperature"] for s in sent) == [0.0, 0.7, 0.7]
    params = measure.with_priority(SamplingParams(temperature=0.7, extra={"ignore_eos": True}), 1)
    assert params.to_request()["priority"] == 1 and params.to_request()["ignore_eos"] is True
    assert measure.with_priority(params, None) is params


def test_background_priority_comes_from_the_server_spec(tmp_path):
    assert request_priority(SimpleNamespace(spec=VLLMServerSpec(model_dir=tmp_path)), "background") == 1
    assert request_priority(SimpleNamespace(spec=VLLMServerSpec(model_dir=tmp_path, scheduling_policy="fcfs")),
                            "background") is None
    assert request_priority(object(), "background") is None  # a stand-in without a spec: no priority field


# ---------------------------------------------------------------- outputs


def fake_doc(ablation: bool = True) -> dict:
    def ev(rate, cap):
        return {"desirable_rate": rate, "ci95": list(measure.wilson(round(rate * 100), 100)),
                "capability_accuracy": cap}

    runs = []
    for name, rates in [("concise", [0.2, 0.45, 0.6]), ("examples", [0.05, 0.1, 0.4])]:
        cycles = [{"cycle": i, "eval": ev(r, 0.97), "cycle_seconds": 500.0, "promoted": True}
                  for i, r in enumerate(rates[1:], 1)]
        cycles[0].update(promoted=False, refused_candidate_eval=ev(0.5, 0.8))
        if ablation:
            for c in cycles:
                c["ablation_pinned"] = {"eval": ev(0.1, 0.9)}
        runs.append({"rater": name, "base": ev(rates[0], 1.0), "cycles": cycles})
    return {"runs": runs}


def test_summary_goals():
    doc = fake_doc()
    r = doc["runs"][1]
    s = report.summarize(r["base"], r["cycles"])
    assert s["best_gain_points"] == pytest.approx(35.0)
    assert s["min_capability_ratio"] == pytest.approx(0.97)
    assert {k: v for k, v in s["goals"].items() if v is not None} == {
        "gain_30_points_in_2_cycles": True, "capability_95pct_every_cycle": True, "cycle_10_min_every_cycle": True}
    r["cycles"][0]["cycle_seconds"] = 601
    assert report.summarize(r["base"], r["cycles"])["goals"]["cycle_10_min_every_cycle"] is False
    assert report.summarize(doc["runs"][0]["base"], doc["runs"][0]["cycles"])["ablation_pinned_final_desirable_rate"] \
        == 0.1


def test_plot_and_json_are_written(tmp_path):
    png = tmp_path / "out" / "sim.png"
    report.plot(fake_doc(), png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    mixed = fake_doc()  # a case's other preferences are drawn beside the main one
    for r in mixed["runs"]:
        r["case"] = {"main": r["rater"]}
        for e in [r["base"]] + [c["eval"] for c in r["cycles"]]:
            e["by_rater"] = {r["rater"]: {"desirable_rate": e["desirable_rate"]}, "minority": {"desirable_rate": 0.3}}
    report.plot(mixed, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    edges = fake_doc()  # a rater at 0% and 100%: the error bars must still be drawable
    edges["runs"][0]["base"]["desirable_rate"], edges["runs"][0]["base"]["ci95"] = 0.0, list(measure.wilson(0, 3))
    edges["runs"][0]["cycles"][1]["eval"].update(desirable_rate=1.0, ci95=list(measure.wilson(4, 4)))
    report.plot(edges, png)
    report.write_json({"x": 1.5, "p": inputs.DATA_DIR, "t": (1, 2)}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": 1.5, "p": str(inputs.DATA_DIR), "t": [1, 2]}


def _results_file(path, runs, **settings):
    doc = fake_doc()
    doc["runs"] = [dict(r, summary=report.summarize(r["base"], r["cycles"])) for r in doc["runs"] if r["rater"] in runs]
    doc.update(kind="kto-loop simulate", settings=settings, machine={"cpu": "test"}, started_at="2026-12-02T10:00:00",
               code="abc1234")
    path.write_text(json.dumps(doc))
    return path


def test_combine_puts_several_results_files_into_one_json_and_plot(tmp_path, capsys):
    cfg = config_from(argparse.Namespace(), environ={})
    a = _results_file(tmp_path / "a.json", {"concise"}, first_lora_layer="15")
    b = _results_file(tmp_path / "b.json", {"examples"}, first_lora_layer="20")
    c = _results_file(tmp_path / "c.json", {"examples"}, first_lora_layer="0")
    out, png = tmp_path / "all.json", tmp_path / "all.png"
    assert cmd.run(parse(["--combine", str(a), str(b), str(c), "--json", str(out), "--plot", str(png)]), cfg) == 0
    doc = json.loads(out.read_text())
    assert doc["kind"] == "kto-loop simulate" and doc["combined_from"] == [str(a), str(b), str(c)]
    assert [r["rater"] for r in doc["runs"]] == ["concise", "examples", "examples"]
    # each run keeps its own file's settings; a rater seen twice is told apart by its file in the legend
    assert [r["settings"]["first_lora_layer"] for r in doc["runs"]] == ["15", "20", "0"]
    assert [r["label"] for r in doc["runs"]] == ["concise", "examples (b)", "examples (c)"]
    assert doc["runs"][1]["summary"]["best_gain_points"] == pytest.approx(35.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "examples (c): desirable 5.0% → 40.0%" in printed and str(out) in printed
    # and the combined file is itself a results file: it can be combined again
    assert cmd.run(parse(["--combine", str(out), str(a), "--json", str(tmp_path / "again.json")]), cfg) == 0
    again = json.loads((tmp_path / "again.json").read_text())["runs"]
    assert [r["label"] for r in again] == ["concise (a)", "examples (b)", "examples (c)", "concise (a)"]
    assert [r["settings"]["first_lora_layer"] for r in again] == ["15", "20", "0", "15"]  # not lost on the way
    assert [r["source"] for r in again] == [str(a), str(b), str(c), str(a)]
    assert {r["code"] for r in again} == {"abc1234"}
    # FILE=LABEL names a file's runs in the legend; a file whose own name holds "=" is still read as a file
    odd = _results_file(tmp_path / "k=20.json", {"concise"})
    assert cmd.run(parse(["--combine", f"{b}=lr 2e-3", f"{c}=seed 1", str(odd), "--json", str(out)]), cfg) == 0
    doc = json.loads(out.read_text())
    assert [r["label"] for r in doc["runs"]] == ["examples, lr 2e-3", "examples, seed 1", "concise"]
    assert doc["combined_from"] == [str(b), str(c), str(odd)]
    # an interrupted run's file has no summary yet: the combined document gets one
    bare = json.loads(b.read_text())
    del bare["runs"][0]["summary"]
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    assert cmd.run(parse(["--combine", str(tmp_path / "bare.json"), "--json", str(out)]), cfg) == 0
    assert json.loads(out.read_text())["runs"][0]["summary"]["best_gain_points"] == pytest.approx(35.0)


def test_files_given_one_label_are_repeats_quoted_by_their_median(tmp_path, capsys):
    cfg = config_from(argparse.Namespace(), environ={})
    files = []
    for seed, (up1, up2) in enumerate([(0.45, 0.6), (0.3, 0.25), (0.5, 0.55)]):  # gains +40, +10, +35 over 0.2
        doc = json.loads(_results_file(tmp_path / f"s{seed}.json", {"concise"}).read_text())
        run = doc["runs"][0]
        run["seed"] = seed
        run["cycles"][0]["eval"]["desirable_rate"], run["cycles"][1]["eval"]["desirable_rate"] = up1, up2
        run["summary"] = report.summarize(run["base"], run["cycles"])
        (tmp_path / f"s{seed}.json").write_text(json.dumps(doc))
        files.append(tmp_path / f"s{seed}.json")
    other = _results_file(tmp_path / "other.json", {"concise"}, first_lora_layer="20")
    out = tmp_path / "all.json"
    args = [f"{f}=K15" for f in files] + [str(other), "--json", str(out)]
    assert cmd.run(parse(["--combine", *args]), cfg) == 0
    doc = json.loads(out.read_text())
    assert [r["label"] for r in doc["runs"]] == ["concise, K15 (seed 0)", "concise, K15 (seed 1)",
                                                 "concise, K15 (seed 2)", "concise"]
    k15, alone = doc["repeats"]
    assert (k15["group"], k15["n_runs"], k15["seeds"]) == ("K15", 3, [0, 1, 2])
    assert k15["best_gain_points"] == pytest.approx([40.0, 10.0, 35.0])
    assert k15["median_best_gain_points"] == pytest.approx(35.0)
    assert k15["final_gain_points"] == pytest.approx([40.0, 5.0, 35.0])
    assert k15["median_final_gain_points"] == pytest.approx(35.0)
    assert k15["runs_meeting_all_goals"] == 2 and k15["codes"] == ["abc1234"]
    assert k15["median_desirable_rate_by_cycle"] == pytest.approx([0.2, 0.45, 0.55])
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"  # the plot draws the median line
    assert (alone["group"], alone["n_runs"], alone["runs_meeting_all_goals"]) == (None, 1, 1)
    printed = capsys.readouterr().out
    assert "concise, K15: 3 repeats, gain median +35.0 points (each +40.0, +10.0, +35.0)" in printed
    assert "all goals met in 2 of 3" in printed
    # LABEL#RUN names a repeat (older files did not record their seed); the group is the part before '#'
    named = [f"{f}=K15#s{i}" for i, f in enumerate(files)]
    assert cmd.run(parse(["--combine", *named, "--json", str(out)]), cfg) == 0
    doc = json.loads(out.read_text())
    assert [r["label"] for r in doc["runs"]] == ["concise, K15 (s0)", "concise, K15 (s1)", "concise, K15 (s2)"]
    assert [(g["group"], g["n_runs"]) for g in doc["repeats"]] == [("K15", 3)]
    # without labels, identical settings make repeats too
    doc = report.combine([(str(f), json.loads(f.read_text()), None) for f in files])
    assert [(g["n_runs"], g["median_best_gain_points"]) for g in doc["repeats"]] == [(3, 35.0)]
    assert [r["label"] for r in doc["runs"]] == ["concise (seed 0)", "concise (seed 1)", "concise (seed 2)"]


def test_combine_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    cfg = config_from(argparse.Namespace(), environ={})
    good = _results_file(tmp_path / "a.json", {"concise"})
    out = tmp_path / "all.json"
    (tmp_path / "broken.json").write_text('{"kind": "kto-loop simulate", "runs": [')
    (tmp_path / "other.json").write_text('{"kind": "benchmark", "runs": []}')
    (tmp_path / "empty.json").write_text('{"kind": "kto-loop simulate", "runs": []}')
    (tmp_path / "norater.json").write_text('{"kind": "kto-loop simulate", "runs": [{"base": {}}]}')
    (tmp_path / "noeval.json").write_text('{"kind": "kto-loop simulate", "runs": [{"rater": "r", "base": {}, '
                                          '"cycles": [{}]}]}')
    for bad, says in [("missing.json", "cannot read it as JSON"), ("broken.json", "cannot read it as JSON"),
                      ("other.json", "not a `kto-loop simulate` results file"),
                      ("norater.json", "a run without rater, base and cycles"),
                      ("noeval.json", "a run whose measurements cannot be read")]:
        assert cmd.run(parse(["--combine", str(good), str(tmp_path / bad), "--json", str(out)]), cfg) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1
    assert cmd.run(parse(["--combine", str(tmp_path / "empty.json"), "--json", str(out)]), cfg) == 2
    assert "nothing to combine" in capsys.readouterr().err
    assert not out.exists() and not out.with_suffix(".png").exists()


def test_fresh_config_never_points_at_the_production_store(tmp_path):
    cfg = config_from(argparse.Namespace(), environ={})
    fresh = sim.fresh_config(cfg, tmp_path / "r")
    assert fresh.db_path == tmp_path / "r" / "feedback.duckdb" and fresh.adapter_dir == tmp_path / "r" / "adapters"
    assert fresh.vllm_port == 0 and fresh.db_path != cfg.db_path


def test_simulate_refuses_a_used_work_dir(tmp_path):
    (tmp_path / "concise").mkdir()
    (tmp_path / "concise" / "feedback.duckdb").write_text("x")
    spec = sim.SimSpec("concise", inputs.load_rater("concise")[1])
    cfg = config_from(argparse.Namespace(), environ={})
    with pytest.raises(inputs.SimulationError, match="not empty"):
        sim.simulate(cfg, [spec], tmp_path, log=lambda m: None, build_stack=lambda c: pytest.fail("started"))


def parse(argv):
    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    return p.parse_args(argv)


def test_command_bad_input_is_a_one_line_error(tmp_path, capsys):
    cfg = config_from(argparse.Namespace(), environ={})
    out = tmp_path / "r.json"
    assert cmd.run(parse(["--rater", "nope", "--json", str(out)]), cfg) == 2
    assert "bad rater" in capsys.readouterr().err
    assert cmd.run(parse(["--cycles", "0", "--json", str(out)]), cfg) == 2
    assert "--cycles must be at least 1" in capsys.readouterr().err
    overlap = tmp_path / "h.jsonl"
    overlap.write_text(inputs.DEFAULT_PROMPTS.read_text().splitlines()[0] + "\n")
    assert cmd.run(parse(["--holdout", str(overlap), "--json", str(out)]), cfg) == 2
    assert "also in the training prompts" in capsys.readouterr().err
    assert not out.exists()


def test_parallel_map_keeps_order_and_does_not_run_the_queue_after_an_error():
    import threading
    import time

    assert measure.parallel_map(lambda x: x * x, list(range(20)), 4) == [x * x for x in range(20)]
    started: list[int] = []
    lock = threading.Lock()

    def job(i):
        with lock:
            started.append(i)
        if i == 0:
            raise KeyboardInterrupt  # what Ctrl-C looks like to the simulator
        time.sleep(0.05)
        return i

    with pytest.raises(KeyboardInterrupt):
        measure.parallel_map(job, list(range(200)), 2)
    time.sleep(0.3)
    assert len(started) < 50  # the queued chats were cancelled, not all 200 run


def test_refused_candidate_is_only_a_guard_refusal():
    guard = {"candidate": "kto-v3", "served": "kto-v2", "ok": False}
    assert sim.refused_candidate({"promoted": False, "capability_guard": guard}) == "kto-v3"
    assert sim.refused_candidate({"promoted": True, "capability_guard": dict(guard, ok=True)}) is None
    assert sim.refused_candidate({"promoted": False, "capability_guard": None}) is None  # the gate said no first
    assert sim.refused_candidate({"promoted": False}) is None


def test_refused_candidate_is_the_final_adapter_even_when_a_checkpoint_was_promoted():
    from types import SimpleNamespace

    guard = {"candidate": "kto-v4", "served": "kto-v1", "ok": False, "candidate_correct": 19}
    manifest = {"candidates": [
        {"candidate": "final", "step": None, "version": "kto-v4", "promoted": False, "reason": "no",
         "capability_guard": guard},
        {"candidate": "step 11/22", "step": 11, "version": "kto-v5", "promoted": True, "reason": "yes",
         "capability_guard": dict(guard, candidate="kto-v5", ok=True, candidate_correct=32, candidate_loops=2,
                                  floor_loops=1, loops_ok=True)}],
        "promoted_checkpoint": {"step": 11}}
    rec = sim._cycle_record(SimpleNamespace(run_id="r", status="promoted", promoted=True, reason="yes",
                                            version="kto-v5", manifest=manifest))
    assert rec["promoted_step"] == 11
    assert [(c["version"], c["capability_correct"], c["capability_ok"]) for c in rec["candidates"]] == [
        ("kto-v4", 19, False), ("kto-v5", 32, True)]
    assert "candidate_loops" not in rec["candidates"][0]  # refused by the probe: no loop check ran
    assert (rec["candidates"][1]["candidate_loops"], rec["candidates"][1]["loops_ok"]) == (2, True)
    assert sim.refused_candidate(rec) == "kto-v4"
    gate_said_no = dict(rec, candidates=[{"candidate": "final", "version": None, "promoted": False}])
    assert sim.refused_candidate(gate_said_no) is None  # never loaded: nothing to measure


def test_evenly_spaced_keeps_every_part_of_the_list():
    items = [f"p{i}" for i in range(58)]
    picked = inputs.evenly_spaced(items, 40)
    assert len(picked) == 40 == len(set(picked)) and picked[0] == "p0" and picked[-1] in items[-3:]
    assert inputs.evenly_spaced(items, 0) == items and inputs.evenly_spaced(items, 100) == items


def test_collect_refills_unrated_answers_at_full_concurrency_and_never_overshoots():
    """Chats stream: an unrated answer is replaced at once, in flight never exceeds the ratings still missing."""
    import threading

    class Service:
        def __init__(self):
            self.lock = threading.Lock()
            self.in_flight = self.peak = 0
            self.rated: list[tuple[str, bool]] = []
            self.over: list[tuple[int, int]] = []  # (in flight, ratings missing) whenever in flight > missing
            self.rated_during_chats = 0  # ratings stored while other chats were still generating

        def session(self, user, name):
            return type("S", (), {"turns": [], "user": user})()

        def send(self, sess, prompt):
            with self.lock:
                self.in_flight += 1
                self.peak = max(self.peak, self.in_flight)
                missing = 10 - len(self.rated)
                if self.in_flight > missing:
                    self.over.append((self.in_flight, missing))
            time.sleep(0.02 if "slow" not in prompt else 0.1)
            sess.turns.append(prompt)
            with self.lock:
                self.in_flight -= 1
            yield f"answer to {prompt}"

        def rate(self, sess, turn, verdict):
            with self.lock:
                self.rated.append((sess.turns[turn], verdict))
                self.rated_during_chats += self.in_flight > 0

    svc = Service()
    prompts = [f"p{i}" + (" slow" if i % 4 == 0 else "") + (" skip" if i % 3 == 0 else "") for i in range(12)]
    stats, cursor = sim.collect(svc, prompts, lambda p, a: None if "skip" in p else "slow" in p, 10, cursor=5,
                                tag="t", workers=4)
    assert stats["ratings"] == len(svc.rated) == 10 and stats["answers"] == 10 + stats["not_rated"]
    assert stats["not_rated"] >= 3 and cursor == 5 + stats["answers"]
    assert svc.peak == 4 and not svc.over and svc.rated_during_chats >= 5
    assert {p for p, _ in svc.rated} <= {prompts[i % 12] for i in range(5, cursor)}
    assert stats["up"] == sum(v for _, v in svc.rated)
    # the answer cap still holds when the rater rates almost nothing
    svc2 = Service()
    stats2, _ = sim.collect(svc2, prompts, lambda p, a: True if p == "p1" else None, 10, cursor=0, tag="u",
                            workers=4, max_answers=15)
    assert stats2["answers"] == 15 and stats2["ratings"] == 2


def test_results_name_the_code_that_made_them(tmp_path):
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    assert report.code_version(tmp_path) is None  # not a checkout
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "--short", "HEAD")
    assert report.code_version(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert report.code_version(tmp_path) == head + "-dirty"


def test_the_code_version_is_the_one_the_run_started_with(tmp_path, monkeypatch):
    """Results files get committed while a long simulation runs; the JSON must still name the code that ran."""
    import contextlib

    versions = iter(["abc1234", "def5678-dirty"])
    monkeypatch.setattr(sim, "code_version", lambda root=report.SOURCE_ROOT: next(versions))

    def one_run(stack, spec, log, checkpoint):
        rec = {"rater": spec.rater_name, "base": {}, "cycles": []}
        checkpoint(rec)
        next(versions)  # a commit lands mid-run
        checkpoint(rec)
        return rec

    monkeypatch.setattr(sim, "simulate_one", one_run)
    monkeypatch.setattr(sim, "evidence", lambda stack: {})
    cfg = config_from(argparse.Namespace(), environ={"KTO_LOOP_HOME": str(tmp_path / "home")})
    updates = []
    doc = sim.simulate(cfg, [sim.SimSpec("coin", lambda p, a: True)], tmp_path / "work",
                       build_stack=lambda c: contextlib.nullcontext(object()), on_update=updates.append)
    assert [u["code"] for u in updates] + [doc["code"]] == ["abc1234"] * 4


# ---------------------------------------------------------------- robustness cases through the loop and the command


def likes_lists(prompt, answer):
    return answer.startswith("- ")


def likes_long(prompt, answer):
    return len(answer.split()) > 20


def likes_short(prompt, answer):
    return len(answer.split()) <= 20


class FakeRealigner:
    """Stands in for the aligner only: exports the store's snapshot as the real one does, then 'promotes'."""

    def __init__(self, store, registry, work_dir):
        self.store, self.registry, self.work_dir, self.runs = store, registry, work_dir, 0

    def run(self, trigger, progress=None):
        self.runs += 1
        run_dir = self.work_dir / f"run-{self.runs}"
        run_dir.mkdir(parents=True)
        self.store.export_snapshot(run_dir / "snapshot.parquet")  # every rating so far, as a fresh-mode run
        self.registry.name = f"kto-v{self.runs}"
        return SimpleNamespace(run_id=str(self.runs), status="promoted", promoted=True, reason="promoted",
                               version=self.registry.name, manifest={})


def test_a_robustness_case_runs_through_the_loop_and_is_measured_per_preference(store, tmp_path):
    from app.sim.population import Case

    registry = FakeRegistry("base")
    stack = SimpleNamespace(cfg=config_from(argparse.Namespace(), environ={}), store=store, client=CannedClient(),
                            registry=registry, server=object(),
                            settings=SimpleNamespace(load=lambda: SimpleNamespace(system_prompt="sys")),
                            realigner=FakeRealigner(store, registry, tmp_path / "work"))
    case = Case(("lists", likes_lists), (("long", likes_long, 0.3),), change_at=1, after=("short", likes_short),
                attacker_share=0.25, attacker_identities=3)
    spec = sim.SimSpec("lists70+long30", likes_lists, cycles=2, ratings_per_cycle=24,
                       prompts=["give me a list", "explain tides", "a list again", "why?"], holdout=["a list", "no"],
                       capability=[gate.Question("What is the capital of France?", ("Paris",))], samples_per_prompt=2,
                       capability_repeats=1, workers=4, case=case)
    rec = sim.simulate_one(stack, spec, log=lambda m: None)
    assert rec["case"]["after"] == "short" and rec["case"]["attacker"] == "attacker (not lists)"
    # every preference is measured on the same held-out answers, with the clean raters
    assert set(rec["base"]["by_rater"]) == {"lists", "long", "short", "attacker (not lists)"}
    assert rec["base"]["by_rater"]["lists"]["desirable_rate"] == rec["base"]["desirable_rate"] == 0.5
    assert rec["base"]["by_rater"]["attacker (not lists)"]["desirable_rate"] == 0.5
    c1, c2 = rec["cycles"]
    # before the change the majority is `lists`, after cycle 1 `short`; the attacker keeps opposing `lists`
    assert set(c1["collect"]["by_group"]) <= {"lists", "long", "attacker"} and "lists" in c1["collect"]["by_group"]
    assert "short" in c2["collect"]["by_group"] and "lists" not in c2["collect"]["by_group"]
    # the attacker's share of what each run trained on, read from the snapshot the run wrote
    attacker_ratings = 0
    for n, c in ((24, c1), (48, c2)):
        g = c["collect"]["by_group"].get("attacker", {"up": 0, "down": 0})
        attacker_ratings += g["up"] + g["down"]
        assert c["snapshot_sources"]["n"] == n
        assert c["snapshot_sources"]["attacker_share"] == pytest.approx(attacker_ratings / n)
    assert attacker_ratings > 0
    s = rec["summary"]
    assert list(s["rates_by_rater"]) == ["lists", "long", "short", "attacker (not lists)"]
    assert len(s["rates_by_rater"]["long"]) == 3 and len(s["attacker_share_by_cycle"]) == 2
    # canned answers never change, so nothing moves: the goals say so
    assert s["goals"]["gain_30_points_in_2_cycles"] is False
    assert s["goals"]["follows_change_in_2_cycles"] is None  # one cycle after the change: not yet judged
    assert s["goals"]["minorities_keep_half_their_rate"] is True and s["goals"]["not_toward_attacker"] is True
    assert rec["rater_heldout"] is False


def fake_simulate(captured):
    """`simulate` without a stack: records the specs, returns a document of canned runs (one per spec)."""

    def simulate(cfg, specs, work_dir, log=print, on_update=None):
        captured.extend(specs)
        base = fake_doc(ablation=False)["runs"][0]
        runs = []
        for i, spec in enumerate(specs):
            cycles = [dict(c, eval=dict(c["eval"], desirable_rate=c["eval"]["desirable_rate"] - 0.1 * i))
                      for c in base["cycles"]]
            runs.append({"rater": spec.rater_name, "seed": spec.seed, "base": base["base"], "cycles": cycles,
                         "summary": report.summarize(base["base"], cycles)})
        return {"kind": "kto-loop simulate", "runs": runs, "repeats": report.repeats(runs)}

    return simulate


def test_command_builds_seeds_and_cases_and_reports_minimum_median_and_every_seed(tmp_path, monkeypatch, capsys):
    cfg = config_from(argparse.Namespace(), environ={"KTO_LOOP_HOME": str(tmp_path / "home")})
    out = tmp_path / "r.json"
    specs: list = []
    monkeypatch.setattr(sim, "simulate", fake_simulate(specs))
    assert cmd.run(parse(["--rater", "concise", "--seeds", "3", "--seed", "5", "--json", str(out)]), cfg) == 0
    assert [(s.rater_name, s.seed, s.case) for s in specs] == [("concise", 5, None), ("concise", 6, None),
                                                               ("concise", 7, None)]  # plain: no case at all
    printed = capsys.readouterr().out
    # gains +40, +30, +20 over the three seeds (the canned cycles lowered by 10 points per seed)
    assert "concise (seed 6): desirable 20.0% → 50.0%" in printed
    assert "concise: 3 repeats, gain median +30.0 points (each +40.0, +30.0, +20.0)" in printed
    assert "minimum gain +20.0" in printed
    assert "in every seed: gain 30 points in 2 cycles: FAILED; capability 95pct every cycle: held" in printed
    assert json.loads(out.read_text())["repeats"][0]["goals_in_every_seed"]["gain_30_points_in_2_cycles"] is False

    specs.clear()
    assert cmd.run(parse(["--mix", "bullets:0.3,concise:0.7", "--flip", "0.2", "--rate-prob", "0.33",
                          "--json", str(out)]), cfg) == 0
    (spec,) = specs
    assert spec.rater_name == "concise70+bullets30" and spec.case.main[0] == "concise"
    assert [(n, s) for n, _, s in spec.case.minorities] == [("bullets", 0.3)]
    assert (spec.case.flip, spec.case.rate_prob) == (0.2, 0.33)

    specs.clear()
    assert cmd.run(parse(["--rater", "concise", "--rater", "plain", "--cycles", "4", "--change-at", "2",
                          "--rater-after", "numbers", "--attacker-share", "0.3", "--attacker-identities", "50",
                          "--json", str(out)]), cfg) == 0
    assert [s.rater_name for s in specs] == ["concise", "plain"]
    assert all(s.case.after[0] == "numbers" and s.case.change_at == 2 and s.case.attacker_share == 0.3
               and s.case.attacker_identities == 50 for s in specs)


@pytest.mark.parametrize("argv,says", [
    (["--mix", "concise:0.7,bullets:0.3", "--rater", "concise"], "leave out --rater"),
    (["--mix", "concise:0.7,bullets:0.2"], "sum to 1"),
    (["--change-at", "2", "--rater-after", "plain"], "leaves no cycle after the change"),
    (["--rater-after", "plain"], "go together"),
    (["--change-at", "1", "--rater-after", "concise", "--rater", "concise"], "must differ"),
    (["--flip", "0.7"], "--flip"),
    (["--rate-prob", "0"], "--rate-prob"),
    (["--attacker-share", "0.3", "--attacker-identities", "0"], "--attacker-identities"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--rater-after", "nope", "--change-at", "1"], "bad rater"),
])
def test_command_refuses_bad_robustness_options_in_one_line(argv, says, tmp_path, capsys, monkeypatch):
    cfg = config_from(argparse.Namespace(), environ={})
    monkeypatch.setattr(sim, "simulate", lambda *a, **k: pytest.fail("started"))
    out = tmp_path / "r.json"
    assert cmd.run(parse([*argv, "--json", str(out)]), cfg) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_simulate_gives_each_seed_its_own_fresh_store(tmp_path, monkeypatch):
    import contextlib

    seen = []
    monkeypatch.setattr(sim, "simulate_one", lambda stack, spec, log, checkpoint: {
        "rater": spec.rater_name, "base": {}, "cycles": [], "seed": spec.seed})
    monkeypatch.setattr(sim, "evidence", lambda stack: {})
    monkeypatch.setattr(sim, "document", lambda cfg, specs, t0, runs, code: {"runs": runs})

    def build(c):
        seen.append(c.data_dir)
        return contextlib.nullcontext(object())

    cfg = config_from(argparse.Namespace(), environ={"KTO_LOOP_HOME": str(tmp_path / "home")})
    specs = [sim.SimSpec("a", likes_lists, seed=s) for s in (0, 1)] + [sim.SimSpec("b", likes_lists)]
    sim.simulate(cfg, specs, tmp_path / "w", build_stack=build)
    assert seen == [tmp_path / "w" / "a-seed0", tmp_path / "w" / "a-seed1", tmp_path / "w" / "b"]
