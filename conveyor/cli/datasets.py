"""`conveyor publish | datasets`: dataset versions in object storage (see `conveyor.datasets`).

    conveyor publish STORE [--to URL]     publish the store's current version (a no-op when already there)
    conveyor datasets [URL] [--json]      the published stores and versions
"""
from __future__ import annotations

import argparse

from conveyor.errors import ConveyorError


def register(sub: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the `conveyor` parser."""
    p = sub.add_parser("publish", help="publish a store's current version to object storage (incremental)")
    p.add_argument("store", metavar="STORE", help="store name under store_root, or a store folder")
    p.add_argument("--to", metavar="URL", help="file:///path or s3://bucket/prefix (default: storage_url)")
    p.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(handler=_publish)

    d = sub.add_parser("datasets", help="list the published dataset stores and versions")
    d.add_argument("url", nargs="?", metavar="URL", help="default: storage_url")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.add_argument("--config", default=argparse.SUPPRESS, help="conveyor.toml (as the global --config)")
    d.set_defaults(handler=_datasets)


def _publish(args) -> int:
    from conveyor.datasets.publish import publish
    from conveyor.repo import open_repo
    from conveyor.store import is_store
    from conveyor.stores import resolve_store
    from tasks.repo import load_storage_settings  # prefect is imported only when a credentials block is named

    settings = load_storage_settings(args.config)
    folder = resolve_store(args.store, settings.store_root)  # the one STORE rule (conveyor/stores.py)
    if not is_store(folder):
        raise ConveyorError(args.store, "not a conveyor store (no .conveyor/ folder); name a store this machine "
                                        "holds")
    folder = folder.resolve()
    with open_repo(args.to, settings) as repo:
        r = publish(folder, repo, concurrency=settings.transfer.max_concurrency)
    if not r.published:
        print(f"{r.store} {r.version.short} is already published to {r.url}; nothing to do")
    else:
        print(f"published {r.store} {r.version.short} ({r.version.total_episodes} episodes) to {r.url}: "
              f"{r.files_total} files, {r.bytes_total / 1e6:.1f} MB; sent {r.files_sent} files "
              f"({r.bytes_sent / 1e6:.1f} MB), the rest already stored; {r.seconds:.2f} s")
    return 0


def _datasets(args) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from conveyor.datasets.format import list_versions, read_version
    from conveyor.repo import open_repo
    from tasks.repo import load_storage_settings

    settings = load_storage_settings(args.config)
    url = args.url or settings.storage_url
    with open_repo(url, settings) as repo:
        refs = list_versions(repo)
        with ThreadPoolExecutor(8) as pool:
            versions = list(pool.map(lambda r: read_version(repo, r.key), refs))
    rows = [{"store": v.store, "commit": v.version.commit, "content_hash": v.version.content_hash,
             "episodes": v.version.total_episodes, "frames": v.version.total_frames, "files": v.total_files,
             "bytes": v.total_bytes, "published": v.created.isoformat()} for v in versions]
    if args.json:
        import json
        print(json.dumps(rows))
        return 0
    if not rows:
        print(f"{url}: no published dataset versions")
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=url)
    for col in ("store", "commit", "content hash", "episodes", "frames", "size", "published (UTC)"):
        t.add_column(col, justify="right" if col in ("commit", "episodes", "frames", "size") else "left")
    for r in rows:
        t.add_row(r["store"], str(r["commit"]), r["content_hash"][:16], str(r["episodes"]), str(r["frames"]),
                  f"{r['bytes'] / 1e6:.1f} MB", r["published"][:19].replace("T", " "))
    Console(width=160).print(t)
    return 0
