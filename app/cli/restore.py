"""`kto-loop restore FILE`: put a backup back as the feedback database (the app must be stopped)."""

from __future__ import annotations

import argparse
import json
import sys

from app.config import Config

NAME = "restore"
HELP = "replace the feedback database with a backup (checked first; the replaced file is kept aside); app stopped"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="the backup to restore (e.g. the newest in DATA_DIR/backups)")


def run(args: argparse.Namespace, cfg: Config) -> int:
    from app.cli._remote import runtime_info
    from feedback_store import StoreError, restore

    cfg = cfg.resolved()
    info = runtime_info(cfg)
    if info is not None:
        print(f"kto-loop restore: the app is running (pid {info.get('pid')}); stop it first, then restore",
              file=sys.stderr)
        return 2
    if cfg.db_url:
        print("kto-loop restore: the feedback store is on PostgreSQL (db_url): restore it with the server's own "
              "tools (pg_restore), see docs/deploy.md", file=sys.stderr)
        return 2
    try:
        aside = restore(args.file, cfg.db_path)
    except (StoreError, OSError) as e:
        print(f"kto-loop restore: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"restored": args.file, "db": str(cfg.db_path), "previous": aside and str(aside)}))
    return 0
