"""`conveyor` command line. Each area registers its own subcommands (cli_*.py) so modules stay small.

Exit codes: 0 ok, 1 a check failed or an input was bad (one line naming the file), 2 usage error.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from conveyor.errors import ConveyorError

Handler = Callable[[argparse.Namespace], int]
# no pydantic plugins are used; without this pydantic scans every installed package's entry points (~20 ms)
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

DESCRIPTION = """\
Turn LeRobot v2.1 recordings into LeRobot v3.0 datasets ("stores") that grow as you record, check them,
train policies on them and back them up. STORE is a store name (a folder under store_root, e.g. the name
of a [[sources]] entry in conveyor.toml) or a store folder."""

EPILOG = """\
start here:
  conveyor up --demo                        run everything on this machine, with a demo recording
  conveyor stores                           what is in each store
  conveyor show koch_grasp                  one store: cameras, tasks, lengths, versions, quarantine
  conveyor validate koch_grasp --deep       check a store, also through lerobot
  conveyor train --store koch_grasp --policy-type act --steps 2000

exit status: 0 ok, 1 a check failed or an input was bad (one line naming the file), 2 usage error.
`conveyor COMMAND --help` shows each command's options and their defaults."""


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default:" in text or default is None or default is False
                or default == [] or default is argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


class _TopFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """`conveyor --help` keeps its examples' line breaks."""


def build_parser() -> argparse.ArgumentParser:
    from conveyor.cli import (backup as cli_backup, datasets as cli_datasets, scrub as cli_scrub,
                              service as cli_service, show as cli_show, store as cli_store, train as cli_train)

    p = argparse.ArgumentParser(prog="conveyor", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=_TopFormatter)
    p.add_argument("--config", metavar="FILE",
                   help="settings file (default: $CONVEYOR_CONFIG, else ./conveyor.toml, else built-in defaults)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in (cli_store, cli_show, cli_scrub, cli_service, cli_train, cli_backup, cli_datasets):
        mod.register(sub)
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for one in action.choices.values():
                _format_all(one)
    return p


def _format_all(parser: argparse.ArgumentParser) -> None:
    """One help style for every subcommand, however deep."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _format_all(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return int(handler(args) or 0)
    except ConveyorError as e:
        print(f"conveyor: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a read-only mount, a permission: one line, never a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"conveyor: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("conveyor: interrupted", file=sys.stderr)
        return 130
