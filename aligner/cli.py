"""`align`: the subprocess entry point the app spawns (also `python -m aligner` and `kto-loop align`).

Exit codes: 0 success, 2 bad input (one line on stderr), 1 training failure (non-finite values; nothing written).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from aligner.config import SETTINGS, TrainConfig, flag, problems


def _flag_kind(tp: Any) -> dict[str, Any]:
    """argparse's type/nargs/action for a field's type: `X | None` → X, `list[X]` → one or more, bool → --x/--no-x."""
    args = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) in (Union, UnionType) else [tp]
    if str in args:
        return {"type": str}
    base = args[0]
    if get_origin(base) is list:
        return {"type": get_args(base)[0], "nargs": "+"}
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": base}


def add_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup, *, optional: bool = False) -> None:
    """One flag per TrainConfig field (name, type, default, choices and help from the field), plus --progress-json.

    `optional`: no flag is required and none has a default, so a caller (`kto-loop align`) sees which were given."""
    hints = get_type_hints(TrainConfig)
    for name, f in SETTINGS.items():
        meta, has_default = f.metadata, f.default is not MISSING
        shown = f" (default: {f.default})" if has_default and f.default is not None else ""
        kwargs = {**_flag_kind(hints[name]), "dest": name, "help": (meta["help"] + shown).replace("%", "%%"),
                  "choices": meta["choices"], "metavar": meta["metavar"]}
        if kwargs.get("action"):
            del kwargs["choices"], kwargs["metavar"]
        elif kwargs["metavar"] is None and kwargs["choices"] is None:
            kwargs["metavar"] = kwargs["type"].__name__.upper()
        if optional:
            kwargs["default"] = argparse.SUPPRESS
        elif has_default:
            kwargs["default"] = f.default
        else:
            kwargs["required"] = True
        action = p.add_argument(flag(name), *meta["aliases"], **kwargs)
        action.help = kwargs["help"]  # BooleanOptionalAction appends its own default on some Pythons
    p.add_argument("--progress-json", action="store_true", help="JSON lines on stdout instead of a progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


def _adapted_modules(adapter_dir: str | None) -> set[str]:
    """The layers an adapter directory adapts (empty without one)."""
    from aligner.data import SnapshotError

    if not adapter_dir:
        return set()
    try:
        return set(json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("target_modules") or [])
    except (OSError, ValueError, AttributeError) as e:
        raise SnapshotError(f"{adapter_dir}/adapter_config.json is unreadable: {e}") from None


def _validate(cfg: TrainConfig) -> None:
    from aligner.data import SnapshotError
    from aligner.model import LLAMA_LINEAR

    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SnapshotError(f"output {out} already exists and is not an empty directory")
    if not Path(cfg.model_dir).is_dir():
        raise SnapshotError(f"model directory not found: {cfg.model_dir}")
    for name in ("resume_from", "served_adapter"):
        d = getattr(cfg, name)
        if d and not (Path(d) / "adapter_config.json").is_file():
            raise SnapshotError(f"{flag(name)} {d} is not an adapter directory")
    for name, rule in problems(vars(cfg)):
        raise SnapshotError(f"{flag(name)} {rule}")
    resumed = _adapted_modules(cfg.resume_from) if cfg.target_modules else set()
    checks = [(1 <= cfg.lora_rank <= cfg.max_lora_rank, "--lora-rank must be in [1, --max-lora-rank]"),
              (cfg.anchor_prompts is None or Path(cfg.anchor_prompts).is_file(),
               f"--anchor-prompts {cfg.anchor_prompts} is not a file"),
              (cfg.target_modules is None or set(cfg.target_modules) <= set(LLAMA_LINEAR),
               f"--target-modules must be among {' '.join(LLAMA_LINEAR)}"),
              (cfg.target_modules is None or not cfg.resume_from
               or set(cfg.target_modules) == resumed,
               f"--target-modules {' '.join(cfg.target_modules or [])} differs from the layers the --resume-from "
               f"adapter adapts ({' '.join(sorted(resumed))}): a resumed adapter keeps its own")]
    for ok, msg in checks:
        if not ok:
            raise SnapshotError(msg)


class _Printer:
    """Progress sink: JSON lines on stdout, or a tqdm bar on stderr."""

    def __init__(self, as_json: bool) -> None:
        self.as_json, self.bar = as_json, None

    def __call__(self, event: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps(event), flush=True)
            return
        if event["event"] == "progress":
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=event["total"], desc="align", unit="step", file=sys.stderr)
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{event['loss']:.4f}", z0=f"{event['z0_pre_clamp']:+.3f}")
        elif event["event"] == "phase":
            print(f"align: {event['phase']} ({event.get('sequences', 0)} sequences)", file=sys.stderr)
        elif event["event"] == "done":
            if self.bar is not None:
                self.bar.close()
            print(f"align: wrote {event['out']}", file=sys.stderr)


def train(values: dict[str, Any], progress_json: bool = False) -> int:
    """Validate the settings, train, write the adapter; the exit code (0, 1 training failed, 2 bad input)."""
    from aligner.data import SnapshotError
    from aligner.train import TrainingDiverged, run

    try:
        cfg = TrainConfig(**values)
        _validate(cfg)
        run(cfg, _Printer(progress_json))
    except SnapshotError as e:
        print(f"align: error: {e}", file=sys.stderr)
        return 2
    except (TrainingDiverged, FloatingPointError) as e:
        print(f"align: error: training failed, nothing written: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    values = vars(build_parser().parse_args(argv))
    return train(values, progress_json=values.pop("progress_json"))
