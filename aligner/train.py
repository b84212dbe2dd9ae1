"""One alignment run: snapshot → LoRA KTO training → held-out metrics → adapter directory (atomically).

Every forward is expensive on CPU, so each is done once: reference log-probs for the matched pairs and every
KL pair any epoch will use come from one no-grad pass before training (the seeded shuffles fix the plan), which
also makes `--reference previous` exact without a frozen copy. Under `accelerate launch` (gloo) micro-batches are
dealt round-robin and z0, the loss scale and the gradients are reduced so N processes give one process's update.
On a GPU (`--device cuda`) the same run computes there, one GPU per process (nccl) under `accelerate launch`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from aligner import anchor, balance
from aligner.config import TrainConfig
from aligner.data import Dataset, Example, MicroBatch, SnapshotError, build_dataset, plan_epoch
from aligner.evaluate import heldout_metrics
from aligner.layers import first_layer, num_layers
from aligner.loss import kto_loss, rotation
from aligner.model import (
    Prefix,
    adapter_rank,
    common_head,
    completion_logps,
    load_policy,
    load_tokenizer,
    model_device,
    prefix_states,
    resolve_device,
    resolve_dtype,
    set_shared_head,
    shared_prefix_layers,
)

Progress = Callable[[dict[str, Any]], None]


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient or metric: the run stops and writes nothing."""


# ---------------------------------------------------------------------------------------------- distributed
class Dist:
    """Rank, world size, this process's device and the collectives we need; a no-op outside `accelerate launch`.

    `device` is the resolved --device: on cuda each process computes on its local rank's GPU and reduces with
    nccl (which needs its tensors there); on cpu the process group is gloo's.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        cuda = device is not None and device.type == "cuda"
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
        if self.world > 1:
            from accelerate import PartialState

            # initialises the process group from the launcher's environment: gloo on cpu, nccl (and the local
            # rank's GPU as the current device) on cuda
            state = PartialState(cpu=not cuda)
            if cuda:
                self.device = state.device
        if cuda:
            torch.cuda.set_device(self.device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def gather_dict(self, d: dict) -> dict:
        if self.world == 1:
            return d
        parts: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(parts, d)
        return {k: v for p in parts for k, v in p.items()}

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


# ---------------------------------------------------------------------------------------------- helpers
def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip() or None
    except Exception:
        return None


def _resolve_lambdas(cfg: TrainConfig, n_d: int, n_u: int) -> tuple[float, float, str]:
    return balance.resolve(n_d, n_u, cfg.lambda_d, cfg.lambda_u, cfg.target_ratio, cfg.preference)


def _logps_for(model: Any, keys: list[tuple[int, int]], prompts: list[Example], completions: list[Example],
               pad_id: int, batch_tokens: int, prefix: Prefix | None = None,
               tag: str = "train") -> dict[tuple[int, int], float]:
    """No-grad log-probs for (prompt index, completion index) pairs, batched by similar length.

    With a usable `prefix`, a batch whose layer-k states are cached starts at layer k; any other batch runs the
    whole model and leaves its states in the cache (keyed (tag, i, j)) for the passes after it."""
    def length(k: tuple[int, int]) -> int:
        return len(prompts[k[0]].prompt_ids) + len(completions[k[1]].completion_ids)

    keys = sorted(set(keys), key=length)
    out: dict[tuple[int, int], float] = {}
    prefix = prefix if prefix is not None and prefix.usable(model) else None
    s = 0
    # Inference mode where we can: the values leave as Python floats. States kept for later passes with gradient
    # must not be inference tensors, hence plain no_grad when the prefix cache is filled.
    with torch.no_grad() if prefix is not None else torch.inference_mode():
        while s < len(keys):
            e = s + 1
            while e < len(keys) and (e + 1 - s) * length(keys[e]) <= batch_tokens:
                e += 1
            chunk = keys[s:e]
            seqs = [(prompts[i].prompt_ids, completions[j].completion_ids) for i, j in chunk]
            tagged = [(tag, i, j) for i, j in chunk]
            states = prefix.get(tagged) if prefix is not None else None
            if states is not None:
                lp = completion_logps(model, seqs, pad_id, start=(prefix.layers, states))
            elif prefix is not None:
                captured: list[torch.Tensor] = []
                lp = completion_logps(model, seqs, pad_id, capture=(prefix.layers, captured))
                prefix.put(tagged, captured)
            else:
                lp = completion_logps(model, seqs, pad_id)
            for k, v in zip(chunk, lp.tolist(), strict=True):
                out[k] = v
            s = e
    return out


def _grad_chunks(indices: list[int], train: list[Example], budget: int) -> list[list[int]]:
    """Split a micro-batch into length-sorted chunks of at most `budget` padded tokens (at least one example each).

    Activations kept for backward grow with the padded token count (~0.7 MiB per token for SmolLM2-135M), so a
    micro-batch of 8 long examples would hold ~3 GiB. The KTO loss is per-example once z0 is fixed for the step,
    so running the chunks' forward/backward one after another gives the same gradient with a bounded peak.
    """
    order = sorted(indices, key=lambda i: len(train[i].prompt_ids) + len(train[i].completion_ids))
    chunks: list[list[int]] = []
    for i in order:
        n = len(train[i].prompt_ids) + len(train[i].completion_ids)  # the longest so far: sets the padded width
        if chunks and (len(chunks[-1]) + 1) * n <= budget:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


_LIBC: Any = None


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them): between phases, and every `trim_every` steps if
    asked. Not every step by default: the next step faults the same pages in again
    (docs/experiments/2026-12-01-aligner-trim-heap.md)."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _kl_sum(model: Any, mbs: list[MicroBatch], train: list[Example], ref: dict[tuple[int, int], float],
            pad_id: int, prefix: Prefix | None = None) -> torch.Tensor:
    """(Σ policy−reference log-ratio, count) over the mismatched pairs of these micro-batches, without gradient."""
    device = model_device(model)
    kl_sum = torch.zeros(2, device=device)
    with torch.inference_mode():
        for mb in mbs:
            pairs = list(zip(mb.examples, mb.partners, strict=True))
            seqs = [(train[i].prompt_ids, train[j].completion_ids) for i, j in pairs]
            lp = completion_logps(model, seqs, pad_id, start=_start(prefix, model, [("train", *k) for k in pairs]))
            kl = lp - torch.tensor([ref[k] for k in pairs], device=device)
            kl_sum += torch.stack([kl.sum(), torch.tensor(float(kl.numel()), device=device)])
    return kl_sum


def _start(prefix: Prefix | None, model: Any, keys: list) -> tuple[int, list[torch.Tensor]] | None:
    """Where a pass over these cached sequences may start (model.completion_logps `start`); None = layer 0."""
    if prefix is None or not prefix.usable(model):
        return None
    states = prefix.get(keys)
    return None if states is None else (prefix.layers, states)


def _heldout_pairs(heldout: list[Example]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Matched and mismatched (rotation over the whole held-out set) index pairs; empty below 2 examples."""
    if len(heldout) < 2:
        return [], []
    return [(i, i) for i in range(len(heldout))], [(i, j) for i, j in enumerate(rotation(len(heldout)))]


def _eval_heldout(policy: dict, ref: dict, heldout: list[Example], beta: float, lam_d: float,
                  lam_u: float) -> dict[str, Any]:
    matched, kl = _heldout_pairs(heldout)
    rewards = torch.tensor([policy[k] - ref[k] for k in matched])
    kl_rewards = torch.tensor([policy[k] - ref[k] for k in kl])
    desirable = torch.tensor([ex.desirable for ex in heldout])
    return heldout_metrics(rewards, kl_rewards, desirable, beta, lam_d, lam_u, [ex.user_id for ex in heldout])


def _keep_checkpoint(model: Any, d: Path, step: int, total: int, heldout: list[Example], h_keys: list,
                     h_ref: dict, served_metrics: dict | None, cfg: TrainConfig, lam_d: float, lam_u: float,
                     pad_id: int, batch_tokens: int, prefix: Prefix | None = None) -> dict[str, Any]:
    """Save the adapter as it is after `step`, with its own held-out metrics (same pairs, same base reference as
    the final adapter's, so the gate compares like with like) unless they are left for evaluate_checkpoints.
    Returns its entry for the run manifest."""
    model.eval()
    metrics = None
    if h_keys and cfg.checkpoint_eval == "eager":
        metrics = _eval_heldout(_logps_for(model, h_keys, heldout, heldout, pad_id, batch_tokens, prefix, "heldout"),
                                h_ref, heldout, cfg.beta, lam_d, lam_u)
    entry = {"step": step, "steps": total, "path": f"checkpoints/step-{step}", "heldout_new": metrics,
             "heldout_pending": bool(h_keys) and metrics is None}
    d.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(model, d, {
        "checkpoint": entry, "base_model": str(cfg.model_dir), "reference": cfg.reference,
        "resume_from": cfg.resume_from, "lambda_d": lam_d, "lambda_u": lam_u, "beta": cfg.beta,
        "heldout": {"n": len(heldout), "new": metrics, "served": served_metrics, "reference": "base"}})
    return entry


def adapter_generation(adapter_dir: str | Path | None) -> int:
    """How many runs produced this adapter, minus one: 0 for a fresh one, its parent's + 1 for a continued one.

    Read from the adapter's manifest ("generation"; older manifests: by following "resume_from"); an adapter
    without a manifest (made elsewhere) counts as fresh. A checkpoint's manifest names its run's `resume_from`,
    so a served checkpoint counts as its run's generation.
    """
    import json

    seen: set[str] = set()
    d, depth = adapter_dir, 0
    while d and str(d) not in seen:
        seen.add(str(d))
        try:
            m = json.loads((Path(d) / "manifest.json").read_text())
        except (OSError, ValueError):
            return depth
        if isinstance(m.get("generation"), int):
            return depth + m["generation"]
        d = m.get("resume_from")
        depth += 1 if d else 0
    return depth


def _lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then linear decay to zero: a multiplier on the base learning rate."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def checkpoint_steps(lr_multipliers: list[float], n: int) -> list[int]:
    """Steps after which an earlier adapter is kept: n points strictly inside the run, evenly spaced in cumulative
    learning rate (how far the weights have been pushed), not in steps.

    When the gate refuses the final adapter for moving too far, an earlier point of the same run is often the
    strongest safe one; each costs a ~10 MB save, and a held-out pass only when needed (evaluate_checkpoints).
    """
    total = sum(lr_multipliers)
    if n < 1 or len(lr_multipliers) < 2 or total <= 0:
        return []
    steps, cum, k = set(), 0.0, 1
    for s, m in enumerate(lr_multipliers[:-1], 1):
        cum += m
        while k <= n and cum >= total * k / (n + 1) - 1e-12:
            steps.add(s)
            k += 1
    return sorted(steps)


def save_adapter(model: Any, d: Path, manifest: dict[str, Any]) -> None:
    """save_pretrained plus our manifest, refusing what vLLM would refuse (see serving/registry.validate)."""
    import json

    model.save_pretrained(str(d), save_embedding_layers=False)
    cfg = json.loads((d / "adapter_config.json").read_text())
    if cfg.get("modules_to_save") or cfg.get("use_dora") or cfg.get("bias", "none") != "none":
        raise RuntimeError(f"adapter config is not vLLM-compatible: {cfg}")
    if not (d / "adapter_model.safetensors").is_file():
        raise RuntimeError("adapter_model.safetensors was not written")
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def write_adapter_atomically(model: Any, out: Path, manifest: dict[str, Any],
                             checkpoints_dir: Path | None = None) -> None:
    """Save into a temporary sibling directory, check it, then rename: readers see all of it or nothing.
    `checkpoints_dir` (earlier adapters of the run) moves in as `out/checkpoints` before the rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_adapter(model, tmp, manifest)
        if checkpoints_dir is not None and checkpoints_dir.is_dir():
            os.rename(checkpoints_dir, tmp / "checkpoints")
        if out.exists():
            out.rmdir()  # only an empty directory may be replaced (the CLI refuses a non-empty one up front)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    import json

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def evaluate_checkpoints(adapter_dir: str | Path) -> dict[str, Any]:
    """Held-out metrics for a lazy run's checkpoints, written into the run's manifest and each checkpoint's own.

    Most runs never need them. This rebuilds the run's held-out split from its snapshot (sha256 checked), with the
    same base reference and batching, so the metrics are those the run would have written. Returns the updated
    manifest (unchanged when nothing is pending).
    """
    import json

    from safetensors.torch import load_file

    out = Path(adapter_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    pending = [c for c in manifest.get("checkpoints") or [] if c.get("heldout_pending")]
    if not pending:
        return manifest
    t0 = time.time()
    hp = manifest["hyperparameters"]
    tok = load_tokenizer(manifest["base_model"])
    data = build_dataset(manifest["snapshot"], tok, hp["max_length"], hp["heldout_fraction"], hp["max_examples"],
                         hp.get("heldout_min", 0))  # manifests before the floor: the hash slice alone
    if data.data_sha256 != manifest["data_sha256"]:
        raise SnapshotError(f"snapshot {manifest['snapshot']} changed since the run (sha256 differs)")
    heldout = data.heldout
    if len(heldout) != manifest["heldout"]["n"]:
        raise SnapshotError(f"held-out split differs from the run's ({len(heldout)} vs {manifest['heldout']['n']})")
    h_matched, h_kl = _heldout_pairs(heldout)
    h_keys = h_matched + h_kl
    batch_tokens = hp["batch_size"] * hp["max_length"]
    device = resolve_device(hp.get("device", "cpu"))  # where the run computed (earlier manifests: the CPU)
    if device.type == "cuda" and hp.get("gpu_memory_fraction", 0) > 0:  # the run's share of a shared GPU
        torch.cuda.set_per_process_memory_fraction(hp["gpu_memory_fraction"], device)
    model = load_policy(manifest["base_model"], resume_from=out / pending[0]["path"],
                        dtype=resolve_dtype(hp["dtype"], device), attention_backward=hp["attention_backward"],
                        device=device)
    model.eval()
    pad_id = tok.pad_token_id
    prefix = Prefix(shared_prefix_layers(model), hp.get("prefix_cache_mb", TrainConfig.prefix_cache_mb) << 20)
    n_head = (manifest.get("prefix") or {}).get("head_tokens") or 0  # the run's head, so its numbers are the run's
    set_shared_head(model, heldout[0].prompt_ids[:n_head] if n_head and heldout else None)
    with model.disable_adapter():
        h_ref = _logps_for(model, h_keys, heldout, heldout, pad_id, batch_tokens, prefix, "heldout")
    from peft import set_peft_model_state_dict

    for i, entry in enumerate(pending):
        d = out / entry["path"]
        if i > 0:  # same layers, same rank: swap the weights into the loaded adapter
            set_peft_model_state_dict(model, load_file(str(d / "adapter_model.safetensors")))
        entry["heldout_new"] = _eval_heldout(_logps_for(model, h_keys, heldout, heldout, pad_id, batch_tokens,
                                                        prefix, "heldout"),
                                             h_ref, heldout, manifest["beta"], manifest["lambda_d"],
                                             manifest["lambda_u"])
        entry["heldout_pending"] = False
        own = json.loads((d / "manifest.json").read_text())
        own["checkpoint"] = entry
        own["heldout"]["new"] = entry["heldout_new"]
        _write_json_atomically(d / "manifest.json", own)
    manifest["checkpoint_eval_seconds"] = round(time.time() - t0, 3)
    _write_json_atomically(out / "manifest.json", manifest)
    return manifest


# ---------------------------------------------------------------------------------------------- the run
def run(cfg: TrainConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Train and write the adapter; returns the manifest. Raises SnapshotError (bad input), TrainingDiverged."""
    t_start = time.time()
    try:  # before anything is loaded: cuda asked for where there is none fails here, clearly
        device = resolve_device(cfg.device)
    except ValueError as e:
        raise SnapshotError(str(e)) from e
    if not 0 <= cfg.gpu_memory_fraction <= 1:
        raise SnapshotError(f"--gpu-memory-fraction must be in [0, 1], got {cfg.gpu_memory_fraction}")
    dist = Dist(device)
    device = dist.device
    emit = progress if (progress is not None and dist.main) else (lambda _e: None)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // dist.world))
    elif cfg.gpu_memory_fraction > 0:  # a GPU shared with vLLM: this process allocates at most its share
        torch.cuda.set_per_process_memory_fraction(cfg.gpu_memory_fraction, device)
    torch.manual_seed(cfg.seed)
    if cfg.reference not in ("base", "previous"):
        raise SnapshotError(f"--reference must be base or previous, got {cfg.reference!r}")
    if cfg.reference == "previous" and not cfg.resume_from:
        raise SnapshotError("--reference previous needs --resume-from (there is no previous adapter)")
    if cfg.batch_size < 2:
        raise SnapshotError("--batch-size must be at least 2 (KL pairs are formed inside a batch)")
    if cfg.trim_every < 0:
        raise SnapshotError(f"--trim-every must be 0 or more, got {cfg.trim_every}")
    if cfg.checkpoint_eval not in ("lazy", "eager"):
        raise SnapshotError(f"--checkpoint-eval must be lazy or eager, got {cfg.checkpoint_eval!r}")
    if cfg.prefix_cache_mb < 0:
        raise SnapshotError(f"--prefix-cache-mb must be 0 or more, got {cfg.prefix_cache_mb}")
    try:
        cfg = replace(cfg, first_lora_layer=first_layer(cfg.first_lora_layer, num_layers(cfg.model_dir)))
    except (OSError, KeyError, ValueError) as e:
        raise SnapshotError(str(e) if isinstance(e, ValueError) else f"cannot read the model's layer count: {e}") from e

    tok = load_tokenizer(cfg.model_dir)
    pad_id = tok.pad_token_id
    data: Dataset = build_dataset(cfg.snapshot, tok, cfg.max_length, cfg.heldout_fraction, cfg.max_examples,
                                  cfg.heldout_min)
    train, heldout = data.train, data.heldout
    n_d = sum(ex.desirable for ex in train)
    n_u = len(train) - n_d
    try:
        lam_d, lam_u, lam_mode = _resolve_lambdas(cfg, n_d, n_u)
    except ValueError as e:
        raise SnapshotError(f"{e} (after holding out {len(heldout)} and dropping {len(data.dropped)})") from e

    # Later cycles continue an adapter that earlier ones already moved: with lr_generation_decay < 1 each step is
    # smaller, as if the cycles were one run whose learning rate keeps decaying across its warm restarts.
    generation = adapter_generation(cfg.resume_from) + 1 if cfg.resume_from else 0
    lr_base = cfg.lr * cfg.lr_generation_decay ** generation

    dtype = resolve_dtype(cfg.dtype, device)
    model = load_policy(cfg.model_dir, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                        resume_from=cfg.resume_from, dtype=dtype, target_modules=cfg.target_modules,
                        attention_backward=cfg.attention_backward, first_lora_layer=cfg.first_lora_layer,
                        device=device)
    # Layers below the adapter: run once per sequence, in the reference pass (model.Prefix). A resumed adapter
    # decides where its own layers start. The tokens all sequences start with: once per pass (model.SharedHead).
    prefix = Prefix(shared_prefix_layers(model), cfg.prefix_cache_mb << 20)
    head = set_shared_head(model, common_head([ex.prompt_ids for ex in train + heldout]) if cfg.shared_head else None)
    seconds: dict[str, float] = {"load": time.time() - t_start}  # where a run's time goes, phase by phase
    rank = adapter_rank(model)
    if rank > cfg.max_lora_rank:
        raise SnapshotError(f"adapter rank {rank} exceeds the server's max LoRA rank {cfg.max_lora_rank}")

    # The plan: every epoch's shuffle, micro-batches and KL partners, fixed by the seed.
    lengths = [len(ex.prompt_ids) + len(ex.completion_ids) for ex in train]
    per_step = cfg.grad_accum * dist.world
    steps: list[list[MicroBatch]] = []
    for epoch in range(cfg.epochs):
        mbs = plan_epoch(lengths, cfg.batch_size, cfg.seed, epoch, labels=[ex.desirable for ex in train])
        steps += [mbs[s:s + per_step] for s in range(0, len(mbs), per_step)]
    if cfg.max_steps is not None:
        steps = steps[:cfg.max_steps]
    total = len(steps)

    # Reference log-probs, once: matched pairs and every KL pair of the plan, sharded over processes.
    # Before the first update the policy *is* the reference (a fresh adapter has lora_B = 0; with `--reference
    # previous` the reference is the resumed adapter): the first step's KL log-ratios are exactly 0, so neither
    # its KL pass nor those pairs' reference log-probs are computed.
    policy_is_reference = cfg.resume_from is None or cfg.reference == "previous"
    kl_steps = steps[1:] if policy_is_reference else steps
    train_keys = sorted({(i, i) for i in range(len(train))}
                        | {(i, j) for st in kl_steps for mb in st for i, j in zip(mb.examples, mb.partners,
                                                                                  strict=True)})
    batch_tokens = cfg.batch_size * cfg.max_length  # no-grad passes: bigger batches are fine
    emit({"event": "phase", "phase": "reference", "sequences": len(train_keys)})
    t_phase = time.time()
    model.eval()
    my_keys = train_keys[dist.rank::dist.world]
    if dist.world > 1 and prefix.layers > 0:  # each process keeps the states of the micro-batches it will run
        my_keys = sorted({(i, i) for st in steps for mb in st[dist.rank::dist.world] for i in mb.examples}
                         | {(i, j) for st in kl_steps for mb in st[dist.rank::dist.world]
                            for i, j in zip(mb.examples, mb.partners, strict=True)})
    if cfg.reference == "base":
        with model.disable_adapter():
            ref = _logps_for(model, my_keys, train, train, pad_id, batch_tokens, prefix)
    else:
        ref = _logps_for(model, my_keys, train, train, pad_id, batch_tokens, prefix)
    ref = dist.gather_dict(ref)  # log-probs only: each process keeps the states of its own keys
    _trim_heap()
    seconds["reference"] = time.time() - t_phase
    t_phase = time.time()

    # Held-out: base reference, and the served adapter's numbers (rank 0 only; nothing to reduce).
    h_matched, h_kl = _heldout_pairs(heldout)
    h_keys = h_matched + h_kl
    served_metrics = None
    h_ref: dict = {}
    if dist.main and h_keys:
        emit({"event": "phase", "phase": "heldout_served", "sequences": len(h_keys)})
        with model.disable_adapter():
            h_ref = _logps_for(model, h_keys, heldout, heldout, pad_id, batch_tokens, prefix, "heldout")
        if cfg.served_adapter:
            model.load_adapter(str(cfg.served_adapter), adapter_name="served")
            model.to(device)
            model.set_adapter("served")
            h_served = _logps_for(model, h_keys, heldout, heldout, pad_id, batch_tokens, prefix, "heldout")
            model.set_adapter("default")
            model.delete_adapter("served")
        else:
            h_served = h_ref  # the base model is served: rewards are exactly 0
        served_metrics = _eval_heldout(h_served, h_ref, heldout, cfg.beta, lam_d, lam_u)
    seconds["heldout_served"] = time.time() - t_phase
    anchors = None
    if cfg.anchor_weight > 0:
        emit({"event": "phase", "phase": "anchor", "sequences": 0})
        t_phase = time.time()
        prompts = anchor.load_prompts(cfg.anchor_prompts)
        key = anchor.cache_key(cfg.model_dir, prompts, cfg.anchor_max_tokens, anchor.TOP_K, dtype) \
            if cfg.anchor_cache else None
        anchors = anchor.load_cached(cfg.anchor_cache, key) if key else None
        anchors_cached = anchors is not None
        if anchors is not None:
            anchors = anchors.to(device)
        else:
            anchors = anchor.build(model, tok, prompts, cfg.anchor_max_tokens)
            if key and dist.main:
                try:
                    anchor.save_cached(anchors, cfg.anchor_cache, key)
                except OSError as e:  # a cache that cannot be written costs the next run time, not this run
                    emit({"event": "warning", "message": f"anchor cache not written: {e}"})
        if prefix.usable(model):  # the anchors' lower layers once (~1 s here), not at every use
            for a in range(0, len(anchors.seqs), 16):
                idx = list(range(a, min(a + 16, len(anchors.seqs))))
                prefix.put([("anchor", i) for i in idx],
                           prefix_states(model, [anchors.seqs[i] for i in idx], pad_id, prefix.layers))
        seconds["anchor"] = time.time() - t_phase
    for n, p in model.named_parameters():  # set_adapter/delete_adapter may touch requires_grad
        p.requires_grad_("lora_" in n and ".default." in n)

    # Earlier adapters for the gate to fall back to; staged beside `out`, removed with this object on any failure.
    warmup = int(cfg.warmup_ratio * total)
    keep_at = set(checkpoint_steps([_lr_at(s, total, warmup) for s in range(total)], cfg.checkpoints)) \
        if dist.main else set()
    staging = tempfile.TemporaryDirectory(prefix=f".{Path(cfg.out).name}.ckpt-", dir=Path(cfg.out).parent) \
        if keep_at else None
    kept: list[dict[str, Any]] = []
    checkpoint_seconds = 0.0

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr_base, weight_decay=0.0)
    log: list[dict[str, Any]] = []
    n_tokens = 0
    t_train = time.time()
    for s, step in enumerate(steps):
        t_step = time.time()
        mine = step[dist.rank::dist.world]
        n_global = sum(len(mb.examples) for mb in step)
        # z0: policy log-ratios of this step's mismatched pairs, without gradient, reduced over processes.
        model.eval()
        kl_sum = torch.tensor([0.0, 1.0], device=device)
        if s > 0 or not policy_is_reference:
            kl_sum = dist.sum_(_kl_sum(model, mine, train, ref, pad_id, prefix))
        z0_pre = kl_sum[0] / kl_sum[1]
        kl_seconds = time.time() - t_step
        # Matched pairs with gradient; the loss is the mean over the global step batch.
        model.train()
        # loss sum, reward sum D, count D, reward sum U, count U, anchor KL sum, tokens
        stats = torch.zeros(7, device=device)
        for chunk in (c for mb in mine for c in _grad_chunks(mb.examples, train, cfg.grad_tokens)):
            seqs = [(train[i].prompt_ids, train[i].completion_ids) for i in chunk]
            n_tokens += sum(len(p) + len(c) for p, c in seqs)
            lp = completion_logps(model, seqs, pad_id, start=_start(prefix, model, [("train", i, i) for i in chunk]))
            rewards = lp - torch.tensor([ref[(i, i)] for i in chunk], device=device)
            desirable = torch.tensor([train[i].desirable for i in chunk], device=device)
            out = kto_loss(rewards, None, desirable, cfg.beta, lam_d, lam_u, z0_pre_clamp=z0_pre)
            (out.losses.sum() / n_global).backward()
            loss_sum = out.losses.detach().sum()
            del lp, out  # free this chunk's graph before the next chunk's forward
            r = rewards.detach()
            stats[:5] += torch.stack([loss_sum, r[desirable].sum(), desirable.sum().float(),
                                      r[~desirable].sum(), (~desirable).sum().float()])
        if anchors is not None:  # γ · mean KL per anchor token of the step; the processes share the anchors
            a_idx = anchors.for_step(s, cfg.anchor_per_step)
            a_mine = a_idx[dist.rank::dist.world]
            if a_mine:
                a_kl = anchor.kl_sum(model, anchors, a_mine, pad_id,
                                     start=_start(prefix, model, [("anchor", i) for i in a_mine]))
                (cfg.anchor_weight * a_kl / anchors.n_tokens(a_idx)).backward()
                stats[5] += a_kl.detach()
                del a_kl
            stats[6] += anchors.n_tokens(a_mine)
        if dist.world > 1:
            flat = torch.cat([p.grad.reshape(-1) if p.grad is not None
                              else torch.zeros(p.numel(), device=p.device) for p in params])
            dist.sum_(flat)
            o = 0
            for p in params:
                p.grad = flat[o:o + p.numel()].view_as(p).clone()
                o += p.numel()
        stats = dist.sum_(stats)
        loss = (stats[0] / n_global).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
        anchor_kl = (stats[5] / stats[6]).item() if stats[6] > 0 else None
        if not (math.isfinite(loss) and math.isfinite(grad_norm) and math.isfinite(z0_pre.item())
                and (anchor_kl is None or math.isfinite(anchor_kl))):
            raise TrainingDiverged(f"non-finite value at step {s + 1}/{total}: loss={loss}, grad_norm={grad_norm}, "
                                   f"z0={z0_pre.item()}, anchor_kl={anchor_kl}")
        lr = lr_base * _lr_at(s, total, warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cfg.trim_every > 0 and (s + 1) % cfg.trim_every == 0:
            _trim_heap()
        rec = {"step": s + 1, "loss": loss, "z0": max(0.0, z0_pre.item()), "z0_pre_clamp": z0_pre.item(),
               "reward_desirable": (stats[1] / stats[2]).item() if stats[2] > 0 else None,
               "reward_undesirable": (stats[3] / stats[4]).item() if stats[4] > 0 else None,
               "grad_norm": grad_norm, "lr": lr,
               "seconds": round(time.time() - t_step, 3), "kl_seconds": round(kl_seconds, 3)}  # where a step goes
        if anchor_kl is not None:
            rec["anchor_kl"] = anchor_kl  # KL(ref ‖ policy) per anchor token, before this step's update
        log.append(rec)
        emit({"event": "progress", "total": total, **rec})
        if s + 1 in keep_at:
            assert staging is not None
            t_ckpt = time.time()
            emit({"event": "phase", "phase": "checkpoint", "step": s + 1, "sequences": len(h_keys)})
            kept.append(_keep_checkpoint(model, Path(staging.name) / "checkpoints" / f"step-{s + 1}", s + 1,
                                         total, heldout, h_keys, h_ref, served_metrics, cfg, lam_d, lam_u,
                                         pad_id, batch_tokens, prefix))
            model.train()
            checkpoint_seconds += time.time() - t_ckpt
    train_seconds = time.time() - t_train - checkpoint_seconds
    seconds.update(train=train_seconds, checkpoints=checkpoint_seconds)
    t_phase = time.time()
    tokens_total = int(dist.sum_(torch.tensor([float(n_tokens)], device=device)).item())

    manifest: dict[str, Any] = {}
    if dist.main:
        model.eval()
        heldout_block: dict[str, Any] = {"n": len(heldout), "new": None, "served": served_metrics,
                                         "n_desirable": sum(ex.desirable for ex in heldout),
                                         "n_undesirable": sum(not ex.desirable for ex in heldout),
                                         "reference": "base"}
        if h_keys:
            emit({"event": "phase", "phase": "heldout_new", "sequences": len(h_keys)})
            h_new = _logps_for(model, h_keys, heldout, heldout, pad_id, batch_tokens, prefix, "heldout")
            try:
                heldout_block["new"] = _eval_heldout(h_new, h_ref, heldout, cfg.beta, lam_d, lam_u)
            except FloatingPointError as e:
                raise TrainingDiverged(str(e)) from e
        seconds["heldout_new"] = time.time() - t_phase
        hp = {k: v for k, v in asdict(cfg).items() if k not in ("snapshot", "out")}
        hp.update(lora_rank=rank, lora_alpha=float(model.peft_config["default"].lora_alpha),
                  target_modules=sorted(model.peft_config["default"].target_modules), world_size=dist.world,
                  lambda_mode=lam_mode,
                  global_batch=cfg.batch_size * cfg.grad_accum * dist.world, steps=total, lr_effective=lr_base,
                  dtype=str(dtype).removeprefix("torch."))
        z0s = [r["z0"] for r in log]
        z0p = [r["z0_pre_clamp"] for r in log]
        manifest = {
            "n_desirable": n_d, "n_undesirable": n_u, "lambda_d": lam_d, "lambda_u": lam_u, "beta": cfg.beta,
            "lambda_rule": balance.describe(n_d, n_u, lam_d, lam_u),
            "hyperparameters": hp, "data_sha256": data.data_sha256, "snapshot": str(cfg.snapshot),
            "n_rows": data.n_rows, "reference": cfg.reference, "resume_from": cfg.resume_from,
            "generation": generation,
            "served_adapter": cfg.served_adapter, "base_model": str(cfg.model_dir), "git_commit": _git_commit(),
            "train_seconds": round(train_seconds, 3), "checkpoint_seconds": round(checkpoint_seconds, 3),
            "total_seconds": round(time.time() - t_start, 3),
            "phase_seconds": {k: round(v, 3) for k, v in seconds.items()},
            "train_tokens": tokens_total, "tokens_per_second": tokens_total / max(train_seconds, 1e-9),
            "z0_pre_clamp_mean": sum(z0p) / len(z0p) if z0p else None,
            "z0_mean": sum(z0s) / len(z0s) if z0s else None,
            "final_loss": log[-1]["loss"] if log else None,
            "dropped_examples": data.dropped,
            "heldout_returned_to_training": data.unheld, "heldout_floor_added": data.floor_added,
            "heldout_examples": [ex.example_id for ex in heldout],  # lineage: rated, but judged on, not trained on
            "truncated_examples": sum(ex.prompt_truncated > 0 for ex in train + heldout),
            "heldout": heldout_block, "log": log,
            "checkpoints": kept,  # earlier adapters under out/checkpoints, oldest first
            "prefix": {"layers": prefix.layers, "sequences": len(prefix.hidden),
                       "mb": round(prefix.used / 2**20, 1),  # layers run once per sequence (model.Prefix)
                       "head_tokens": len(head.ids) if head else 0},  # tokens run once per pass (SharedHead)
            "anchor": None if anchors is None else {
                "weight": cfg.anchor_weight, "prompts": str(cfg.anchor_prompts or anchor.DEFAULT_PROMPTS),
                "n_answers": len(anchors.seqs), "answer_tokens": anchors.n_tokens(),
                "per_step": cfg.anchor_per_step, "from_cache": anchors_cached,
                "kl_first": log[0].get("anchor_kl") if log else None,
                "kl_last": log[-1].get("anchor_kl") if log else None},
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_adapter_atomically(model, Path(cfg.out), manifest,
                                 Path(staging.name) / "checkpoints" if staging is not None else None)
        if staging is not None:
            staging.cleanup()
        emit({"event": "done", "out": str(cfg.out)})
    dist.barrier()
    return manifest
