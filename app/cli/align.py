"""`kto-loop align`: train an adapter from a snapshot (the aligner), or trigger a realignment run now."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from aligner import cli as aligner_cli
from aligner.config import SETTINGS, flag
from app.config import Config

NAME = "align"
HELP = ("train a LoRA KTO adapter from a snapshot (--snapshot FILE --out DIR ...), or run a full realignment "
        "now (--now) on the running app or, when it is not running, directly on the data dir")
SETTINGS_HIDDEN_IN_HELP = True  # the aligner's own flags are what this help is for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--now", action="store_true",
                        help="snapshot → train → gate → hot-swap now, with the app's settings")
    parser.add_argument("--no-wait", action="store_true", help="with --now on a running app: return at once")
    aligner_cli.add_arguments(parser.add_argument_group(
        "the aligner's flags (without --now)",
        "--model-dir defaults to the app's model; the settings the app forwards to the aligner (--lora-rank, --beta, "
        "--first-lora-layer, --anchor-weight, --anchor-max-tokens, --lr-generation-decay) default to the app's, "
        "so their KTO_LOOP_* env vars apply"), optional=True)
    parser.epilog = ("kto-loop's start-up settings (--home DIR, --data-dir DIR, ...; see `kto-loop run --help` and "
                     "docs/configuration.md) are accepted too.")


def _given(args: argparse.Namespace) -> dict[str, object]:
    """The aligner flags on the command line (they have no argparse default, so absent ones are not set)."""
    return {name: getattr(args, name) for name in SETTINGS if hasattr(args, name)}


def aligner_values(args: argparse.Namespace, cfg: Config) -> dict[str, object]:
    """The aligner's settings for this command line: its flags, else the app's forwarded settings, else its own."""
    forwarded = {f.metadata["aligner"]: getattr(cfg, f.name)
                 for f in dataclasses.fields(Config) if f.metadata.get("aligner")}
    return {**forwarded, "model_dir": str(cfg.model_dir), **_given(args)}


def run(args: argparse.Namespace, cfg: Config) -> int:
    if not args.now:
        missing = [flag(n) for n in ("snapshot", "out") if not hasattr(args, n)]
        if missing:
            print(f"kto-loop align: {' and '.join(missing)} needed (or --now for a full realignment)",
                  file=sys.stderr)
            return 2
        return aligner_cli.train(aligner_values(args, cfg), progress_json=getattr(args, "progress_json", False))
    app_settings = {f.name for f in dataclasses.fields(Config)}
    only_aligner = [flag(n) for n in _given(args) if n not in app_settings]
    if only_aligner:
        print(f"kto-loop align: {' '.join(only_aligner)} apply to the aligner alone, not to --now (which runs with "
              f"the app's settings; pass aligner flags to it with --align-extra-args)", file=sys.stderr)
        return 2
    return align_now(cfg, wait=not args.no_wait)


def align_now(cfg: Config, wait: bool = True) -> int:
    from app.cli._remote import AppNotRunning, RemoteError, call

    try:
        out = call(cfg, "POST", "/api/admin/align", {"trigger": "operator"})
    except RemoteError as e:
        print(f"kto-loop: {e}", file=sys.stderr)
        return 1
    except AppNotRunning:
        return _align_offline(cfg)
    print(out["message"], flush=True)
    if not wait:
        return 0
    last = None
    while True:
        st = call(cfg, "GET", "/api/admin/run")
        line = f"  {st['phase']} {st['step']}/{st['total']}" if st["total"] else f"  {st['phase']}"
        if line != last:
            print(line, flush=True)
            last = line
        if not st["running"]:
            print(json.dumps(st.get("last", {})))
            return 1 if st.get("last", {}).get("status") in ("failed", "cancelled") else 0
        time.sleep(2)


def _align_offline(cfg: Config) -> int:
    """No app running: bring the stack up here (vLLM is needed to load and warm the new adapter)."""
    from app.main import build_stack

    why = _refusal_offline(cfg)
    if why:
        print(f"kto-loop align: not started: {why}", file=sys.stderr)
        return 1
    print("kto-loop: the app is not running; realigning directly on", cfg.data_dir, flush=True)
    with build_stack(cfg) as st:
        s = st.settings.load()

        def show(ev: dict) -> None:
            if ev.get("event") == "progress":
                print(f"  train {ev['step']}/{ev['total']} loss {ev.get('loss')}", flush=True)
            elif ev.get("event") == "phase":
                print(f"  {ev['phase']}", flush=True)

        out = st.realigner.run("operator", progress=show, max_examples=s.max_examples)
    print(json.dumps({"run_id": out.run_id, "status": out.status, "promoted": out.promoted,
                      "reason": out.reason, "version": out.version}))
    return 1 if out.status in ("failed", "cancelled") else 0


def _refusal_offline(cfg: Config) -> str | None:
    """Why a run on the stopped app's data would be refused (too few ratings), checked before vLLM starts."""
    import shlex

    from app.cli._remote import open_store
    from app.loop.next_run import next_run, refusal
    from app.main import default_settings
    from app.operator_settings import SettingsStore
    from feedback_store import StoreError

    s = SettingsStore(cfg.data_dir, default_settings(cfg)).load()
    extra = shlex.split(cfg.align_extra_args)
    try:
        with open_store(cfg) as store:
            nxt = next_run(store, mode=cfg.align_mode, max_examples=s.max_examples, extra_args=extra)
    except StoreError as e:
        return str(e)
    return refusal(nxt, extra, s.min_new_ratings)
