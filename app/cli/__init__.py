"""The `kto-loop` console script: global configuration flags plus one subcommand per module in this package."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType

from app import cli as commands
from app.config import add_config_arguments, config_from
from app.logs import configure_logging


def _command_modules() -> list[ModuleType]:
    names = sorted(m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_"))
    return [importlib.import_module(f"app.cli.{n}") for n in names]


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """An option's default in its help only where it says something (never "(default: None)" or a switch's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            return action.help
        return super()._get_help_string(action)


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers that see the last arguments: config flags go there (`kto-loop model fetch --home X`)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    return [leaf for a in subs for child in dict.fromkeys(a.choices.values()) for leaf in _leaf_parsers(child)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kto-loop",
        description="Chat, collect thumbs up/down, and keep aligning the served model with KTO.",
        formatter_class=_Help,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _command_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP,
                           formatter_class=_Help)
        module.add_arguments(p)
        for leaf in _leaf_parsers(p):
            leaf.formatter_class = _Help
            add_config_arguments(leaf, hidden=getattr(module, "SETTINGS_HIDDEN_IN_HELP", False))
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from(args)
    configure_logging(cfg.log_format)
    try:
        return int(args._run(args, cfg) or 0)
    except KeyboardInterrupt:
        print("kto-loop: interrupted", file=sys.stderr)
        return 130

