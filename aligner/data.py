"""Snapshot → tokenised examples → deterministic held-out split → length-grouped step plan.

The snapshot is the Parquet file feedback_store exports (see docs/ARCHITECTURE.md). Everything here is
deterministic given the snapshot and the seed, so every process of a distributed run builds the same plan and a
resumed run holds out the same answers.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aligner.config import HELDOUT_FLOOR_MAX_SHARE, HELDOUT_MIN_PER_CLASS
from aligner.loss import rotation

REQUIRED_COLUMNS = ("example_id", "answer_id", "messages", "completion", "label")
OPTIONAL_COLUMNS = ("user_id", "ended")
MIN_PROMPT_TOKENS = 8  # below this the completion is judged without its question, so the example is dropped


class SnapshotError(ValueError):
    """Bad input: the run is refused with a one-line message (exit code 2)."""


@dataclass
class Example:
    example_id: str
    answer_id: str
    prompt_ids: list[int]
    completion_ids: list[int]  # the answer tokens, plus the end-of-turn token if it ended; the loss covers these
    desirable: bool
    prompt_truncated: int = 0  # prompt tokens cut from the left to fit max_length
    user_id: str | None = None  # who rated it (snapshots carry it): the gate's per-rater breakdown


@dataclass
class Dataset:
    train: list[Example]
    heldout: list[Example]
    dropped: list[dict[str, Any]] = field(default_factory=list)
    data_sha256: str = ""
    n_rows: int = 0
    unheld: list[str] = field(default_factory=list)  # answer ids the split held out but training needed
    floor_added: list[str] = field(default_factory=list)  # answer ids held out to reach the per-kind minimum


def read_snapshot(path: str | Path) -> list[dict[str, Any]]:
    """Rows of the snapshot as dicts; SnapshotError for anything that is not a usable snapshot."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f"snapshot not found: {path}")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt/foreign files
        raise SnapshotError(f"cannot read snapshot {path}: {type(e).__name__}: {e}".splitlines()[0]) from e
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise SnapshotError(f"snapshot {path.name} lacks column(s) {', '.join(missing)}")
    if table.num_rows == 0:
        raise SnapshotError(f"snapshot {path.name} is empty: nothing to train on")
    optional = [c for c in OPTIONAL_COLUMNS if c in table.column_names]
    rows = table.select([*REQUIRED_COLUMNS, *optional]).to_pylist()
    for i, row in enumerate(rows):
        row["ended"] = row.get("ended") is not False  # older snapshots have no column: every answer ended
        if row["label"] is None or not isinstance(row["label"], bool):
            raise SnapshotError(f"row {i}: label must be a bool, got {row['label']!r}")
        if not isinstance(row["completion"], str):
            raise SnapshotError(f"row {i}: completion must be a string")
        try:
            msgs = json.loads(row["messages"]) if isinstance(row["messages"], str) else None
        except json.JSONDecodeError as e:
            raise SnapshotError(f"row {i}: messages is not valid JSON ({e.msg})") from e
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise SnapshotError(f"row {i}: messages must be a non-empty JSON list of {{role, content}}")
        row["messages"] = msgs
    return rows


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def answer_hash(answer_id: str) -> float:
    """A uniform number in [0, 1) fixed by the answer id: the order in which answers are held out."""
    return int.from_bytes(hashlib.sha256(answer_id.encode()).digest()[:8], "big") / 2**64


def is_heldout(answer_id: str, fraction: float) -> bool:
    """Held out iff the hash of the answer id falls below `fraction`: stable across runs and snapshots, and all
    ratings of one answer land on the same side, so a held-out answer is never trained on."""
    return fraction > 0 and answer_hash(answer_id) < fraction


def tokenize_pair(tokenizer: Any, messages: list[dict[str, str]], completion: str,
                  ended: bool = True) -> tuple[list[int], list[int]]:
    """Prompt ids (chat template with the generation prompt) and completion ids (the answer, end-of-turn if it ended).

    The completion is rendered through the template too, so the end-of-turn marker is the model's own; text the
    template adds after it (a newline) is not part of what the model generated and is left out. An answer that did
    not end (cut at max_tokens, stopped by the user) gets no end-of-turn: log π(y|x) is of what was sampled, and a
    marker there would teach the model to stop mid-sentence.
    """
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=False)
    if full.startswith(prompt):
        suffix = full[len(prompt):]
        eot = tokenizer.eos_token or ""
        start = suffix.find(completion) + len(completion) if completion in suffix else 0
        cut = suffix.find(eot, start) if eot else -1
        suffix = suffix[:cut + len(eot)] if cut >= 0 else suffix.rstrip()
    else:  # templates that rewrite earlier turns: fall back to the plain answer plus EOS
        suffix = completion + (tokenizer.eos_token or "")
    if not ended:
        suffix = suffix[:suffix.find(completion) + len(completion)] if completion in suffix else completion
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    return list(prompt_ids), list(completion_ids)


def build_dataset(path: str | Path, tokenizer: Any, max_length: int = 512, heldout_fraction: float = 0.1,
                  max_examples: int | None = None, heldout_min: int = HELDOUT_MIN_PER_CLASS) -> Dataset:
    """Read, tokenise, truncate prompts from the left, drop (and report) what cannot fit, split by answer id
    (the hash slice, topped up to `heldout_min` answers of each kind; 0 = the slice alone)."""
    rows = read_snapshot(path)
    if max_examples is not None:
        rows = rows[:max_examples]
    kept: list[Example] = []
    dropped: list[dict[str, Any]] = []
    for row in rows:
        prompt_ids, completion_ids = tokenize_pair(tokenizer, row["messages"], row["completion"], row["ended"])
        n_total = len(prompt_ids) + len(completion_ids)
        if not completion_ids:
            dropped.append({"example_id": row["example_id"], "answer_id": row["answer_id"],
                            "reason": "no completion tokens", "n_tokens": n_total})
            continue
        if len(completion_ids) > max_length - MIN_PROMPT_TOKENS:
            dropped.append({"example_id": row["example_id"], "answer_id": row["answer_id"],
                            "reason": "completion longer than max_length allows", "n_tokens": n_total})
            continue
        cut = max(0, n_total - max_length)
        kept.append(Example(row["example_id"], row["answer_id"], prompt_ids[cut:], completion_ids, row["label"], cut,
                            row.get("user_id")))
    train, heldout, unheld, added = split(kept, heldout_fraction, heldout_min)
    return Dataset(train, heldout, dropped, file_sha256(path), len(rows), unheld, added)


def split(examples: list[Example], heldout_fraction: float, heldout_min: int = HELDOUT_MIN_PER_CLASS
          ) -> tuple[list[Example], list[Example], list[str], list[str]]:
    """(train, heldout, answer ids returned to training, answer ids added by the floor): the hash slice, the
    per-kind floor, then both kinds kept in training. Needs only answer ids and labels, so the app can tell what
    the next run would train on without tokenising (app/loop/next_run.py)."""
    train, heldout = [], []
    for ex in examples:
        (heldout if is_heldout(ex.answer_id, heldout_fraction) else train).append(ex)
    added: list[str] = []
    if heldout_fraction > 0 and heldout_min > 0:
        train, heldout, added = hold_out_floor(train, heldout, heldout_min)
    train, heldout, unheld = _keep_both_kinds_in_training(train, heldout)
    return train, heldout, unheld, added


def hold_out_floor(train: list[Example], heldout: list[Example], minimum: int,
                   max_share: float = HELDOUT_FLOOR_MAX_SHARE) -> tuple[list[Example], list[Example], list[str]]:
    """Top the held-out slice up to `minimum` examples of each kind, whole answers from training in hash order, at
    most `max_share` of that kind's examples: so the gate's margin never rests on one answer.

    Hash order keeps the choice stable: an answer one run trained on is not held out by a later run, unless
    `max_share` binds or old ratings leave the `max_examples` window (which only makes the gate stricter).
    Measured: docs/experiments/2026-12-02-heldout-floor.md.
    """
    added: list[str] = []
    for kind in (True, False):
        n_kind = sum(ex.desirable == kind for ex in train + heldout)
        need = min(minimum, int(n_kind * max_share)) - sum(ex.desirable == kind for ex in heldout)
        if need <= 0:
            continue
        candidates = sorted({ex.answer_id for ex in train if ex.desirable == kind}, key=answer_hash)
        for answer_id in candidates:
            if need <= 0:
                break
            moved = [ex for ex in train if ex.answer_id == answer_id]
            train = [ex for ex in train if ex.answer_id != answer_id]
            heldout = heldout + moved
            need -= sum(ex.desirable == kind for ex in moved)
            added.append(answer_id)
    return train, heldout, added


def _keep_both_kinds_in_training(train: list[Example], heldout: list[Example]
                                 ) -> tuple[list[Example], list[Example], list[str]]:
    """When every thumb of one kind hashed into the held-out slice, train on those answers instead of refusing the
    run: KTO needs both kinds, the gate can judge on the rest. Whole answers move, so none is on both sides.
    """
    unheld: set[str] = set()
    for kind in (True, False):
        if not any(ex.desirable == kind for ex in train):
            unheld |= {ex.answer_id for ex in heldout if ex.desirable == kind}
    if not unheld:
        return train, heldout, []
    return (train + [ex for ex in heldout if ex.answer_id in unheld],
            [ex for ex in heldout if ex.answer_id not in unheld], sorted(unheld))


@dataclass
class MicroBatch:
    examples: list[int]  # indices into the train list
    partners: list[int]  # KL partner of each: the next example of this micro-batch (rotation)


def plan_epoch(lengths: list[int], batch_size: int, seed: int, epoch: int, group: int = 16,
               labels: list[bool] | None = None) -> list[MicroBatch]:
    """One epoch of micro-batches: fresh shuffle, then (approximate) length grouping; with `labels`, every
    micro-batch also gets its proportional share of thumbs-up and thumbs-down.

    Length grouping alone gives one-class batches when the preference correlates with length, and a batch of
    undesirable answers alone can only push every log-prob down; stratifying keeps both forces in every step
    (measured: docs/experiments/2026-11-23-simulator-defaults.md). The sort key is jittered (±15%) so epochs
    differ, the batch order is shuffled, and the KL pairs are rotated inside each micro-batch.
    """
    n = len(lengths)
    if n < 2:
        raise ValueError(f"need at least 2 training examples, got {n}")
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(n))
    rng.shuffle(order)
    jitter = {i: lengths[i] * rng.uniform(0.85, 1.15) for i in order}
    if labels is not None:
        if len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} examples")
        # Same batch sizes as the plain plan (full batches, a remainder of one joins the last batch): equal
        # sizes keep the per-micro-batch mean loss equivalent to one big batch under gradient accumulation and
        # across processes. Batch k takes the next slice of each length-sorted class, the desirable share
        # rounded so that the shares add up.
        sizes = [batch_size] * (n // batch_size)
        rest = n - sum(sizes)
        if rest >= 2 or not sizes:
            sizes.append(rest)
        else:
            sizes[-1] += rest
        pos = sorted((i for i in order if labels[i]), key=jitter.__getitem__)
        neg = sorted((i for i in order if not labels[i]), key=jitter.__getitem__)
        batches, done, p_at, n_at = [], 0, 0, 0
        for size in sizes:
            done += size
            p_end = round(done * len(pos) / n)
            take_p = min(p_end - p_at, size)
            batch = pos[p_at:p_at + take_p] + neg[n_at:n_at + size - take_p]
            p_at, n_at = p_at + take_p, n_at + size - take_p
            batches.append(batch)
        batches[-1] += pos[p_at:] + neg[n_at:]  # nothing is left unless rounding met a tiny class; never drop it
        rng.shuffle(batches)
        return [MicroBatch(b, [b[j] for j in rotation(len(b))]) for b in batches]
    window = batch_size * group
    sorted_order: list[int] = []
    for s in range(0, n, window):
        sorted_order += sorted(order[s:s + window], key=jitter.__getitem__)
    batches = [sorted_order[s:s + batch_size] for s in range(0, n, batch_size)]
    if len(batches[-1]) < 2:
        last = batches.pop()
        batches[-1] = batches[-1] + last
    rng.shuffle(batches)
    return [MicroBatch(b, [b[j] for j in rotation(len(b))]) for b in batches]
