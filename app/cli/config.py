"""`kto-loop config`: the settings this command line and environment give, or the settings reference page.

The page (docs/configuration.md) is generated from the declarations, app/config.py's `Config` and the aligner's
`TrainConfig`, so it cannot drift from them; tests/app/test_config_docs.py fails when the committed page is stale.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
from pathlib import Path
from typing import Any

from aligner.config import TrainConfig
from aligner.config import flag as aligner_flag
from app.config import Config, _env, _flag

NAME = "config"
HELP = ("print the start-up settings this command line and environment give (JSON, secrets masked), or with "
        "--markdown the settings reference page")
REGENERATE = "kto-loop config --markdown > docs/configuration.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--markdown", action="store_true",
                        help=f"print docs/configuration.md, generated from the declarations ({REGENERATE})")


def run(args: argparse.Namespace, cfg: Config) -> int:
    print(markdown() if args.markdown else json.dumps(cfg.public_dict(), indent=2), end="" if args.markdown else "\n")
    return 0


def sections(cls: type) -> list[tuple[str, str, list[dataclasses.Field]]]:
    """(title, note, fields) for each `# Title. Note` comment heading a run of fields in the dataclass body."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    out: list[tuple[str, str, list[dataclasses.Field]]] = []
    comment: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        if m := re.match(r"    # (.*)$", line):
            comment.append(m.group(1))
            continue
        m = re.match(r"    (\w+): ", line)
        if m and m.group(1) in by_name:
            if comment or not out:
                head = " ".join(comment) or "General."
                title, note = re.match(r"(.*?)(?:[.:](?:\s+|$)|$)(.*)", head).groups()
                out.append((title, note[:1].upper() + note[1:] if note[:1].isascii() else note, []))
            out[-1][2].append(by_name[m.group(1)])
        comment = []
    return out


def _shown(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "`on`" if value else "`off`"
    text = str(value) if isinstance(value, Path | int | float) else json.dumps(value, ensure_ascii=False)
    return f"`{text}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _help(f: dataclasses.Field) -> str:
    text = f.metadata["help"]
    if f.metadata.get("choices"):
        text += "; one of " + ", ".join(f"`{c}`" for c in f.metadata["choices"])
    return _cell(text)


def _app_rows(fields: list[dataclasses.Field]) -> list[str]:
    rows = ["| flag | env var | default | what it sets |", "|---|---|---|---|"]
    for f in fields:
        env = f"`{_env(f.name)}`" + (f" (or `{f.metadata['old_env']}`)" if f.metadata.get("old_env") else "")
        note = f" (the aligner's `{aligner_flag(f.metadata['aligner'])}`)" if f.metadata.get("aligner") else ""
        rows.append(f"| `{_flag(f.name)}` | {env} | {_shown(f.default)} | {_help(f)}{_cell(note)} |")
    return rows


def _aligner_rows(fields: list[dataclasses.Field]) -> list[str]:
    rows = ["| flag | default | what it sets |", "|---|---|---|"]
    for f in fields:
        flags = f"`{aligner_flag(f.name)}`"
        if f.type == "bool":
            flags = f"`{aligner_flag(f.name)}` / `--no-{aligner_flag(f.name)[2:]}`"
        flags += "".join(f" (or `{a}`)" for a in f.metadata["aliases"])
        default = "required" if f.default is dataclasses.MISSING else _shown(f.default)
        rows.append(f"| {flags} | {default} | {_help(f)} |")
    return rows


def _tables(cls: type, rows: Any) -> list[str]:
    out: list[str] = []
    for title, note, fields in sections(cls):
        out += [f"### {title}", ""] + ([_cell(note), ""] if note else []) + rows(fields) + [""]
    return out


def markdown() -> str:
    """docs/configuration.md: one table per group of settings, from the declarations alone (no env, no flags)."""
    lines = [
        "# Configuration",
        "",
        f"Generated from the declarations by `{REGENERATE}`; do not edit by hand (a test fails when this page is "
        "stale).",
        "",
        "## Start-up settings",
        "",
        "Every `kto-loop` command reads these (`app/config.py`, `Config`). Each has a default, an environment "
        "variable and a flag; later wins: the default, then the environment variable, then the flag. "
        "`kto-loop config` prints the values a command line and environment give. Settings marked as the "
        "aligner's are declared once, by the aligner (default, help and range), and passed to every training run.",
        "",
        *_tables(Config, _app_rows),
        "## The aligner",
        "",
        "`kto-loop align --snapshot FILE --out DIR ...` and `python -m aligner ...`, which the app runs as a "
        "subprocess for every realignment (`aligner/config.py`, `TrainConfig`). Flags only, no environment "
        "variables; under `kto-loop align`, `--model-dir` defaults to the app's model and the settings the app "
        "forwards default to the app's.",
        "",
        *_tables(TrainConfig, _aligner_rows),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"
