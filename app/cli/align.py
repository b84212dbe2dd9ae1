"""`kto-loop align`: train an adapter from a snapshot (the aligner), or trigger a realignment run now."""

from __future__ import annotations

import argparse
import json
import sys
import time

from app.config import Config

NAME = "align"
HELP = ("train a LoRA KTO adapter from a snapshot (--snapshot FILE --out DIR ...), or run a full realignment "
        "now (--now) on the running app or, when it is not running, directly on the data dir")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--now", action="store_true",
                        help="snapshot → train → gate → hot-swap now; other flags go to the aligner otherwise")
    parser.add_argument("--no-wait", action="store_true", help="with --now on a running app: return at once")
    parser.add_argument("aligner_args", nargs=argparse.REMAINDER,
                        help="without --now: the aligner's flags (--snapshot FILE --out DIR --model-dir DIR ...)")


def run(args: argparse.Namespace, cfg: Config) -> int:
    if not args.now:
        from aligner.cli import main as aligner_main

        argv = list(args.aligner_args)
        if "--model-dir" not in argv and argv and argv[0] not in ("-h", "--help"):
            argv += ["--model-dir", str(cfg.model_dir)]
        return int(aligner_main(argv) or 0)
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
            return 1 if st.get("last", {}).get("status") == "failed" else 0
        time.sleep(2)


def _align_offline(cfg: Config) -> int:
    """No app running: bring the stack up here (vLLM is needed to load and warm the new adapter)."""
    from app.main import build_stack

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
    return 1 if out.status == "failed" else 0
