"""Scrub: re-read every committed file of a store and compare it with the sha256 its commit recorded.

The restic `check --read-data` / ZFS scrub of a store. Silent damage (a failing disk, a bad copy, a
stray process writing zeros into an mp4) passes every structural check; only the bytes tell. Each
damaged, missing or extra file is named together with the store episodes whose rows or frames it holds.

Safe while a writer commits: committed data/video/episode files are immutable and a commit replaces
files only under the store's apply lock. Files are hashed without any lock, and every suspect is
re-checked under the shared apply lock against the manifest as it is *then*: a file that a concurrent
commit replaced or removed is not damage.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import BaseModel, Field

from conveyor import layout
from conveyor.errors import ConveyorError
from conveyor.version import DatasetVersion
from conveyor.store import DOT, FileEntry, Store

Progress = Callable[[int, int, str], None]  # progress(done, total, description), as elsewhere
BUF = 4 << 20          # read size: large sequential reads run at disk speed
WORKERS = 2            # sha256 releases the GIL: two threads keep a disk and a core busy


class FileDamage(BaseModel):
    """One file that is not as committed, and what it holds."""

    path: str
    problem: str = Field(description="damaged | missing | extra")
    detail: str = ""
    episodes: list[int] = Field(default_factory=list, description="store episodes whose rows/frames it holds")
    whole_store: bool = Field(False, description="store-wide metadata (info, stats, tasks)")
    camera: str | None = None

    def holds(self) -> str:
        """What this file carries, for a one-line message."""
        if self.problem == "extra":
            return "written by no commit"
        if self.whole_store:
            return "whole store"
        what = f"episodes {format_episodes(self.episodes)}" if self.episodes else "no episodes"
        if self.camera:
            return f"{what}, camera {self.camera}"
        if self.path.startswith("data/"):
            return f"{what}, rows"
        if self.path.startswith("meta/episodes/"):
            return f"{what}, episode metadata"
        return what

    def line(self) -> str:
        return f"{self.problem.upper()} {self.path}: {self.holds()}" + (f" ({self.detail})" if self.detail else "")


class ScrubReport(BaseModel):
    store: str
    version: DatasetVersion | None = None
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    problems: list[FileDamage] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def damaged(self) -> list[FileDamage]:
        """Damaged or missing: what a repair must bring back."""
        return [p for p in self.problems if p.problem in ("damaged", "missing")]

    @property
    def extra(self) -> list[FileDamage]:
        return [p for p in self.problems if p.problem == "extra"]

    @property
    def mb_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        counts = ", ".join(f"{sum(p.problem == k for p in self.problems)} {k}" for k in ("damaged", "missing", "extra"))
        at = f" at commit {self.version.commit}" if self.version else ""
        verdict = "every byte as committed" if self.ok else counts
        return (f"scrub of {self.store}{at}: {self.files} files, {self.bytes / 1e6:.1f} MB in {self.seconds:.2f} s "
                f"({self.mb_s:.0f} MB/s): {verdict}")


def format_episodes(eps: list[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2, 5, 7-8'."""
    out, eps = [], sorted(set(eps))
    i = 0
    while i < len(eps):
        j = i
        while j + 1 < len(eps) and eps[j + 1] == eps[j] + 1:
            j += 1
        out.append(str(eps[i]) if i == j else f"{eps[i]}-{eps[j]}")
        i = j + 1
    return ", ".join(out)


# --------------------------------------------------------------------------------------------------
# hashing


def hash_file(path: Path, tick: Callable[[int], None] | None = None) -> str:
    """sha256 of a file in large sequential reads; `tick(n)` after each read."""
    h = hashlib.sha256()
    buf = bytearray(BUF)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        try:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):
            pass
        while n := f.readinto(view):
            h.update(view[:n])
            if tick:
                tick(n)
    return h.hexdigest()


def _check(root: Path, rel: str, entry: FileEntry, tick=None) -> FileDamage | None:
    p = root / rel
    try:
        size = p.stat().st_size
        if size != entry.size:
            return FileDamage(path=rel, problem="damaged", detail=f"{size} bytes, committed {entry.size}")
        sha = hash_file(p, tick)
    except FileNotFoundError:
        return FileDamage(path=rel, problem="missing")
    except OSError as e:  # an unreadable sector is damage too, named rather than raised
        return FileDamage(path=rel, problem="damaged", detail=f"read error: {e.strerror or e}")
    if sha != entry.sha256:
        return FileDamage(path=rel, problem="damaged", detail=f"sha256 {sha[:12]}…, committed {entry.sha256[:12]}…")
    return None


def _on_disk(root: Path) -> set[str]:
    """Every regular file of the dataset (not `.conveyor/` internals)."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root) and DOT in dirnames:
            dirnames.remove(DOT)
        for f in filenames:
            out.add(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return out


def verify_files(s: Store, rels: list[str] | None = None, *, progress: Progress | None = None,
                 workers: int = WORKERS) -> tuple[list[FileDamage], int, int, DatasetVersion]:
    """Hash `rels` (default: every committed file) against the manifest and list extras when scanning all.

    Returns (problems, files, bytes, version), each problem confirmed under the apply lock."""
    with s.committed_view():
        manifest, version = s.manifest(), s.version
    todo = sorted(manifest) if rels is None else [r for r in rels if r in manifest]
    total = sum(manifest[r].size for r in todo)
    done, lock = [0], threading.Lock()

    def tick(n: int) -> None:
        with lock:
            done[0] += n

    suspects = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for d in pool.map(lambda r: _check(s.root, r, manifest[r], tick), todo):
            if d:
                suspects.append(d)
            if progress:  # from the caller's thread only (Prefect artifacts and rich need it)
                progress(done[0], total, "scrubbing")
    # a file a commit replaced is retained until vacuum (readers of the previous version may use it): not extra
    extras = sorted(_on_disk(s.root) - set(manifest) - set(s.retained())) if rels is None else []
    if not suspects and not extras:
        return [], len(todo), total, version
    # confirm under the lock, against the manifest of the commit that is current now
    with s.committed_view():
        now, version = s.manifest(), s.version
        confirmed = []
        for d in suspects:  # a file a concurrent commit removed is gone by design; one it replaced is re-read
            again = _check(s.root, d.path, now[d.path]) if d.path in now else None
            if again:
                confirmed.append(again)
        for rel in extras:
            if rel not in now and (s.root / rel).is_file():
                confirmed.append(FileDamage(path=rel, problem="extra"))
    return confirmed, len(todo), total, version


# --------------------------------------------------------------------------------------------------
# which episodes a file holds


def _episode_rows(root: Path, manifest: dict[str, FileEntry], damaged: set[str]) -> tuple[list[dict], set[int]]:
    """Location columns of every episode-metadata row, and the episode indices found; a metadata file
    that cannot be read is skipped (its episodes are the ones missing from the others)."""
    import pyarrow.parquet as pq  # only when something is wrong: keeps `conveyor scrub` start-up light

    rows: list[dict] = []
    for rel in sorted(r for r in manifest if r.startswith("meta/episodes/")):
        try:
            f = pq.ParquetFile(root / rel)
            cols = [c for c in f.schema_arrow.names if c == "episode_index" or c.endswith(("chunk_index", "file_index"))]
            t = f.read(columns=cols).to_pylist()
        except Exception:  # noqa: BLE001 - damaged metadata: fall back to the gaps below
            continue
        for r in t:
            r["_meta"] = rel
        rows += t
    return rows, {r["episode_index"] for r in rows}


def attribute(s: Store, problems: list[FileDamage]) -> list[FileDamage]:
    """Fill in each problem's episodes (and camera) from the store's episode metadata."""
    if not problems:
        return problems
    manifest = s.manifest()
    bad = {p.path for p in problems}
    rows, found = _episode_rows(s.root, manifest, bad)
    total = len(s.ledger()) or (max(found) + 1 if found else 0)
    unknown = sorted(set(range(total)) - found)
    unreadable_meta = [p.path for p in problems if p.path.startswith("meta/episodes/")
                       and not any(r["_meta"] == p.path for r in rows)]
    for p in problems:
        if p.problem == "extra":
            continue
        rel = p.path
        if rel in layout.META_FILES:
            p.whole_store = True
        elif rel.startswith("data/"):
            p.episodes = sorted(r["episode_index"] for r in rows
                                if layout.DATA_PATH.format(chunk_index=r["data/chunk_index"],
                                                           file_index=r["data/file_index"]) == rel)
        elif rel.startswith("videos/"):
            key = rel.split("/")[1]
            p.camera = key
            ck, fk = f"videos/{key}/chunk_index", f"videos/{key}/file_index"
            p.episodes = sorted(r["episode_index"] for r in rows if ck in r and
                                layout.VIDEO_PATH.format(video_key=key, chunk_index=r[ck], file_index=r[fk]) == rel)
        elif rel.startswith("meta/episodes/"):
            mine = sorted(r["episode_index"] for r in rows if r["_meta"] == rel)
            p.episodes = mine or (unknown if len(unreadable_meta) == 1 else [])
            if not p.episodes and unknown:
                p.detail = (p.detail + "; " if p.detail else "") + f"episodes among {format_episodes(unknown)}"
        else:
            p.whole_store = True
    return problems


# --------------------------------------------------------------------------------------------------


def scrub(store: str | Path | Store, *, progress: Progress | None = None, workers: int = WORKERS) -> ScrubReport:
    """Read every committed file and compare it with its recorded sha256; list extras; name episodes."""
    t0 = time.perf_counter()
    s = store if isinstance(store, Store) else Store.open(store)
    if not (s.root / layout.MANIFEST).exists():
        if s.head_commit() == 0:
            return ScrubReport(store=str(s.root), version=s.version, seconds=time.perf_counter() - t0)
        raise ConveyorError(s.root / layout.MANIFEST, "manifest missing: the store's record of its files is gone")
    try:
        problems, files, nbytes, version = verify_files(s, progress=progress, workers=workers)
    except ValueError as e:  # a damaged manifest.json cannot vouch for anything
        raise ConveyorError(s.root / layout.MANIFEST, f"damaged manifest: {e}") from None
    return ScrubReport(store=str(s.root), version=version, files=files, bytes=nbytes,
                       seconds=time.perf_counter() - t0, problems=attribute(s, problems))
