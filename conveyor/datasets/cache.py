"""A worker's cache of materialized dataset versions: layout, leases, least-recently-used eviction.

    <cache_dir>/<store>/<commit>-<hash>/        one version: a plain, read-only LeRobot v3.0 folder
    <cache_dir>/<store>/<commit>-<hash>.json    its published manifest (every file's sha256), for reuse
    <cache_dir>/<store>/<commit>-<hash>.lease   held (flock, shared) while a training reads the version;
                                                its mtime is the version's last use
    <cache_dir>/.tmp/<pid>-<id>/                a version being built; renamed into place when complete

A lease is an flock, so a killed training releases it with its process. Eviction takes the lease
exclusively (non-blocking) before deleting, so a version in use is never evicted. Sizes are apparent sizes
(a file hard-linked from the store counts in full).
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from conveyor.errors import ConveyorError

TMP = ".tmp"


def lease_path(folder: Path) -> Path:
    return folder.parent / f"{folder.name}.lease"


def manifest_path(folder: Path) -> Path:
    return folder.parent / f"{folder.name}.json"


def is_cached(folder: Path) -> bool:
    """A folder inside a cache (as opposed to a live store or a plain dataset folder)."""
    return manifest_path(folder).is_file() and folder.parent.parent.joinpath(TMP).is_dir()


def check_writable(cache_dir: Path) -> None:
    """One sentence when this worker cannot build versions in `cache_dir`."""
    try:
        (cache_dir / TMP).mkdir(parents=True, exist_ok=True)
        probe = cache_dir / TMP / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConveyorError(cache_dir, f"the dataset cache folder is not writable ({e.strerror or e}); set "
                                       "cache_dir to a folder this worker can write") from None


def make_writable(root: Path) -> None:
    """Give the owner write access back to a read-only tree (to delete it)."""
    for d, dirs, _ in os.walk(root):
        os.chmod(d, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        for sub in dirs:
            p = os.path.join(d, sub)
            os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR)


def remove_tree(root: Path) -> None:
    if root.exists():
        make_writable(root)
        shutil.rmtree(root, ignore_errors=True)


def clean_stale_builds(cache_dir: Path) -> None:
    """Drop half-built versions whose builder process is gone (killed mid-materialize)."""
    tmp = cache_dir / TMP
    if not tmp.is_dir():
        return
    for d in tmp.iterdir():
        pid = d.name.split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            if int(pid) != os.getpid():
                continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if int(pid) == os.getpid() and time.time() - d.stat().st_mtime < 3600:
            continue  # ours and recent: maybe a build on another thread
        remove_tree(d)


@contextmanager
def lease(folder: Path) -> Iterator[Path]:
    """Hold `folder` (a cached version) in use: eviction skips it until the block ends (or the process dies)."""
    fd = os.open(lease_path(folder), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        if not folder.is_dir():
            raise ConveyorError(folder, "the cached dataset version was evicted before training started; "
                                        "retry the run (it materializes the version again) or raise cache_max_gb")
        os.utime(fd)  # last use, for LRU
        yield folder
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def touch(folder: Path) -> None:
    p = lease_path(folder)
    p.touch()
    os.utime(p)


@dataclass
class CachedVersion:
    folder: Path
    size: int
    last_use: float


def cached_versions(cache_dir: Path) -> list[CachedVersion]:
    out = []
    if not cache_dir.is_dir():
        return out
    for store in cache_dir.iterdir():
        if store.name == TMP or not store.is_dir():
            continue
        for folder in store.iterdir():
            if not folder.is_dir():
                continue
            size = sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(folder) for f in fs)
            lp, mp = lease_path(folder), manifest_path(folder)
            last = (lp if lp.exists() else mp if mp.exists() else folder).stat().st_mtime
            out.append(CachedVersion(folder, size, last))
    return sorted(out, key=lambda c: c.last_use)


def evict(cache_dir: Path, max_bytes: int, keep: set[Path] = frozenset()) -> list[Path]:
    """Delete least-recently-used versions until the cache fits `max_bytes`; versions leased by a running
    training, and those in `keep`, stay (the cache may then stay over its cap)."""
    versions = cached_versions(cache_dir)
    total = sum(v.size for v in versions)
    evicted = []
    for v in versions:
        if total <= max_bytes:
            break
        if v.folder in keep:
            continue
        fd = os.open(lease_path(v.folder), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    continue  # in use by a training
                raise
            remove_tree(v.folder)
            manifest_path(v.folder).unlink(missing_ok=True)
            lease_path(v.folder).unlink(missing_ok=True)
            total -= v.size
            evicted.append(v.folder)
        finally:
            os.close(fd)
    return evicted


@contextmanager
def hold(folder: Path) -> Iterator[Path]:
    """Lease `folder` while a training reads it if it is a cached version; any other folder as is."""
    folder = Path(folder)
    if not is_cached(folder):
        yield folder
        return
    with lease(folder):
        yield folder
