"""`kto-loop run`: start vLLM (LoRA on, loopback), the chat page, the operator console and the scheduler."""

from __future__ import annotations

import argparse
import logging

from app.config import Config
from app.logs import json_logging, say

NAME = "run"
HELP = "serve the chat page (/) and operator console (/admin) with vLLM as a child process; Ctrl-C stops all"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace, cfg: Config) -> int:
    from app.main import serve
    from serving.model_fetch import (
        DEFAULT_MODEL_NAME,
        ModelFetchError,
        check_model_dir,
        ensure_default_model,
        is_complete,
    )

    try:
        if cfg.uses_default_model:
            if not is_complete(cfg.home / "models" / DEFAULT_MODEL_NAME):
                progress(f"fetching the default model {DEFAULT_MODEL_NAME} and converting it for vLLM into "
                         f"{cfg.home / 'models'} (first start only, about a minute)")
            ensure_default_model(cfg.home / "models", progress=not json_logging())
        else:
            check_model_dir(cfg.model_dir)
    except ModelFetchError as e:
        say(str(e), logging.ERROR)
        return 2
    from feedback_store import StoreError

    try:
        return serve(cfg)
    except StoreError as e:  # a damaged or locked database: what happened and the way back, not a traceback
        say(str(e), logging.ERROR)
        return 2


def progress(what: str) -> None:
    """A start-up step on stderr, so the first minutes of `make run` do not look like a hang."""
    say(f"{what} …")
