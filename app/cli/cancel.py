"""`kto-loop cancel`: stop the running app's realignment run (its aligner child); the run is recorded as cancelled."""

from __future__ import annotations

import argparse
import sys

from app.config import Config

NAME = "cancel"
HELP = "cancel the realignment run in progress on the running app (recorded as cancelled)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace, cfg: Config) -> int:
    from app.cli._remote import AppNotRunning, RemoteError, call

    try:
        out = call(cfg, "POST", "/api/admin/cancel", {})
    except RemoteError as e:
        print(f"kto-loop: {e}", file=sys.stderr)
        return 2
    except AppNotRunning as e:  # a run lives in the app's process: with no app there is none to cancel
        print(f"kto-loop: nothing to cancel: {e}", file=sys.stderr)
        return 2
    print(out["message"])
    return 0
