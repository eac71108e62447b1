"""`conveyor convert | ingest | validate | compact`: the store commands."""
from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conveyor import sizing
from conveyor.reports import IngestReport, ValidationReport
from conveyor.retained import RETENTION_S

RETENTION_HOURS = RETENTION_S / 3600


@contextmanager
def progress_bar(description: str, transfer: bool = False):
    """A rich progress bar on a terminal, nothing otherwise; yields a `progress(done, total, what)` callback.

    `transfer=True` counts bytes (size, speed, time left) instead of items.
    """
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

    counts = ((DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()) if transfer
              else (MofNCompleteColumn(), TimeElapsedColumn()))
    with Progress(TextColumn("{task.description}"), BarColumn(), *counts, TextColumn("{task.fields[what]}"),
                  transient=True) as bar:
        task = bar.add_task(description, total=None, what="")

        def update(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, what=what)

        yield update


class _NoPandas:
    """Import hook: `import pandas` fails as if it were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError(f"{name}: not used by conveyor's store commands")
        return None


def lean_process() -> None:
    """What a store command's process leaves out, set before pyarrow and numpy are imported.

    - pandas: pyarrow imports it (~0.3 s) the first time it converts a numpy array, only to ask whether the
      value is a pandas object; the store commands never use pandas (lerobot's deep check runs in its own
      process), so this process tells pyarrow there is none.
    - OpenBLAS threads: numpy starts one per core, and they spin for a while at start-up (~50 ms of CPU,
      the core the other start-up work would use); the store commands make no BLAS calls worth threads."""
    if "pandas" not in sys.modules and not any(isinstance(f, _NoPandas) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoPandas())
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


@contextmanager
def collector_paused() -> Iterator[None]:
    """Around a store command's heavy imports (pyarrow, numpy, PyAV): importing allocates ~100k objects and
    sets off dozens of cyclic-GC passes that find nothing (~5 % of an append's CPU); afterwards the imported
    objects are frozen, so the collections during the work do not walk them again."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def print_ingest(r: IngestReport) -> None:
    for m in r.added:
        print(f"  source episode {m.source_episode_index} -> store episode {m.episode_index} "
              f"({m.length} frames, {m.duration_s:.2f} s, task {m.tasks[0] if m.tasks else ''!r})")
    for q in r.quarantined:
        print(f"  quarantined source episode {q.source_episode_index}: {q.reason}")
    for q in r.changed:
        print(f"  CHANGED source episode {q.source_episode_index}: {q.reason}")
    if r.incomplete:
        print(f"  still being recorded: {r.incomplete}")
    for d in r.duplicates:
        print(f"  already present: {d.reason}")
    dup = f"{len(r.duplicates)} already present from another path (--allow-duplicates adds them), " \
        if r.duplicates else ""
    print(f"{len(r.added)} new episode(s), {r.already} already in store, {dup}{len(r.quarantined)} quarantined; "
          f"store {r.store} at {r.version.short}: {r.version.total_episodes} episodes, "
          f"{r.version.total_frames} frames ({r.seconds:.2f} s)")


def print_validation(r: ValidationReport, verbose: bool) -> None:
    for c in r.checks:
        if verbose or not c.ok:
            print(f"  {'ok  ' if c.ok else 'FAIL'} {c.name}" + (f": {c.detail}" if c.detail and not c.ok else ""))
    kind = "deep" if r.deep else "fast"
    verdict = "passed" if r.ok else f"FAILED ({len(r.failures)} of {len(r.checks)} checks)"
    print(f"{kind} validation of {r.store} {verdict}: {len(r.episodes_checked)} episodes, {r.seconds:.2f} s")


def resolve_store(args: argparse.Namespace, spec: str | Path, new: bool = False) -> Path:
    """STORE as the user types it, by the one rule of conveyor/stores.py (a `/` makes a path; else a store name
    under store_root; `new`: ingest/convert create it there). The settings load only when a name needs them."""
    from conveyor.stores import resolve_store as resolve

    def store_root() -> Path:
        from conveyor.settings import load_settings

        return load_settings(getattr(args, "config", None)).store_root

    return resolve(spec, store_root, new=new)


def _exit_code(r: IngestReport) -> int:
    """Landed what it could; a bad or changed episode still makes the command fail, naming the file."""
    for q in r.quarantined + r.changed:
        print(f"conveyor: error: {q.reason}", file=sys.stderr)
    return 1 if r.quarantined or r.changed else 0


def _convert(a: argparse.Namespace) -> int:
    lean_process()
    from conveyor.source import V21Source
    from conveyor.sessions import is_session_folder, open_source

    src = a.src if is_session_folder(a.src) else open_source(a.src)  # v2.1, v3.0, or a folder of v3.0 sessions
    if isinstance(src, V21Source):
        src.hash_ahead(sorted(src.episode_records()))  # in a child process, while the imports below run
    with collector_paused():
        from conveyor.ingest import convert

    with progress_bar("converting") as cb:
        r = convert(src, resolve_store(a, a.dst, new=True), task=a.task, data_mb=a.data_mb,
                    video_mb=a.video_mb, overwrite=a.overwrite, progress=cb)
    print_ingest(r)
    return _exit_code(r)


def _ingest(a: argparse.Namespace) -> int:
    lean_process()
    from conveyor.pending import nothing_new
    from conveyor.source import V21Source
    from conveyor.sessions import is_session_folder, open_source
    from conveyor.store import is_store

    store = resolve_store(a, a.store, new=True)
    src = a.src if is_session_folder(a.src) else open_source(a.src)  # v2.1, v3.0, or a folder of v3.0 sessions
    r = nothing_new(src, store)  # the common case, without importing pyarrow/numpy/PyAV
    if r is not None and not (a.allow_duplicates and r.duplicates):
        print_ingest(r)
        return _exit_code(r)
    if not is_store(store) and isinstance(src, V21Source):  # a first ingest is a whole conversion: hash
        src.hash_ahead(sorted(src.episode_records()))          # ahead as `convert` does
    with collector_paused():
        from conveyor.ingest import ingest

    with progress_bar("ingesting") as cb:
        r = ingest(src, store, task=a.task, data_mb=a.data_mb, video_mb=a.video_mb, lock_timeout=a.lock_timeout,
                   progress=cb, allow_duplicates=a.allow_duplicates)
    print_ingest(r)
    return _exit_code(r)


def _validate(a: argparse.Namespace) -> int:
    lean_process()
    with collector_paused():
        from conveyor.validate import validate_deep, validate_fast

    r = (validate_deep if a.deep else validate_fast)(resolve_store(a, a.store), against=a.against)
    print_validation(r, a.verbose)
    return 0 if r.ok else 1


def _compact(a: argparse.Namespace) -> int:
    lean_process()
    with collector_paused():
        from conveyor.compact import compact

    with progress_bar("compacting") as cb:
        r = compact(resolve_store(a, a.store), progress=cb)
    if r.rewritten:
        print(f"compacted {r.store}: {r.files_before} -> {r.files_after} files, now {r.version.short} "
              f"({r.seconds:.2f} s)")
    else:
        print(f"{r.store}: nothing to compact ({r.files_before} files)")
    if r.vacuumed:
        print(f"{r.store}: vacuumed {r.vacuumed} file(s) replaced more than {RETENTION_HOURS:g} h ago")
    return 0


def _vacuum(a: argparse.Namespace) -> int:
    from conveyor.store import Store

    s = Store.open(resolve_store(a, a.store))
    with s.lock(timeout=a.lock_timeout):
        files, size = s.vacuum(a.retention_hours * 3600)
        kept = s.retained()
    print(f"{s.root}: removed {files} file(s) ({size / 1e6:.1f} MB) replaced more than {a.retention_hours:g} h "
          f"ago; {len(kept)} younger one(s) retained for readers of older versions")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    def sizes(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-mb", type=float, default=sizing.DATA_MB, help="data file size target in MB (new stores)")
        p.add_argument("--video-mb", type=float, default=sizing.VIDEO_MB, help="video file size target in MB (new stores)")
        p.add_argument("--task", help="task text for episodes recorded without one (default: none)")

    src_help = ("LeRobot v2.1 recording folder, v3.0 dataset (a lerobot 0.6 recording session) or a folder of "
                "v3.0 session datasets (read only, never modified)")
    p = sub.add_parser("convert", help="one-shot v2.1/v3.0 -> v3.0 store conversion into a new store",
                       description="Convert every complete episode of SRC into a new store DST, built beside it "
                                   "and renamed into place at the end (nothing half-written is left behind).")
    p.add_argument("src", metavar="SRC", help=src_help)
    p.add_argument("dst", metavar="DST", help="the new store: a name (folder under store_root) or a folder")
    sizes(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.set_defaults(handler=_convert)

    p = sub.add_parser("ingest", help="append new complete episodes of SRC to STORE (created if missing)",
                       description="Append the complete episodes of SRC that STORE does not have yet, as one "
                                   "commit; bad episodes are quarantined (named on stderr, exit 1), the rest lands.")
    p.add_argument("src", metavar="SRC", help=src_help)
    p.add_argument("store", metavar="STORE", help="store name (folder under store_root) or store folder")
    sizes(p)
    p.add_argument("--lock-timeout", type=float, default=60.0, help="seconds to wait for another writer")
    p.add_argument("--allow-duplicates", action="store_true",
                   help="also add episodes whose exact content the store already holds from another path "
                        "(default: report them as already present, with both paths)")
    p.set_defaults(handler=_ingest)

    p = sub.add_parser("validate", help="check a store (exit 1 on any failure)",
                       description="Fast check: totals, frame ranges, stats, files. --against also compares rows "
                                   "and decoded frames with the recording; --deep also loads it through lerobot.")
    p.add_argument("store", metavar="STORE", help="store name (folder under store_root) or store folder")
    p.add_argument("--against", type=Path, metavar="SRC",
                   help="the v2.1 recording to compare rows and frames with (default: none)")
    p.add_argument("--deep", action="store_true", help="also load through lerobot's LeRobotDataset")
    p.add_argument("-v", "--verbose", action="store_true", help="list passing checks too")
    p.set_defaults(handler=_validate)

    p = sub.add_parser("compact", help="merge undersized files up to the size targets",
                       description="Rewrite many small data and video files into few large ones, as one commit "
                                   "(same rows and frames, a new version).")
    p.add_argument("store", metavar="STORE", help="store name (folder under store_root) or store folder")
    p.set_defaults(handler=_compact)

    p = sub.add_parser("vacuum", help="delete files that commits replaced, once past the retention period",
                       description="Compaction and curation replace files; the replaced ones stay readable (videos "
                                   "at their paths, parquet under .conveyor/retained/) so a reader that opened an "
                                   "older version can finish. This deletes those older than the retention period "
                                   "(compact also does, before it compacts).")
    p.add_argument("store", metavar="STORE", help="store name (folder under store_root) or store folder")
    p.add_argument("--retention-hours", type=float, default=RETENTION_HOURS,
                   help="keep replaced files this long after the commit that replaced them")
    p.add_argument("--lock-timeout", type=float, default=60.0, help="seconds to wait for another writer")
    p.set_defaults(handler=_vacuum)
