"""`conveyor config show`, `conveyor up` and `conveyor worker`: the service area of the command line."""
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
                        description="Start a local Prefect server (SQLite under prefect.home) or join a running "
                                    "one (--api-url), then the work pools, deployments, one worker per pool and "
                                    "the watch flow; Ctrl-C stops it all.")
    up.add_argument("--config", dest="up_config", metavar="FILE", help="conveyor.toml (same as the global --config)")
    up.add_argument("--port", type=_port, help="Prefect server and UI port (default: prefect.port, 4200)")
    up.add_argument("--api-url", metavar="URL",
                    help="join this Prefect server (e.g. http://prefect.lab:4200/api) instead of starting one "
                         "(default: prefect.api_url; none = start a local server)")
    up.add_argument("--pools", default="cpu,gpu", type=_pools, metavar="POOLS",
                    help="work pools to run a worker for on this machine (default: cpu,gpu)")
    up.add_argument("--demo", action="store_true",
                    help="also record a small generated dataset into a demo source over a minute")
    up.set_defaults(handler=_up)

    worker = sub.add_parser("worker", help="join this machine to a Prefect server as a worker of one pool",
                            description="Start a Prefect worker for POOL with this machine's settings (config, "
                                        "store_root, work_dir, cache_dir, storage) in the environment of every "
                                        "flow run it starts; Ctrl-C / SIGTERM stops it and its runs.")
    worker.add_argument("--pool", required=True, choices=("cpu", "gpu"), help="work pool to serve")
    worker.add_argument("--api-url", metavar="URL",
                        help="Prefect server API, e.g. http://prefect.lab:4200/api (default: prefect.api_url, "
                             "else $PREFECT_API_URL)")
    worker.add_argument("--config", dest="worker_config", metavar="FILE",
                        help="this machine's conveyor.toml (same as the global --config)")
    worker.add_argument("--name", help="worker name shown in the UI (default: conveyor-POOL-HOST-PID)")
    worker.set_defaults(handler=_worker)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port must be 1-65535, not {port}")
    return port


def _pools(text: str) -> tuple[str, ...]:
    pools = tuple(p.strip() for p in text.split(",") if p.strip())
    if not pools or set(pools) - {"cpu", "gpu"}:
        raise argparse.ArgumentTypeError(f"pools are cpu and/or gpu, comma-separated, not {text!r}")
    return pools


def _config_show(args: argparse.Namespace) -> int:
    from conveyor.settings import load_settings  # lazily: pydantic-settings costs every command 50 ms

    s = load_settings(args.config)
    print(f"# config file: {s.config_path or '(none: defaults + CONVEYOR_* environment)'}")
    print(json.dumps(s.masked(), indent=2, ensure_ascii=False))
    return 0


def _up(args: argparse.Namespace) -> int:
    from conveyor.settings import load_settings
    from conveyor.service.supervisor import Supervisor

    settings = load_settings(args.up_config or args.config)
    return Supervisor(settings, port=args.port, demo=args.demo, out=lambda m: print(m, flush=True),
                      api_url=args.api_url, pools=args.pools).run()


def _worker(args: argparse.Namespace) -> int:
    import os

    from conveyor.errors import ConveyorError
    from conveyor.settings import load_settings
    from conveyor.service.worker import Worker

    settings = load_settings(args.worker_config or args.config)
    api_url = args.api_url or settings.prefect.api_url or os.environ.get("PREFECT_API_URL")
    if not api_url:
        raise ConveyorError(settings.config_path or "settings", "no Prefect server to join: pass --api-url URL "
                            "or set [prefect] api_url")
    return Worker(settings, args.pool, api_url, name=args.name, out=lambda m: print(m, flush=True)).run()
