"""The anchor term: keep the policy's next-token distributions near the base model's on prompts no one rated.

Preference updates can cost general answers the capability guard checks; like InstructGPT's PPO-ptx (Ouyang et
al., 2022, §3.5) we add a term on data outside the preference set, the per-token KL to the reference along its
own greedy answers to `data/anchor_prompts.jsonl`, cut at `anchor_max_tokens`:

    loss = KTO loss + γ · mean over anchor answer tokens of KL(π_ref(·|x, y_<t) ‖ π_θ(·|x, y_<t))

γ = 0 leaves runs bit-identical to plain KTO; the shipped γ is 7. The reference is the base model (adapter off); its
answers and top-k distributions (loss.bucket_kl) are built once per run and cached by a hash of their inputs.
Measured: docs/experiments/2026-11-30-anchor-term.md, docs/experiments/2026-12-01-anchor-strength-and-length.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aligner.data import SnapshotError
from aligner.loss import bucket_kl, rest_logp
from aligner.model import completion_log_softmax, model_device

DEFAULT_PROMPTS = Path(__file__).parent / "data" / "anchor_prompts.jsonl"
TOP_K = 128  # reference tokens kept per answer position; the rest share one bucket (loss.bucket_kl)


@dataclass
class Anchors:
    seqs: list[tuple[list[int], list[int]]]  # (prompt ids, the reference's greedy answer ids) per anchor prompt
    top_ids: list[torch.Tensor]              # per anchor: [answer tokens, k] the reference's likeliest token ids
    top_logp: list[torch.Tensor]             # per anchor: [answer tokens, k] their reference log-probs
    rest_logp: list[torch.Tensor]            # per anchor: [answer tokens] reference log-mass of all other tokens

    def for_step(self, step: int, per_step: int) -> list[int]:
        """The anchor indices of one optimizer step: consecutive slices, wrapping, so every anchor is used evenly."""
        n = len(self.seqs)
        return [(step * per_step + j) % n for j in range(min(per_step, n))]

    def n_tokens(self, indices: list[int] | None = None) -> int:
        return sum(len(self.seqs[i][1]) for i in (range(len(self.seqs)) if indices is None else indices))

    def to(self, device: torch.device | str) -> Anchors:
        """The same anchors with their reference tensors on `device` (the training device; the cache keeps CPU)."""
        def move(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t.to(device) for t in ts]

        return Anchors(self.seqs, move(self.top_ids), move(self.top_logp), move(self.rest_logp))


def load_prompts(path: str | Path | None) -> list[str]:
    """Prompts of an anchor file: JSON lines with a non-empty "prompt" string each. SnapshotError otherwise."""
    path = Path(path) if path else DEFAULT_PROMPTS
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise SnapshotError(f"cannot read anchor prompts {path}: {e}") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        try:
            prompt = json.loads(line).get("prompt")
        except (json.JSONDecodeError, AttributeError):
            prompt = None
        if not isinstance(prompt, str) or not prompt.strip():
            raise SnapshotError(f"{path}:{n}: each line must be a JSON object with a non-empty \"prompt\"")
        prompts.append(prompt)
    if len(prompts) < 2:
        raise SnapshotError(f"{path}: at least 2 anchor prompts needed, found {len(prompts)}")
    return prompts


def _chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, top_k: int = TOP_K,
          batch_size: int = 64) -> Anchors:
    """The reference's greedy answers (adapter disabled, up to and including its end-of-turn token) and its
    top-k next-token log-probs along them."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    prompt_ids = [_chat_ids(tokenizer, p) for p in prompts]
    seqs: list[tuple[list[int], list[int]]] = []
    device = model_device(model)
    with torch.inference_mode(), model.disable_adapter():
        for s in range(0, len(prompt_ids), batch_size):  # one big batch: decoding cost is per step, not per row
            chunk = prompt_ids[s:s + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)  # left padding
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, use_cache=True, pad_token_id=pad, eos_token_id=eos)
            for p, row in zip(chunk, out[:, width:].tolist(), strict=True):
                answer = row[:row.index(eos) + 1] if eos in row else row
                if answer:
                    seqs.append((p, answer))
        if len(seqs) < 2:
            raise SnapshotError("the reference model produced fewer than 2 non-empty anchor answers")
        top_ids, top_logp, rest = [], [], []
        for s in range(0, len(seqs), 8):
            chunk = seqs[s:s + 8]
            logp = completion_log_softmax(model, chunk, pad)
            v, i = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
            r = rest_logp(v)
            o = 0
            for _, answer in chunk:
                top_ids.append(i[o:o + len(answer)].clone())
                top_logp.append(v[o:o + len(answer)].clone())
                rest.append(r[o:o + len(answer)].clone())
                o += len(answer)
    return Anchors(seqs, top_ids, top_logp, rest)


def kl_sum(model: Any, anchors: Anchors, indices: list[int], pad_id: int,
           start: tuple[int, list[torch.Tensor]] | None = None) -> torch.Tensor:
    """Σ over the answer tokens of `indices` of the bucketed KL(π_ref ‖ π_θ), with gradient through the policy.
    `start`: these anchors' layer-k inputs (model.Prefix), to run from layer k."""
    logp = completion_log_softmax(model, [anchors.seqs[i] for i in indices], pad_id, start=start)
    ids = torch.cat([anchors.top_ids[i] for i in indices])
    policy_top = logp.gather(-1, ids)
    return bucket_kl(torch.cat([anchors.top_logp[i] for i in indices]),
                     torch.cat([anchors.rest_logp[i] for i in indices]), policy_top, rest_logp(policy_top)).sum()


# ---------------------------------------------------------------------------------------------- cache
_CACHE_FORMAT = 1


def cache_key(model_dir: str | Path, prompts: list[str], max_new_tokens: int, top_k: int, dtype: torch.dtype) -> str:
    """A hash of everything the anchors depend on: the base model's files (contents), the prompts, the answer
    length, k, the compute dtype (bf16 and float32 greedy answers can differ) and the torch version."""
    h = hashlib.sha256(json.dumps([_CACHE_FORMAT, prompts, max_new_tokens, top_k, str(dtype),
                                   torch.__version__]).encode())
    for f in sorted(Path(model_dir).iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()[:32]


def load_cached(cache_dir: str | Path, key: str) -> Anchors | None:
    """The anchors stored under `key`, or None when absent or unreadable (the run then builds them again)."""
    path = Path(cache_dir) / f"anchors-{key}.pt"
    try:
        d = torch.load(path, weights_only=True, map_location="cpu")
        anchors = Anchors([(list(p), list(a)) for p, a in d["seqs"]], d["top_ids"], d["top_logp"], d["rest_logp"])
    except Exception:  # missing, truncated or from another format: a cache miss, never a failed run
        return None
    n = len(anchors.seqs)
    if n < 2 or not (len(anchors.top_ids) == len(anchors.top_logp) == len(anchors.rest_logp) == n):
        return None
    return anchors


def save_cached(anchors: Anchors, cache_dir: str | Path, key: str) -> Path:
    """Write atomically (temp file + rename), so a concurrent or interrupted run never reads half a file."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"anchors-{key}.pt"
    fd, tmp = tempfile.mkstemp(prefix=".anchors-", dir=cache_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            cpu = anchors.to("cpu")  # a cache any device can read
            torch.save({"seqs": cpu.seqs, "top_ids": cpu.top_ids, "top_logp": cpu.top_logp,
                        "rest_logp": cpu.rest_logp}, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
