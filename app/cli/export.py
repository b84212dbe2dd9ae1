"""`kto-loop export --format kto|dpo|snapshot --out FILE`: the final ratings as a training file, through the running
app (which streams it back) or straight from the DuckDB file when the app is not running."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from app.config import Config

NAME = "export"
HELP = ("export final ratings as TRL unpaired KTO data or DPO pairs (.jsonl or .parquet), or as the aligner's "
        "Parquet snapshot")
# the file suffixes each format writes; the first is the default
SUFFIXES = {"kto": (".jsonl", ".parquet"), "dpo": (".jsonl", ".parquet"), "snapshot": (".parquet",)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=tuple(SUFFIXES), default="kto",
                        help="kto: TRL's unpaired format (prompt messages, completion, label); dpo: TRL's pairs "
                             "(prompt, chosen, rejected) of sibling answers one user rated 👍 and 👎; both with "
                             "reasons and comments as metadata; snapshot: the aligner's Parquet contract")
    parser.add_argument("--out", required=True,
                        help="output file; for kto and dpo the extension picks .jsonl or .parquet")
    parser.add_argument("--since", default=None,
                        help="only ratings after this: an ISO time (UTC), 'last_run', or an adapter version")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="keep only the newest N examples, or N pairs for dpo (default: all; --max-examples is "
                             "the run setting)")


def parse_since(raw: str | None) -> datetime | str | None:
    """ISO time → datetime; anything else ('last_run', 'kto-v3') is passed on as a name."""
    if raw is None:
        return None
    try:
        return datetime.fromisoformat(raw)
    except ValueError:
        return raw


def run(args: argparse.Namespace, cfg: Config) -> int:
    from app.cli._remote import AppNotRunning, RemoteError, download
    from app.web.admin_api import SUMMARY_HEADER

    cfg = cfg.resolved()
    out = Path(args.out).expanduser().resolve()
    suffix = out.suffix.lower() if len(SUFFIXES[args.format]) > 1 else SUFFIXES[args.format][0]
    try:  # the app holds the file (DuckDB lets one process open it): it exports and streams the result here
        summary = download(cfg, "/api/admin/export", {"format": args.format, "suffix": suffix,
                                                      "since": args.since, "limit": args.limit},
                           out, SUMMARY_HEADER, overwrite=True)  # replaces its output, as the offline one does
    except (RemoteError, OSError) as e:
        print(f"kto-loop export: {e}", file=sys.stderr)
        return 1
    except AppNotRunning:
        try:
            summary = _offline(cfg, args, out)
        except Exception as e:  # StoreError and OSError: a message, not a traceback
            print(f"kto-loop export: {e}", file=sys.stderr)
            return 1
    print(json.dumps({"out": str(out), "format": args.format,
                      **{k: v for k, v in summary.items() if k != "format"}}))
    return 0


def write(store: Any, fmt: str, path: Path, since: datetime | str | None, limit: int | None) -> dict:
    """Export in `fmt` and say what was written: the one code path of the app's endpoint and of the offline
    command, so both print the same."""
    if fmt == "dpo":
        pairs = store.export_dpo(path, since=since, max_examples=limit)
        return {"n_pairs": pairs.n_pairs, "n_chosen": pairs.n_chosen, "n_rejected": pairs.n_rejected,
                "sha256": pairs.sha256}
    info = (store.export_kto if fmt == "kto" else store.export_snapshot)(path, since=since, max_examples=limit)
    return {"n_examples": info.n_examples, "n_desirable": info.n_desirable, "n_undesirable": info.n_undesirable,
            "sha256": info.sha256}


def _offline(cfg: Config, args: argparse.Namespace, out: Path) -> dict:
    from app.cli._remote import open_store

    with open_store(cfg) as store:
        return write(store, args.format, out, parse_since(args.since), args.limit)
