"""Where a fresh adapter starts: decoder layer `N`, or `P%` of the model's depth (layer floor(n·P/100) of n).

An absolute index suits one model only, so the setting may be relative (`50%`: layer 15 of 30, 1 of 2, 0 of 1).
No torch: the app checks the form at start-up, the aligner resolves it before any weights load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def parse_first_layer(spec: str | int) -> tuple[float, bool]:
    """(value, relative) for `N` (an integer ≥ 0) or `P%` (0 ≤ P < 100); ValueError with the accepted forms."""
    text = str(spec).strip()
    relative = text.endswith("%")
    number = text[:-1].strip() if relative else text
    try:
        value = float(number) if relative else int(number)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < 0 or (relative and value >= 100):
        raise ValueError(f"first LoRA layer must be a layer index N ≥ 0 or a share of the depth P% with "
                         f"0 ≤ P < 100 (e.g. 15 or 50%), got {spec!r}")
    return value, relative


def first_layer(spec: str | int, n_layers: int) -> int:
    """The decoder layer index `spec` names in a model of `n_layers`; ValueError when it is out of range."""
    value, relative = parse_first_layer(spec)
    k = math.floor(n_layers * value / 100) if relative else int(value)
    if not 0 <= k < n_layers:
        raise ValueError(f"first LoRA layer must be in [0, {n_layers - 1}] for this model, got {spec}")
    return k


def num_layers(model_dir: str | Path) -> int:
    """Decoder layers of a local model, from its config (no weights loaded: flags are checked before the load)."""
    return int(json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"])
