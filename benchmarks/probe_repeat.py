"""How repeatable is the capability probe? The same greedy questions, asked again and again of the same models.

Every capability number in the simulator's results and every decision of the promotion gate's capability guard
rests on 33 greedy answers from vLLM. Greedy decoding is deterministic only if the logits are: on a CPU in bf16
the kernels' rounding depends on how requests are batched together, so a question whose top two tokens are
nearly tied can flip between runs. The guard allows one lost question, so a flip is the size of the decision.

For the base model and each `--adapter`, served from one real vLLM server, this asks the probe `--repeats` times
in each of two ways:
- `alone`: the 33 questions at once on an idle server, as the capability guard asks them;
- `mixed`: the questions queued behind held-out sampling (`--holdout-limit` prompts × 2 at the served
  temperature), as the simulator's `measure()` asks them;
and reports per model the count correct each time, and each question that was not answered the same way
every time (with how often it was right). `--modes alone,mixed,joint` adds a third way, per adapter:
- `joint`: the adapter's 33 questions and the base model's 33 sent together in one burst, so the two models are
  compared inside one batching context (recorded as the adapter's count and the base's count per repeat).

Run: `.venv/bin/python benchmarks/probe_repeat.py --adapter NAME=DIR ... [--repeats 5]`
Writes benchmarks/results/probe_repeat.json (override with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.loop.capability import CAPABILITY_MAX_TOKENS, is_correct  # noqa: E402
from app.sim import run as sim  # noqa: E402
from serving.client import ChatClient, SamplingParams  # noqa: E402
from serving.server import VLLMServer, VLLMServerSpec  # noqa: E402

DEFAULT_MODEL = Path.home() / ".cache" / "kto-loop" / "models" / "SmolLM2-135M-Instruct"
SYSTEM_PROMPT = "You are a helpful assistant."  # the app's default, as the simulator and the guard send it


def ask_all(client: ChatClient, model: str, questions: list, mixed_prompts: list[str], workers: int) -> list[bool]:
    """One probe of `model`: per question, whether the greedy answer holds an accepted answer."""
    greedy = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=CAPABILITY_MAX_TOKENS)
    sampled = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=128)
    jobs = [(p, sampled) for p in mixed_prompts] + [(q.question, greedy) for q in questions]
    texts = sim.parallel_map(lambda j: sim.complete(client, sim._messages(SYSTEM_PROMPT, j[0]), model, j[1],
                                                    "background"), jobs, workers if mixed_prompts else len(jobs))
    answers = texts[len(mixed_prompts):]
    return [is_correct(a, q.answers) for q, a in zip(questions, answers, strict=True)]


def ask_joint(client: ChatClient, names: list[str], questions: list) -> list[list[bool]]:
    """One probe of several models at once, every question of every model in one burst: per model, per question."""
    greedy = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=CAPABILITY_MAX_TOKENS)
    jobs = [(n, q) for q in questions for n in names]  # interleaved: the models share every batch
    texts = sim.parallel_map(lambda j: sim.complete(client, sim._messages(SYSTEM_PROMPT, j[1].question), j[0], greedy,
                                                    "background"), jobs, len(jobs))
    right = {n: [] for n in names}
    for (n, q), a in zip(jobs, texts, strict=True):
        right[n].append(is_correct(a, q.answers))
    return [right[n] for n in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", action="append", default=[], help="NAME=ADAPTER_DIR, repeatable")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--holdout-limit", type=int, default=29, help="held-out prompts sampled in the mixed probes")
    ap.add_argument("--workers", type=int, default=16, help="concurrent requests in the mixed probes (as measure)")
    ap.add_argument("--modes", default="alone,mixed", help="comma-separated: alone, mixed, joint")
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/probe-repeat"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "probe_repeat.json")
    args = ap.parse_args()
    adapters = [a.partition("=")[::2] for a in args.adapter]
    if any(not n or not Path(d).is_dir() for n, d in adapters):
        raise SystemExit("--adapter takes NAME=DIR with an existing adapter directory")
    modes = args.modes.split(",")
    if not modes or not set(modes) <= {"alone", "mixed", "joint"}:
        raise SystemExit("--modes takes a comma-separated subset of alone, mixed, joint")
    questions = sim.load_capability()
    holdout = sim.evenly_spaced(sim.load_prompts(sim.DEFAULT_HOLDOUT), args.holdout_limit)
    mixed_prompts = [p for p in holdout for _ in range(2)]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    models: dict[str, dict] = {}
    with VLLMServer(VLLMServerSpec(model_dir=args.model_dir, log_path=args.work_dir / "vllm.log")) as server, \
            ChatClient(server.base_url, read_timeout=600) as client:
        for name, d in adapters:
            sim.load_for_eval(server, Path(d), name)
        for name in ["base", *(n for n, _ in adapters)]:
            rec: dict = {"adapter": dict(adapters).get(name)}
            for mode in (m for m in modes if m != "joint"):
                runs = [ask_all(client, name, questions, mixed_prompts if mode == "mixed" else [], args.workers)
                        for _ in range(args.repeats)]
                unstable = [{"question": q.question, "right": sum(r[i] for r in runs), "of": len(runs)}
                            for i, q in enumerate(questions) if len({r[i] for r in runs}) > 1]
                rec[mode] = {"correct": [sum(r) for r in runs], "unstable": unstable}
                print(f"{name} {mode}: {rec[mode]['correct']} of {len(questions)}; unstable "
                      f"{[(u['question'], u['right']) for u in unstable]}", file=sys.stderr, flush=True)
            if "joint" in modes and name != "base":
                runs = [ask_joint(client, [name, "base"], questions) for _ in range(args.repeats)]
                rec["joint"] = {"correct": [sum(r[0]) for r in runs], "base_correct": [sum(r[1]) for r in runs]}
                print(f"{name} joint: {rec['joint']['correct']}, base beside it {rec['joint']['base_correct']}",
                      file=sys.stderr, flush=True)
            models[name] = rec
    doc = {"benchmark": "probe_repeat", "machine": {**sim.machine_info(), "load_avg_at_start": load0,
                                                    "load_avg_at_end": os.getloadavg()[0]},
           "settings": {"repeats": args.repeats, "modes": modes, "n_questions": len(questions),
                        "mixed_sampled_requests": len(mixed_prompts), "workers": args.workers,
                        "max_tokens": CAPABILITY_MAX_TOKENS},
           "wall_seconds": round(time.perf_counter() - t0, 1), "models": models}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({n: {m: r[m]["correct"] for m in modes if m in r} for n, r in models.items()}))


if __name__ == "__main__":
    main()
