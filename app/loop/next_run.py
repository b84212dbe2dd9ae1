"""What the next realignment run would train on: the realigner's snapshot selection (mode, served adapter, cap,
share caps) and the aligner's own held-out split and λ rule, computed without exporting or tokenising.

One function for every place that shows or uses these numbers (the console, `kto-loop stats`, the realigner's run
record), so the dashboard cannot promise a run other than the one that happens. Only length drops are not
foreseen: they need the tokenizer (a completion longer than the aligner's --max-length allows; rare).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aligner import balance
from aligner import cli as aligner_cli
from aligner.config import HELDOUT_FLOOR_MAX_SHARE, TrainConfig
from aligner.data import Example, split

# the aligner settings that decide which snapshot rows train and with which weights
SPLIT_SETTINGS = ("heldout_fraction", "heldout_min", "max_examples", "lambda_d", "lambda_u", "target_ratio",
                  "preference")


class TooFewRatings(ValueError):
    """A run started now could not train or could not be judged (`refusal` says why); nothing was started."""


@dataclass(frozen=True)
class Selection:
    """Which ratings the realigner exports: `since` an adapter version (continue mode) or None (everything)."""
    mode: str
    served: str
    resume: bool
    since: str | None
    max_examples: int


@dataclass(frozen=True)
class NextRun:
    mode: str
    served: str
    resume: bool
    since: str | None
    max_examples: int
    snapshot_desirable: int    # the snapshot's rows (after the cap and the share caps)
    snapshot_undesirable: int
    n_desirable: int           # what trains (after the aligner's cap and held-out split): the λ rule's counts
    n_undesirable: int
    heldout_desirable: int
    heldout_undesirable: int
    lambda_d: float | None
    lambda_u: float | None
    lambda_mode: str | None    # "auto" | "pinned"; None when the run would be refused
    note: str                  # why the run would be refused, else ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def aligner_settings(extra_args: Sequence[str] = ()) -> dict[str, Any]:
    """The split and λ settings an aligner child runs with: its defaults, overridden by the app's extra flags."""
    parser = argparse.ArgumentParser(add_help=False)
    aligner_cli.add_arguments(parser, optional=True)
    given, _ = parser.parse_known_args(list(extra_args))
    defaults = {name: getattr(TrainConfig, name) for name in SPLIT_SETTINGS}
    return {**defaults, **{k: v for k, v in vars(given).items() if k in SPLIT_SETTINGS}}


def selection(store: Any, mode: str, max_examples: int,
              adapter_dir_of: Callable[[str | None], Path | None]) -> Selection:
    """The realigner's choice: "continue" with an adapter served trains it further on the ratings since that
    adapter's snapshot; otherwise a new adapter on everything; newest `max_examples` either way."""
    served = store.current_adapter()
    resume = mode == "continue" and adapter_dir_of(served) is not None
    return Selection(mode, served, resume, served if resume else None, max_examples)


def store_adapter_dir(store: Any) -> Callable[[str | None], Path | None]:
    """An adapter's directory as the store records it (the realigner also asks its registry)."""
    def adapter_dir_of(version: str | None) -> Path | None:
        if not version or version == "base":
            return None
        for a in store.adapters():
            if a.get("version") == version and a.get("path"):
                return Path(a["path"])
        return None
    return adapter_dir_of


def split_counts(rows: Iterable[tuple[str, str, bool]], settings: dict[str, Any]) -> dict[str, Any]:
    """(example_id, answer_id, label) rows in snapshot order → the aligner's train/held-out counts and λ."""
    rows = list(rows)
    if settings.get("max_examples") is not None:
        rows = rows[:settings["max_examples"]]
    examples = [Example(e, a, [], [], bool(label)) for e, a, label in rows]
    train, heldout, _, _ = split(examples, settings["heldout_fraction"], settings["heldout_min"])
    n_d = sum(ex.desirable for ex in train)
    out = {"n_desirable": n_d, "n_undesirable": len(train) - n_d,
           "heldout_desirable": sum(ex.desirable for ex in heldout),
           "heldout_undesirable": sum(not ex.desirable for ex in heldout)}
    try:
        lam_d, lam_u, lam_mode = balance.resolve(n_d, len(train) - n_d, settings.get("lambda_d"),
                                                 settings.get("lambda_u"), settings.get("target_ratio"),
                                                 settings.get("preference"))
        return out | {"lambda_d": lam_d, "lambda_u": lam_u, "lambda_mode": lam_mode, "note": ""}
    except ValueError as e:
        return out | {"lambda_d": None, "lambda_u": None, "lambda_mode": None, "note": str(e)}


def next_run(store: Any, *, mode: str, max_examples: int, extra_args: Sequence[str] = (),
             adapter_dir_of: Callable[[str | None], Path | None] | None = None) -> NextRun:
    """The numbers a run started now would train with (see the module's docstring)."""
    sel = selection(store, mode, max_examples, adapter_dir_of or store_adapter_dir(store))
    keys = store.snapshot_keys(since=sel.since, max_examples=sel.max_examples)
    rows = list(zip(keys.column("example_id").to_pylist(), keys.column("answer_id").to_pylist(),
                    keys.column("label").to_pylist(), strict=True))
    snap_d = sum(bool(r[2]) for r in rows)
    return NextRun(sel.mode, sel.served, sel.resume, sel.since, sel.max_examples, snap_d, len(rows) - snap_d,
                   **split_counts(rows, aligner_settings(extra_args)))


def fewest_per_kind(heldout_min: int, max_share: float = HELDOUT_FLOOR_MAX_SHARE) -> int | None:
    """The fewest ratings of one kind from which the aligner's held-out floor keeps one aside and one to train on
    (aligner/data.py, hold_out_floor); None when there is no floor and only the hash slice holds out."""
    if heldout_min <= 0:
        return None
    n = 2
    while min(heldout_min, int(n * max_share)) < 1:
        n += 1
    return n


def refusal(nxt: NextRun, extra_args: Sequence[str] = (), min_new_ratings: int | None = None) -> str | None:
    """Why a run started now would be wasted (None: it can train and be judged). It trains on at least one
    thumbs-up and one thumbs-down, and the gate judges it on held-out thumbs of both kinds: without them no
    adapter can be promoted, so the run is refused before a snapshot is taken or anything trains."""
    if (nxt.n_desirable and nxt.n_undesirable and nxt.heldout_desirable and nxt.heldout_undesirable
            and not nxt.note):
        return None
    settings = aligner_settings(extra_args)
    fewest = fewest_per_kind(settings["heldout_min"]) if settings["heldout_fraction"] > 0 else None
    if settings["heldout_fraction"] <= 0:
        need = ("the aligner holds nothing out (heldout_fraction 0), so the gate has nothing to judge a new adapter "
                "on: set --heldout-fraction above 0 in align_extra_args")
    elif fewest is None:
        need = (f"with heldout_min 0 only the {settings['heldout_fraction']:g} hash slice is held out: rate more "
                f"until it holds answers of both kinds")
    else:
        need = (f"the aligner holds out up to heldout_min = {settings['heldout_min']} answers of each kind (at most "
                f"{round(HELDOUT_FLOOR_MAX_SHARE * 100)}% of a kind), so at least {fewest} 👍 and {fewest} 👎 "
                f"are needed")
    scope = f"since `{nxt.served}`" if nxt.resume else "in the store"
    have = (f"the next run has {nxt.snapshot_desirable} 👍 / {nxt.snapshot_undesirable} 👎 {scope}: "
            f"{nxt.n_desirable} / {nxt.n_undesirable} to train on, {nxt.heldout_desirable} / "
            f"{nxt.heldout_undesirable} held out")
    wait = (f" (a scheduled run also waits for min_new_ratings = {min_new_ratings} new ratings)"
            if min_new_ratings else "")
    note = f"; {nxt.note}" if nxt.note else ""
    return (f"too few ratings for a run: it needs at least one 👍 and one 👎 to train on and one of each held out "
            f"for the gate to judge the new adapter; {need}{wait}. Now {have}{note}.")
