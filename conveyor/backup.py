"""Incremental, verified snapshots of stores and raw recordings in an object store (`conveyor.storage`).

Repository layout under the storage URL (one repository can hold many targets; objects are shared)::

    blobs/<sha[:2]>/<sha256>            a whole file >= PACK_MIN bytes, named by the sha256 of its bytes
    packs/<sha[:2]>/<sha256>            small files concatenated (<= PACK_TARGET bytes), named by the pack's sha256
    snapshots/<target>/<stamp>.json.gz  a manifest (below); <stamp> = UTC time, 20250131T033000.123Z
    locks/<target>-<stamp>.json         "a backup is writing": a concurrent prune skips garbage collection

Why content-addressed: a file already stored under its hash is never sent again (store files are immutable
after commit, so a nightly backup sends only new commits plus the small metadata files), two snapshots
share objects without bookkeeping, a corrupted object is detected by its own name, and retention's garbage
collection is "delete every object no retained manifest names". Why packs: an object per small file costs
one request each (600 episode files of a raw recording = 600 PUTs on backup and 600 GETs on restore);
packing them makes that a handful, as restic does. A pack is kept whole while any retained snapshot uses
any file in it.

Manifest (gzip-compressed JSON, ``format: "conveyor-snapshot/1"``), written last — it is the commit point,
so a snapshot either lists only objects that exist or does not exist at all::

    {"format": "conveyor-snapshot/1", "id": "lab/20250131T033000.123Z", "target": "lab",
     "kind": "store" | "folder", "source": "/abs/path", "host": "...", "created": "2025-01-31T03:30:00.123Z",
     "version": {DatasetVersion} | null,  "total_files": N, "total_bytes": B,
     "files": [{"path": "data/chunk-000/file-000.parquet", "size": 123, "sha256": "<hex>",
                "mtime_ns": 1738290000000000000, "pack": null | "<pack sha256>", "offset": 0}, ...]}

A file with ``pack: null`` is the blob ``blobs/<sha[:2]>/<sha256>``; otherwise it is ``size`` bytes at
``offset`` in ``packs/<pack[:2]>/<pack>``.

A no-change backup reads no file: a local index (path, size, mtime_ns, inode -> sha256, like restic's and
rclone's) supplies the hashes, one listing of ``blobs/`` and ``packs/`` (one request per 1000 objects) plus
the target's previous manifest tell what is already stored, and the only write is the new manifest.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pydantic import BaseModel, Field

from conveyor.errors import ConveyorError
from conveyor.version import DatasetVersion
from conveyor.storage import CorruptObject, MissingObject, ObjectStore, hash_file, sha256_hex

FORMAT = "conveyor-snapshot/1"
PACK_MIN = 1 << 20        # files smaller than this go into packs
PACK_TARGET = 8 << 20     # a pack is closed once it reaches this size
RACY_NS = 2_000_000_000   # files modified this close to the backup start are re-hashed next time (git's "racy clean")
LOCK_STALE_S = 6 * 3600
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_ACTIVE_LOCKS: set[str] = set()  # locks held by backups running in this process

Progress = Callable[[int, int, str], None]  # progress(done, total, description), like the core API


# --------------------------------------------------------------------------------------------------
# models


class ManifestFile(BaseModel):
    path: str
    size: int
    sha256: str
    mtime_ns: int = 0
    pack: str | None = None
    offset: int = 0

    @property
    def object_key(self) -> str:
        return pack_key(self.pack) if self.pack else blob_key(self.sha256)


class Manifest(BaseModel):
    format: str = FORMAT
    id: str
    target: str
    kind: str
    source: str
    host: str = ""
    created: datetime
    version: DatasetVersion | None = None
    total_files: int = 0
    total_bytes: int = 0
    files: list[ManifestFile] = Field(default_factory=list)

    def object_keys(self) -> set[str]:
        return {f.object_key for f in self.files}


class SnapshotInfo(BaseModel):
    id: str
    target: str
    created: datetime
    kind: str
    source: str
    version: DatasetVersion | None = None
    files: int
    bytes: int


class BackupReport(BaseModel):
    target: str
    url: str
    snapshot: str
    kind: str
    version: DatasetVersion | None = None
    files_total: int = 0
    files_sent: int = 0
    files_skipped: int = 0
    bytes_total: int = 0
    bytes_sent: int = 0
    objects_sent: int = 0
    changed: list[str] = Field(default_factory=list, description="files that changed while read; not in this snapshot")
    seconds: float = 0.0

    @property
    def throughput_mb_s(self) -> float:
        return self.bytes_sent / 1e6 / self.seconds if self.seconds > 0 else 0.0


class RestoreReport(BaseModel):
    snapshot: str
    dst: str
    files: int
    bytes: int
    seconds: float


class VerifyReport(BaseModel):
    snapshot: str
    full: bool
    objects_total: int
    objects_read: int
    bytes_read: int
    failures: list[str] = Field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


class PruneReport(BaseModel):
    url: str
    kept: list[str]
    deleted_snapshots: list[str]
    deleted_objects: int
    gc_skipped: str | None = None
    incomplete_cleaned: int = 0


# --------------------------------------------------------------------------------------------------
# keys and names


def blob_key(sha: str) -> str:
    return f"blobs/{sha[:2]}/{sha}"


def pack_key(sha: str) -> str:
    return f"packs/{sha[:2]}/{sha}"


def stamp(t: datetime) -> str:
    t = t.astimezone(timezone.utc)
    return t.strftime("%Y%m%dT%H%M%S.") + f"{t.microsecond // 1000:03d}Z"


def parse_stamp(s: str) -> datetime:
    return datetime.strptime(s, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=timezone.utc)


def manifest_key(snapshot_id: str) -> str:
    return f"snapshots/{snapshot_id}.json.gz"


def split_ref(url: str) -> tuple[str, str | None]:
    """`URL@SNAPSHOT` -> (URL, SNAPSHOT); SNAPSHOT may be `target`, `target/stamp-prefix`, a stamp prefix, `latest`."""
    if "@" in url:
        base, ref = url.rsplit("@", 1)
        if not ref:
            raise ConveyorError(url, "empty snapshot after '@'")
        return base, ref
    return url, None


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ConveyorError(name, "backup target names may use only letters, digits, '.', '_' and '-'")
    return name


# --------------------------------------------------------------------------------------------------
# reading the source


@dataclass
class _Item:
    rel: str
    path: Path
    size: int
    mtime_ns: int
    ino: int
    sha: str | None = None


@dataclass
class _View:
    root: Path
    kind: str
    items: list[_Item]
    version: DatasetVersion | None = None
    immutable: bool = False   # store snapshot: hard links that nobody writes to


def _walk(root: Path) -> list[_Item]:
    """Every regular file under root (symlinks and special files are skipped), sorted by path."""
    out: list[_Item] = []
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
                out.append(_Item(rel, Path(e.path), st.st_size, st.st_mtime_ns, st.st_ino))
    out.sort(key=lambda i: i.rel)
    return out


@contextmanager
def _source_view(source: Path) -> Iterator[_View]:
    """A conveyor store is read through `Store.snapshot()` (a consistent commit, hashes included); anything
    else is walked as a plain folder."""
    if (source / ".conveyor").is_dir():
        try:
            from conveyor.store import Store
        except ImportError:  # core store not installed: a plain walk is the best we can do
            Store = None
        if Store is not None and hasattr(Store, "snapshot"):
            with Store.open(source).snapshot() as snap:
                items = []
                for rel, entry in sorted(snap.files.items()):
                    p = snap.dir / rel
                    st = p.stat()
                    items.append(_Item(rel, p, entry.size, st.st_mtime_ns, st.st_ino, entry.sha256))
                yield _View(snap.dir, "store", items, snap.version, immutable=True)
                return
    yield _View(source, "folder", _walk(source))


# --------------------------------------------------------------------------------------------------
# local index: (path, size, mtime_ns, inode) -> sha256


def _index_path(index_dir: Path, source: Path) -> Path:
    return index_dir / (hashlib.sha256(str(source).encode()).hexdigest()[:20] + ".json")


def _load_index(index_dir: Path | None, source: Path) -> dict[str, list]:
    if index_dir is None:
        return {}
    p = _index_path(index_dir, source)
    try:
        data = json.loads(p.read_text())
        return data["files"] if data.get("source") == str(source) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # a missing or damaged cache only costs re-hashing


def _save_index(index_dir: Path | None, source: Path, items: list[_Item], start_ns: int) -> None:
    if index_dir is None:
        return
    files = {i.rel: [i.size, i.mtime_ns, i.ino, i.sha] for i in items
             if i.sha and i.mtime_ns < start_ns - RACY_NS}
    p = _index_path(index_dir, source)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"source": str(source), "files": files}))
    os.replace(tmp, p)


def _unchanged(item: _Item) -> bool:
    try:
        st = item.path.stat()
    except OSError:
        return False
    return st.st_size == item.size and st.st_mtime_ns == item.mtime_ns


# --------------------------------------------------------------------------------------------------
# manifests


def _encode(m: Manifest) -> bytes:
    return gzip.compress(m.model_dump_json(exclude_none=False).encode(), compresslevel=6, mtime=0)


def read_manifest(store: ObjectStore, snapshot_id: str) -> Manifest:
    key = manifest_key(snapshot_id)
    try:
        raw = store.get_bytes(key)
        m = Manifest.model_validate_json(gzip.decompress(raw))
    except (OSError, ValueError) as e:
        raise ConveyorError(f"{store.url}/{key}", f"damaged snapshot manifest: {e}") from None
    if m.format != FORMAT:
        raise ConveyorError(f"{store.url}/{key}", f"unknown manifest format {m.format!r}")
    return m


def snapshot_ids(store: ObjectStore, target: str | None = None) -> list[str]:
    """Ids (`target/stamp`) of every snapshot, oldest first — one listing, no manifest reads."""
    ids = []
    for o in store.list(f"snapshots/{target}/" if target else "snapshots/"):
        if o.key.endswith(".json.gz"):
            ids.append(o.key[len("snapshots/"):-len(".json.gz")])
    return sorted(ids, key=lambda i: (i.split("/", 1)[1], i))


def _time_of(snapshot_id: str) -> datetime:
    return parse_stamp(snapshot_id.split("/", 1)[1])


def resolve(store: ObjectStore, ref: str | None) -> str:
    """A snapshot reference -> one snapshot id (see `split_ref`)."""
    ids = snapshot_ids(store)
    if not ids:
        raise ConveyorError(store.url, "no snapshots here")
    targets = sorted({i.split("/", 1)[0] for i in ids})
    if ref in (None, "latest"):
        if len(targets) > 1:
            raise ConveyorError(store.url, f"snapshots of several targets ({', '.join(targets)}): "
                                           "name one as URL@TARGET or URL@TARGET/STAMP")
        return ids[-1]
    if ref in targets:
        return [i for i in ids if i.startswith(ref + "/")][-1]
    hits = [i for i in ids if i.startswith(ref) or i.split("/", 1)[1].startswith(ref)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ConveyorError(f"{store.url}@{ref}", "no such snapshot (`conveyor snapshots URL` lists them)")
    raise ConveyorError(f"{store.url}@{ref}", f"ambiguous: matches {', '.join(hits[:5])}")


def list_snapshots(store: ObjectStore, target: str | None = None) -> list[SnapshotInfo]:
    ids = snapshot_ids(store, target)
    with ThreadPoolExecutor(8) as pool:
        manifests = list(pool.map(lambda i: read_manifest(store, i), ids))
    return [SnapshotInfo(id=m.id, target=m.target, created=m.created, kind=m.kind, source=m.source,
                         version=m.version, files=m.total_files, bytes=m.total_bytes) for m in manifests]


# --------------------------------------------------------------------------------------------------
# backup


@dataclass
class _Plan:
    blobs: list[_Item] = field(default_factory=list)
    packs: list[list[_Item]] = field(default_factory=list)
    loc: dict[str, tuple[str | None, int]] = field(default_factory=dict)  # rel -> (pack, offset)


def _hash_items(items: list[_Item], immutable: bool, progress: Progress | None, workers: int) -> list[str]:
    """Hash items lacking a sha256 (hashlib releases the GIL, so threads use both cores).
    Returns the paths that changed or vanished while being read."""
    todo = [i for i in items if i.sha is None]
    if not todo:
        return []
    total, done, changed = sum(i.size for i in todo), 0, []

    def one(item: _Item):
        try:
            sha = hash_file(item.path)
        except FileNotFoundError:
            return item, None
        if not immutable and not _unchanged(item):
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


_DAMAGED = ("does not hash to the sha256 its commit recorded: the store is damaged; not backed up "
            "(`conveyor scrub` names it, `conveyor repair` heals it from an earlier snapshot)")


def _make_pack(items: list[_Item], immutable: bool) -> tuple[bytes, list[_Item], list[str]]:
    """Concatenate small files, re-checking each one's hash (it may have changed since hashing)."""
    parts, kept, changed = [], [], []
    for it in items:
        try:
            data = it.path.read_bytes()
        except FileNotFoundError:
            changed.append(it.rel)
            continue
        if immutable and sha256_hex(data) != it.sha:  # a committed store file is never rewritten: this is damage
            raise ConveyorError(it.rel, _DAMAGED)
        if sha256_hex(data) != it.sha or (not immutable and not _unchanged(it)):
            changed.append(it.rel)
            continue
        parts.append(data)
        kept.append(it)
    return b"".join(parts), kept, changed


def backup(source: str | os.PathLike, store: ObjectStore, *, name: str | None = None,
           index_dir: str | os.PathLike | None = None, now: datetime | None = None,
           progress: Progress | None = None, workers: int = 2, concurrency: int = 8) -> BackupReport:
    """Write one snapshot of `source` (a conveyor store or any folder) to `store`; see the module doc."""
    t0 = time.perf_counter()
    start_ns = time.time_ns()
    source = Path(source).expanduser().resolve()
    if not source.is_dir():
        raise ConveyorError(source, "backup source is not a folder")
    name = check_name(name or source.name)
    now = now or datetime.now(timezone.utc)
    snap_id = f"{name}/{stamp(now)}"
    index_dir = Path(index_dir) if index_dir else None

    with _source_view(source) as view:
        items = view.items
        if view.kind == "folder":
            index = _load_index(index_dir, source)
            for it in items:
                hit = index.get(it.rel)
                if hit and hit[0] == it.size and hit[1] == it.mtime_ns and hit[2] == it.ino:
                    it.sha = hit[3]
        lock = f"locks/{name}-{stamp(now)}.json"
        _ACTIVE_LOCKS.add(lock)
        try:
            store.put_bytes(lock, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                              "time": now.isoformat()}).encode())
            try:
                report = _backup_locked(store, view, name, snap_id, source, now, progress, workers, concurrency)
            except ConveyorError as e:
                if e.problem == _DAMAGED:  # name the store's file, not its hard link in the snapshot folder
                    raise ConveyorError(source / e.path, e.problem) from None
                raise
        finally:
            _ACTIVE_LOCKS.discard(lock)
            try:
                store.delete([lock])
            except ConveyorError:
                pass  # a stale lock only makes the next prune wait; the backup's own error matters more
        if view.kind == "folder":
            skip = set(report.changed)
            _save_index(index_dir, source, [i for i in items if i.rel not in skip], start_ns)
    report.seconds = time.perf_counter() - t0
    return report


def _backup_locked(store: ObjectStore, view: _View, name: str, snap_id: str, source: Path, now: datetime,
                   progress: Progress | None, workers: int, concurrency: int) -> BackupReport:
    # what the repository already holds: two listings and the target's previous manifest
    blobs_present = {o.key.rsplit("/", 1)[1] for o in store.list("blobs/")}
    packs_present = {o.key.rsplit("/", 1)[1] for o in store.list("packs/")}
    known: dict[str, tuple[str, int]] = {}
    prev_ids = snapshot_ids(store, name)
    if snap_id in prev_ids:
        raise ConveyorError(f"{store.url}/{manifest_key(snap_id)}", "a snapshot with this id already exists")
    if prev_ids:
        for f in read_manifest(store, prev_ids[-1]).files:
            if f.pack and f.pack in packs_present:
                known[f.sha256] = (f.pack, f.offset)

    changed = _hash_items(view.items, view.immutable, progress, workers)
    items = [i for i in view.items if i.sha is not None]

    plan, pending, fill = _Plan(), {}, 0
    for it in items:
        if it.sha in blobs_present:
            plan.loc[it.rel] = (None, 0)
        elif it.size < PACK_MIN and it.sha in known:
            plan.loc[it.rel] = known[it.sha]
        elif it.size >= PACK_MIN:
            if it.sha not in pending:
                pending[it.sha] = it
                plan.blobs.append(it)
        else:
            if it.sha in pending:  # same content twice in this backup: store once
                continue
            pending[it.sha] = it
            if not plan.packs or fill >= PACK_TARGET:
                plan.packs.append([])
                fill = 0
            plan.packs[-1].append(it)
            fill += it.size

    total = sum(i.size for i in plan.blobs) + sum(i.size for p in plan.packs for i in p)
    sent = [0]

    def tick(n: int):
        sent[0] += n
        if progress:
            progress(min(sent[0], total), total, "uploading")

    placed: dict[str, tuple[str | None, int]] = {}  # sha -> location, for everything uploaded now

    def upload_pack(group: list[_Item]):
        data, kept, bad = _make_pack(group, view.immutable)
        if not kept:
            return [], bad
        psha = sha256_hex(data)
        if psha not in packs_present:
            store.put_bytes(pack_key(psha), data, psha)
        off, out = 0, []
        for it in kept:
            out.append((it.sha, (psha, off)))
            off += it.size
        tick(len(data))
        return out, bad

    objects_sent = 0
    with ThreadPoolExecutor(max(1, min(concurrency, 4))) as pool:
        pack_futs = [pool.submit(upload_pack, g) for g in plan.packs]
        blob_changed = []
        if plan.blobs:
            results = store.put_files([(it.path, blob_key(it.sha), it.sha) for it in plan.blobs], progress=tick,
                                      concurrency=concurrency, return_exceptions=True)
            for it, res in zip(plan.blobs, results):
                if isinstance(res, ConveyorError):
                    if view.immutable and isinstance(res, CorruptObject):
                        raise ConveyorError(it.rel, _DAMAGED)
                    if view.immutable or _unchanged(it) or not isinstance(res, CorruptObject):
                        raise res
                    blob_changed.append(it.rel)  # the server refused bytes that no longer match the hash
                    continue
                objects_sent += 1
                if not view.immutable and not _unchanged(it):
                    # bytes on the server may not be the hashed ones: drop the object, skip the file this time
                    store.delete([blob_key(it.sha)])
                    blob_changed.append(it.rel)
                else:
                    placed[it.sha] = (None, 0)
        for f in pack_futs:
            locs, bad = f.result()
            changed += bad
            if locs:
                objects_sent += 1
            placed.update(locs)
    changed += blob_changed

    files, sent_count, sent_bytes = [], 0, 0
    for it in items:
        if it.rel in plan.loc:
            pack, off = plan.loc[it.rel]
        elif it.sha in placed:
            pack, off = placed[it.sha]
            sent_count += 1
            sent_bytes += it.size
        else:
            continue  # changed while being read: reported, not listed
        files.append(ManifestFile(path=it.rel, size=it.size, sha256=it.sha, mtime_ns=it.mtime_ns,
                                  pack=pack, offset=off))
    manifest = Manifest(id=snap_id, target=name, kind=view.kind, source=str(source), host=socket.gethostname(),
                        created=now, version=view.version, total_files=len(files),
                        total_bytes=sum(f.size for f in files), files=files)
    store.put_bytes(manifest_key(snap_id), _encode(manifest))  # the commit point: written last
    return BackupReport(target=name, url=store.url, snapshot=snap_id, kind=view.kind, version=view.version,
                        files_total=len(files), files_sent=sent_count, files_skipped=len(files) - sent_count,
                        bytes_total=manifest.total_bytes, bytes_sent=sent_bytes, objects_sent=objects_sent,
                        changed=sorted(set(changed)))


# --------------------------------------------------------------------------------------------------
# restore

# what makes a restored store look complete (info.json, then HEAD): written after every other file
RESTORED_LAST = ("meta/info.json", ".conveyor/HEAD")


def restore(store: ObjectStore, ref: str | None, dst: str | os.PathLike, *, force: bool = False,
            progress: Progress | None = None, concurrency: int = 8) -> RestoreReport:
    """Rebuild a snapshot's folder byte for byte (every file's sha256 is checked before it is renamed in)."""
    t0 = time.perf_counter()
    snap_id = resolve(store, ref)
    m = read_manifest(store, snap_id)
    dst = Path(dst).expanduser().resolve()
    if dst.exists() and not dst.is_dir():
        raise ConveyorError(dst, "restore destination exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise ConveyorError(dst, "restore destination is not empty (use --force to write into it)")
    for f in m.files:
        if ".." in f.path.split("/") or f.path.startswith("/"):
            raise ConveyorError(f"{store.url}/{manifest_key(snap_id)}", f"unsafe path in manifest: {f.path!r}")
    dirs = {(dst / f.path).parent for f in m.files} | {dst}
    for d in sorted(dirs):
        d.mkdir(parents=True, exist_ok=True)

    total, done = m.total_bytes, [0]

    def tick(n: int):
        done[0] += n
        if progress:
            progress(min(done[0], total), total, "restoring")

    blobs: dict[str, list[ManifestFile]] = {}
    packs: dict[str, list[ManifestFile]] = {}
    last = [f for f in m.files if f.path in RESTORED_LAST]
    for f in m.files:
        if f.path not in RESTORED_LAST:
            (packs.setdefault(f.pack, []) if f.pack else blobs.setdefault(f.sha256, [])).append(f)

    def write_pack(psha: str):
        data = store.get_bytes(pack_key(psha), expected_sha256=psha)
        for f in packs[psha]:
            chunk = data[f.offset:f.offset + f.size]
            if len(chunk) != f.size or sha256_hex(chunk) != f.sha256:
                raise CorruptObject(f"{store.url}/{pack_key(psha)}", f"bytes for {f.path} do not match the manifest")
            _write_atomic(dst / f.path, chunk, f.mtime_ns)
            tick(f.size)

    with ThreadPoolExecutor(max(1, min(concurrency, 8))) as pool:
        futs = [pool.submit(write_pack, p) for p in packs]
        if blobs:
            firsts = [fs[0] for fs in blobs.values()]
            store.get_files([(blob_key(f.sha256), dst / f.path, f.sha256) for f in firsts], progress=tick,
                            concurrency=concurrency)
            for fs in blobs.values():
                os.utime(dst / fs[0].path, ns=(fs[0].mtime_ns, fs[0].mtime_ns))
                for f in fs[1:]:  # identical content stored once
                    _write_atomic(dst / f.path, (dst / fs[0].path).read_bytes(), f.mtime_ns)
                    tick(f.size)
        for f in futs:
            f.result()
    for f in sorted(last, key=lambda f: RESTORED_LAST.index(f.path)):  # only once everything else is in place
        if f.pack:
            chunk = store.get_bytes(pack_key(f.pack))[f.offset:f.offset + f.size]
            if sha256_hex(chunk) != f.sha256:
                raise CorruptObject(f"{store.url}/{pack_key(f.pack)}", f"bytes for {f.path} do not match the manifest")
        else:
            chunk = store.get_bytes(blob_key(f.sha256), expected_sha256=f.sha256)
        _write_atomic(dst / f.path, chunk, f.mtime_ns)
        tick(f.size)
    return RestoreReport(snapshot=snap_id, dst=str(dst), files=len(m.files), bytes=m.total_bytes,
                         seconds=time.perf_counter() - t0)


def _write_atomic(path: Path, data: bytes, mtime_ns: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a full disk leaves no temp file behind


# --------------------------------------------------------------------------------------------------
# verify


def verify(store: ObjectStore, ref: str | None, *, full: bool = False, sample: int = 16, seed: int | None = None,
           concurrency: int = 8) -> VerifyReport:
    """Every referenced object must exist with a plausible size; `full` re-reads and re-hashes all of them,
    otherwise a random sample of `sample`. Failures name the object."""
    t0 = time.perf_counter()
    snap_id = resolve(store, ref)
    m = read_manifest(store, snap_id)
    present = {o.key: o.size for prefix in ("blobs/", "packs/") for o in store.list(prefix)}
    need: dict[str, int] = {}  # object key -> minimum size
    for f in m.files:
        k = f.object_key
        need[k] = max(need.get(k, 0), f.offset + f.size)
    failures = []
    for k, size in sorted(need.items()):
        if k not in present:
            failures.append(f"{store.url}/{k}: missing")
        elif (k.startswith("blobs/") and present[k] != size) or present[k] < size:
            failures.append(f"{store.url}/{k}: size {present[k]}, expected {'at least ' if k.startswith('packs/') else ''}{size}")
    candidates = [k for k in sorted(need) if k in present]
    chosen = candidates if full else random.Random(seed).sample(candidates, min(sample, len(candidates)))
    by_pack: dict[str, list[ManifestFile]] = {}
    for f in m.files:
        if f.pack:
            by_pack.setdefault(f.pack, []).append(f)

    def check(key: str) -> tuple[int, list[str]]:
        sha = key.rsplit("/", 1)[1]
        try:
            if key.startswith("packs/"):
                data = store.get_bytes(key)
                bad = [] if sha256_hex(data) == sha else [f"{store.url}/{key}: content hashes to {sha256_hex(data)}"]
                for f in by_pack.get(sha, []):
                    if sha256_hex(data[f.offset:f.offset + f.size]) != f.sha256:
                        bad.append(f"{store.url}/{key}: bytes of {f.path} do not match the manifest")
                return len(data), bad
            h, n = hashlib.sha256(), 0
            for buf in store.read_chunks(key):
                h.update(buf)
                n += len(buf)
            return n, [] if h.hexdigest() == sha else [f"{store.url}/{key}: content hashes to {h.hexdigest()}"]
        except MissingObject:
            return 0, [f"{store.url}/{key}: missing"]

    read = 0
    with ThreadPoolExecutor(max(1, min(concurrency, 8))) as pool:
        for n, bad in pool.map(check, chosen):
            read += n
            failures += bad
    return VerifyReport(snapshot=snap_id, full=full, objects_total=len(need), objects_read=len(chosen),
                        bytes_read=read, failures=failures, seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------------
# retention


def select_retained(ids: list[str], keep_daily: int, keep_weekly: int) -> set[str]:
    """restic-style: per target, the newest snapshot of each of the last `keep_daily` days that have one and
    of each of the last `keep_weekly` ISO weeks that have one; the newest snapshot is always kept."""
    keep: set[str] = set()
    by_target: dict[str, list[str]] = {}
    for i in ids:
        by_target.setdefault(i.split("/", 1)[0], []).append(i)
    for snaps in by_target.values():
        snaps = sorted(snaps, key=_time_of, reverse=True)
        keep.add(snaps[0])
        for n, bucket in ((keep_daily, lambda t: t.date()), (keep_weekly, lambda t: t.isocalendar()[:2])):
            seen = []
            for s in snaps:
                b = bucket(_time_of(s))
                if b not in seen:
                    if len(seen) >= n:
                        break
                    seen.append(b)
                    keep.add(s)
    return keep


def _live_locks(store: ObjectStore, now: datetime) -> list[str]:
    live = []
    for o in store.list("locks/"):
        try:
            info = json.loads(store.get_bytes(o.key))
            t = datetime.fromisoformat(info["time"])
        except (ConveyorError, ValueError, KeyError, TypeError):
            continue
        if now - t > timedelta(seconds=LOCK_STALE_S):
            continue
        if info.get("host") == socket.gethostname():
            if int(info.get("pid", -1)) == os.getpid():
                if o.key in _ACTIVE_LOCKS:
                    live.append(o.key)
                continue  # left behind by a failed backup of this very process
            try:
                os.kill(int(info["pid"]), 0)
            except ProcessLookupError:
                continue  # the writer died (e.g. SIGKILL); its lock means nothing
            except (PermissionError, ValueError):
                pass
        live.append(o.key)
    return live


def prune(store: ObjectStore, keep_daily: int, keep_weekly: int, *, now: datetime | None = None,
          dry_run: bool = False) -> PruneReport:
    """Apply retention: delete expired manifests first, then every object no remaining manifest names
    (never the reverse, so a crash in between leaves only garbage, never a broken snapshot)."""
    now = now or datetime.now(timezone.utc)
    ids = snapshot_ids(store)
    keep = select_retained(ids, keep_daily, keep_weekly)
    expired = [i for i in ids if i not in keep]
    report = PruneReport(url=store.url, kept=sorted(keep, key=_time_of), deleted_snapshots=expired, deleted_objects=0)
    if dry_run:
        return report
    store.delete([manifest_key(i) for i in expired])
    locks = _live_locks(store, now)
    if locks:
        report.gc_skipped = f"a backup is running ({locks[0]}); unreferenced objects are collected next time"
        return report
    with ThreadPoolExecutor(8) as pool:
        manifests = list(pool.map(lambda i: read_manifest(store, i), sorted(keep)))
    referenced = set().union(*(m.object_keys() for m in manifests)) if manifests else set()
    garbage = [o.key for prefix in ("blobs/", "packs/") for o in store.list(prefix) if o.key not in referenced]
    store.delete(garbage)
    report.deleted_objects = len(garbage)
    report.incomplete_cleaned = store.cleanup_incomplete()
    return report
