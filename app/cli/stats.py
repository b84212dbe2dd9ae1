"""`kto-loop stats [--json]`: rating counts and the λ pair the aligner would choose now, from the DuckDB file."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from app.config import Config

NAME = "stats"
HELP = "print rating counts (overall, per adapter, since the last run) and the λ_D/λ_U a run would use now"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")


def lambdas(n_desirable: int, n_undesirable: int) -> dict[str, Any]:
    """The aligner's own rule (aligner.balance.auto_lambdas), or why it would refuse to train."""
    from aligner.balance import auto_lambdas

    try:
        lam_d, lam_u = auto_lambdas(n_desirable, n_undesirable)
    except ValueError as e:
        return {"lambda_d": None, "lambda_u": None, "note": str(e)}
    return {"lambda_d": lam_d, "lambda_u": lam_u, "note": ""}


def collect(store: Any, max_examples: int | None) -> dict[str, Any]:
    n_d, n_u = store.training_counts(max_examples=max_examples)
    return {
        "deployment": store.deployment,
        "counts": store.counts(),
        "since_last_run": store.ratings_since_last_run(),
        "by_adapter": store.counts_by_adapter(),
        "current_adapter": store.current_adapter(),
        "next_run": {"max_examples": max_examples, "n_desirable": n_d, "n_undesirable": n_u, **lambdas(n_d, n_u)},
    }


def run(args: argparse.Namespace, cfg: Config) -> int:
    from feedback_store import FeedbackStore, StoreError

    try:
        with FeedbackStore(cfg.store_location, deployment=cfg.deployment, read_only=True) as store:
            out = collect(store, cfg.max_examples)
    except StoreError as e:
        print(f"kto-loop stats: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out, default=str))
        return 0
    c, nxt, new = out["counts"], out["next_run"], out["since_last_run"]
    print(f"deployment {out['deployment']}: {c['up']} up, {c['down']} down, {c['withdrawn']} withdrawn; "
          f"serving {out['current_adapter']}")
    print(f"since last run: {new['up']} up, {new['down']} down")
    for a in out["by_adapter"]:
        approval = "-" if a["approval"] is None else f"{100 * a['approval']:.1f}%"
        print(f"  {a['adapter']}: {a['up']} up, {a['down']} down, approval {approval}")
    if nxt["lambda_d"] is None:
        print(f"next run: {nxt['note']}")
    else:
        print(f"next run: {nxt['n_desirable']} up / {nxt['n_undesirable']} down → "
              f"λ_D={nxt['lambda_d']:.4g}, λ_U={nxt['lambda_u']:.4g}")
    return 0
