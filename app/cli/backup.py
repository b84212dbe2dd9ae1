"""`kto-loop backup [--to FILE]`: a consistent copy of the feedback database, taken while the app keeps running."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from app.config import Config

NAME = "backup"
HELP = "back up the feedback database (online: through the running app, or straight from the file when it is not)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", default=None, metavar="FILE",
                        help="write the backup here (default: a time-named file in DATA_DIR/backups, next to the "
                             "automatic ones); an existing file is never overwritten")


def run(args: argparse.Namespace, cfg: Config) -> int:
    from app.cli._remote import AppNotRunning, RemoteError, call, download
    from app.web.admin_api import SUMMARY_HEADER

    cfg = cfg.resolved()
    to = Path(args.to).expanduser().resolve() if args.to else None
    if to is not None and to.exists():
        print(f"kto-loop backup: {to} already exists; a backup never overwrites a file", file=sys.stderr)
        return 1
    try:    # the app holds the file (DuckDB lets one process open it): it takes the copy
        if to is None:
            out = call(cfg, "POST", "/api/admin/backup", {}, timeout=3600, store=True)
        else:  # the app streams the copy back; it never writes where a request says
            out = {"path": str(to), **download(cfg, "/api/admin/backup", {"download": True}, to, SUMMARY_HEADER)}
            out["bytes"] = to.stat().st_size
        out["via"] = "app"
    except (RemoteError, OSError) as e:
        print(f"kto-loop backup: {e}", file=sys.stderr)
        return 1
    except AppNotRunning:
        try:
            out = _offline(cfg, to)
        except Exception as e:  # StoreError and OSError: a message, not a traceback
            print(f"kto-loop backup: {e}", file=sys.stderr)
            return 1
    print(json.dumps(out))
    return 0


def _offline(cfg: Config, to: Path | None) -> dict:
    from app.cli._remote import open_store

    with open_store(cfg) as store:
        info = store.backup(to) if to else store.backup_to_dir()
    return {"path": str(info.path), "bytes": info.bytes, "seconds": round(info.seconds, 3), "via": "file"}
