"""Snapshot file formats: the aligner's Parquet contract and TRL's unpaired KTO and paired DPO formats, written
atomically."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# The contract with the aligner (docs/ARCHITECTURE.md): one row per final, non-withdrawn rating.
SNAPSHOT_SCHEMA = pa.schema([
    ("example_id", pa.string()),
    ("answer_id", pa.string()),
    ("messages", pa.string()),      # JSON list of {"role","content"}: the exact prompt context
    ("completion", pa.string()),
    ("label", pa.bool_()),          # true = thumbs up = desirable
    ("user_id", pa.string()),
    ("adapter", pa.string()),
    ("rated_at", pa.timestamp("us", tz="UTC")),
    ("ended", pa.bool_()),          # false: cut at max_tokens or stopped by the user, so no end-of-turn to learn
])

_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
_UTC = pa.timestamp("us", tz="UTC")
# TRL's unpaired preference format, conversational: prompt and completion are lists of messages; then metadata
# TRL leaves alone (the rated answer, its rater, the reason and comment given with the final rating, whether the
# model ended the answer or it was cut, when). TRL appends an end-of-turn to every completion: filter on `ended`.
KTO_SCHEMA = pa.schema([("prompt", pa.list_(_MESSAGE)), ("completion", pa.list_(_MESSAGE)), ("label", pa.bool_()),
                        ("answer_id", pa.string()), ("user_id", pa.string()), ("reason", pa.string()),
                        ("comment", pa.string()), ("ended", pa.bool_()), ("rated_at", _UTC)])
# TRL's preference format (DPOTrainer), conversational with an explicit prompt: chosen and rejected are one
# assistant message each; then metadata: both answers, the one user who rated them, each final rating's reason and
# comment, and when the later of the two ratings was made.
DPO_SCHEMA = pa.schema([("prompt", pa.list_(_MESSAGE)), ("chosen", pa.list_(_MESSAGE)),
                        ("rejected", pa.list_(_MESSAGE)), ("chosen_answer_id", pa.string()),
                        ("rejected_answer_id", pa.string()), ("user_id", pa.string()),
                        ("chosen_reason", pa.string()), ("chosen_comment", pa.string()),
                        ("rejected_reason", pa.string()), ("rejected_comment", pa.string()), ("rated_at", _UTC)])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, write: Callable[[Path], None]) -> str:
    """Write through a temp file in the same folder, fsync, rename over `path`; returns the sha256.

    A reader (the aligner subprocess) never sees a half-written file, and a crash leaves the old one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = sha256_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return digest


def answer_ended(sampling: str | dict | None, completion_tokens: int | None) -> bool:
    """Did the model end this answer itself? Not when the user stopped it, vLLM said "length", or (answers stored
    before the finish reason was kept) it used all of max_tokens. Unknown counts as ended, the old assumption."""
    if isinstance(sampling, str):
        try:
            sampling = json.loads(sampling) if sampling else {}
        except json.JSONDecodeError:
            sampling = {}
    sampling = sampling if isinstance(sampling, dict) else {}
    if sampling.get("stopped"):
        return False
    finish = sampling.get("finish_reason")
    if isinstance(finish, str):
        return finish == "stop"
    limit = sampling.get("max_tokens")
    return not (isinstance(limit, int) and isinstance(completion_tokens, int) and completion_tokens >= limit)


def to_snapshot_table(table: pa.Table) -> pa.Table:
    """Cast a query result to the exact snapshot schema (UTC timestamps, column order); `ended` is worked out from
    the answers' sampling and completion_tokens columns."""
    cols = []
    for field in SNAPSHOT_SCHEMA:
        if field.name == "ended":
            cols.append(pa.array([answer_ended(s, n) for s, n in zip(table.column("sampling").to_pylist(),
                                                                      table.column("completion_tokens").to_pylist(),
                                                                      strict=True)], pa.bool_()))
            continue
        col = table.column(field.name)
        if field.name == "rated_at":
            col = col.cast(pa.timestamp("us")).cast(field.type)  # stored as naive UTC
        else:
            col = col.cast(field.type)
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=SNAPSHOT_SCHEMA)


def _messages(raw: str) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in json.loads(raw)]


def _utc(t: datetime) -> datetime:
    """A stored (naive UTC) time as an aware one, so both file formats say it is UTC."""
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def kto_rows(rated: pa.Table) -> list[dict]:
    """Rated rows (the snapshot's columns plus reason and comment) → TRL unpaired rows: prompt = message list,
    completion = [assistant message], label, then the metadata columns of KTO_SCHEMA."""
    return [{"prompt": _messages(r["messages"]), "completion": [{"role": "assistant", "content": r["completion"]}],
             "label": bool(r["label"]), **{name: r[name] for name in KTO_SCHEMA.names[3:-2]},
             "ended": answer_ended(r["sampling"], r["completion_tokens"]), "rated_at": _utc(r["rated_at"])}
            for r in rated.to_pylist()]


def dpo_rows(pairs: pa.Table) -> list[dict]:
    """Pair rows (messages, chosen_text, rejected_text and the metadata of DPO_SCHEMA) → TRL preference rows."""
    out = []
    for p in pairs.to_pylist():
        out.append({"prompt": _messages(p["messages"]),
                    "chosen": [{"role": "assistant", "content": p["chosen_text"]}],
                    "rejected": [{"role": "assistant", "content": p["rejected_text"]}],
                    **{name: p[name] for name in DPO_SCHEMA.names[3:-1]}, "rated_at": _utc(p["rated_at"])})
    return out


def kto_format(path: Path) -> str:
    """'jsonl' or 'parquet', chosen by the file extension."""
    suffix = Path(path).suffix.lower()
    if suffix in {".jsonl", ".json"}:
        return "jsonl"
    if suffix in {".parquet", ".pq"}:
        return "parquet"
    raise ValueError(f"cannot tell the format of {path}: use a .jsonl or .parquet file name")


def write_rows(path: Path, rows: list[dict], schema: pa.Schema) -> str:
    """Write TRL rows as JSON lines (times in ISO 8601 with their UTC offset) or as Parquet in `schema`, by the
    file extension; returns the sha256."""
    fmt = kto_format(path)
    if fmt == "jsonl":
        def write(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False, default=datetime.isoformat) + "\n")
    else:
        def write(tmp: Path) -> None:
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    return write_atomic(path, write)


def write_snapshot(path: Path, table: pa.Table) -> str:
    return write_atomic(path, lambda tmp: pq.write_table(table, tmp))
