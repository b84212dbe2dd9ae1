"""`kto-loop schedule`: show or change the realignment schedule (persisted; the running app applies it now)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from app.config import Config

NAME = "schedule"
HELP = "show or set the realignment schedule: --every MINUTES | --cron EXPR | --off, --min-new N, --examples-per-run N"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--every", type=int, metavar="MINUTES", help="run every N minutes (replaces a cron schedule)")
    g.add_argument("--cron", metavar="EXPR", help="crontab expression, e.g. '0 3 * * *' (replaces an interval)")
    g.add_argument("--off", action="store_true", help="no scheduled runs (settings are kept)")
    g.add_argument("--on", action="store_true", help="re-enable scheduled runs")
    parser.add_argument("--min-new", type=int, metavar="N", help="start a scheduled run only after N new ratings")
    parser.add_argument("--examples-per-run", type=int, metavar="N", help="newest N examples per run at most")


def changes_from(args: argparse.Namespace) -> dict:
    ch: dict = {}
    if args.every is not None:
        ch |= {"interval_minutes": args.every, "cron": "", "enabled": True}
    if args.cron is not None:
        ch |= {"cron": args.cron, "interval_minutes": 0, "enabled": True}
    if args.off:
        ch["enabled"] = False
    if args.on:
        ch["enabled"] = True
    if args.min_new is not None:
        ch["min_new_ratings"] = args.min_new
    if args.examples_per_run is not None:
        ch["max_examples"] = args.examples_per_run
    return ch


def run(args: argparse.Namespace, cfg: Config) -> int:
    from app.cli._remote import AppNotRunning, RemoteError, call

    ch = changes_from(args)
    try:
        out = call(cfg, "POST", "/api/admin/schedule", ch) if ch else call(cfg, "GET", "/api/admin/schedule")
    except RemoteError as e:
        print(f"kto-loop: {e}", file=sys.stderr)
        return 2
    except AppNotRunning:
        try:
            out = _offline(cfg, ch)
        except ValueError as e:
            print(f"kto-loop: {e}", file=sys.stderr)
            return 2
    print(json.dumps(out, indent=2))
    return 0


def _offline(cfg: Config, ch: dict) -> dict:
    """No app running: check and persist the changes here (nothing is written when one is bad)."""
    from app.main import default_settings
    from app.operator_settings import SettingsStore

    store = SettingsStore(cfg.data_dir, default_settings(cfg))
    s = store.load()
    if store.error:
        print(f"kto-loop: {store.error}", file=sys.stderr)
    if ch:
        s = store.update(**ch)
    return dataclasses.asdict(s) | {"note": "app not running; applied at next start"}
