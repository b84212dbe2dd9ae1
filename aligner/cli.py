"""`align`: the subprocess entry point the app spawns (also `python -m aligner` and `kto-loop align`).

Exit codes: 0 success, 2 bad input (one line on stderr), 1 training failure (non-finite values; nothing written).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from aligner.data import HELDOUT_FLOOR_MAX_SHARE, HELDOUT_MIN_PER_CLASS, SnapshotError


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The align flags, shareable with `kto-loop align` (which forwards to main)."""
    p.add_argument("--snapshot", required=True, help="Parquet snapshot exported by feedback_store")
    p.add_argument("--out", required=True, help="adapter directory to create (written atomically)")
    p.add_argument("--model-dir", required=True, help="local Hugging Face model directory (the served base)")
    p.add_argument("--resume-from", default=None, help="continue training this adapter directory")
    p.add_argument("--reference", choices=("base", "previous"), default="base",
                   help="reference policy: base (adapter off) or previous (the --resume-from adapter, frozen)")
    p.add_argument("--served-adapter", default=None, help="adapter served now, for held-out comparison "
                                                          "(default: the base model is served)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=None, help="default: 2 × rank")
    p.add_argument("--max-lora-rank", type=int, default=16, help="the vLLM server's --max-lora-rank")
    p.add_argument("--target-modules", nargs="+", default=None, metavar="MODULE",
                   help="linear layers to adapt, e.g. q_proj k_proj v_proj o_proj (default: every linear layer of "
                        "the block); with --resume-from it must name the resumed adapter's own")
    p.add_argument("--first-lora-layer", default="0", metavar="N|P%",
                   help="a fresh adapter goes in decoder layers N.. only, or from P%% of the depth up (50%% = the "
                        "upper half); the layers below run once per sequence instead of in every pass "
                        "(0 = all layers)")
    p.add_argument("--no-shared-head", dest="shared_head", action="store_false",
                   help="run every sequence from its first token, instead of the tokens all of them start with "
                        "(the chat template's system turn) once per pass; same numbers, for comparison")
    p.add_argument("--prefix-cache-mb", type=int, default=2048,
                   help="memory for the outputs of the layers below the adapter (sequences beyond it run the whole "
                        "model)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch size per process (≥ 2)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--grad-tokens", type=int, default=2048, help="padded tokens per forward with gradient: "
                                                                 "bounds training memory; same result")
    p.add_argument("--lr", type=float, default=2.5e-4,
                   help="higher rates moved the rater faster but lost facts (benchmarks/results/lr_sweep.json)")
    p.add_argument("--lr-generation-decay", type=float, default=1.0, metavar="D",
                   help="a continued adapter (--resume-from) trains at lr × D^g, g = how many runs before this one "
                        "trained it (its manifest's generation + 1): each cycle moves an already-moved adapter in "
                        "smaller steps; 1 = the same rate every cycle")
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=512, help="prompt+completion tokens; prompts cut on the left")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--checkpoints", type=int, default=3,
                   help="earlier adapters kept (evenly spaced) for the promotion gate to fall back to; 0 = none")
    p.add_argument("--checkpoint-eval", choices=("lazy", "eager"), default="lazy",
                   help="lazy: checkpoints' held-out metrics are computed only if the gate needs them "
                        "(python -m aligner.checkpoints); eager: during the run")
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lambda-d", type=float, default=None, help="pin λ_D (disables the automatic rule)")
    p.add_argument("--lambda-u", type=float, default=None, help="pin λ_U (disables the automatic rule)")
    p.add_argument("--target-ratio", type=float, default=None, help="λ_D·n_D/(λ_U·n_U) in [1, 4/3]")
    p.add_argument("--preference", choices=("neutral", "penalise_bad", "reward_good"), default=None,
                   help="loss-aversion preference within the paper's rule")
    p.add_argument("--holdout-fraction", "--heldout-fraction", dest="heldout_fraction", type=float, default=0.1)
    p.add_argument("--heldout-min", type=int, default=HELDOUT_MIN_PER_CLASS,
                   help="top the held-out slice up to this many answers of each kind (thumbs-up, thumbs-down), "
                        f"taking at most {round(HELDOUT_FLOOR_MAX_SHARE * 100)}%% of a kind from training; "
                        "0 = the slice alone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="base-model weights; auto = bfloat16 where the CPU has native bf16 (AVX512-BF16, AMX), "
                        "else float32")
    p.add_argument("--attention-backward", choices=("matmul", "flash"), default="matmul",
                   help="how attention's gradient is computed: batched matmuls for batches up to 192 tokens "
                        "(aligner/attention.py) or PyTorch's CPU flash-attention backward; the forward, and so "
                        "every log-prob, is SDPA's either way")
    p.add_argument("--anchor-weight", type=float, default=0.0,
                   help="γ of the optional anchor term: γ × per-token KL(base ‖ policy) on the base model's own "
                        "answers to general prompts nobody rated (aligner/anchor.py); 0 = plain KTO")
    p.add_argument("--anchor-prompts", default=None, help="JSON lines of {\"prompt\": ...} for the anchor term "
                                                          "(default: the shipped aligner/data/anchor_prompts.jsonl)")
    p.add_argument("--anchor-per-step", type=int, default=4, help="anchor answers per optimizer step")
    p.add_argument("--anchor-max-tokens", type=int, default=24,
                   help="the anchor term covers the first N tokens of the base model's anchor answers")
    p.add_argument("--anchor-cache", default=None, help="directory where the base model's anchor answers are kept "
                                                        "for later runs (default: built again every run)")
    p.add_argument("--trim-every", type=int, default=0,
                   help="give freed heap memory back to the OS every N optimizer steps (default 0: only between "
                        "phases; trimming every step re-faults each step's activations: 1.12x slower steps, same "
                        "peak RSS, benchmarks/results/trim_heap_ab.json)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: cores / processes)")
    p.add_argument("--progress-json", action="store_true", help="JSON lines on stdout instead of a progress bar")
    return p


def _adapted_modules(adapter_dir: str | None) -> set[str]:
    """The layers an adapter directory adapts (empty without one)."""
    if not adapter_dir:
        return set()
    try:
        return set(json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("target_modules") or [])
    except (OSError, ValueError, AttributeError) as e:
        raise SnapshotError(f"{adapter_dir}/adapter_config.json is unreadable: {e}") from None


def _validate(args: argparse.Namespace) -> None:
    from aligner.model import LLAMA_LINEAR

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SnapshotError(f"output {out} already exists and is not an empty directory")
    if not Path(args.model_dir).is_dir():
        raise SnapshotError(f"model directory not found: {args.model_dir}")
    for flag in ("resume_from", "served_adapter"):
        d = getattr(args, flag)
        if d and not (Path(d) / "adapter_config.json").is_file():
            raise SnapshotError(f"--{flag.replace('_', '-')} {d} is not an adapter directory")
    resumed = _adapted_modules(args.resume_from) if args.target_modules else set()
    checks = [(args.epochs >= 1, "--epochs must be ≥ 1"), (args.batch_size >= 2, "--batch-size must be ≥ 2"),
              (args.grad_accum >= 1, "--grad-accum must be ≥ 1"), (args.lr > 0, "--lr must be > 0"),
              (0 < args.lr_generation_decay <= 1, "--lr-generation-decay must be in (0, 1]"),
              (args.grad_tokens >= 1, "--grad-tokens must be ≥ 1"),
              (args.beta > 0, "--beta must be > 0"), (args.max_length >= 32, "--max-length must be ≥ 32"),
              (0 <= args.heldout_fraction < 1, "--holdout-fraction must be in [0, 1)"),
              (args.heldout_min >= 0, "--heldout-min must be ≥ 0"),
              (1 <= args.lora_rank <= args.max_lora_rank, "--lora-rank must be in [1, --max-lora-rank]"),
              (args.max_steps is None or args.max_steps >= 1, "--max-steps must be ≥ 1"),
              (0 <= args.checkpoints <= 20, "--checkpoints must be in [0, 20]"),
              (math.isfinite(args.anchor_weight) and args.anchor_weight >= 0,
               "--anchor-weight must be a finite number ≥ 0"),
              (args.anchor_per_step >= 1, "--anchor-per-step must be ≥ 1"),
              (1 <= args.anchor_max_tokens <= 512, "--anchor-max-tokens must be in [1, 512]"),
              (args.anchor_prompts is None or Path(args.anchor_prompts).is_file(),
               f"--anchor-prompts {args.anchor_prompts} is not a file"),
              (args.target_modules is None or set(args.target_modules) <= set(LLAMA_LINEAR),
               f"--target-modules must be among {' '.join(LLAMA_LINEAR)}"),
              (args.target_modules is None or not args.resume_from
               or set(args.target_modules) == resumed,
               f"--target-modules {' '.join(args.target_modules or [])} differs from the layers the --resume-from "
               f"adapter adapts ({' '.join(sorted(resumed))}): a resumed adapter keeps its own")]
    for ok, msg in checks:
        if not ok:
            raise SnapshotError(msg)


class _Printer:
    """Progress sink: JSON lines on stdout, or a tqdm bar on stderr."""

    def __init__(self, as_json: bool) -> None:
        self.as_json, self.bar = as_json, None

    def __call__(self, event: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps(event), flush=True)
            return
        if event["event"] == "progress":
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=event["total"], desc="align", unit="step", file=sys.stderr)
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{event['loss']:.4f}", z0=f"{event['z0_pre_clamp']:+.3f}")
        elif event["event"] == "phase":
            print(f"align: {event['phase']} ({event.get('sequences', 0)} sequences)", file=sys.stderr)
        elif event["event"] == "done":
            if self.bar is not None:
                self.bar.close()
            print(f"align: wrote {event['out']}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="align", description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    from aligner.train import TrainConfig, TrainingDiverged, run

    try:
        _validate(args)
        cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k != "progress_json"})
        run(cfg, _Printer(args.progress_json))
    except SnapshotError as e:
        print(f"align: error: {e}", file=sys.stderr)
        return 2
    except (TrainingDiverged, FloatingPointError) as e:
        print(f"align: error: training failed, nothing written: {e}", file=sys.stderr)
        return 1
    return 0
