"""The simulator's inputs, checked up front: prompts, the capability probe and raters, so a bad file fails before
a server starts."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from app.loop import gate
from app.loop.gate import DEFAULT_CAPABILITY, Question

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_PROMPTS = DATA_DIR / "prompts.jsonl"
DEFAULT_HOLDOUT = DATA_DIR / "holdout.jsonl"

Rater = Callable[[str, str], "bool | None"]
Log = Callable[[str], None]


class SimulationError(RuntimeError):
    """Bad input (prompts, rater) or a stage that did not run; the message says which."""


# ---------------------------------------------------------------- inputs

def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a .jsonl file ({"prompt": ...} per line) or a plain text file (one prompt per line)."""
    path = Path(path)
    if not path.is_file():
        raise SimulationError(f"prompt file not found: {path}")
    out: list[str] = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if path.suffix == ".jsonl":
            try:
                text = json.loads(line)["prompt"]
            except (ValueError, KeyError, TypeError) as e:
                raise SimulationError(f"{path}:{i}: expected a JSON object with a 'prompt' string ({e})") from None
            if not isinstance(text, str) or not text.strip():
                raise SimulationError(f"{path}:{i}: 'prompt' must be a non-empty string")
            line = text.strip()
        out.append(line)
    if not out:
        raise SimulationError(f"no prompts in {path}")
    return out


def evenly_spaced(items: Sequence[str], n: int) -> list[str]:
    """`n` items spread over the list (all when n <= 0 or n >= len), so every category of the file stays in."""
    return [items[i * len(items) // n] for i in range(n)] if 0 < n < len(items) else list(items)


def load_capability(path: str | Path = DEFAULT_CAPABILITY) -> list[Question]:
    """The gate's capability questions, with the simulator's error type so the command reports it in one line."""
    try:
        return gate.load_capability(path)
    except gate.CapabilityError as e:
        raise SimulationError(str(e)) from None


def load_rater(spec: str) -> tuple[str, Rater]:
    """`concise` (an example rater), `package.module:function` or `path/to/file.py:function` → (name, fn)."""
    from app.sim import raters

    if spec in raters.RATERS:
        return spec, raters.RATERS[spec]
    target, sep, fn_name = spec.rpartition(":")
    if not sep or not target or not fn_name:
        raise SimulationError(f"bad rater {spec!r}: use one of {sorted(raters.RATERS)}, "
                              "MODULE:FUNCTION or FILE.py:FUNCTION")
    try:
        if target.endswith(".py") or os.sep in target:
            file = Path(target)
            if not file.is_file():
                raise SimulationError(f"rater file not found: {file}")
            mod_spec = importlib.util.spec_from_file_location(f"kto_rater_{file.stem}", file)
            assert mod_spec is not None and mod_spec.loader is not None
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except SimulationError:
        raise
    except Exception as e:
        raise SimulationError(f"cannot import rater {spec!r}: {type(e).__name__}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise SimulationError(f"rater {spec!r}: {fn_name!r} is not a function in {target}")
    return fn_name, fn


def call_rater(rater: Rater, prompt: str, answer: str) -> bool | None:
    """One verdict, checked: a user-written rater that raises or returns a non-bool is named, not trusted."""
    try:
        verdict = rater(prompt, answer)
    except Exception as e:
        raise SimulationError(f"the rater raised {type(e).__name__}: {e} (prompt {prompt[:60]!r})") from e
    if verdict is None:
        return None
    if not isinstance(verdict, bool):
        raise SimulationError(f"the rater must return True, False or None, got {verdict!r}")
    return verdict

