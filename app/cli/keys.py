"""`kto-loop keys create NAME | list | revoke NAME`: API keys for client applications of the OpenAI-compatible API.

Through the running app's operator API when it is up (the app holds the database), on the file when it is not.
A new key is printed once; only its hash is kept, so a lost key is revoked and replaced, never recovered.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from app.config import Config

NAME = "keys"
HELP = "API keys for client applications of /v1/chat/completions: create NAME (shown once), list, revoke NAME"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="make a key for client NAME and print it (the only time it is shown)")
    create.add_argument("name", metavar="NAME", help="the client application, e.g. open-webui")
    sub.add_parser("list", help="every key made: client, prefix, created, revoked")
    revoke = sub.add_parser("revoke", help="revoke client NAME's key: its requests are refused from now on")
    revoke.add_argument("name", metavar="NAME")
    for p in sub.choices.values():
        p.add_argument("--json", action="store_true", help="one JSON object on stdout")


def remote_call(action: str, name: str | None) -> tuple[str, str, dict | None]:
    """The operator API request for an action: (method, path, body)."""
    return {"create": ("POST", "/api/admin/keys", {"name": name}),
            "list": ("GET", "/api/admin/keys", None),
            "revoke": ("POST", "/api/admin/keys/revoke", {"name": name})}[action]


def _offline(cfg: Config, action: str, name: str | None) -> dict[str, Any]:
    from feedback_store import FeedbackStore

    with FeedbackStore(cfg.store_location, deployment=cfg.deployment) as store:
        if action == "create":
            secret, row = store.create_api_key(name)
            return {"key": secret, **json.loads(json.dumps(row, default=str))}
        if action == "revoke":
            n = store.revoke_api_key(name)
            if not n:
                raise LookupError(f"client {name!r} has no active key")
            return {"name": name, "revoked": n}
        return {"keys": json.loads(json.dumps(store.api_keys(), default=str))}


def run(args: argparse.Namespace, cfg: Config) -> int:
    from app.cli._remote import AppNotRunning, RemoteError, call
    from feedback_store import StoreError

    cfg = cfg.resolved()
    action, name = args.keys_command, getattr(args, "name", None)
    try:
        out = call(cfg, *remote_call(action, name))
        out["via"] = "app"
    except RemoteError as e:
        print(f"kto-loop keys: {e}", file=sys.stderr)
        return 1
    except AppNotRunning:
        try:
            out = _offline(cfg, action, name) | {"via": "file"}
        except (StoreError, LookupError) as e:
            print(f"kto-loop keys: {e}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(out))
    elif action == "create":
        print(f"API key for {out['name']} (shown once, keep it secret):\n{out['key']}")
    elif action == "revoke":
        print(f"revoked the key of {out['name']}")
    else:
        for k in out["keys"]:
            state = f"revoked {k['revoked_at']}" if k["revoked_at"] else "active"
            print(f"{k['name']}\t{k['prefix']}…\tcreated {k['created_at']}\t{state}")
        if not out["keys"]:
            print("no API keys yet (kto-loop keys create NAME)")
    return 0
