"""How much of a rater's thumbs the prompt alone decides, in the answers a simulation collected.

A thumb can say "this answer, not another one to the same prompt" or only "this kind of prompt". KTO's reward is
the log-ratio of one answer given its prompt, so only the first kind tells the model what to write differently.
Where a prompt was answered twice or more by the same adapter, the thumbs' spread inside each prompt is compared with
the spread it would have if the prompt did not matter (a binomial draw at the adapter's thumbs-up rate):
`within_ratio` ≈ 1 when the prompt says nothing, 0 when it decides every thumb; `prompt_share` = 1 − within_ratio.

Run: `.venv/bin/python -m benchmarks.label_sources SIM_DIR[=LABEL] ...` (a simulation's work directory, default
location ~/.cache/kto-loop/data/simulations/<started>; each rater's feedback.duckdb is read read-only). Writes
benchmarks/results/label_sources/<date>_<cpu>[_<label>].json.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import duckdb

from benchmarks.harness import per_simulation_store


def within_prompt_ratio(thumbs_by_prompt: list[list[bool]]) -> dict[str, float | int | None]:
    """Within-prompt variance of the thumbs over its expectation if the prompt did not matter (prompts seen ≥ twice)."""
    multi = [t for t in thumbs_by_prompt if len(t) >= 2]
    n = sum(len(t) for t in multi)
    if not n:
        return {"prompts": 0, "answers": 0, "up_rate": None, "within_ratio": None, "prompt_share": None}
    p = sum(sum(t) for t in multi) / n
    within = sum(sum((x - sum(t) / len(t)) ** 2 for x in t) for t in multi) / n
    expected = sum(len(t) - 1 for t in multi) / n * p * (1 - p)  # E[within] for independent Bernoulli(p) thumbs
    ratio = within / expected if expected > 0 else None
    return {"prompts": len(multi), "answers": n, "up_rate": round(p, 4),
            "within_ratio": None if ratio is None else round(ratio, 3),
            "prompt_share": None if ratio is None else round(1 - ratio, 3)}


def read_store(path: Path) -> dict[str, list[list[bool]]]:
    """Per adapter, the thumbs of its answers grouped by the prompt (the last user message) they answered."""
    with duckdb.connect(str(path), read_only=True) as con:
        rows = con.execute("SELECT a.adapter, a.prompt_messages, r.value FROM answers a JOIN ratings r "
                           "ON r.answer_id = a.id WHERE r.value IN ('up', 'down')").fetchall()
    grouped: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for adapter, messages, value in rows:
        grouped[adapter][json.loads(messages)[-1]["content"]].append(value == "up")
    return {a: list(by_prompt.values()) for a, by_prompt in grouped.items()}


def main() -> None:
    per_simulation_store("label_sources", __doc__,
                         lambda store: {a: within_prompt_ratio(t) for a, t in sorted(
                             read_store(store).items(), key=lambda kv: (kv[0] != "base", kv[0]))},
                         lambda a, v: f"{a}: prompt share {v['prompt_share']} ({v['answers']} answers, "
                                      f"{v['prompts']} prompts)")


if __name__ == "__main__":
    main()
