"""`kto-loop export --format kto --out FILE`: the final ratings as a training file, straight from the DuckDB file."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime

from app.config import Config

NAME = "export"
HELP = "export final ratings as TRL unpaired KTO data (.jsonl or .parquet) or as the aligner's Parquet snapshot"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("kto", "snapshot"), default="kto",
                        help="kto: TRL's unpaired format (prompt messages, completion, label); "
                             "snapshot: the aligner's Parquet contract")
    parser.add_argument("--out", required=True, help="output file; for kto the extension picks .jsonl or .parquet")
    parser.add_argument("--since", default=None,
                        help="only ratings after this: an ISO time (UTC), 'last_run', or an adapter version")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="keep only the newest N examples (default: all; --max-examples is the run setting)")


def parse_since(raw: str | None) -> datetime | str | None:
    """ISO time → datetime; anything else ('last_run', 'kto-v3') is passed on as a name."""
    if raw is None:
        return None
    try:
        return datetime.fromisoformat(raw)
    except ValueError:
        return raw


def run(args: argparse.Namespace, cfg: Config) -> int:
    from feedback_store import FeedbackStore, StoreError

    try:
        with FeedbackStore(cfg.store_location, deployment=cfg.deployment, read_only=True) as store:
            since = parse_since(args.since)
            if args.format == "kto":
                info = store.export_kto(args.out, since=since, max_examples=args.limit)
            else:
                info = store.export_snapshot(args.out, since=since, max_examples=args.limit)
    except StoreError as e:
        print(f"kto-loop export: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(info.path), "format": args.format, "n_examples": info.n_examples,
                      "n_desirable": info.n_desirable, "n_undesirable": info.n_undesirable,
                      "sha256": info.sha256}))
    return 0
