"""A v3.0 dataset folder plus `.conveyor/`: commits, ledger, lock and crash recovery.

lerobot globs every parquet under `data/` and `meta/episodes/`, so a stray file is corruption. Every
commit therefore stages its files under `.conveyor/staging/<id>/`, then writes a commit record (the
atomic commit point), then renames the staged files into place with `meta/info.json` last, then moves
`HEAD`. Opening a store finishes a recorded commit (roll forward) and deletes staging without a record
(roll back), so `kill -9` at any moment leaves either the old or the new state. Staged files are flushed
to disk (`fdatasync`) and their folders synced before the record is written, so a power loss does too.

Committed data, video and episode-metadata files are immutable: appends add new files and compaction
replaces whole files in one commit. That is what makes appends O(new episodes) and hard-link snapshots
(for backup) consistent. The files a commit replaces stay readable for open readers until `vacuum`
(`conveyor/retained.py`).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from conveyor import layout
from conveyor.errors import ConveyorError, StoreLocked
from conveyor.fileio import fsync_dir, sha256_file, write_atomic
from conveyor.ledger import LedgerRecord, LedgerState, append_ledger, read_ledger, read_state
from conveyor.retained import move, retained_files, swap_folder, vacuum as vacuum_retained
from conveyor.version import DatasetVersion

DOT = layout.DOT
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
    """One transaction's staged files, removals, ledger records and totals; made visible atomically when its
    `Store.transaction()` block ends without an error."""

    def __init__(self, store: "Store", kind: str):
        self.store = store
        self.kind = kind
        self.id = uuid.uuid4().hex
        self.dir = store.root / layout.STAGING / self.id
        self.dir.mkdir(parents=True)
        self.add: dict[str, FileEntry] = {}
        self.remove: list[str] = []
        self.ledger: list[LedgerRecord] = []
        self.totals: tuple[int, int] | None = None
        self.cancelled = False
        self.version: DatasetVersion | None = None  # set once committed
        self.writing: dict[int, str] = {}  # thread id -> the file it last opened, for a full disk's message

    def path(self, rel: str) -> Path:
        """Where to write the staged file that will become `rel`."""
        p = self.dir / rel
        self.writing[threading.get_ident()] = rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def staged(self, rel: str) -> None:
        """Record a staged file written at `path(rel)`: flushed to disk, and hashed while it is in page cache.
        Called on the thread that wrote the file, so the flushes of several files overlap."""
        p = self.dir / rel
        self.add[rel] = FileEntry(p.stat().st_size, sha256_file(p, sync=True))

    def write(self, rel: str, data: bytes) -> None:
        with open(self.path(rel), "wb") as f:
            f.write(data)
            f.flush()
            os.fdatasync(f.fileno())
        self.add[rel] = FileEntry(len(data), hashlib.sha256(data).hexdigest())

    def delete(self, rels: list[str]) -> None:
        """Committed files this commit removes (compaction replaces them)."""
        self.remove += rels

    def record(self, records: list[LedgerRecord]) -> None:
        """Ledger records of the episodes this commit adds (their commit number is filled in at commit)."""
        self.ledger += records

    def set_totals(self, episodes: int, frames: int) -> None:
        """The store's total episodes and frames once this commit is applied."""
        self.totals = (episodes, frames)

    def cancel(self) -> None:
        """Nothing to commit after all: the block ends without a new version and staging is dropped."""
        self.cancelled = True

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Store:
    """Open with `Store.open(root)`; write under `lock()` through `with store.transaction(kind) as tx:`."""

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
                    try:
                        version = json.loads((root / layout.INFO).read_text(encoding="utf-8")).get("codebase_version")
                    except (OSError, ValueError, AttributeError):
                        version = None
                    if version != layout.CODEBASE_VERSION:
                        raise ConveyorError(root, f"a {version or 'LeRobot'} recording, not a conveyor store; make "
                                                  f"one with `conveyor convert {root} DST` or `conveyor ingest "
                                                  f"{root} STORE`")
                    raise ConveyorError(root, "a v3.0 dataset, but not a conveyor store (no .conveyor/); "
                                              "convert the v2.1 source with `conveyor convert` instead")
                raise ConveyorError(root, "not a conveyor store (no .conveyor/ folder)")
            if root.exists() and any(root.iterdir()):
                raise ConveyorError(root, "folder exists and is not empty; refusing to make it a store")
            (store.root / layout.COMMITS).mkdir(parents=True)
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
        for rec_path in sorted((self.root / layout.COMMITS).glob("*.json")):
            n = int(rec_path.stem)
            if n > head:
                try:
                    record = json.loads(rec_path.read_text())
                except json.JSONDecodeError:  # torn record: the commit point was never reached
                    rec_path.unlink()
                    continue
                self._apply(record)
        staging = self.root / layout.STAGING
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
        p = self.root / layout.HEAD
        if not p.exists():
            return DatasetVersion(commit=0)
        return DatasetVersion.from_json(p.read_text())

    @property
    def info(self) -> dict:
        p = self.root / layout.INFO
        if not p.exists():
            return {}
        return json.loads(p.read_text(encoding="utf-8"))

    def manifest(self) -> dict[str, FileEntry]:
        """Every committed file of the dataset: relative path -> size and sha256."""
        p = self.root / layout.MANIFEST
        if not p.exists():
            return {}
        return {k: FileEntry(*v) for k, v in json.loads(p.read_text()).items()}

    def ledger(self) -> list[LedgerRecord]:
        """Source episode -> store episode records of committed commits, in store order."""
        return read_ledger(self.root / layout.LEDGER, self.head_commit())

    def ledger_state(self) -> LedgerState:
        """The ledger with its dropped source episodes and curation records (`conveyor/curate.py`)."""
        return read_state(self.root / layout.LEDGER, self.head_commit())

    # -- locking ---------------------------------------------------------------------------------------

    @contextmanager
    def lock(self, timeout: float | None = 60.0) -> Iterator[None]:
        """Exclusive writer lock; waits up to `timeout` s (None = forever) then raises StoreLocked."""
        if self._lock_fd is not None:  # re-entrant within one Store object
            yield
            return
        self.dot.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / layout.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
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
        fd = os.open(self.root / layout.APPLY_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @contextmanager
    def committed_view(self) -> Iterator[None]:
        """No commit renames files while this is held (the shared apply lock), so the manifest and the files
        read under it agree; a read-only store (no lock file can be taken) has no writer to wait for."""
        with ExitStack() as held:
            try:
                held.enter_context(self._apply_lock(shared=True))
            except OSError as e:
                if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                    raise
            yield

    def restore_committed(self, rel: str, staged: Path) -> None:
        """Put back a committed file's exact bytes (scrub's repair: `staged` is flushed and already checked
        against the sha256 its commit recorded). Renamed under the lock a commit's renames hold; no new
        version, since the content is what was committed."""
        target = self.root / rel
        with self._apply_lock(shared=False):
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
            fsync_dir(target.parent)

    # -- committing ------------------------------------------------------------------------------------

    @contextmanager
    def transaction(self, kind: str) -> Iterator[Commit]:
        """The one way to change a store: stage files into the yielded commit; when the block ends without an
        error it is committed (`tx.version`), on any error (or `tx.cancel()`) staging is dropped."""
        if self._lock_fd is None:
            raise RuntimeError("transaction() needs the store lock")
        c = Commit(self, kind)
        try:
            yield c
            if not c.cancelled:
                c.version = self._commit(c)
        except OSError as e:  # pyarrow's "Error writing bytes to file ... [errno 28]" names no file: name it
            if e.errno != errno.ENOSPC and "[errno 28]" not in str(e).lower():
                raise
            rel = c.writing.get(threading.get_ident())
            where = Path(e.filename) if e.filename else c.dir / rel if rel else c.dir
            raise ConveyorError(where, f"No space left on device while writing store {self.root} ({kind}); "
                                       "nothing half-written is visible: free space and run it again") from None
        finally:
            if c.version is None:
                c.abort()

    def _commit(self, c: Commit) -> DatasetVersion:
        """Write the commit record (the commit point), then apply it."""
        if c.totals is None:
            raise RuntimeError("a commit needs set_totals()")
        totals = c.totals
        parent = self.version
        manifest = self.manifest()
        for rel in c.remove:
            manifest.pop(rel, None)
        manifest.update(c.add)
        c.write(layout.MANIFEST,
                json.dumps({k: [v.size, v.sha256] for k, v in sorted(manifest.items())}).encode())
        h = hashlib.sha256(parent.content_hash.encode())
        for rel in sorted(c.add):
            h.update(f"+{rel}:{c.add[rel].sha256}\n".encode())
        for rel in sorted(c.remove):
            h.update(f"-{rel}\n".encode())
        version = DatasetVersion(commit=parent.commit + 1, commit_id=c.id, total_episodes=totals[0],
                                 total_frames=totals[1], content_hash=h.hexdigest())
        record = {
            "commit": version.commit, "id": c.id, "kind": c.kind,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "version": version.to_dict(),
            "add": {k: [v.size, v.sha256] for k, v in c.add.items()},
            "remove": c.remove, "ledger": [replace(r, commit=version.commit).to_json() for r in c.ledger],
        }
        for d in {p.parent for p in c.dir.rglob("*") if p.is_file()}:
            fsync_dir(d)
        crashpoint("staged")
        write_atomic(self.root / layout.COMMIT_RECORD.format(commit=version.commit),
                      json.dumps(record, ensure_ascii=False).encode("utf-8"))
        fsync_dir(self.root / layout.COMMITS)
        crashpoint("recorded")
        self._apply(record)
        return version

    def _apply(self, record: dict) -> None:
        """Idempotent roll-forward of a recorded commit: renames, removals, ledger, HEAD.

        Order, for lerobot readers of the live store: videos (and anything else) first, then data, then
        meta/episodes (whose rows point into the files before them), then the small metadata with info.json
        last. Replaced files are retained, not deleted (`vacuum` removes them after `retained.RETENTION_S`): a
        video stays at its path, so a reader that opened the previous version keeps decoding it; a chunk folder
        of data/ or meta/episodes/ that loses parquet is swapped whole (`retained.swap_folder`: RENAME_EXCHANGE,
        one syscall), so lerobot's glob of it sees the old set or the new set, never a mix, and the replaced
        parquet move to RETAINED."""
        staging = self.root / layout.STAGING / record["id"]
        retained = self.root / layout.RETAINED / f"{record['commit']:08d}"

        def group(rel: str) -> tuple:
            if rel in layout.META_FILES:
                return 3, layout.META_FILES.index(rel), rel
            return (1 if rel.startswith("data/") else 2 if rel.startswith("meta/episodes/") else 0), 0, rel

        order = sorted(record["add"], key=group)
        swapped = {str(Path(rel).parent) for rel in record["remove"]
                   if rel.startswith(("data/", "meta/episodes/"))}
        with self._apply_lock(shared=False):
            for rel in order:
                folder = str(Path(rel).parent)
                if group(rel)[0] == 3:  # before the small metadata: folders that only lose files
                    for f in sorted(swapped):
                        swap_folder(self.root, f, record, staging, retained, crashpoint)
                    swapped.clear()
                if folder in swapped:
                    swap_folder(self.root, folder, record, staging, retained, crashpoint)
                    swapped.discard(folder)
                src = staging / rel
                if src.exists():
                    dst = self.root / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, dst)
                    crashpoint(f"renamed:{rel}")
            for folder in sorted(swapped):
                swap_folder(self.root, folder, record, staging, retained, crashpoint)
            for rel in record["remove"]:  # anything else a commit replaces (e.g. conveyor's own files)
                if not rel.startswith(("videos/", "data/", "meta/episodes/")):
                    move(self.root / rel, retained / rel)
            if record["ledger"]:
                append_ledger(self.root / layout.LEDGER, record["ledger"])
            crashpoint("ledger")
            write_atomic(self.root / layout.HEAD, json.dumps(record["version"]).encode())
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
        snap_dir = self.root / layout.SNAPSHOTS / uuid.uuid4().hex
        with self._apply_lock(shared=True):
            version = self.version
            files = dict(self.manifest())
            for rel in layout.BOOKKEEPING:
                p = self.root / rel
                if p.exists():
                    files[rel] = FileEntry(p.stat().st_size, sha256_file(p))
            for p in sorted((self.root / layout.COMMITS).glob("*.json")):
                if int(p.stem) <= version.commit:
                    files[f"{layout.COMMITS}/{p.name}"] = FileEntry(p.stat().st_size, sha256_file(p))
            for rel in files:
                dst = snap_dir / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(self.root / rel, dst)
        try:
            yield Snapshot(snap_dir, files, version)
        finally:
            shutil.rmtree(snap_dir, ignore_errors=True)

    def next_linear(self, kind: str) -> int:
        """Next unused file number (chunk*1000 + file) for 'data', 'meta' or 'videos/<key>'. A video a commit
        replaced stays at its path until vacuum, so its number is never reused (a reader may still open it)."""
        used = [layout.linear_index(p) for p in self.manifest() if layout.kind_of(p) == kind]
        if kind.startswith("videos/") and (self.root / kind).is_dir():
            used += [layout.linear_index(f"{kind}/{c.name}/{f.name}") for c in os.scandir(self.root / kind)
                     if c.is_dir() for f in os.scandir(c.path)]
        return max((u for u in used if u is not None), default=-1) + 1

    # -- retention (`conveyor/retained.py`) ----------------------------------------------------------------

    def retained(self) -> dict[str, tuple[int, datetime, Path]]:
        """Files replaced or removed by commits that vacuum has not yet cleared, still on disk: their path ->
        (commit, removal time, where the bytes are). Not part of the committed state."""
        return retained_files(self.root, self.manifest(), self.version.commit)

    def vacuum(self, retention_s: float, now: datetime | None = None) -> tuple[int, int]:
        """Delete what commits replaced or removed longer than `retention_s` ago (caller holds the lock);
        returns (files, bytes) removed."""
        return vacuum_retained(self.root, self.manifest(), self.version.commit, retention_s, now)
