"""Materialize a published dataset version as a plain, read-only LeRobot v3.0 folder in a worker's cache.

Every file comes from the cheapest place that provably holds its bytes: a hard link from the live store (on
its own filesystem, where the committed file's sha256 still matches), a hard link from another cached
version of the same store, else the repository (only the objects the cache lacks, every file's sha256
checked). The folder is built under `<cache_dir>/.tmp/` and renamed into place when complete, so lerobot
never sees a half-materialized version.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import time
import uuid
from pathlib import Path

from pydantic import BaseModel

from conveyor.backup.objects import fetch
from conveyor.datasets import cache as C
from conveyor.datasets.format import PublishedVersion
from conveyor.errors import ConveyorError
from conveyor.fileio import sha256_file, write_atomic
from conveyor.version import DatasetVersion
from conveyor.repo import CorruptObject, MissingObject, Repo
from conveyor.store import Store, crashpoint, is_store


class MaterializeReport(BaseModel):
    path: str
    version: DatasetVersion
    reused: bool = False          # the version was already in the cache
    linked_store: int = 0         # files hard-linked from the live store
    linked_cache: int = 0         # files hard-linked from another cached version
    copied: int = 0               # store files copied (the cache is on another filesystem)
    fetched_files: int = 0
    fetched_bytes: int = 0
    evicted: list[str] = []
    seconds: float = 0.0


def _link_or_copy(src: Path, dst: Path) -> bool:
    """Hard link (True), or copy when src is on another filesystem (False)."""
    try:
        os.link(src, dst)
        return True
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o444)
    return False


def _from_store(live: Path, need: dict, build: Path, report: MaterializeReport) -> None:
    """Link the files whose committed sha256 matches, from a consistent snapshot of the live store (its
    hard links pin the bytes even if a compaction removes the files meanwhile)."""
    store = Store.open(live)
    try:
        with store.snapshot() as snap:
            for rel, f in list(need.items()):
                entry = snap.files.get(rel)
                if entry is not None and entry.sha256 == f.sha256:
                    if _link_or_copy(snap.dir / rel, build / rel):
                        report.linked_store += 1
                    else:
                        report.copied += 1
                    del need[rel]
        return
    except OSError as e:  # a read-only view of the store: link directly, then prove the bytes by hashing
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
    manifest = store.manifest()
    for rel, f in list(need.items()):
        entry = manifest.get(rel)
        if entry is None or entry.sha256 != f.sha256:
            continue
        try:
            linked = _link_or_copy(live / rel, build / rel)
        except FileNotFoundError:
            continue
        if sha256_file(build / rel) != f.sha256:  # replaced since the manifest was read: fetch it instead
            os.unlink(build / rel)
            continue
        report.linked_store += linked
        report.copied += not linked
        del need[rel]


def _from_cache(store_dir: Path, skip: Path, need: dict, build: Path, report: MaterializeReport) -> None:
    by_sha: dict[str, Path] = {}
    for mp in sorted(store_dir.glob("*.json"), reverse=True):
        folder = mp.with_suffix("")
        if folder == skip or not folder.is_dir():
            continue
        try:
            other = PublishedVersion.model_validate_json(mp.read_bytes())
        except ValueError:
            continue
        for f in other.files:
            by_sha.setdefault(f.sha256, folder / f.path)
    for rel, f in list(need.items()):
        src = by_sha.get(f.sha256)
        if src is None:
            continue
        try:
            if src.stat().st_size != f.size:
                continue
            os.link(src, build / rel)
        except OSError:
            continue
        report.linked_cache += 1
        del need[rel]


def _seal(build: Path) -> None:
    """Read-only below the top folder (the top one is sealed after its rename)."""
    for d, dirs, files in os.walk(build, topdown=False):
        for f in files:
            p = os.path.join(d, f)
            if os.stat(p).st_nlink == 1:  # never change the mode of a file shared with the live store
                os.chmod(p, 0o444)
        if Path(d) != build:
            os.chmod(d, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)


def materialize(pv: PublishedVersion, cache_dir: Path, *, repo: Repo | None = None, live_store: Path | None = None,
                max_bytes: int | None = None, concurrency: int = 8) -> MaterializeReport:
    """The version's folder in `cache_dir` (built now unless already there); LRU eviction afterwards."""
    t0 = time.perf_counter()
    cache_dir = Path(cache_dir)
    C.check_writable(cache_dir)
    final = cache_dir / pv.store / pv.name
    report = MaterializeReport(path=str(final), version=pv.version)
    if final.is_dir():
        C.touch(final)
        report.reused = True
        report.seconds = time.perf_counter() - t0
        return report
    C.clean_stale_builds(cache_dir)
    for f in pv.files:
        if ".." in f.path.split("/") or f.path.startswith("/"):
            raise ConveyorError(f"{pv.store}@{pv.version.short}", f"unsafe path in published manifest: {f.path!r}")
    build = cache_dir / C.TMP / f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    try:
        for d in sorted({(build / f.path).parent for f in pv.files} | {build}):
            d.mkdir(parents=True, exist_ok=True)
        need = {f.path: f for f in pv.files}
        if live_store is not None and is_store(live_store):
            _from_store(Path(live_store), need, build, report)
        if need:
            _from_cache(cache_dir / pv.store, final, need, build, report)
        if need:
            if repo is None:
                raise ConveyorError(live_store or cache_dir, f"{len(need)} file(s) of {pv.store} version "
                                                             f"{pv.version.short} are not on this machine and the "
                                                             "settings have no storage_url to fetch them from; set "
                                                             "storage_url to where the store is published")
            files = list(need.values())
            try:
                fetch(repo, files, build, where="published version manifest", concurrency=concurrency)
            except (MissingObject, CorruptObject) as e:
                what = "missing from" if isinstance(e, MissingObject) else "corrupt in"
                raise ConveyorError(e.path, f"this object of {pv.store} version {pv.version.short} is {what} "
                                            f"storage; publish the store again with `conveyor publish {pv.store}` "
                                            "(or restore the repository) or pin another version") from None
            report.fetched_files = len(files)
            report.fetched_bytes = sum(f.size for f in files)
        crashpoint("materialize:built")
        _seal(build)
        final.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(C.manifest_path(final), pv.model_dump_json().encode(), fsync=False)
        try:
            os.rename(build, final)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            report.reused = True  # another process finished the same version first
        os.chmod(final, 0o555)
    except OSError as e:  # a full disk, mostly: one sentence naming the cache; nothing of this build is kept
        if not final.is_dir():
            C.manifest_path(final).unlink(missing_ok=True)
        where = f" ({e.filename})" if e.filename else ""
        raise ConveyorError(cache_dir, f"cannot materialize {pv.store} version {pv.version.short} in the dataset "
                                       f"cache: {e.strerror or e}{where}; nothing was kept; free space there or set "
                                       "cache_dir to a larger disk") from None
    finally:
        C.remove_tree(build)
    C.touch(final)
    if max_bytes is not None:
        report.evicted = [str(p) for p in C.evict(cache_dir, max_bytes, keep={final})]
    report.seconds = time.perf_counter() - t0
    return report
