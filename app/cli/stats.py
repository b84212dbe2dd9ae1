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


def collect(store: Any, nxt: dict[str, Any], settings_error: str | None = None) -> dict[str, Any]:
    """The report, the same whether the app answers it (/api/admin/counts) or the file does."""
    return {
        "deployment": store.deployment,
        "counts": store.counts(),
        "since_last_run": store.ratings_since_last_run(),
        "by_adapter": store.counts_by_adapter(),
        "current_adapter": store.current_adapter(),
        "next_run": nxt,
        "shares": shares(store, nxt),
        "last_run_checks": last_run_checks(store),
        "settings_error": settings_error,
    }


def shares(store: Any, nxt: dict[str, Any], top: int = 5) -> dict[str, Any]:
    """Who supplies the next run's ratings: the top signed users and client addresses, their share of its
    snapshot and what the share caps (max_user_share / max_addr_share) cut from each."""
    return store.snapshot_shares(since=nxt["since"], max_examples=nxt["max_examples"], top=top)


def last_run_checks(store: Any) -> dict[str, Any] | None:
    """The newest finished run's gate verdict: its reason, the per-rater check (app/loop/gate.py, rater_check)
    and what its snapshot's share caps cut; None before any run has finished."""
    for r in store.runs(limit=10):
        if r.get("status") == "running":
            continue
        m = r.get("metrics") if isinstance(r.get("metrics"), dict) else {}
        return {"run_id": r.get("id"), "status": r.get("status"), "version": r.get("adapter_version"),
                "reason": r.get("error") or m.get("reason"), "rater_check": m.get("rater_check"),
                "caps": r.get("snapshot_caps") if isinstance(r.get("snapshot_caps"), dict) else None}
    return None


def offline(cfg: Config) -> dict[str, Any]:
    """The report straight from the file (the app is not running, so nothing else holds it)."""
    from app.cli._remote import open_store
    from app.loop.next_run import next_run
    from app.main import default_settings
    from app.operator_settings import SettingsStore

    settings = SettingsStore(cfg.data_dir, default_settings(cfg))
    max_examples = settings.load().max_examples
    with open_store(cfg) as store:
        nxt = next_run(store, mode=cfg.align_mode, max_examples=max_examples,
                       extra_args=shlex.split(cfg.align_extra_args))
        return json.loads(json.dumps(collect(store, nxt.as_dict(), settings.error), default=str))


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
    if out.get("settings_error"):
        print(f"warning: scheduled realignment is off: {out['settings_error']}")
    print(f"deployment {out['deployment']}: {c['up']} up, {c['down']} down, {c['withdrawn']} withdrawn; "
          f"serving {out['current_adapter']}")
    print(f"since last run: {new['up']} up, {new['down']} down")
    for a in out["by_adapter"]:
        approval = "-" if a["approval"] is None else f"{100 * a['approval']:.1f}%"
        print(f"  {a['adapter']}: {a['up']} up, {a['down']} down, approval {approval}")
    print(describe_next_run(nxt))
    print(describe_trust(out.get("shares"), out.get("last_run_checks")))
    return 0


def describe_trust(sh: dict[str, Any] | None, last: dict[str, Any] | None) -> str:
    """Lines: the next run's biggest contributors and what the caps cut; the last run's per-rater check."""
    lines = []
    if sh:
        lines.append(f"share caps: max_user_share {sh['max_user_share']}, max_addr_share {sh['max_addr_share']}; "
                     f"they cut {sh['n_dropped']} of the next run's {sh['n_candidates']} ratings")
        for kind, key in (("users", "user_id"), ("addrs", "client_addr")):
            for r in sh.get(f"top_{kind}") or []:
                cut = f", {r['dropped']} cut by the cap" if r["dropped"] else ""
                lines.append(f"  {kind[:-1]} {r[key]}: {r['kept']} ratings, {100 * r['share']:.1f}%{cut}")
    if last:
        rc = last.get("rater_check")
        check = ("not applied" if rc is None else
                 f"{'passed' if rc['ok'] else 'REFUSED'} (without {rc['most_influential']}: gain "
                 f"{rc['gain_without']}, needs > {rc['min_gain']})")
        lines.append(f"last run {last['run_id']} ({last['status']}): {last.get('reason') or ''}; per-rater check "
                     f"{check}")
    return "\n".join(lines)


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
