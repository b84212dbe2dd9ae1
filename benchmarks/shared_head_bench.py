"""The shared head (model.SharedHead) against whole sequences, pass by pass, interleaved in one process.

The aligner's passes are the reference pass (no gradient, every layer), the KL pass (no gradient) and the pass
with gradient; with `--first-lora-layer K` the last two start at layer K. This takes the training examples of a
real snapshot, length-sorted into micro-batches of 8 as the aligner batches them, and times one no-gradient
pass and one forward + backward over the same batches, head on and off alternately, `--repeats` times (this
machine's speed drifts within minutes; alternating keeps the drift out of the ratio). Medians, and ratios
off / on.

    .venv/bin/python -m benchmarks.shared_head_bench --snapshot RUN_DIR/snapshot.parquet [--batches 6] [--repeats 5]

Writes benchmarks/results/shared_head_bench/<date>_<cpu>.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from app.config import config_from
from benchmarks.harness import machine, result_path, write_result


def main() -> None:
    import torch

    from aligner.data import build_dataset
    from aligner.model import common_head, completion_logps, load_policy, load_tokenizer, set_shared_head

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshot", type=Path, required=True)
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--batches", type=int, default=6, help="micro-batches of 8, spread over the length range")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--first-lora-layer", type=int, default=0)
    ap.add_argument("--out", type=Path, default=result_path("shared_head_bench"))
    args = ap.parse_args()
    t_all = time.perf_counter()
    model_dir = args.model_dir or config_from().resolved().model_dir
    tok = load_tokenizer(model_dir)
    data = build_dataset(args.snapshot, tok, 512, 0.1, 200, 3)
    seqs = sorted(((ex.prompt_ids, ex.completion_ids) for ex in data.train), key=lambda s: len(s[0]) + len(s[1]))
    stride = max(1, (len(seqs) - 8) // max(1, args.batches - 1))
    batches = [seqs[i:i + 8] for i in range(0, len(seqs) - 7, stride)][:args.batches]
    head = common_head([p for p, _ in seqs])
    model = load_policy(model_dir, first_lora_layer=args.first_lora_layer)
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.01)
    pad = tok.pad_token_id
    times: dict[str, dict[str, list[float]]] = {"off": {"no_grad": [], "grad": []}, "on": {"no_grad": [], "grad": []}}
    for rep in range(args.repeats):
        for variant in (("off", "on") if rep % 2 == 0 else ("on", "off")):
            set_shared_head(model, head if variant == "on" else None)
            t = time.perf_counter()
            with torch.inference_mode():
                for b in batches:
                    completion_logps(model, b, pad)
            times[variant]["no_grad"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for b in batches:
                completion_logps(model, b, pad).sum().backward()
            model.zero_grad(set_to_none=True)
            times[variant]["grad"].append(time.perf_counter() - t)
            print(f"rep {rep} head {variant}: no-grad {times[variant]['no_grad'][-1]:.2f} s, "
                  f"grad {times[variant]['grad'][-1]:.2f} s", flush=True)
    med = {v: {k: statistics.median(x) for k, x in d.items()} for v, d in times.items()}
    tokens = sum(len(p) + len(c) for b in batches for p, c in b)
    result = {"benchmark": "shared_head", "machine": machine(), "snapshot": str(args.snapshot),
              "threads": torch.get_num_threads(), "first_lora_layer": args.first_lora_layer,
              "batches": len(batches), "sequences": 8 * len(batches), "tokens": tokens, "head_tokens": len(head),
              "head_share_of_tokens": round(len(head) * 8 * len(batches) / tokens, 4),
              "repeats": args.repeats, "quoted": "medians over repeats, head on/off alternating",
              "seconds": times, "median_seconds": med,
              "ratios": {f"{k}_speedup": med["off"][k] / med["on"][k] for k in ("no_grad", "grad")}}
    write_result(result, args.out, t_all)


if __name__ == "__main__":
    main()
