"""What the promotion gate's capability probe costs the people chatting, and how long it takes, side by side in one run.

Before an adapter is served, the capability guard (app/loop/gate.py) asks it the 33 shipped factual questions
(greedy, up to 64 tokens). This benchmark runs that probe on one vLLM server (kto-loop's spec: priority
scheduling) while simulated users chat, in four ways:
1. `old`: 8 questions at a time at the users' priority (0), the guard as it was;
2. `all_at_once_p0`: every question at once, priority 0;
3. `all_at_once_p1`: every question at once, priority +1 (serving.server.PRIORITY_BACKGROUND), the guard now;
4. `no_probe`: users alone, the baseline.
Users: 8 threads, each sending one streamed chat after another (32 tokens, ignore_eos, temperature 0) on the served
adapter. For each window (the probe's duration; 20 s for the baseline): the users' time to first token (median and
p90 of the chats started in it) and their streamed tokens per second. Then the probe alone on the idle server (8 at
a time vs all at once), which is what a realignment cycle waits for. Each probe condition runs twice, interleaved;
medians quoted.

Run: `.venv/bin/python -m benchmarks.probe_priority_bench` (about 5 minutes on 2 cores). Writes
benchmarks/results/probe_priority_bench/<date>_<cpu>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from app.loop.gate import http_ask, load_capability, probe
from benchmarks.harness import PROMPTS, machine, make_adapter, result_path, write_result
from serving.client import ChatClient, SamplingParams
from serving.registry import AdapterRegistry
from serving.server import PRIORITY_BACKGROUND, VLLMServer, VLLMServerSpec

USERS = 8
TOKENS = 32
BASELINE_WINDOW_S = 20.0
CONDITIONS = {"old": (8, 0), "all_at_once_p0": (0, 0), "all_at_once_p1": (0, PRIORITY_BACKGROUND)}


class Users:
    """USERS threads chatting back to back; every streamed chunk and every first token is timestamped."""

    def __init__(self, client: ChatClient, model: str) -> None:
        self.client, self.model = client, model
        self.sampling = SamplingParams(temperature=0.0, max_tokens=TOKENS, extra={"ignore_eos": True})
        self.chunks: list[float] = []
        self.firsts: list[tuple[float, float]] = []  # (request start, time to first token)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(u,), daemon=True) for u in range(USERS)]

    def _loop(self, u: int) -> None:
        i = u
        while not self._stop.is_set():
            t0 = time.perf_counter()
            first = None
            try:
                for _ in self.client.stream_chat(PROMPTS[i % len(PROMPTS)], self.model, self.sampling):
                    now = time.perf_counter()
                    first = first if first is not None else now - t0
                    with self._lock:
                        self.chunks.append(now)
            except Exception as e:  # counted, not raised
                self.errors.append(f"{type(e).__name__}: {e}")
            if first is not None:
                with self._lock:
                    self.firsts.append((t0, first))
            i += USERS

    def __enter__(self) -> Users:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def baseline(self) -> dict:
        """The users alone for BASELINE_WINDOW_S."""
        t0 = time.perf_counter()
        time.sleep(BASELINE_WINDOW_S)
        return self.window(t0, time.perf_counter())

    def window(self, t0: float, t1: float) -> dict:
        with self._lock:
            ttfts = sorted(f for s, f in self.firsts if t0 <= s < t1)
            chunks = sum(t0 <= c < t1 for c in self.chunks)
        return {"seconds": t1 - t0, "user_chats_started": len(ttfts),
                "user_ttft_median_s": statistics.median(ttfts) if ttfts else None,
                "user_ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))] if ttfts else None,
                "user_tok_s": chunks / (t1 - t0)}


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def medians(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per condition: its runs and the median of each measured field."""
    return {name: {"runs": rs, **{k: _median([r[k] for r in rs]) for k in rs[0]
                                  if k not in ("user_chats_started", "admission")}}
            for name, rs in runs.items()}


def _fmt(w: dict) -> str:
    ttft = (f"first token {w['user_ttft_median_s']:.2f}s (p90 {w['user_ttft_p90_s']:.2f}s, "
            f"{w['user_chats_started']} chats)" if w["user_ttft_median_s"] is not None else "no chat started")
    return f"{ttft}, {w['user_tok_s']:.1f} tok/s"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


@contextlib.contextmanager
def served_and_candidate(model_dir: Path, tmp: Path) -> Iterator[tuple[VLLMServer, ChatClient, str]]:
    """A vLLM server with kto-loop's spec, a served adapter (promoted through the registry, as the app does) and a
    candidate loaded under the name "candidate" for the probe; yields (server, client, served version)."""
    import httpx

    make_adapter(model_dir, tmp / "served", seed=1)
    make_adapter(model_dir, tmp / "candidate", seed=2)
    spec = VLLMServerSpec(model_dir=model_dir, log_path=tmp / "vllm.log", auto_restart=False)
    with VLLMServer(spec) as server, ChatClient(server.base_url, read_timeout=600, api_key=server.api_key) as client:
        registry = AdapterRegistry(server, tmp / "registry.json", base_model_dir=model_dir)
        served = registry.promote(tmp / "served")
        r = httpx.post(f"{server.base_url.removesuffix('/v1')}/v1/load_lora_adapter",
                       json={"lora_name": "candidate", "lora_path": str(tmp / "candidate")}, timeout=300,
                       headers=server.auth_headers())
        r.raise_for_status()
        yield server, client, served


def timed_probe(ask, model: str, questions, workers: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = probe(ask, model, questions, workers)
    return time.perf_counter() - t0, r.correct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path,
                    default=Path("~/.cache/kto-loop/models/SmolLM2-135M-Instruct").expanduser())
    ap.add_argument("--out", type=Path, default=result_path("probe_priority_bench"))
    args = ap.parse_args()
    t_all = time.perf_counter()
    questions = load_capability()
    result: dict = {"benchmark": "probe_priority", "machine": machine(), "users": USERS, "user_tokens": TOKENS,
                    "questions": len(questions), "quoted": "medians of 2 interleaved repetitions", "under_load": {},
                    "idle": {}}
    with tempfile.TemporaryDirectory(prefix="probe-bench-") as tmp:
        tmp = Path(tmp)
        with served_and_candidate(args.model_dir, tmp) as (server, client, served):
            asks = {p: http_ask(server.base_url, api_key=server.api_key, priority=p or None)
                    for p in {p for _, p in CONDITIONS.values()}}
            timed_probe(asks[0], "candidate", questions, 0)  # first use of the candidate, not timed
            runs: dict[str, list[dict]] = {k: [] for k in [*CONDITIONS, "no_probe"]}
            with Users(client, served) as users:
                time.sleep(10)  # users reach a steady state
                for rep in range(2):
                    for name, (workers, prio) in CONDITIONS.items():
                        t0 = time.perf_counter()
                        secs, correct = timed_probe(asks[prio], "candidate", questions, workers)
                        w = users.window(t0, time.perf_counter())
                        runs[name].append({**w, "probe_s": secs, "probe_correct": correct})
                        print(f"  rep {rep} {name:15s}: probe {secs:5.1f}s; users: {_fmt(w)}", flush=True)
                        time.sleep(3)
                    runs["no_probe"].append(w := users.baseline())
                    print(f"  rep {rep} no_probe       : users: {_fmt(w)}", flush=True)
            result["user_errors"] = len(users.errors)
            result["under_load"] = medians(runs)
            idle: dict[str, list[float]] = {"old": [], "all_at_once": []}
            for _ in range(2):
                idle["old"].append(timed_probe(asks[0], "candidate", questions, 8)[0])
                idle["all_at_once"].append(timed_probe(asks[0], "candidate", questions, 0)[0])
            result["idle"] = {k: {"runs": v, "probe_s": statistics.median(v)} for k, v in idle.items()}
            print(f"  idle: probe 8 at a time {result['idle']['old']['probe_s']:.1f}s, all at once "
                  f"{result['idle']['all_at_once']['probe_s']:.1f}s", flush=True)
    u = result["under_load"]
    result["ratios"] = {
        "idle_probe_old_over_all_at_once": _ratio(result["idle"]["old"]["probe_s"],
                                                  result["idle"]["all_at_once"]["probe_s"]),
        "user_ttft_p0_over_p1": _ratio(u["all_at_once_p0"]["user_ttft_median_s"],
                                       u["all_at_once_p1"]["user_ttft_median_s"]),
        "user_ttft_old_over_p1": _ratio(u["old"]["user_ttft_median_s"], u["all_at_once_p1"]["user_ttft_median_s"]),
        "user_ttft_p1_over_no_probe": _ratio(u["all_at_once_p1"]["user_ttft_median_s"],
                                             u["no_probe"]["user_ttft_median_s"]),
        "user_tok_s_p1_over_p0": _ratio(u["all_at_once_p1"]["user_tok_s"], u["all_at_once_p0"]["user_tok_s"]),
        "user_tok_s_p1_over_old": _ratio(u["all_at_once_p1"]["user_tok_s"], u["old"]["user_tok_s"]),
        "user_tok_s_p1_over_no_probe": _ratio(u["all_at_once_p1"]["user_tok_s"], u["no_probe"]["user_tok_s"]),
        "probe_s_p1_over_p0": _ratio(u["all_at_once_p1"]["probe_s"], u["all_at_once_p0"]["probe_s"]),
        "probe_s_old_over_p1": _ratio(u["old"]["probe_s"], u["all_at_once_p1"]["probe_s"]),
    }
    write_result(result, args.out, t_all)


if __name__ == "__main__":
    main()
