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

import argparse
import json
from pathlib import Path

import duckdb

from app.loop.gate import repeats_itself
from app.sim.measure import stops_mid_sentence
from benchmarks.harness import machine, result_path
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sim_dirs", nargs="+", help="simulation work directories, each optionally =LABEL")
    ap.add_argument("--label", default="", help="suffix of the result file's name")
    ap.add_argument("--out", type=Path, help="result file (default: benchmarks/results/answer_faults/...)")
    args = ap.parse_args()
    runs = []
    for spec in args.sim_dirs:
        where, _, label = spec.partition("=")
        sim = Path(where).expanduser()
        for store in sorted(sim.glob("*/feedback.duckdb")):
            by_adapter = count(read_store(store))
            runs.append({"simulation": sim.name, "label": label or sim.name, "rater": store.parent.name,
                         "adapters": by_adapter})
            cells = ", ".join(f"{a}: mid-sentence {v['stops_mid_sentence']:.1%}, loops {v['repeats_itself']:.1%} of "
                              f"{v['answers']} (cut {v['cut']:.0%})"
                              for a, v in by_adapter.items())
            print(f"{label or sim.name} {store.parent.name}: {cells}")
    out = args.out or result_path("answer_faults", args.label)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"kind": "answer_faults", "machine": machine(), "runs": runs}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
