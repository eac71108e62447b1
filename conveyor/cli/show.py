"""`conveyor stores` and `conveyor show STORE`: what is in the datasets, read from metadata only."""
from __future__ import annotations

import argparse
import json

from conveyor.errors import ConveyorError


def register(sub: argparse._SubParsersAction) -> None:
    """Add `stores` and `show` to the `conveyor` parser."""
    p = sub.add_parser("stores", help="list every store under store_root: episodes, hours, size, version",
                       description="One line per store under store_root: episodes, frames, hours recorded, size "
                                   "on disk, current version and when it was committed.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_stores)

    s = sub.add_parser("show", help="one store as a dataset: features, cameras, tasks, lengths, versions, quarantine",
                       description="Features with shapes, cameras (resolution, codec, fps), tasks with episode "
                                   "counts, episode lengths, every version with what it added, and the episodes "
                                   "the last ingest of each source quarantined, with the reason.")
    s.add_argument("store", metavar="STORE", help="store name (folder under store_root) or store folder")
    s.add_argument("--versions", type=int, default=10, metavar="N", help="show the newest N versions (0: all)")
    s.add_argument("--json", action="store_true", help="machine-readable output (everything)")
    s.set_defaults(handler=_show)


def _console():
    from rich.console import Console

    return Console(width=140)


def _mb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _duration(hours: float) -> str:
    return f"{hours:.2f} h" if hours >= 1 else f"{hours * 60:.1f} min"


def _when(t) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M") if t else "-"


def _stores(args: argparse.Namespace) -> int:
    from rich.table import Table

    from conveyor.inventory import list_stores
    from conveyor.settings import load_settings

    root = load_settings(args.config).store_root
    stores = list_stores(root)
    if args.json:
        print(json.dumps([s.model_dump(mode="json") for s in stores], indent=1, ensure_ascii=False))
        return 0
    if not stores:
        print(f"no stores under {root} (a source's store appears there after its first ingest)")
        return 0
    t = Table(title=f"stores under {root}")
    for col in ("store", "episodes", "frames", "recorded", "size", "version", "last commit"):
        t.add_column(col, justify="left" if col in ("store", "version", "last commit") else "right")
    for s in stores:
        t.add_row(s.name, str(s.episodes), str(s.frames), _duration(s.hours), _mb(s.size_bytes), s.version,
                  _when(s.last_commit))
    _console().print(t)
    return 0


def _show(args: argparse.Namespace) -> int:
    from rich.table import Table

    from conveyor.cli.store import resolve_store
    from conveyor.inventory import describe
    from conveyor.store import is_store

    path = resolve_store(args, args.store)
    if not is_store(path):
        from conveyor.store import Store

        Store.open(path)  # raises the one-line reason (a recording, a plain v3.0 dataset, nothing)
        raise ConveyorError(path, "not a conveyor store")
    d = describe(path)
    if args.json:
        print(d.model_dump_json(indent=1))
        return 0
    c = _console()
    c.print(f"[bold]{d.name}[/bold]  {d.path}")
    c.print(f"{d.episodes} episodes, {d.frames} frames, {_duration(d.hours)} at {d.fps} fps, {_mb(d.size_bytes)}; "
            f"version {d.version}, committed {_when(d.last_commit)}; robot {d.robot_type or '-'}")

    t = Table(title="features")
    for col in ("feature", "dtype", "shape"):
        t.add_column(col)
    for f in d.features:
        t.add_row(f.name, f.dtype, "x".join(str(x) for x in f.shape))
    c.print(t)
    if d.cameras:
        t = Table(title="cameras")
        for col in ("camera", "resolution", "codec", "pixel format", "fps"):
            t.add_column(col)
        for cam in d.cameras:
            t.add_row(cam.key, f"{cam.width}x{cam.height}", cam.codec or "-", cam.pix_fmt or "-",
                      f"{cam.fps:g}" if cam.fps else "-")
        c.print(t)
    if d.tasks:
        t = Table(title="tasks")
        t.add_column("task")
        t.add_column("episodes", justify="right")
        for task in d.tasks:
            t.add_row(task.task or "(none)", str(task.episodes))
        c.print(t)
    L, fps = d.lengths, d.fps or 1
    if L.frames:
        c.print(f"episode length: min {L.min} frames ({L.min / fps:.1f} s), median {L.median:g} "
                f"({L.median / fps:.1f} s), mean {L.mean:.1f}, max {L.max} ({L.max / fps:.1f} s)")
    versions = d.versions[-args.versions:] if args.versions else d.versions
    if versions:
        t = Table(title=f"versions (newest {len(versions)} of {len(d.versions)})")
        for col in ("commit", "time", "kind", "added", "episodes", "frames", "files +/-", "version"):
            t.add_column(col, justify="right" if col in ("commit", "episodes", "frames") else "left")
        for v in versions:
            added = (f"+{v.episodes_added} ep, +{v.frames_added} frames" if v.episodes_added
                     else "files rewritten" if v.kind == "compact" else "-")
            t.add_row(str(v.commit), _when(v.time), v.kind, added, str(v.total_episodes), str(v.total_frames),
                      f"+{v.files_added}/-{v.files_removed}", v.version)
        c.print(t)
    if d.sources:
        t = Table(title="sources")
        for col in ("source", "kind", "episodes"):
            t.add_column(col, justify="right" if col == "episodes" else "left")
        for src in d.sources:
            t.add_row(src.path, src.kind, str(src.episodes))
        c.print(t)
    if d.quarantined:
        t = Table(title="quarantined at the last ingest (source untouched; fix or re-record, the next ingest "
                        "picks them up)")
        for col in ("source", "episode", "reason"):
            t.add_column(col)
        for q in d.quarantined:
            t.add_row(q.source, str(q.source_episode_index), q.reason)
        c.print(t)
    else:
        c.print("quarantined: none")
    if d.curated:
        t = Table(title="curated (`conveyor undrop STORE ID` brings a dropped one back)")
        for col in ("episode", "drop id", "action", "source episode", "detail", "reason", "when", "version"):
            t.add_column(col)
        for e in d.curated:
            t.add_row("-" if e.episode is None else str(e.episode), "" if e.drop_id is None else str(e.drop_id),
                      e.action, f"{e.source} #{e.source_episode_index}", e.detail, e.reason,
                      f"{e.time:%Y-%m-%d %H:%M}" if e.time else "", e.version)
        c.print(t)
    return 0
