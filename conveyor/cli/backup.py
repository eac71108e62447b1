"""`conveyor backup | snapshots | restore`: snapshots in object storage (see `conveyor.backup`).

    conveyor backup STORE_OR_SOURCE [--to URL]        one snapshot (URL defaults to settings.storage_url);
                                                      short for `backup store STORE_OR_SOURCE` (a store named
                                                      `verify` or `prune`: `conveyor backup store verify`)
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

def register(sub: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the `conveyor` parser."""
    p = sub.add_parser(
        "backup", help="snapshot a store or recording into object storage (also: backup verify|prune)",
        description="`conveyor backup STORE_OR_SOURCE [--to URL]` writes one incremental snapshot (short for "
                    "`conveyor backup store STORE_OR_SOURCE`, which also backs up a store named `verify` or "
                    "`prune`); `conveyor backup verify [URL[@SNAPSHOT]] [--full]` re-reads and re-hashes objects; "
                    "`conveyor backup prune [URL]` applies retention (keep N daily, M weekly).")
    acts = p.add_subparsers(dest="action", required=True, metavar="{STORE_OR_SOURCE,store,verify,prune}")
    st = acts.add_parser("store", help="one snapshot of STORE_OR_SOURCE (the default action)")
    st.add_argument("target", metavar="STORE_OR_SOURCE",
                    help="store folder, recording folder, or the name of a configured store/source")
    st.add_argument("--to", metavar="URL", help="file:///path or s3://bucket/prefix (default: storage_url)")
    st.add_argument("--name", help="target name in the repository (default: store/source name or folder name)")
    st.set_defaults(handler=_backup)
    v = acts.add_parser("verify", help="re-read objects, exit 1 naming any bad one")
    v.add_argument("url", nargs="?", metavar="URL[@SNAPSHOT]", help="the repository (default: storage_url)")
    v.add_argument("--full", action="store_true", help="re-read every object, not a sample")
    v.add_argument("--sample", type=int, help="objects re-read (default: backup.verify_sample)")
    v.set_defaults(handler=_verify)
    pr = acts.add_parser("prune", help="apply retention and delete unreferenced objects")
    pr.add_argument("url", nargs="?", metavar="URL", help="the repository (default: storage_url)")
    pr.add_argument("--keep-daily", type=int, help="daily snapshots kept (default: backup.keep_daily)")
    pr.add_argument("--keep-weekly", type=int, help="weekly snapshots kept (default: backup.keep_weekly)")
    pr.set_defaults(handler=_prune)
    _store_by_default(p, acts.choices)

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
    """The settings with a named credentials block applied (the Prefect layer's storage_settings; prefect is
    imported only when a block is named), for conveyor.repo.open_repo(url, settings)."""
    from tasks.repo import load_storage_settings

    return load_storage_settings(args.config)


def resolve_target(settings, spec: str) -> tuple[Path, str]:
    """STORE_OR_SOURCE -> (folder, target name), by the one STORE rule (conveyor/stores.py): a name is a store
    under store_root, else a configured source (its recording, as `<name>.source`); a path is that folder."""
    from conveyor.stores import check_name, is_path, resolve_store

    if not is_path(spec):
        if (settings.store_root / check_name(spec)).is_dir():
            return (settings.store_root / spec).resolve(), spec
        for src in settings.sources:
            if src.name == spec:
                return src.path, f"{src.name}.source"
    p = resolve_store(spec, settings.store_root)  # a path, or a folder of that name here; else the known stores
    if not p.is_dir():
        raise ConveyorError(spec, "no such folder")
    p = p.resolve()
    for src in settings.sources:
        if src.path == p:
            return p, f"{src.name}.source"
    return p, p.name


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _store_by_default(parser: argparse.ArgumentParser, actions: dict) -> None:
    """`conveyor backup lab` means `conveyor backup store lab`: argparse has no default subcommand, so the
    backup parser puts `store` in front of arguments that do not start with an action (or --help)."""
    parse = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        if args and args[0] not in actions and args[0] not in ("-h", "--help"):
            args.insert(0, "store")
        return parse(args, namespace)

    parser.parse_known_args = parse_known_args


def _backup(args) -> int:
    from conveyor.backup import backup
    from conveyor.repo import open_repo

    settings = _settings(args)
    folder, name = resolve_target(settings, args.target)
    url = args.to or settings.storage_url
    with open_repo(url, settings) as repo, progress_bar("transferring", transfer=True) as cb:
        r = backup(folder, repo, name=args.name or name, index_dir=settings.work_dir / "backup-index",
                   progress=cb, concurrency=settings.transfer.max_concurrency)
    version = f" (dataset {r.version.short}, {r.version.total_episodes} episodes)" if r.version else ""
    print(f"{url}@{r.snapshot}: {r.files_total} files, {_mb(r.bytes_total)}{version}; sent {r.files_sent} "
          f"files ({_mb(r.bytes_sent)}), {r.files_skipped} already stored; {r.seconds:.2f} s")
    for rel in r.changed:
        print(f"conveyor: warning: {folder / rel}: changed while being read, not in this snapshot "
              "(the next backup takes it)", file=sys.stderr)
    return 0


def _verify(args) -> int:
    from conveyor.backup import snapshot_ids, split_ref, verify
    from conveyor.repo import open_repo

    settings = _settings(args)
    url, ref = split_ref(args.url or settings.storage_url)
    sample = settings.backup.verify_sample if args.sample is None else args.sample
    bad = 0
    with open_repo(url, settings) as repo:
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


def _prune(args) -> int:
    from conveyor.backup import prune
    from conveyor.datasets.retention import prune_versions
    from conveyor.repo import open_repo

    settings = _settings(args)
    url = args.url or settings.storage_url
    with open_repo(url, settings) as repo:
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
    from conveyor.repo import open_repo

    settings = _settings(args)
    url = args.url or settings.storage_url
    with open_repo(url, settings) as repo:
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
    from conveyor.repo import open_repo

    settings = _settings(args)
    url, ref = split_ref(args.url)
    with open_repo(url, settings) as repo, progress_bar("transferring", transfer=True) as cb:
        r = restore(repo, ref, args.dst, force=args.force, progress=cb,
                    concurrency=settings.transfer.max_concurrency)
    print(f"restored {url}@{r.snapshot} into {r.dst}: {r.files} files, {_mb(r.bytes)}, every sha256 checked; "
          f"{r.seconds:.2f} s")
    return 0
