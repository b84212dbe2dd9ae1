"""Admission control for the product's own requests: what the capability probe costs people chatting, with and without.

probe_priority_bench.py showed that vLLM's request priority does not shield running chats: the guard's 33
questions, sent all at once at priority +1, took 8 users' tokens/s from 38.3 to 21.4. serving/admission.py holds
the product's own ("background") requests to a few in flight while anyone chats. This benchmark runs the probe
(greedy, up to 64 tokens, priority +1, all questions handed over at once as the guard does) on one vLLM server with
kto-loop's spec while 8 simulated users chat, in these ways, interleaved, twice each:
1. `no_admission`: every question in flight at once (the guard before admission control);
2. `admission_2`: at most 2 in flight while users chat (the default, KTO_LOOP_BACKGROUND_WHILE_CHATTING=2);
3. `admission_4`: at most 4;
4. `no_probe`: users alone, the baseline (20 s windows).
Users chat through a client sharing the same Admission, as in the app. For each window (the probe's duration):
the users' time to first token (median, p90) and their streamed tokens/s. Then, with nobody chatting, the probe
through the same Admission, which must run as fast as without it (all at once). Medians quoted.

Run: `.venv/bin/python -m benchmarks.admission_bench` (about 12 minutes on 2 cores). Writes
benchmarks/results/admission_bench/<date>_<cpu>.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from app.loop.gate import http_ask, load_capability, probe
from benchmarks.harness import machine, result_path, write_result
from benchmarks.probe_priority_bench import (
    TOKENS,
    USERS,
    Users,
    _fmt,
    _ratio,
    medians,
    served_and_candidate,
)
from serving.admission import Admission
from serving.server import PRIORITY_BACKGROUND

CONDITIONS = {"no_admission": None, "admission_2": 2, "admission_4": 4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path,
                    default=Path("~/.cache/kto-loop/models/SmolLM2-135M-Instruct").expanduser())
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=result_path("admission_bench"))
    args = ap.parse_args()
    t_all = time.perf_counter()
    questions = load_capability()
    result: dict = {"benchmark": "admission", "machine": machine(), "users": USERS, "user_tokens": TOKENS,
                    "questions": len(questions), "probe_priority": PRIORITY_BACKGROUND,
                    "quoted": f"medians of {args.reps} interleaved repetitions", "under_load": {}, "idle": {}}
    with tempfile.TemporaryDirectory(prefix="admission-bench-") as tmp:
        tmp = Path(tmp)
        with served_and_candidate(args.model_dir, tmp) as (server, client, served):
            # first use of the candidate, not timed
            probe(http_ask(server.base_url, api_key=server.api_key), "candidate", questions)
            runs: dict[str, list[dict]] = {k: [] for k in [*CONDITIONS, "no_probe"]}
            with Users(client, served) as users:
                time.sleep(10)  # users reach a steady state
                for rep in range(args.reps):
                    for name, limit in CONDITIONS.items():
                        adm = Admission(while_users=limit) if limit else None
                        client.admission = adm  # the users' chats count as "user" in the same Admission,
                        t_wait = time.perf_counter()  # as in the app, where it lives as long as the server:
                        while adm and adm.stats()["in_flight"]["user"] < USERS and time.perf_counter() - t_wait < 60:
                            time.sleep(0.1)  # every user's next chat has started under it
                        ask = http_ask(server.base_url, api_key=server.api_key, priority=PRIORITY_BACKGROUND,
                                       admission=adm)
                        t0 = time.perf_counter()
                        res = probe(ask, "candidate", questions)
                        t1 = time.perf_counter()
                        w = users.window(t0, t1)
                        runs[name].append({**w, "probe_s": t1 - t0, "probe_correct": res.correct,
                                           "admission": adm.stats() if adm else None})
                        print(f"  rep {rep} {name:13s}: probe {t1 - t0:5.1f}s; users: {_fmt(w)}", flush=True)
                        time.sleep(3)
                    runs["no_probe"].append(w := users.baseline())
                    print(f"  rep {rep} no_probe     : users: {_fmt(w)}", flush=True)
            client.admission = None
            result["user_errors"] = len(users.errors)
            result["under_load"] = medians(runs)
            # Nobody chatting: the default Admission must not slow the probe (its quiet time has long passed).
            idle: dict[str, list[float]] = {"no_admission": [], "admission_2": []}
            for _ in range(args.reps):
                for name, limit in (("no_admission", None), ("admission_2", 2)):
                    adm = Admission(while_users=limit) if limit else None
                    t0 = time.perf_counter()
                    probe(http_ask(server.base_url, api_key=server.api_key, priority=PRIORITY_BACKGROUND,
                                   admission=adm), "candidate", questions)
                    idle[name].append(time.perf_counter() - t0)
            result["idle"] = {k: {"runs": v, "probe_s": statistics.median(v)} for k, v in idle.items()}
            print(f"  idle: probe without admission {result['idle']['no_admission']['probe_s']:.1f}s, with "
                  f"{result['idle']['admission_2']['probe_s']:.1f}s", flush=True)
    u = result["under_load"]
    result["ratios"] = {
        "user_tok_s_admission_2_over_no_admission": _ratio(u["admission_2"]["user_tok_s"],
                                                           u["no_admission"]["user_tok_s"]),
        "user_tok_s_admission_2_over_no_probe": _ratio(u["admission_2"]["user_tok_s"], u["no_probe"]["user_tok_s"]),
        "user_tok_s_no_admission_over_no_probe": _ratio(u["no_admission"]["user_tok_s"],
                                                        u["no_probe"]["user_tok_s"]),
        "user_ttft_no_admission_over_admission_2": _ratio(u["no_admission"]["user_ttft_median_s"],
                                                          u["admission_2"]["user_ttft_median_s"]),
        "probe_s_admission_2_over_no_admission": _ratio(u["admission_2"]["probe_s"], u["no_admission"]["probe_s"]),
        "probe_s_admission_4_over_no_admission": _ratio(u["admission_4"]["probe_s"], u["no_admission"]["probe_s"]),
        "idle_probe_s_admission_2_over_no_admission": _ratio(result["idle"]["admission_2"]["probe_s"],
                                                             result["idle"]["no_admission"]["probe_s"]),
    }
    write_result(result, args.out, t_all)


if __name__ == "__main__":
    main()
