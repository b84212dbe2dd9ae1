"""The aligner with PyTorch's CPU flash-attention backward against ours (aligner/attention.py): time, memory, error.

The forward is SDPA's in both arms, so the two runs compute the same log-probs; only the attention gradient
differs. Three measurements, one run, the default model:

1. **Speed** on a rated snapshot (a simulator run's `snapshot.parquet`, else a synthetic one): the aligner
   subprocess, as the app starts it plus `--attention-backward X --max-steps S --checkpoints 0 --anchor-weight 2`
   (the anchor term is what the simulator runs), alternated ABBA over `--repeats` pairs so drift in machine load hits
   both. Per run: the manifest's phase seconds, training seconds per step, wall time, CPU seconds and peak RSS
   (wait4). Medians per arm, and the ratio flash / matmul.
2. **Long sequences**: a synthetic snapshot of answers near `--max-length 512`, 3 steps per arm (time per step and
   peak RSS), where attention is a larger share of the work and our backward's [heads, T, T] temporaries largest.
3. **Numerics**: for 16 snapshot examples, whether the log-probs with gradient equal SDPA's without (they must, bit
   for bit), and each backward's gradient error relative to a float32 run (bf16 autocast where the CPU has native
   bf16, as the aligner runs; float32 otherwise).

    .venv/bin/python -m benchmarks.attention_bench [--snapshot RUN_DIR/snapshot.parquet] [--steps 12] [--repeats 2]

Writes benchmarks/results/attention_bench/<date>_<cpu>.json (rewritten after every run, so a cut-short bench
keeps its data).

`--crossover` instead times one forward + backward of the default model on 2048-token batches of 96 to 512-token
sequences with each backward (ours forced at every length), interleaved, median of 5: where ours stops paying,
which sets `aligner.attention.MAX_MATMUL_LENGTH`. Writes benchmarks/results/attention_bench/<date>_<cpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from app.config import config_from
from benchmarks import aligner_ab
from benchmarks.aligner_bench import make_snapshot
from benchmarks.harness import machine, result_path, write_result

ARMS = ("flash", "matmul")


def align(snapshot: Path, model_dir: Path, backward: str, extra: list[str]) -> dict:
    """One aligner subprocess with `--attention-backward backward` (timings, CPU seconds, peak RSS)."""
    return {"arm": backward, "backward": backward,
            **aligner_ab.align(snapshot, model_dir, ["--attention-backward", backward, *extra])}


def numerics(snapshot: Path, model_dir: Path, n: int = 16) -> dict:
    """Log-probs with gradient vs SDPA without (bit-equal?), and each backward's gradient error vs float32."""
    import torch

    from aligner.data import build_dataset
    from aligner.model import completion_logps, load_policy, load_tokenizer, resolve_dtype

    torch.set_num_threads(os.cpu_count() or 1)
    tok = load_tokenizer(model_dir)
    train = build_dataset(str(snapshot), tok, 512, 0.0, None).train[:n]
    seqs = [(e.prompt_ids, e.completion_ids) for e in train]
    dtype = resolve_dtype("auto")

    def grad_and_logps(backward: str, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        model = load_policy(model_dir, dtype=dt, attention_backward=backward)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)  # a non-zero adapter: every LoRA weight gets a gradient
        model.train()
        lp = torch.cat([completion_logps(model, seqs[s:s + 4], tok.pad_token_id) for s in range(0, len(seqs), 4)])
        (lp.sum() / len(seqs)).backward()  # one backward over all chunks' graphs
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        model.eval()
        with torch.inference_mode():
            lp0 = torch.cat([completion_logps(model, seqs[s:s + 4], tok.pad_token_id)
                             for s in range(0, len(seqs), 4)])
        return lp.detach(), lp0, grad

    _, _, truth = grad_and_logps("flash", torch.float32)
    out: dict = {"n": len(seqs), "dtype": str(dtype).split(".")[-1],
                 "mean_completion_tokens": round(statistics.mean(len(c) for _, c in seqs), 1)}
    for arm in ARMS:
        lp, lp0, grad = grad_and_logps(arm, dtype)
        out[arm] = {"logps_with_grad_equal_no_grad_sdpa": bool(torch.equal(lp, lp0)),
                    "grad_relative_error_vs_float32": round(((grad - truth).norm() / truth.norm()).item(), 5)}
    return out


def crossover(model_dir: Path, lengths: tuple[int, ...] = (96, 160, 192, 256, 384, 512), repeats: int = 6) -> dict:
    """Seconds for one forward + backward per backward and sequence length, 2048 tokens a batch (see --crossover)."""
    import torch

    from aligner import attention
    from aligner.model import completion_logps, load_policy

    torch.set_num_threads(os.cpu_count() or 1)
    attention.MAX_MATMUL_LENGTH = max(lengths)  # measure ours everywhere, not only where the aligner uses it
    model = load_policy(model_dir).train()
    g = torch.Generator().manual_seed(0)
    rows = []
    for t in lengths:
        b = max(1, 2048 // t)
        seqs = [(torch.randint(3, 40000, (t // 4,), generator=g).tolist(),
                 torch.randint(3, 40000, (t - t // 4,), generator=g).tolist()) for _ in range(b)]
        times: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for r in range(repeats):
            for arm in (ARMS if r % 2 else ARMS[::-1]):
                model.get_base_model().set_attn_implementation(attention.implementation(arm))
                t0 = time.perf_counter()
                completion_logps(model, seqs, 0).sum().backward()
                times[arm].append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
        med = {arm: statistics.median(v[1:]) for arm, v in times.items()}  # the first of each is a warm-up
        rows.append({"length": t, "batch": b, "seconds": {k: round(v, 3) for k, v in med.items()},
                     "flash_over_matmul": round(med["flash"] / med["matmul"], 3)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"repeats": repeats, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshot", type=Path, default=None, help="a rated snapshot (default: a synthetic one)")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=12, help="training steps per speed run")
    ap.add_argument("--repeats", type=int, default=2, help="ABBA pairs of speed runs")
    ap.add_argument("--max-examples", type=int, default=400)
    ap.add_argument("--crossover", action="store_true", help="only the per-length forward + backward timing")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    t_all = time.perf_counter()
    model_dir = args.model_dir or config_from().resolved().model_dir
    if args.crossover:
        write_result({"benchmark": "attention_crossover", "machine": machine(), **crossover(model_dir)},
                     args.out or result_path("attention_bench", "crossover"), t_all)
        return
    args.out = args.out or result_path("attention_bench")
    result: dict = {"benchmark": "attention_bench", "machine": machine(), "steps": args.steps,
                    "snapshot": str(args.snapshot) if args.snapshot else "synthetic (aligner_bench.make_snapshot)"}
    with tempfile.TemporaryDirectory() as tmp:
        snapshot = args.snapshot or make_snapshot(Path(tmp) / "snap.parquet", args.max_examples)
        speed = ["--max-steps", str(args.steps), "--anchor-weight", "2", "--max-examples", str(args.max_examples)]
        runs: list[dict] = []
        for order in [ARMS if k % 2 == 0 else ARMS[::-1] for k in range(args.repeats)]:
            for arm in order:
                runs.append(align(snapshot, model_dir, arm, speed))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
                result["speed"] = {"runs": runs, "median": aligner_ab.medians(runs, list(ARMS))}
                write_result(result, args.out, t_all)
        med = result["speed"]["median"]
        if all(a in med for a in ARMS):
            result["ratios"] = {f"flash_over_matmul_{k}": round(med["flash"][k] / med["matmul"][k], 3)
                                for k in ("train_s_per_step", "reference_s", "wall_s", "peak_rss_mib")
                                if med["matmul"].get(k)}
        long_snap = make_snapshot(Path(tmp) / "long.parquet", 48, seed=1)
        result["long_sequences"] = {arm: align(long_snap, model_dir, arm,
                                                        ["--max-steps", "3", "--holdout-fraction", "0"])
                                    for arm in ARMS}
        write_result(result, args.out, t_all)
        result["numerics"] = numerics(snapshot, model_dir)
    write_result(result, args.out, t_all)
    print(json.dumps({"ratios": result.get("ratios"), "numerics": result["numerics"]}, indent=1))


if __name__ == "__main__":
    main()
