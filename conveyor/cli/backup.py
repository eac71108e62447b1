"""`conveyor backup | snapshots | restore`: snapshots in object storage (see `conveyor.backup`).

    conveyor backup STORE_OR_SOURCE [--to URL]        one snapshot (URL defaults to settings.storage_url)
    conveyor backup verify [URL[@SNAPSHOT]] [--full]  re-read objects, exit 1 naming any bad one
    conveyor backup prune [URL] [--keep-daily N] [--keep-weekly M]
    conveyor snapshots [URL]
    conveyor restore URL[@SNAPSHOT] DST [--force]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conveyor.cli.store import progress_bar
from conveyor.errors import ConveyorError

VERBS = ("verify", "prune")


def register(sub: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the `conveyor` parser."""
    p = sub.add_parser(
        "backup", help="snapshot a store or recording into object storage (also: backup verify|prune)",
        description="`conveyor backup STORE_OR_SOURCE [--to URL]` writes one incremental snapshot; "
                    "`conveyor backup verify [URL[@SNAPSHOT]] [--full]` re-reads and re-hashes objects; "
                    "`conveyor backup prune [URL]` applies retention (keep N daily, M weekly).")
    p.add_argument("target", metavar="STORE_OR_SOURCE",
                   help="store folder, recording folder, or the name of a configured store/source; "
                        "or the word `verify` / `prune`")
    p.add_argument("url", nargs="?", metavar="URL[@SNAPSHOT]", help="with verify/prune: the repository URL")
    p.add_argument("--to", metavar="URL", help="file:///path or s3://bucket/prefix (default: storage_url)")
    p.add_argument("--name", help="target name in the repository (default: store/source name or folder name)")
    p.add_argument("--full", action="store_true", help="verify: re-read every object, not a sample")
    p.add_argument("--sample", type=int, help="verify: objects re-read (default: backup.verify_sample)")
    p.add_argument("--keep-daily", type=int, help="prune: daily snapshots kept (default: backup.keep_daily)")
    p.add_argument("--keep-weekly", type=int, help="prune: weekly snapshots kept (default: backup.keep_weekly)")
    p.set_defaults(handler=_backup, _parser=p)

    s = sub.add_parser("snapshots", help="list the snapshots in a backup repository")
    s.add_argument("url", nargs="?", metavar="URL", help="backup repository (default: storage_url)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(handler=_snapshots)

    r = sub.add_parser("restore", help="rebuild a snapshot byte-identical into a folder")
    r.add_argument("url", metavar="URL[@SNAPSHOT]", help="SNAPSHOT: TARGET, TARGET/STAMP, a stamp prefix or latest")
    r.add_argument("dst", type=Path, metavar="DST",
                   help="folder to restore into (created; must be empty without --force)")
    r.add_argument("--force", action="store_true", help="write into a non-empty DST (files in the snapshot are replaced)")
    r.set_defaults(handler=_restore)


# ----------------------------------------------------------------------------------------------


def _settings(args):
    from conveyor.settings import load_settings
    return load_settings(args.config)


def open_repo(settings, url: str):
    """Repo for `url` with the configured S3 endpoint/credentials (or the named Prefect block)."""
    from tasks.repo import repo_from_settings  # prefect is imported only when a block is named

    return repo_from_settings(settings, url)


def resolve_target(settings, spec: str) -> tuple[Path, str]:
    """STORE_OR_SOURCE -> (folder, target name). A path wins; then a store name; then a source name."""
    p = Path(spec).expanduser()
    if p.is_dir():
        p = p.resolve()
        for src in settings.sources:
            if src.path == p:
                return p, f"{src.name}.source"
        return p, p.name
    store = settings.store_path(spec)
    if store.is_dir():
        return store, spec
    for src in settings.sources:
        if src.name == spec:
            return src.path, f"{src.name}.source"
    raise ConveyorError(spec, "not a folder, nor the name of a store under store_root or a configured source")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _backup(args) -> int:
    settings = _settings(args)
    if args.target in VERBS:
        if args.to:
            args._parser.error(f"`backup {args.target}` takes the URL as an argument, not --to")
        return _verify(args, settings) if args.target == "verify" else _prune(args, settings)
    if args.url or args.full or args.sample is not None or args.keep_daily is not None or args.keep_weekly is not None:
        args._parser.error("`backup STORE_OR_SOURCE` takes only --to and --name")
    from conveyor.backup import backup

    folder, name = resolve_target(settings, args.target)
    url = args.to or settings.storage_url
    with open_repo(settings, url) as repo, progress_bar("transferring", transfer=True) as cb:
        r = backup(folder, repo, name=args.name or name, index_dir=settings.work_dir / "backup-index",
                   progress=cb, concurrency=settings.transfer.max_concurrency)
    version = f" (dataset {r.version.short}, {r.version.total_episodes} episodes)" if r.version else ""
    print(f"{url}@{r.snapshot}: {r.files_total} files, {_mb(r.bytes_total)}{version}; sent {r.files_sent} "
          f"files ({_mb(r.bytes_sent)}), {r.files_skipped} already stored; {r.seconds:.2f} s")
    for rel in r.changed:
        print(f"conveyor: warning: {folder / rel}: changed while being read, not in this snapshot "
              "(the next backup takes it)", file=sys.stderr)
    return 0


def _verify(args, settings) -> int:
    from conveyor.backup import snapshot_ids, split_ref, verify

    url, ref = split_ref(args.url or settings.storage_url)
    sample = settings.backup.verify_sample if args.sample is None else args.sample
    bad = 0
    with open_repo(settings, url) as repo:
        refs = [ref] if ref else sorted({i.split("/", 1)[0] for i in snapshot_ids(repo)})
        if not refs:
            raise ConveyorError(url, "no snapshots here")
        for one in refs:
            r = verify(repo, one, full=args.full, sample=sample)
            for f in r.failures:
                print(f"conveyor: error: {f}", file=sys.stderr)
            bad += len(r.failures)
            state = "ok" if r.ok else f"FAILED ({len(r.failures)} problem(s))"
            print(f"{url}@{r.snapshot}: {state}: {r.objects_total} objects present, {r.objects_read} re-read "
                  f"({_mb(r.bytes_read)}) in {r.seconds:.2f} s")
    return 1 if bad else 0


def _prune(args, settings) -> int:
    from conveyor.backup import prune
    from conveyor.datasets.retention import prune_versions

    url = args.url or settings.storage_url
    with open_repo(settings, url) as repo:
        v = prune_versions(repo, settings.datasets.keep_days)
        r = prune(repo, args.keep_daily if args.keep_daily is not None else settings.backup.keep_daily,
                  args.keep_weekly if args.keep_weekly is not None else settings.backup.keep_weekly)
    if v.deleted:
        print(f"{url}: deleted {len(v.deleted)} published dataset version(s) older than "
              f"{settings.datasets.keep_days} days; kept {len(v.kept)} ({len(v.pinned)} pinned by unfinished runs)")
    print(f"{url}: kept {len(r.kept)} snapshot(s), deleted {len(r.deleted_snapshots)} snapshot(s) and "
          f"{r.deleted_objects} unreferenced object(s)")
    if r.locks_removed or r.incomplete_cleaned:
        print(f"{url}: removed {r.locks_removed} lock(s) of dead or expired writers and {r.incomplete_cleaned} "
              "temporary object(s) of killed uploads")
    if r.gc_skipped:
        print(f"conveyor: warning: {r.gc_skipped}", file=sys.stderr)
    return 0


def _snapshots(args) -> int:
    from conveyor.backup import list_snapshots

    settings = _settings(args)
    url = args.url or settings.storage_url
    with open_repo(settings, url) as repo:
        snaps = list_snapshots(repo)
    if args.json:
        print("[" + ",".join(s.model_dump_json() for s in snaps) + "]")
        return 0
    if not snaps:
        print(f"{url}: no snapshots")
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=url)
    for col in ("snapshot", "time (UTC)", "kind", "dataset version", "files", "bytes"):
        t.add_column(col, justify="right" if col in ("files", "bytes") else "left")
    for s in snaps:
        v = f"{s.version.short} ({s.version.total_episodes} ep)" if s.version else "-"
        t.add_row(s.id, s.created.strftime("%Y-%m-%d %H:%M:%S"), s.kind, v, str(s.files), _mb(s.bytes))
    Console(width=160).print(t)
    return 0


def _restore(args) -> int:
    from conveyor.backup import restore, split_ref

    settings = _settings(args)
    url, ref = split_ref(args.url)
    with open_repo(settings, url) as repo, progress_bar("transferring", transfer=True) as cb:
        r = restore(repo, ref, args.dst, force=args.force, progress=cb,
                    concurrency=settings.transfer.max_concurrency)
    print(f"restored {url}@{r.snapshot} into {r.dst}: {r.files} files, {_mb(r.bytes)}, every sha256 checked; "
          f"{r.seconds:.2f} s")
    return 0
