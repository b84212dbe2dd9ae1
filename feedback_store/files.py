"""Snapshot file formats: the aligner's Parquet contract and TRL's unpaired KTO format, written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
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
])

_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
# TRL's unpaired preference format, conversational: prompt and completion are lists of messages.
KTO_SCHEMA = pa.schema([("prompt", pa.list_(_MESSAGE)), ("completion", pa.list_(_MESSAGE)), ("label", pa.bool_())])


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


def to_snapshot_table(table: pa.Table) -> pa.Table:
    """Cast a query result to the exact snapshot schema (UTC timestamps, column order)."""
    cols = []
    for field in SNAPSHOT_SCHEMA:
        col = table.column(field.name)
        if field.name == "rated_at":
            col = col.cast(pa.timestamp("us")).cast(field.type)  # stored as naive UTC
        else:
            col = col.cast(field.type)
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=SNAPSHOT_SCHEMA)


def kto_rows(snapshot: pa.Table) -> list[dict]:
    """Snapshot rows → TRL unpaired rows: prompt = message list, completion = [assistant message], label."""
    out = []
    for messages, completion, label in zip(snapshot.column("messages").to_pylist(),
                                           snapshot.column("completion").to_pylist(),
                                           snapshot.column("label").to_pylist(), strict=True):
        prompt = [{"role": m["role"], "content": m["content"]} for m in json.loads(messages)]
        out.append({"prompt": prompt, "completion": [{"role": "assistant", "content": completion}],
                    "label": bool(label)})
    return out


def kto_format(path: Path) -> str:
    """'jsonl' or 'parquet', chosen by the file extension."""
    suffix = Path(path).suffix.lower()
    if suffix in {".jsonl", ".json"}:
        return "jsonl"
    if suffix in {".parquet", ".pq"}:
        return "parquet"
    raise ValueError(f"cannot tell the format of {path}: use a .jsonl or .parquet file name")


def write_kto(path: Path, rows: list[dict]) -> str:
    fmt = kto_format(path)
    if fmt == "jsonl":
        def write(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        def write(tmp: Path) -> None:
            pq.write_table(pa.Table.from_pylist(rows, schema=KTO_SCHEMA), tmp)
    return write_atomic(path, write)


def write_snapshot(path: Path, table: pa.Table) -> str:
    return write_atomic(path, lambda tmp: pq.write_table(table, tmp))
