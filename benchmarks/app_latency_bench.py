"""Chat latency (time to first token, full answer) while idle vs while a realignment run trains, one run.

Brings up the real stack (`build_stack`: vLLM child + DuckDB + registry + realigner), seeds rated answers, then
sends the same chat requests through the app's ChatService (a) with nothing else going on and (b) while the
aligner subprocess trains. Prints the ratios and writes benchmarks/results/app_latency_bench/<date>_<cpu>.json.

    .venv/bin/python -m benchmarks.app_latency_bench [--model-dir DIR] [--requests 12] [--align-args "..."]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from app.config import Config, config_from
from app.main import build_stack, sampling_for
from app.web.chat import ChatService
from benchmarks.harness import machine, result_path

PROMPTS = ["What is the capital of France?", "Give me three tips for sleeping better.",
           "Explain what a hash table is.", "Write a haiku about autumn.", "How do plants make food?",
           "What is 17 times 23?"]




def one_chat(service: ChatService, i: int) -> tuple[float, float]:
    sess = service.session(f"bench-{i}-{time.time()}", "bench-user")
    t0 = time.perf_counter()
    ttft = None
    for _ in service.send(sess, PROMPTS[i % len(PROMPTS)]):
        if ttft is None:
            ttft = time.perf_counter() - t0
    return ttft or 0.0, time.perf_counter() - t0


def seed(store, n: int = 24) -> None:
    conv = store.new_conversation("seed")
    for i in range(n):
        m = store.add_user_message(conv, f"question {i}")
        a = store.add_answer(conv, m, [{"role": "user", "content": f"question {i}"}],
                             f"A clear, helpful answer number {i}." if i % 3 else "meh", adapter="base")
        store.rate("seed", a, "up" if i % 3 else "down")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--align-args", default="--max-steps 30")
    ap.add_argument("--out", type=Path, default=result_path("app_latency_bench"))
    args = ap.parse_args()

    base = config_from(None)
    data = Path(tempfile.mkdtemp(prefix="kto-bench-"))
    cfg = Config(home=base.home, model_dir=args.model_dir or base.model_dir, data_dir=data, vllm_port=0,
                 max_tokens=args.max_tokens, temperature=0.0, align_extra_args=args.align_args,
                 promote_min_gain=-1e9).resolved()
    with build_stack(cfg) as st:
        service = ChatService(st.store, st.client, st.registry, system_prompt=lambda: cfg.system_prompt,
                              sampling=lambda: sampling_for(cfg), max_chars=4000, ratings_per_minute=1000)
        seed(st.store)
        one_chat(service, 0)  # warm-up
        idle = [one_chat(service, i) for i in range(args.requests)]

        outcome: dict = {}
        train = threading.Thread(target=lambda: outcome.update(out=st.realigner.run("cli")), daemon=True)
        train.start()
        while st.realigner.status.phase not in ("train",) and train.is_alive():
            time.sleep(0.2)
        time.sleep(8)  # let the aligner get past model loading into the training steps
        during, i = [], 0
        while train.is_alive() and i < args.requests:
            during.append(one_chat(service, i))
            i += 1
        train.join()
        res = outcome.get("out")

    def med(xs, k):
        return statistics.median(x[k] for x in xs) if xs else None

    out = {
        "machine": machine(), "model_dir": str(cfg.model_dir), "max_tokens": args.max_tokens,
        "align_args": args.align_args, "requests_idle": len(idle), "requests_during_training": len(during),
        "ttft_s_median": {"idle": med(idle, 0), "training": med(during, 0)},
        "answer_s_median": {"idle": med(idle, 1), "training": med(during, 1)},
        "run": None if res is None else {"status": res.status, "reason": res.reason},
    }
    if during:
        out["ratio_training_over_idle"] = {"ttft": med(during, 0) / med(idle, 0),
                                           "answer": med(during, 1) / med(idle, 1)}
    print(json.dumps(out, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
