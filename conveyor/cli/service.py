"""`conveyor config show` and `conveyor up`: the service area of the command line."""
from __future__ import annotations

import argparse
import json



def register(sub: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the `conveyor` parser."""
    cfg = sub.add_parser("config", help="inspect the settings")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = cfg_sub.add_parser("show", help="print the resolved settings (file + CONVEYOR_* env), secrets masked")
    show.set_defaults(handler=_config_show)

    up = sub.add_parser("up", help="run everything on this machine: Prefect server, workers, watcher",
                        description="Start a local Prefect server (SQLite under prefect.home), the work pools, "
                                    "deployments, one worker per pool and the watch flow; Ctrl-C stops it all.")
    up.add_argument("--config", dest="up_config", metavar="FILE", help="conveyor.toml (same as the global --config)")
    up.add_argument("--port", type=_port, help="Prefect server and UI port (default: prefect.port, 4200)")
    up.add_argument("--demo", action="store_true",
                    help="also record a small generated dataset into a demo source over a minute")
    up.set_defaults(handler=_up)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port must be 1-65535, not {port}")
    return port


def _config_show(args: argparse.Namespace) -> int:
    from conveyor.settings import load_settings  # lazily: pydantic-settings costs every command 50 ms

    s = load_settings(args.config)
    print(f"# config file: {s.config_path or '(none: defaults + CONVEYOR_* environment)'}")
    print(json.dumps(s.masked(), indent=2, ensure_ascii=False))
    return 0


def _up(args: argparse.Namespace) -> int:
    from conveyor.settings import load_settings
    from conveyor.supervisor import Supervisor

    settings = load_settings(args.up_config or args.config)
    return Supervisor(settings, port=args.port, demo=args.demo, out=lambda m: print(m, flush=True)).run()
