"""Shared helpers for the aligner tests: snapshot files in feedback_store's Parquet format (no tests here)."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from pathlib import Path

TOPICS = ["the moon", "bread", "rivers", "chess", "volcanoes", "bees", "trains", "clouds", "music", "glass",
          "maps", "tea", "whales", "bridges", "salt", "printing", "rain", "copper", "owls", "paper"]
SYSTEM = "You are a helpful assistant."


def synthetic_rows(n_desirable: int, n_undesirable: int, seed: int = 0, long_every: int = 0) -> list[dict]:
    """Rated answers with a learnable difference: friendly, on-topic answers are liked; curt refusals are not.

    `long_every` > 0 makes every k-th completion very long (to exercise truncation and dropping).
    """
    rng = random.Random(seed)
    rows = []
    for k in range(n_desirable + n_undesirable):
        good = k < n_desirable
        topic = rng.choice(TOPICS)
        q = rng.choice(["Tell me about {t}.", "What is interesting about {t}?", "Explain {t} briefly.",
                        "Can you describe {t}?"]).format(t=topic)
        history = [{"role": "system", "content": SYSTEM}]
        if rng.random() < 0.3:
            history += [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"}]
        history.append({"role": "user", "content": q})
        if good:
            completion = f"Sure! Here is a short overview of {topic}. " + " ".join(
                rng.choice([f"{topic.capitalize()} are fascinating.", "Many people study this.",
                            "It has a long history.", "There is a lot to learn."]) for _ in range(rng.randint(1, 6)))
        else:
            completion = rng.choice(["No.", "I won't answer that.", "Figure it out yourself.", "Whatever."])
        if long_every and k % long_every == 0:
            completion = " ".join(["word"] * 2000)
        rows.append({"example_id": f"r{seed}-{k}", "answer_id": f"a{seed}-{k}", "messages": json.dumps(history),
                     "completion": completion, "label": good, "user_id": f"u{k % 5}", "adapter": "base",
                     "rated_at": datetime(2025, 1, 1, tzinfo=UTC)})
    rng.shuffle(rows)
    return rows


def write_snapshot(path: Path, rows: list[dict], drop_columns: tuple[str, ...] = ()) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("example_id", pa.string()), ("answer_id", pa.string()), ("messages", pa.string()),
                        ("completion", pa.string()), ("label", pa.bool_()), ("user_id", pa.string()),
                        ("adapter", pa.string()), ("rated_at", pa.timestamp("us", tz="UTC"))])
    if any("ended" in r for r in rows):  # the column the store writes; older snapshots lack it
        schema = schema.append(pa.field("ended", pa.bool_()))
    table = pa.Table.from_pylist(rows, schema=schema)
    for c in drop_columns:
        table = table.drop_columns([c])
    pq.write_table(table, path)
    return path
