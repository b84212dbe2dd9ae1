"""The aligner's settings, declared once: each field's default, help, choices and range drive its `align` flag,
the app's forwarded settings (app/config.py) and docs/configuration.md.

Kept free of torch so the app and `--help` can read it without loading the training stack.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import Field, dataclass, field, fields
from typing import Any

from aligner.balance import DEFAULT_TARGET_RATIO, PREFERENCES, RATIO_MAX, RATIO_MIN

HELDOUT_MIN_PER_CLASS = 3  # the hash slice is topped up to this many answers of each kind (data.hold_out_floor)
HELDOUT_FLOOR_MAX_SHARE = 0.25  # ... but never takes more than this share of a kind from training
ANCHOR_MAX_TOKENS_LIMIT = 512  # longest anchor answer the term covers
DEVICES = ("auto", "cpu", "cuda")  # where the aligner computes (model.resolve_device)


def _arg(default: Any = None, help: str = "", *, required: bool = False, choices: tuple[str, ...] | None = None,
         metavar: str | None = None, aliases: tuple[str, ...] = (),
         check: tuple[Callable[[Any], bool], str] | None = None) -> Any:
    """A field with its flag's metadata (TRL-style `metadata={"help": ...}`); `check` = (valid?, rule when not)."""
    meta = {"help": help, "choices": choices, "metavar": metavar, "aliases": aliases, "check": check}
    return field(metadata=meta) if required else field(default=default, metadata=meta)


def _at_least(n: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v is None or v >= n), f"must be ≥ {n:g}"


@dataclass
class TrainConfig:
    # Input and output.
    snapshot: str = _arg(required=True, help="Parquet snapshot exported by feedback_store", metavar="FILE")
    out: str = _arg(required=True, help="adapter directory to create (written atomically)", metavar="DIR")
    model_dir: str = _arg(required=True, help="local Hugging Face model directory (the served base)",
                          metavar="DIR")
    resume_from: str | None = _arg(None, "continue training this adapter directory", metavar="DIR")
    reference: str = _arg("base", "reference policy: base (adapter off) or previous (the --resume-from adapter, "
                                  "frozen)", choices=("base", "previous"))
    served_adapter: str | None = _arg(None, "adapter served now, for the held-out comparison (default: the base "
                                            "model is served)", metavar="DIR")
    # The adapter.
    lora_rank: int = _arg(16, "LoRA rank of a new adapter (at most the vLLM server's --max-lora-rank)")
    lora_alpha: float | None = _arg(None, "LoRA alpha (default: 2 × rank)")
    max_lora_rank: int = _arg(16, "the vLLM server's --max-lora-rank: a larger adapter would be refused at load time")
    target_modules: list[str] | None = _arg(
        None, "linear layers to adapt, e.g. q_proj k_proj v_proj o_proj (default: every linear layer of the block); "
              "with --resume-from it must name the resumed adapter's own", metavar="MODULE")
    first_lora_layer: int | str = _arg(
        "50%", "a new adapter goes in decoder layers N.. only, or from P% of the depth up (50% = the upper half, "
               "whatever the model): the layers below run once per rated answer instead of in every training pass "
               "(aligner/model.py, Prefix), and the facts kept in the lower layers stay put; a continued adapter "
               "keeps its own layers; 0 = every layer",
        metavar="N|P%")
    # Optimisation.
    epochs: int = _arg(2, "passes over the training examples: a cycle's few thumbs-up teach more in two "
                          "(docs/experiments/2026-12-06-shipped-recipe.md)", check=_at_least(1))
    batch_size: int = _arg(8, "micro-batch size per process (KL pairs are formed inside a batch)",
                           check=_at_least(2))
    grad_accum: int = _arg(1, "micro-batches per optimizer step", check=_at_least(1))
    grad_tokens: int = _arg(2048, "padded tokens per forward with gradient: bounds training memory; a longer "
                                  "micro-batch is chunked, same result", check=_at_least(1))
    lr: float = _arg(1e-3, "learning rate of the upper-half adapter with the anchor term; higher rates moved the "
                           "rater faster but lost facts (docs/experiments/2026-12-06-shipped-recipe.md)",
                     check=((lambda v: v > 0), "must be > 0"))
    lr_generation_decay: float = _arg(
        1.0, "a continued adapter (--resume-from) trains at lr × D^g, g = how many runs before this one trained it "
             "(its manifest's generation + 1): each cycle moves an already-moved adapter in smaller steps, against "
             "the facts a second cycle can cost; 1 = the same rate every cycle",
        metavar="D", check=((lambda v: 0 < v <= 1), "must be in (0, 1]"))
    warmup_ratio: float = _arg(0.1, "share of the steps over which the learning rate warms up (then decays "
                                    "linearly)")
    max_grad_norm: float = _arg(1.0, "gradient norm clipped to")
    max_length: int = _arg(512, "prompt+completion tokens; prompts cut on the left", check=_at_least(32))
    max_steps: int | None = _arg(None, "stop after this many optimizer steps (default: the epochs' steps)",
                                 check=_at_least(1))
    # Checkpoints the promotion gate can fall back to.
    checkpoints: int = _arg(5, "earlier adapters kept (evenly spaced) for the promotion gate to fall back to; "
                               "0 = none", check=((lambda v: 0 <= v <= 20), "must be in [0, 20]"))
    checkpoint_eval: str = _arg("lazy", "lazy: checkpoints' held-out metrics are computed only if the gate needs "
                                        "them (python -m aligner.checkpoints); eager: during the run",
                                choices=("lazy", "eager"))
    # KTO's loss: β and the weights λ_D, λ_U (set from the ratio of thumbs-up to thumbs-down unless pinned).
    beta: float = _arg(0.1, "KTO's β: how sharply the loss saturates in the implied reward (the paper's value)",
                       check=((lambda v: v > 0), "must be > 0"))
    lambda_d: float | None = _arg(None, "pin λ_D (disables the automatic rule; λ_U defaults to 1)")
    lambda_u: float | None = _arg(None, "pin λ_U (disables the automatic rule; λ_D defaults to 1)")
    target_ratio: float | None = _arg(
        None, f"λ_D·n_D/(λ_U·n_U) in [{RATIO_MIN:g}, {RATIO_MAX:.4g}] (default: {DEFAULT_TARGET_RATIO:.4g})")
    preference: str | None = _arg(None, "loss-aversion preference within the paper's rule (default: neutral)",
                                  choices=tuple(PREFERENCES))
    # Data: the held-out split and the examples that train.
    heldout_fraction: float = _arg(0.1, "share of the rated answers held out (by a hash of the answer id) for the "
                                        "promotion gate's margin test", aliases=("--holdout-fraction",),
                                   check=((lambda v: 0 <= v < 1), "must be in [0, 1)"))
    heldout_min: int = _arg(HELDOUT_MIN_PER_CLASS,
                            "top the held-out slice up to this many answers of each kind (thumbs-up, thumbs-down), "
                            f"taking at most {round(HELDOUT_FLOOR_MAX_SHARE * 100)}% of a kind from training; "
                            "0 = the slice alone", check=_at_least(0))
    max_examples: int | None = _arg(None, "most examples of the snapshot used, newest first (default: all)")
    seed: int = _arg(0, "seed of the shuffles and the adapter's initialisation")
    # Machine: threads, precision, speed and memory.
    device: str = _arg("auto", "where the aligner computes: auto = cuda when a CUDA GPU is visible, else cpu; under "
                               "`accelerate launch` on cuda each process takes its local rank's GPU (nccl)",
                       choices=DEVICES, check=((lambda v: v in DEVICES), f"must be one of {', '.join(DEVICES)}"))
    gpu_memory_fraction: float = _arg(
        0.0, "on cuda, the share of the GPU's memory this process may allocate (a GPU shared with vLLM: vLLM's "
             "--gpu-memory-utilization, 0.9 by default, takes its share first, so set vLLM lower and this to at most "
             "the rest; docs/deploy.md); 0 = no cap", metavar="F",
        check=((lambda v: 0 <= v <= 1), "must be in [0, 1]"))
    threads: int | None = _arg(None, "torch threads on cpu (default: cores / processes)")
    dtype: str = _arg("auto", "base-model weights; auto = bfloat16 where the device has native bf16 (a CPU with "
                              "AVX512-BF16 or AMX, a GPU with bf16), else float32",
                      choices=("auto", "bfloat16", "float32"))
    attention_backward: str = _arg("matmul", "how attention's gradient is computed: batched matmuls for batches up "
                                             "to 192 tokens (aligner/attention.py) or PyTorch's CPU flash-attention "
                                             "backward; the forward, and so every log-prob, is SDPA's either way",
                                   choices=("matmul", "flash"))
    prefix_cache_mb: int = _arg(2048, "memory for the outputs of the layers below the adapter (sequences beyond it "
                                      "run the whole model)")
    shared_head: bool = _arg(True, "run the tokens every sequence starts with (the chat template's system turn) once "
                                   "per pass; --no-shared-head runs each sequence from its first token (same "
                                   "numbers, for comparison)")
    trim_every: int = _arg(0, "give freed heap memory back to the OS every N optimizer steps (0: only between "
                              "phases; trimming every step re-faults each step's activations: 1.12x slower steps, "
                              "same peak RSS, docs/experiments/2026-12-01-aligner-trim-heap.md)")
    # The anchor term (aligner/anchor.py).
    anchor_weight: float = _arg(7.0, "γ of the anchor term: γ × per-token KL(base ‖ policy) along the base "
                                     "model's own answers to shipped general prompts nobody rated, against the "
                                     "facts a strong preference can cost (aligner/anchor.py); 0 = the paper's KTO "
                                     "loss alone",
                                check=((lambda v: math.isfinite(v) and v >= 0), "must be a finite number ≥ 0"))
    anchor_prompts: str | None = _arg(None, "JSON lines of {\"prompt\": ...} for the anchor term (default: the "
                                            "shipped aligner/data/anchor_prompts.jsonl)", metavar="FILE")
    anchor_per_step: int = _arg(4, "anchor answers per optimizer step", check=_at_least(1))
    anchor_max_tokens: int = _arg(24, "the anchor term covers the first N tokens of the base model's anchor "
                                      "answers: facts are lost in an answer's opening, a preference mostly lives "
                                      "after it",
                                  check=((lambda v: 1 <= v <= ANCHOR_MAX_TOKENS_LIMIT),
                                         f"must be in [1, {ANCHOR_MAX_TOKENS_LIMIT}]"))
    anchor_cache: str | None = _arg(None, "directory where the base model's anchor answers are kept for later runs "
                                          "(default: built again every run)", metavar="DIR")


SETTINGS: dict[str, Field] = {f.name: f for f in fields(TrainConfig)}


def default(name: str) -> Any:
    """The declared default of one setting (for the app's settings that are forwarded to the aligner)."""
    return SETTINGS[name].default


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def problems(values: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(setting, rule) for each given value outside its setting's declared range."""
    for name, value in values.items():
        check = SETTINGS[name].metadata["check"] if name in SETTINGS else None
        if check is not None and value is not None and not check[0](value):
            yield name, check[1]
