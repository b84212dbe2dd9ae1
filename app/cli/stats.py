"""`kto-loop stats [--json]`: rating counts and what the next run would train on (its n_D/n_U after the held-out
split, and its λ_D/λ_U), from the running app or, when it is not running, from the DuckDB file."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

from app.config import Config

NAME = "stats"
HELP = ("print rating counts (overall, per adapter, since the last run) and what the next run would train on: "
        "n_D/n_U after its cap and held-out split, and the λ_D/λ_U it would use")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")


def collect(store: Any, nxt: dict[str, Any]) -> dict[str, Any]:
    """The report, the same whether the app answers it (/api/admin/counts) or the file does."""
    return {
        "deployment": store.deployment,
        "counts": store.counts(),
        "since_last_run": store.ratings_since_last_run(),
        "by_adapter": store.counts_by_adapter(),
        "current_adapter": store.current_adapter(),
        "next_run": nxt,
    }


def offline(cfg: Config) -> dict[str, Any]:
    """The report straight from the file (the app is not running, so nothing else holds it)."""
    from app.cli._remote import open_store
    from app.loop.next_run import next_run
    from app.main import default_settings
    from app.operator_settings import SettingsStore

    max_examples = SettingsStore(cfg.data_dir, default_settings(cfg)).load().max_examples
    with open_store(cfg) as store:
        nxt = next_run(store, mode=cfg.align_mode, max_examples=max_examples,
                       extra_args=shlex.split(cfg.align_extra_args))
        return json.loads(json.dumps(collect(store, nxt.as_dict()), default=str))


def run(args: argparse.Namespace, cfg: Config) -> int:
    from app.cli._remote import AppNotRunning, RemoteError, call
    from feedback_store import StoreError

    cfg = cfg.resolved()
    try:
        out = call(cfg, "GET", "/api/admin/counts", store=True)
    except RemoteError as e:
        print(f"kto-loop stats: {e}", file=sys.stderr)
        return 1
    except AppNotRunning:
        try:
            out = offline(cfg)
        except StoreError as e:
            print(f"kto-loop stats: {e}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(out))
        return 0
    c, nxt, new = out["counts"], out["next_run"], out["since_last_run"]
    print(f"deployment {out['deployment']}: {c['up']} up, {c['down']} down, {c['withdrawn']} withdrawn; "
          f"serving {out['current_adapter']}")
    print(f"since last run: {new['up']} up, {new['down']} down")
    for a in out["by_adapter"]:
        approval = "-" if a["approval"] is None else f"{100 * a['approval']:.1f}%"
        print(f"  {a['adapter']}: {a['up']} up, {a['down']} down, approval {approval}")
    print(describe_next_run(nxt))
    return 0


def describe_next_run(nxt: dict[str, Any]) -> str:
    """One line: what the next run would train on, or why it would be refused."""
    scope = (f"continues {nxt['served']} on the ratings since it" if nxt["resume"]
             else "trains a new adapter on all ratings")
    head = (f"next run ({nxt['mode']}): {scope}, newest {nxt['max_examples']} at most: "
            f"{nxt['snapshot_desirable']} up / {nxt['snapshot_undesirable']} down, "
            f"{nxt['heldout_desirable']} up / {nxt['heldout_undesirable']} down held out")
    if nxt["lambda_d"] is None:
        return f"{head}; {nxt['note']}"
    return (f"{head}; trains on {nxt['n_desirable']} up / {nxt['n_undesirable']} down → "
            f"λ_D={nxt['lambda_d']:.4g}, λ_U={nxt['lambda_u']:.4g}")
