"""`kto-loop lineage ANSWER_ID`: which ratings shaped the adapter that wrote an answer, split into the ones its run
trained on, held out (judged the new adapter on) and dropped."""

from __future__ import annotations

import argparse
import json
from typing import Any
from urllib.parse import quote

from app.config import Config

NAME = "lineage"
HELP = "the ratings behind an answer's adapter: trained on, held out, dropped (--ancestors: its parent chain too)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("answer_id", help="the answer's id (as the chat and the API return it)")
    parser.add_argument("--ancestors", action="store_true",
                        help="also the adapters it was resumed from (continue mode trains one further each run)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")


def run(args: argparse.Namespace, cfg: Config) -> int:
    from app.cli._remote import read

    out = read(cfg.resolved(), NAME, f"/api/admin/lineage/{quote(args.answer_id, safe='')}",
               lambda store: store.lineage_detail(args.answer_id, args.ancestors),
               params={"ancestors": "true" if args.ancestors else "false"})
    if out is None:
        return 1
    print(json.dumps(out) if args.json else describe(out))
    return 0


def describe(out: dict[str, Any]) -> str:
    """Per adapter: its run and the counts, then the rating ids of each kind."""
    lines = [f"answer {out['answer_id']} was written by {out['adapter']}"]
    if not out["adapters"]:
        lines.append("  no adapter run behind it (the base model, or an adapter without a recorded run)")
    for a in out["adapters"]:
        lines.append(f"  {a['version']} (run {a['run_id']}, parent {a['parent'] or 'none'}): {len(a['trained'])} "
                     f"trained, {len(a['heldout'])} held out, {len(a['dropped'])} dropped"
                     + (f"; {a['deleted']} of its ratings deleted since (kto-loop forget, retention)"
                        if a.get("deleted") else ""))
        for kind in ("trained", "heldout", "dropped"):
            if a[kind]:
                lines.append(f"    {kind}: {' '.join(a[kind])}")
    return "\n".join(lines)
