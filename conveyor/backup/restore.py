"""`restore()`: rebuild a snapshot's folder byte for byte."""
from __future__ import annotations

import os
import time
from pathlib import Path

from conveyor import layout
from conveyor.backup.format import RestoreReport, manifest_key
from conveyor.backup.manifests import read_manifest, resolve
from conveyor.backup.objects import fetch
from conveyor.backup.walk import Progress
from conveyor.errors import ConveyorError
from conveyor.repo import Repo

RESTORED_LAST = (layout.INFO, layout.HEAD)  # in this order, after everything else


def restore(repo: Repo, ref: str | None, dst: str | os.PathLike, *, force: bool = False,
            progress: Progress | None = None, concurrency: int = 8) -> RestoreReport:
    """Every file's sha256 is checked before it is renamed in; mtimes are restored."""
    t0 = time.perf_counter()
    snap_id = resolve(repo, ref)
    m = read_manifest(repo, snap_id)
    dst = Path(dst).expanduser().resolve()
    if dst.exists() and not dst.is_dir():
        raise ConveyorError(dst, "restore destination exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise ConveyorError(dst, "restore destination is not empty (use --force to write into it)")
    for f in m.files:
        if ".." in f.path.split("/") or f.path.startswith("/"):
            raise ConveyorError(f"{repo.url}/{manifest_key(snap_id)}", f"unsafe path in manifest: {f.path!r}")
    for d in sorted({(dst / f.path).parent for f in m.files} | {dst}):
        d.mkdir(parents=True, exist_ok=True)

    total, done = m.total_bytes, [0]

    def tick(n: int):
        done[0] += n
        if progress:
            progress(min(done[0], total), total, "restoring")

    # what makes a restored store look complete is written after every other file: a restore cut short
    # (disk full, kill) never leaves a folder that passes for a whole store
    last = sorted((f for f in m.files if f.path in RESTORED_LAST), key=lambda f: RESTORED_LAST.index(f.path))
    fetch(repo, [f for f in m.files if f.path not in RESTORED_LAST], dst, where="manifest", tick=tick,
          concurrency=concurrency)
    for f in last:
        fetch(repo, [f], dst, where="manifest", tick=tick, concurrency=1)
    return RestoreReport(snapshot=snap_id, dst=str(dst), files=len(m.files), bytes=m.total_bytes,
                         seconds=time.perf_counter() - t0)
