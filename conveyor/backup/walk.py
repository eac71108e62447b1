"""Reading a backup source: a store through a consistent snapshot, any other folder by walking it, with a
local hash index so an unchanged file is not read again.

The index (path, size, mtime_ns, inode -> sha256, like restic's and rclone's) lets a no-change backup read
no file at all. Files modified within `RACY_NS` of the backup start are re-hashed next time (git's
"racy clean").
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from conveyor.errors import ConveyorError
from conveyor.fileio import sha256_file, write_atomic
from conveyor.version import DatasetVersion
from conveyor.store import Store, is_store

RACY_NS = 2_000_000_000
Progress = Callable[[int, int, str], None]  # progress(done, total, description), like the core API


@dataclass
class Item:
    """One file to store: where it is read from, its identity on disk, and its sha256 once known."""

    rel: str
    path: Path
    size: int
    mtime_ns: int
    ino: int
    sha: str | None = None


@dataclass
class View:
    root: Path
    kind: str
    items: list[Item]
    version: DatasetVersion | None = None
    immutable: bool = False   # store snapshot: hard links that nobody writes to


def walk(root: Path) -> list[Item]:
    """Every regular file under root (symlinks and special files are skipped), sorted by path."""
    out: list[Item] = []
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            raise ConveyorError(d, f"cannot list folder: {e.strerror or e}") from None
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                stack.append(Path(e.path))
            elif e.is_file(follow_symlinks=False):
                st = e.stat(follow_symlinks=False)
                rel = os.path.relpath(e.path, root).replace(os.sep, "/")
                out.append(Item(rel, Path(e.path), st.st_size, st.st_mtime_ns, st.st_ino))
    out.sort(key=lambda i: i.rel)
    return out


@contextmanager
def source_view(source: Path) -> Iterator[View]:
    """A conveyor store is read through `Store.snapshot()` (a consistent commit, hashes included); anything
    else is walked as a plain folder."""
    if is_store(source):
        with Store.open(source).snapshot() as snap:
            items = []
            for rel, entry in sorted(snap.files.items()):
                p = snap.dir / rel
                st = p.stat()
                items.append(Item(rel, p, entry.size, st.st_mtime_ns, st.st_ino, entry.sha256))
            yield View(snap.dir, "store", items, snap.version, immutable=True)
            return
    yield View(source, "folder", walk(source))


def _index_path(index_dir: Path, source: Path) -> Path:
    return index_dir / (hashlib.sha256(str(source).encode()).hexdigest()[:20] + ".json")


def load_index(index_dir: Path | None, source: Path) -> dict[str, list]:
    if index_dir is None:
        return {}
    p = _index_path(index_dir, source)
    try:
        data = json.loads(p.read_text())
        return data["files"] if data.get("source") == str(source) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # a missing or damaged cache only costs re-hashing


def apply_index(items: list[Item], index: dict[str, list]) -> None:
    for it in items:
        hit = index.get(it.rel)
        if hit and hit[0] == it.size and hit[1] == it.mtime_ns and hit[2] == it.ino:
            it.sha = hit[3]


def save_index(index_dir: Path | None, source: Path, items: list[Item], start_ns: int) -> None:
    if index_dir is None:
        return
    files = {i.rel: [i.size, i.mtime_ns, i.ino, i.sha] for i in items
             if i.sha and i.mtime_ns < start_ns - RACY_NS}
    p = _index_path(index_dir, source)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(p, json.dumps({"source": str(source), "files": files}).encode(), fsync=False)


def unchanged(item: Item) -> bool:
    try:
        st = item.path.stat()
    except OSError:
        return False
    return st.st_size == item.size and st.st_mtime_ns == item.mtime_ns


def hash_items(items: list[Item], immutable: bool, progress: Progress | None, workers: int) -> list[str]:
    """Hash items lacking a sha256 (hashlib releases the GIL, so threads use both cores).
    Returns the paths that changed or vanished while being read."""
    todo = [i for i in items if i.sha is None]
    if not todo:
        return []
    total, done, changed = sum(i.size for i in todo), 0, []

    def one(item: Item):
        try:
            sha = sha256_file(item.path)
        except FileNotFoundError:
            return item, None
        if not immutable and not unchanged(item):
            return item, None
        return item, sha

    with ThreadPoolExecutor(workers) as pool:
        for item, sha in pool.map(one, todo):
            done += item.size
            if sha is None:
                changed.append(item.rel)
            item.sha = sha
            if progress:
                progress(done, total, "hashing")
    return changed
