"""`kto-loop rollback [VERSION]`: serve the previous (or the named) adapter version again."""

from __future__ import annotations

import argparse
import json
import sys

from app.config import Config

NAME = "rollback"
HELP = "switch serving back to the previous adapter version (or VERSION, e.g. kto-v2, or base)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version", nargs="?", default=None, help="version to serve (default: the previous one)")


def run(args: argparse.Namespace, cfg: Config) -> int:
    from app.cli._remote import AppNotRunning, RemoteError, call

    try:
        out = call(cfg, "POST", "/api/admin/rollback", {"version": args.version})
    except RemoteError as e:
        print(f"kto-loop: {e}", file=sys.stderr)
        return 2
    except AppNotRunning:
        return _offline(cfg, args.version)
    print(out["message"])
    return 0


def _offline(cfg: Config, version: str | None) -> int:
    """No app running: switch the registry's persisted pointer (needs the server to load and warm it)."""
    from app.loop.scheduler import RealignScheduler
    from app.main import build_stack
    from app.web.console import Operator

    with build_stack(cfg) as st:
        op = Operator(st.store, st.registry, st.realigner, RealignScheduler(st.realigner, st.store, st.settings),
                      st.settings)
        try:
            msg = op.rollback(version)
        except Exception as e:
            print(f"kto-loop: rollback refused: {e}", file=sys.stderr)
            return 2
    print(json.dumps({"message": msg}))
    return 0
