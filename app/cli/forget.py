"""`kto-loop forget USER`: delete one user's conversations, answers and ratings (a privacy request), keep only the
counts for audit, and name the adapter versions that learnt from those ratings so the operator can retrain."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from app.config import Config

NAME = "forget"
HELP = "delete one user's conversations and ratings (asks first unless --yes) and name the adapters trained on them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("user", help="the user id as stored: anon-…, user:NAME (signed in), key:CLIENT/USER "
                                     "(an API client's end user) or key:CLIENT")
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run(args: argparse.Namespace, cfg: Config) -> int:
    from app.cli._remote import AppNotRunning, RemoteError, call

    cfg = cfg.resolved()
    try:     # the app holds the file (DuckDB lets one process open it): it deletes
        return _forget(args, lambda dry_run: call(cfg, "POST", "/api/admin/forget",
                                                  {"user": args.user, "dry_run": dry_run}, store=True))
    except RemoteError as e:
        print(f"kto-loop forget: {e}", file=sys.stderr)
        return 1
    except AppNotRunning:
        pass
    from feedback_store import FeedbackStore, StoreError

    try:
        with FeedbackStore(cfg.store_location, deployment=cfg.deployment) as store:
            return _forget(args, lambda dry_run: json.loads(json.dumps(
                store.forget_user(args.user, dry_run=dry_run).as_dict(), default=str)))
    except StoreError as e:
        print(f"kto-loop forget: {e}", file=sys.stderr)
        return 1


def _forget(args: argparse.Namespace, forget: Any) -> int:
    """Count first, ask, then delete; the same through the app and on the file."""
    preview = forget(True)
    if not preview["conversations"] and not preview["ratings"]:
        print(f"nothing is stored under {args.user!r} (ids look like anon-…, user:NAME, key:CLIENT/USER)",
              file=sys.stderr)
        print(json.dumps(preview) if args.json else f"{args.user}: nothing to delete")
        return 0
    if not args.yes:
        print(f"This deletes, for good, {_counts(preview)} of {args.user}.", file=sys.stderr)
        if preview["runs"]:
            print(_runs(preview), file=sys.stderr)
        try:
            answer = input("Delete? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("kto-loop forget: nothing deleted", file=sys.stderr)
            return 1
    report = forget(False)
    print(json.dumps(report) if args.json else describe(args.user, report))
    return 0


def _counts(r: dict[str, Any]) -> str:
    v = r["by_value"]
    return (f"{r['conversations']} conversations ({r['messages']} messages, {r['answers']} answers) and "
            f"{r['ratings']} ratings ({v['up']} up, {v['down']} down, {v['withdrawn']} withdrawn, with their reasons, "
            f"comments and {r['rating_events']} audit events)")


def _runs(r: dict[str, Any]) -> str:
    lines = ["adapter versions that learnt from these ratings (they keep what they learnt until retrained):"]
    for run in r["runs"]:
        served = ", serving now" if run["served"] else ""
        if run["via"]:
            lines.append(f"  {run['version']}: continued from {run['via']}{served}")
        else:
            lines.append(f"  {run['version'] or '(no adapter)'}: run {run['run_id']} ({run['status']}) trained on "
                         f"{run['trained']}, held out {run['heldout']}, dropped {run['dropped']}{served}")
    return "\n".join(lines)


def describe(user: str, r: dict[str, Any]) -> str:
    lines = [f"deleted {_counts(r)} of {user}; the audit keeps these counts, not the id"]
    if r["runs"]:
        lines += [_runs(r), "to drop their influence: roll back to a version not listed (kto-loop rollback), or "
                            "retrain from the base model with align_mode=fresh"]
    else:
        lines.append("no adapter version was trained on them")
    return "\n".join(lines)
