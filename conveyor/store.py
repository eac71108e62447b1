"""A v3.0 dataset folder plus `.conveyor/`: commits, ledger, lock and crash recovery.

lerobot globs every parquet under `data/` and `meta/episodes/`, so a stray file is corruption. Every
commit therefore stages its files under `.conveyor/staging/<id>/`, then writes a commit record (the
atomic commit point), then renames the staged files into place with `meta/info.json` last, then moves
`HEAD`. Opening a store finishes a recorded commit (roll forward) and deletes staging without a record
(roll back), so `kill -9` at any moment leaves either the old or the new state.

Committed data, video and episode-metadata files are immutable: appends add new files and compaction
replaces whole files in one commit. That is what makes appends O(new episodes) and hard-link snapshots
(for backup) consistent.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from conveyor import layout
from conveyor.errors import ConveyorError, StoreLocked
from conveyor.fileio import fsync_dir, sha256_file, write_atomic
from conveyor.models import DatasetVersion

DOT = ".conveyor"
CRASH_ENV = "CONVEYOR_CRASH_AT"  # fault injection for the crash tests: SIGKILL self at a named point


def crashpoint(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), 9)


def is_store(path: str | Path) -> bool:
    return (Path(path) / DOT).is_dir()


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass
class Snapshot:
    """A consistent committed view: files hard-linked into `dir`, immune to later commits."""

    dir: Path
    files: dict[str, FileEntry]
    version: DatasetVersion


class Commit:
    """Files staged for one commit; `Store.commit()` makes them visible atomically."""

    def __init__(self, store: "Store", kind: str):
        self.store = store
        self.kind = kind
        self.id = uuid.uuid4().hex
        self.dir = store.dot / "staging" / self.id
        self.dir.mkdir(parents=True)
        self.add: dict[str, FileEntry] = {}
        self.remove: list[str] = []
        self.ledger: list[dict] = []

    def path(self, rel: str) -> Path:
        """Where to write the staged file that will become `rel`."""
        p = self.dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def staged(self, rel: str) -> None:
        """Record a staged file written at `path(rel)` (hashing it now, while it is in page cache)."""
        p = self.dir / rel
        self.add[rel] = FileEntry(p.stat().st_size, sha256_file(p))

    def write(self, rel: str, data: bytes) -> None:
        p = self.path(rel)
        p.write_bytes(data)
        self.add[rel] = FileEntry(len(data), hashlib.sha256(data).hexdigest())

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Store:
    """Open with `Store.open(root)`; write through `lock()` + `begin()` + `commit()`."""

    def __init__(self, root: Path):
        self.root = root
        self.dot = root / DOT
        self._lock_fd: int | None = None

    # -- opening ---------------------------------------------------------------------------------------

    @classmethod
    def open(cls, root: str | Path, create: bool = False) -> "Store":
        root = Path(root).resolve()
        store = cls(root)
        if not store.dot.is_dir():
            if not create:
                if (root / layout.INFO).exists():
                    raise ConveyorError(root, "a v3.0 dataset, but not a conveyor store (no .conveyor/); "
                                              "convert the v2.1 source with `conveyor convert` instead")
                raise ConveyorError(root, "not a conveyor store (no .conveyor/ folder)")
            if root.exists() and any(root.iterdir()):
                raise ConveyorError(root, "folder exists and is not empty; refusing to make it a store")
            (store.dot / "commits").mkdir(parents=True)
        store.recover()
        return store

    def recover(self) -> None:
        """Finish or discard an interrupted commit; a no-op while another writer holds the lock."""
        try:
            with self.lock(timeout=0):
                self._recover_locked()
        except StoreLocked:
            pass
        except OSError as e:  # a read-only mount (a reader, e.g. a training worker) cannot and need not recover
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise

    def _recover_locked(self) -> None:
        head = self.head_commit()
        for rec_path in sorted((self.dot / "commits").glob("*.json")):
            n = int(rec_path.stem)
            if n > head:
                try:
                    record = json.loads(rec_path.read_text())
                except json.JSONDecodeError:  # torn record: the commit point was never reached
                    rec_path.unlink()
                    continue
                self._apply(record)
        staging = self.dot / "staging"
        if staging.is_dir():
            for d in staging.iterdir():
                shutil.rmtree(d, ignore_errors=True)
        for t in self.dot.glob(".*.tmp"):
            t.unlink(missing_ok=True)

    # -- state -----------------------------------------------------------------------------------------

    def head_commit(self) -> int:
        return self.version.commit

    @property
    def version(self) -> DatasetVersion:
        p = self.dot / "HEAD"
        if not p.exists():
            return DatasetVersion(commit=0)
        return DatasetVersion.model_validate_json(p.read_text())

    @property
    def info(self) -> dict:
        p = self.root / layout.INFO
        if not p.exists():
            return {}
        return json.loads(p.read_text(encoding="utf-8"))

    def manifest(self) -> dict[str, FileEntry]:
        """Every committed file of the dataset: relative path -> size and sha256."""
        p = self.dot / "manifest.json"
        if not p.exists():
            return {}
        return {k: FileEntry(*v) for k, v in json.loads(p.read_text()).items()}

    def ledger(self) -> list[dict]:
        """Source episode -> store episode records of committed commits, in store order."""
        p = self.dot / "ledger.jsonl"
        if not p.exists():
            return []
        head = self.head_commit()
        seen: dict[int, dict] = {}
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                if r["commit"] <= head:
                    seen[r["episode_index"]] = r  # a rolled-forward commit may have appended twice
        return [seen[k] for k in sorted(seen)]

    # -- locking ---------------------------------------------------------------------------------------

    @contextmanager
    def lock(self, timeout: float | None = 60.0) -> Iterator[None]:
        """Exclusive writer lock; waits up to `timeout` s (None = forever) then raises StoreLocked."""
        if self._lock_fd is not None:  # re-entrant within one Store object
            yield
            return
        self.dot.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dot / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if deadline is not None and time.monotonic() >= deadline:
                    owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    os.close(fd)
                    raise StoreLocked(self.root, f"store is locked by {owner}; another writer is "
                                                 f"running (waited {timeout:.0f} s)") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC".encode(), 0)
        self._lock_fd = fd
        try:
            yield
        finally:
            self._lock_fd = None
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @contextmanager
    def _apply_lock(self, shared: bool) -> Iterator[None]:
        """Held exclusively while files are renamed into place, shared while a snapshot links them."""
        fd = os.open(self.dot / "apply.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # -- committing ------------------------------------------------------------------------------------

    def begin(self, kind: str) -> Commit:
        if self._lock_fd is None:
            raise RuntimeError("begin() needs the store lock")
        return Commit(self, kind)

    def commit(self, c: Commit, totals: tuple[int, int]) -> DatasetVersion:
        """Write the commit record (the commit point), then apply it."""
        parent = self.version
        manifest = self.manifest()
        for rel in c.remove:
            manifest.pop(rel, None)
        manifest.update(c.add)
        c.write(f"{DOT}/manifest.json",
                json.dumps({k: [v.size, v.sha256] for k, v in sorted(manifest.items())}).encode())
        h = hashlib.sha256(parent.content_hash.encode())
        for rel in sorted(c.add):
            h.update(f"+{rel}:{c.add[rel].sha256}\n".encode())
        for rel in sorted(c.remove):
            h.update(f"-{rel}\n".encode())
        version = DatasetVersion(commit=parent.commit + 1, commit_id=c.id, total_episodes=totals[0],
                                 total_frames=totals[1], content_hash=h.hexdigest())
        for r in c.ledger:
            r["commit"] = version.commit
        record = {
            "commit": version.commit, "id": c.id, "kind": c.kind,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "version": version.model_dump(),
            "add": {k: [v.size, v.sha256] for k, v in c.add.items()},
            "remove": c.remove, "ledger": c.ledger,
        }
        for d in {p.parent for p in c.dir.rglob("*") if p.is_file()}:
            fsync_dir(d)
        crashpoint("staged")
        write_atomic(self.dot / "commits" / f"{version.commit:08d}.json",
                      json.dumps(record, ensure_ascii=False).encode("utf-8"))
        fsync_dir(self.dot / "commits")
        crashpoint("recorded")
        self._apply(record)
        return version

    def _apply(self, record: dict) -> None:
        """Idempotent roll-forward of a recorded commit: renames, removals, ledger, HEAD."""
        staging = self.dot / "staging" / record["id"]
        order = sorted(record["add"], key=lambda r: (r in layout.META_FILES, layout.META_FILES.index(r)
                                                     if r in layout.META_FILES else 0, r))
        with self._apply_lock(shared=False):
            for rel in order:
                src = staging / rel
                if src.exists():
                    dst = self.root / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, dst)
                    crashpoint(f"renamed:{rel}")
            for rel in record["remove"]:
                (self.root / rel).unlink(missing_ok=True)
            if record["ledger"]:
                with open(self.dot / "ledger.jsonl", "a", encoding="utf-8") as f:
                    for r in record["ledger"]:
                        f.write(json.dumps(r, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            crashpoint("ledger")
            write_atomic(self.dot / "HEAD", json.dumps(record["version"]).encode())
        crashpoint("head")
        shutil.rmtree(staging, ignore_errors=True)
        for rel in record["remove"]:  # drop folders emptied by compaction
            parent = (self.root / rel).parent
            while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent

    # -- reading ---------------------------------------------------------------------------------------

    @contextmanager
    def snapshot(self) -> Iterator[Snapshot]:
        """Hard-link the committed files (and conveyor's bookkeeping) into a private folder."""
        snap_dir = self.dot / "snapshots" / uuid.uuid4().hex
        with self._apply_lock(shared=True):
            version = self.version
            files = dict(self.manifest())
            for rel in ("HEAD", "ledger.jsonl", "manifest.json"):
                p = self.dot / rel
                if p.exists():
                    files[f"{DOT}/{rel}"] = FileEntry(p.stat().st_size, sha256_file(p))
            for p in sorted((self.dot / "commits").glob("*.json")):
                if int(p.stem) <= version.commit:
                    files[f"{DOT}/commits/{p.name}"] = FileEntry(p.stat().st_size, sha256_file(p))
            for rel in files:
                dst = snap_dir / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(self.root / rel, dst)
        try:
            yield Snapshot(snap_dir, files, version)
        finally:
            shutil.rmtree(snap_dir, ignore_errors=True)

    def next_linear(self, kind: str) -> int:
        """Next unused file number (chunk*1000 + file) for 'data', 'meta' or 'videos/<key>'."""
        used = [layout.linear_index(p) for p in self.manifest() if layout.kind_of(p) == kind]
        return max((u for u in used if u is not None), default=-1) + 1
