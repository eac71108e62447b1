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
  conveyor review koch_grasp 0-11           look at episodes: one HTML sheet of frames and joint plots
  conveyor drop koch_grasp 7 --reason "arm bumped"   a new version without episode 7 (undrop brings it back)
  conveyor train --store koch_grasp --policy-type act --steps 20 --device cpu \\
      --set policy.pretrained_backbone_weights=null   a short training run on this machine's CPU
                                            (on a GPU: drop --device cpu, e.g. --steps 2000)

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


# which module of conveyor.cli registers each command, in `conveyor --help` order (tests/test_lab.py checks it)
COMMANDS = {"convert": "store", "ingest": "store", "validate": "store", "compact": "store", "vacuum": "store", "salvage": "salvage",
            "drop": "curate", "undrop": "curate", "trim": "curate", "retask": "curate",
            "stores": "show", "show": "show", "review": "review", "scrub": "scrub", "repair": "scrub",
            "config": "service", "up": "service", "worker": "service", "train": "train", "evaluate": "train",
            "backup": "backup", "snapshots": "backup", "restore": "backup", "publish": "datasets",
            "datasets": "datasets"}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or only the module that registers `command`: a store command then parses
    without importing and building the other six modules' parsers (~5 ms of a 0.25 s append)."""
    import importlib

    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    p = argparse.ArgumentParser(prog="conveyor", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=_TopFormatter)
    p.add_argument("--config", metavar="FILE",
                   help="settings file (default: $CONVEYOR_CONFIG, else ./conveyor.toml, else built-in defaults)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        importlib.import_module(f"conveyor.cli.{name}").register(sub)
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


def _command(argv: list[str]) -> str | None:
    """The command word of argv (after a leading `--config FILE`), or None (`--help`, none, unknown)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            i += 2
        elif arg.startswith("--config="):
            i += 1
        else:
            return None if arg.startswith("-") else arg
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return int(handler(args) or 0)
    except ConveyorError as e:
        print(f"conveyor: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a read-only mount, a permission: one line, never a traceback
        from conveyor.errors import mask_userinfo

        where = f"{e.filename}: " if e.filename else ""
        print(f"conveyor: error: {mask_userinfo(f'{where}{e.strerror or e}')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("conveyor: interrupted", file=sys.stderr)
        return 130
