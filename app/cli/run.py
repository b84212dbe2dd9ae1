"""`kto-loop run`: start vLLM (LoRA on, loopback), the chat page, the operator console and the scheduler."""

from __future__ import annotations

import argparse
import sys

from app.config import Config

NAME = "run"
HELP = "serve the chat page (/) and operator console (/admin) with vLLM as a child process; Ctrl-C stops all"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace, cfg: Config) -> int:
    from app.main import serve
    from serving.model_fetch import ModelFetchError, check_model_dir, ensure_default_model

    try:
        if cfg.uses_default_model:
            ensure_default_model(cfg.home / "models", progress=True)
        else:
            check_model_dir(cfg.model_dir)
    except ModelFetchError as e:
        print(f"kto-loop: {e}", file=sys.stderr)
        return 2
    from feedback_store import StoreError

    try:
        return serve(cfg)
    except StoreError as e:  # a damaged or locked database: what happened and the way back, not a traceback
        print(f"kto-loop: {e}", file=sys.stderr)
        return 2
