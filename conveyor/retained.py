"""What a commit replaces stays readable for a while: the folder swap that retains it, and `vacuum`.

Apart from `store.py` so that the commit protocol reads on its own there; `Store._apply` calls `swap_folder`
and `Store.retained`/`Store.vacuum` call the functions here with the committed state (root, manifest, HEAD's
commit number). Replaced videos stay at their paths; replaced data and meta/episodes parquet move to
`RETAINED/<commit>/`. Nothing here is part of the committed state.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from conveyor import layout
from conveyor.fileio import fsync_dir, write_atomic

RETENTION_S = 24 * 3600  # files a commit replaces stay readable this long (until `vacuum`), for open readers


def move(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` (same filesystem); a file already moved (a commit rolled forward twice) is fine."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
    except FileNotFoundError:
        pass


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the filesystem cannot."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    if fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _drop_empty_parents(d: Path, root: Path) -> None:
    while d != root and d.is_dir() and not any(d.iterdir()):
        d.rmdir()
        d = d.parent


def _read_int(p: Path) -> int:
    try:
        return int(p.read_text())
    except (OSError, ValueError):
        return 0


def swap_folder(root: Path, folder: str, record: dict, staging: Path, retained: Path,
                crashpoint: Callable[[str], None]) -> None:
    """Give `folder` its new set of files in one step: a copy is built in staging (hard links of the files
    that stay, the commit's new files moved in), exchanged with the live folder, and the replaced files of
    the old one moved to `retained`. Done once the live folder holds every new file and no removed one.
    `crashpoint`: the store's fault injection (`store.crashpoint`)."""
    live = root / folder
    gone = {Path(r).name for r in record["remove"] if str(Path(r).parent) == folder}
    new = {Path(r).name for r in record["add"] if str(Path(r).parent) == folder}
    have = set(os.listdir(live)) if live.is_dir() else set()
    if new <= have and not gone & have:
        return
    build = staging / ".swap" / folder
    build.mkdir(parents=True, exist_ok=True)
    for name in new:
        if (staging / folder / name).exists():
            os.replace(staging / folder / name, build / name)
    try:
        for name in have - gone:
            if not (build / name).exists():
                os.link(live / name, build / name)
        linked = True
    except OSError as e:  # a filesystem without hard links
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        linked = False
    fsync_dir(build)
    if not live.is_dir():
        live.parent.mkdir(parents=True, exist_ok=True)
        os.replace(build, live)
    elif not linked or not _exchange(build, live):  # no RENAME_EXCHANGE (or links): move out, then in
        for name in gone & have:
            move(live / name, retained / folder / name)
        for name in new:
            if (build / name).exists():
                os.replace(build / name, live / name)
        shutil.rmtree(build, ignore_errors=True)
        fsync_dir(live)
        return
    fsync_dir(live.parent)
    crashpoint(f"swapped:{folder}")
    for name in gone:  # `build` now holds the previous folder
        if (build / name).exists():
            move(build / name, retained / folder / name)
    shutil.rmtree(build, ignore_errors=True)


def retained_files(root: Path, manifest: dict, head: int) -> dict[str, tuple[int, datetime, Path]]:
    """Files replaced or removed by commits that vacuum has not yet cleared, still on disk: their path ->
    (commit, removal time, where the bytes are). Not part of the committed state."""
    out: dict[str, tuple[int, datetime, Path]] = {}
    for n, record in _records_since_vacuum(root, head):
        t = datetime.fromisoformat(record["time"])
        for rel in record["remove"]:
            where = root / (rel if rel.startswith("videos/") else
                            f"{layout.RETAINED}/{n:08d}/{rel}")
            if rel not in manifest and where.is_file():
                out[rel] = (n, t, where)
    return out


def _records_since_vacuum(root: Path, head: int) -> Iterator[tuple[int, dict]]:
    done = _read_int(root / layout.VACUUMED)
    for p in sorted((root / layout.COMMITS).glob("*.json")):
        n = int(p.stem)
        if n > done and n <= head:
            record = json.loads(p.read_text(encoding="utf-8"))
            if record.get("remove"):
                yield n, record


def vacuum(root: Path, manifest: dict, head: int, retention_s: float,
           now: datetime | None = None) -> tuple[int, int]:
    """Delete what commits replaced or removed longer than `retention_s` ago (caller holds the lock);
    returns (files, bytes) removed. Like a table format's vacuum: until then a reader that opened an older
    version can finish."""
    now = now or datetime.now(timezone.utc)
    files = size = 0
    done = _read_int(root / layout.VACUUMED)
    for n, record in _records_since_vacuum(root, head):
        if (now - datetime.fromisoformat(record["time"])).total_seconds() < retention_s:
            break  # later commits are younger
        for rel in record["remove"]:
            where = root / (rel if rel.startswith("videos/") else f"{layout.RETAINED}/{n:08d}/{rel}")
            if rel in manifest or not where.is_file():
                continue
            size += where.stat().st_size
            where.unlink()
            files += 1
            _drop_empty_parents(where.parent, root)
        shutil.rmtree(root / layout.RETAINED / f"{n:08d}", ignore_errors=True)
        done = n
    if done != _read_int(root / layout.VACUUMED):  # written only when something was cleared
        write_atomic(root / layout.VACUUMED, str(done).encode(), fsync=False)
    return files, size
