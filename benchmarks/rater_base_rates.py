"""Base desirable rate of each simulated rater (app/sim/raters.RATERS): the base model's answers to the held-out
prompts and every third training prompt (2 samples each; temperature 0.7, top-p 0.95, 128 tokens, the app's system
prompt), rated.

Run: `.venv/bin/python -m benchmarks.rater_base_rates` (starts its own vLLM server, ~6 min on 2 cores), or
`--answers FILE` to re-rate saved answers. Writes benchmarks/results/rater_base_rates/<date>_<cpu>.json and the answers
(benchmarks/results/rater_base_rates/<date>_<cpu>.jsonl) so the figures in app/sim/raters.py can be checked.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from app.sim import raters
from app.sim.inputs import DEFAULT_HOLDOUT, DEFAULT_PROMPTS, load_prompts
from benchmarks.harness import machine, result_path


def generate(model_dir: Path) -> list[dict]:
    from serving.client import ChatClient, SamplingParams
    from serving.server import VLLMServer, VLLMServerSpec

    prompts = load_prompts(DEFAULT_HOLDOUT) + load_prompts(DEFAULT_PROMPTS)[::3]
    jobs = [p for p in prompts for _ in range(2)]
    sampling = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=128)
    with tempfile.TemporaryDirectory() as tmp:
        spec = VLLMServerSpec(model_dir=model_dir, log_path=Path(tmp) / "vllm.log", auto_restart=False)
        with VLLMServer(spec) as server, \
                ChatClient(server.base_url, read_timeout=600, api_key=server.api_key) as client, \
                ThreadPoolExecutor(16) as pool:
            def one(p: str) -> dict:
                msgs = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": p}]
                return {"prompt": p, "answer": client.chat(msgs, "base", sampling).text}
            return list(pool.map(one, jobs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path,
                    default=Path("~/.cache/kto-loop/models/SmolLM2-135M-Instruct").expanduser())
    ap.add_argument("--answers", type=Path, help="rate these saved answers (.jsonl) instead of generating")
    args = ap.parse_args()
    out_path = result_path("rater_base_rates")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if args.answers:
        rows = [json.loads(line) for line in args.answers.read_text().splitlines() if line.strip()]
    else:
        rows = generate(args.model_dir)
        with open(out_path.with_name(out_path.stem + "_answers.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    heldout = set(load_prompts(DEFAULT_HOLDOUT))
    out: dict = {"benchmark": "rater_base_rates", "answers": len(rows),
                 "machine": machine(),
                 "settings": {"temperature": 0.7, "top_p": 0.95, "max_tokens": 128, "samples_per_prompt": 2},
                 "answers_file": str(args.answers) if args.answers else "generated in this run",
                 "raters": {}}
    for name, fn in raters.RATERS.items():
        res = {}
        for part, sel in (("all", rows), ("heldout", [r for r in rows if r["prompt"] in heldout])):
            rated = [v for v in (fn(r["prompt"], r["answer"]) for r in sel) if v is not None]
            res[part] = {"rated": len(rated), "up": sum(rated), "rate": sum(rated) / max(1, len(rated))}
        out["raters"][name] = res
        print(f"{name:17s} all {res['all']['rate']:.1%} of {res['all']['rated']}   "
              f"held-out {res['heldout']['rate']:.1%} of {res['heldout']['rated']}")
    out_path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
