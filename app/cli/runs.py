"""`kto-loop runs`: the recent realignment runs, newest first (the console's Runs tab), from the running app or the
DuckDB file."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from app.config import Config

NAME = "runs"
HELP = "the recent realignment runs: status, counts, λ, held-out margin, version, why"
COLUMNS = ("run", "trigger", "status", "started", "n_D", "n_U", "λ_D", "λ_U", "margin", "version", "why / error")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=20, metavar="N", help="the newest N runs")
    parser.add_argument("--json", action="store_true", help="the store's run records as one JSON list")


def row(r: dict[str, Any]) -> dict[str, Any]:
    """One run record as a table row."""
    m = r.get("metrics") or {}
    new = (m.get("heldout") or {}).get("new") or {}
    margin = new.get("margin")

    def rnd(v: Any) -> Any:
        return round(v, 3) if isinstance(v, float) else v

    return {"run": r.get("id"), "trigger": r.get("trigger"), "status": r.get("status"),
            "started": str(r.get("started_at") or "")[:19], "n_D": r.get("n_desirable"),
            "n_U": r.get("n_undesirable"), "λ_D": rnd(r.get("lambda_d")), "λ_U": rnd(r.get("lambda_u")),
            "margin": rnd(margin), "version": m.get("version") or r.get("adapter_version"),
            "why / error": (r.get("error") or m.get("reason") or "")[:120]}


def table(rows: list[dict[str, Any]]) -> str:
    cells = [[("" if v is None else str(v)) for v in (r[c] for c in COLUMNS)] for r in rows]
    widths = [max([len(c), *(len(x[i]) for x in cells)]) for i, c in enumerate(COLUMNS)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*COLUMNS), *(fmt.format(*x) for x in cells)]).rstrip()


def run(args: argparse.Namespace, cfg: Config) -> int:
    from app.cli._remote import read

    if not 1 <= args.limit <= 1000:
        print("kto-loop runs: --limit must be in [1, 1000]", file=sys.stderr)
        return 2
    out = read(cfg.resolved(), NAME, "/api/admin/runs", lambda store: store.runs(args.limit),
               params={"limit": args.limit})
    if out is None:
        return 1
    if args.json:
        print(json.dumps(out))
    elif not out:
        print("no realignment runs yet")
    else:
        print(table([row(r) for r in out]))
    return 0
