"""How often each adapter of a simulation stopped mid-sentence or looped on one sentence, in the answers it collected.

`kto-loop simulate` measures both on held-out answers (`stops_mid_sentence`, `repeats_itself`); runs from before
it did only kept their stores. This counts them from those stores (each rater's feedback.duckdb, read-only), with
the product's own rules (`app.sim.measure`, `app.loop.gate`) and the snapshot's
(`feedback_store.files.answer_ended`) for which answers the model ended itself.

Run: `.venv/bin/python -m benchmarks.answer_faults SIM_DIR[=LABEL] ...`, where SIM_DIR is a simulation's work
directory (default location ~/.cache/kto-loop/data/simulations/<started>). Writes
benchmarks/results/answer_faults/<date>_<cpu>[_<label>].json.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from app.loop.gate import repeats_itself
from app.sim.measure import stops_mid_sentence
from benchmarks.harness import per_simulation_store
from feedback_store.files import answer_ended


def count(rows: list[tuple[str, str, str | None, int | None]]) -> dict[str, dict[str, float]]:
    """Per adapter: answers, the share cut (not ended by the model), stopped mid-sentence, looping; mean words."""
    out: dict[str, dict[str, float]] = {}
    for adapter in sorted({r[0] for r in rows}, key=lambda a: (a != "base", a)):
        mine = [r for r in rows if r[0] == adapter]
        ended = [answer_ended(sampling, tokens) for _, _, sampling, tokens in mine]
        mid = sum(e and stops_mid_sentence(text, "stop") for e, (_, text, _, _) in zip(ended, mine, strict=True))
        out[adapter] = {"answers": len(mine), "cut": round(1 - sum(ended) / len(mine), 4),
                        "stops_mid_sentence": round(mid / len(mine), 4), "stopped_mid_sentence_n": mid,
                        "repeats_itself": round(sum(repeats_itself(r[1]) for r in mine) / len(mine), 4),
                        "mean_words": round(sum(len(r[1].split()) for r in mine) / len(mine), 1)}
    return out


def read_store(path: Path) -> list[tuple[str, str, str | None, int | None]]:
    """(adapter, text, sampling, completion_tokens) of every stored answer."""
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute("SELECT adapter, text, sampling, completion_tokens FROM answers").fetchall()


def main() -> None:
    per_simulation_store("answer_faults", __doc__, lambda store: count(read_store(store)),
                         lambda a, v: f"{a}: mid-sentence {v['stops_mid_sentence']:.1%}, loops "
                                      f"{v['repeats_itself']:.1%} of {v['answers']} (cut {v['cut']:.0%})")


if __name__ == "__main__":
    main()
