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


def build_parser() -> argparse.ArgumentParser:
    from conveyor.cli import backup as cli_backup, service as cli_service, store as cli_store, train as cli_train

    p = argparse.ArgumentParser(prog="conveyor", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="conveyor.toml (default: $CONVEYOR_CONFIG or ./conveyor.toml)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in (cli_store, cli_service, cli_train, cli_backup):
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return int(handler(args) or 0)
    except ConveyorError as e:
        print(f"conveyor: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("conveyor: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
