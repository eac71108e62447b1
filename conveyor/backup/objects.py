"""Content-addressed objects shared by backups and published dataset versions: upload what the repository
lacks (big files as blobs, small ones packed), fetch files back out of blobs and packs, and the writer lock
that keeps garbage collection away while objects are being added.

Why content-addressed: a file already stored under its hash is never sent again (store files are immutable
after commit, so a nightly backup or a publish sends only new commits plus the small metadata files), two
manifests share objects without bookkeeping, a corrupted object is detected by its own name, and garbage
collection is "delete every object no retained manifest names". Why packs: an object per small file costs
one request each (600 episode files of a raw recording = 600 PUTs on backup and 600 GETs on restore);
packing them makes that a handful, as restic does. A pack is kept whole while any manifest uses any file in it.
"""
from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from conveyor.backup.format import PACK_MIN, PACK_TARGET, ManifestFile, blob_key, pack_key, stamp
from conveyor.backup.walk import Item, unchanged
from conveyor.errors import ConveyorError
from conveyor.fileio import sha256_bytes, write_atomic
from conveyor.repo import CorruptObject, Repo

ACTIVE_LOCKS: set[str] = set()  # locks held by writers running in this process
BytesTick = Callable[[int], None]


@dataclass
class Present:
    """What the repository already holds: one listing of blobs/ and packs/, plus where known small files
    sit inside packs (from earlier manifests)."""

    blobs: set[str]
    packs: set[str]
    in_packs: dict[str, tuple[str, int]] = field(default_factory=dict)  # sha -> (pack, offset)

    @classmethod
    def list(cls, repo: Repo) -> "Present":
        return cls({o.key.rsplit("/", 1)[1] for o in repo.list("blobs/")},
                   {o.key.rsplit("/", 1)[1] for o in repo.list("packs/")})

    def learn(self, files: Iterable[ManifestFile]) -> None:
        """Remember the pack locations of an earlier manifest's small files (if the pack still exists)."""
        for f in files:
            if f.pack and f.pack in self.packs:
                self.in_packs.setdefault(f.sha256, (f.pack, f.offset))


@dataclass
class Uploaded:
    files: list[ManifestFile]
    files_sent: int = 0
    bytes_sent: int = 0
    objects_sent: int = 0
    changed: list[str] = field(default_factory=list)


def _make_pack(items: list[Item], immutable: bool) -> tuple[bytes, list[Item], list[str]]:
    """Concatenate small files, re-checking each one's hash (it may have changed since hashing)."""
    parts, kept, changed = [], [], []
    for it in items:
        try:
            data = it.path.read_bytes()
        except FileNotFoundError:
            changed.append(it.rel)
            continue
        if sha256_bytes(data) != it.sha or (not immutable and not unchanged(it)):
            changed.append(it.rel)
            continue
        parts.append(data)
        kept.append(it)
    return b"".join(parts), kept, changed


def upload(repo: Repo, items: list[Item], present: Present, *, immutable: bool, total_cb: BytesTick | None = None,
           concurrency: int = 8) -> Uploaded:
    """Store every hashed item the repository lacks; return the manifest entries of all of them (in item
    order). Items that changed while being read are left out and named in `changed`."""
    plan_blobs: list[Item] = []
    plan_packs: list[list[Item]] = []
    loc: dict[str, tuple[str | None, int]] = {}
    pending: dict[str, Item] = {}
    fill = 0
    for it in items:
        if it.sha in present.blobs:
            loc[it.rel] = (None, 0)
        elif it.size < PACK_MIN and it.sha in present.in_packs:
            loc[it.rel] = present.in_packs[it.sha]
        elif it.size >= PACK_MIN:
            if it.sha not in pending:
                pending[it.sha] = it
                plan_blobs.append(it)
        else:
            if it.sha in pending:  # same content twice in this batch: store once
                continue
            pending[it.sha] = it
            if not plan_packs or fill >= PACK_TARGET:
                plan_packs.append([])
                fill = 0
            plan_packs[-1].append(it)
            fill += it.size

    placed: dict[str, tuple[str | None, int]] = {}  # sha -> location, for everything uploaded now
    changed: list[str] = []

    def tick(n: int):
        if total_cb:
            total_cb(n)

    def upload_pack(group: list[Item]):
        data, kept, bad = _make_pack(group, immutable)
        if not kept:
            return [], bad
        psha = sha256_bytes(data)
        if psha not in present.packs:
            repo.put_bytes(pack_key(psha), data, psha)
        off, out = 0, []
        for it in kept:
            out.append((it.sha, (psha, off)))
            off += it.size
        tick(len(data))
        return out, bad

    objects_sent = 0
    with ThreadPoolExecutor(max(1, min(concurrency, 4))) as pool:
        pack_futs = [pool.submit(upload_pack, g) for g in plan_packs]
        blob_changed = []
        if plan_blobs:
            results = repo.put_files([(it.path, blob_key(it.sha), it.sha) for it in plan_blobs], progress=tick,
                                     concurrency=concurrency, return_exceptions=True)
            for it, res in zip(plan_blobs, results):
                if isinstance(res, ConveyorError):
                    if immutable or unchanged(it) or not isinstance(res, CorruptObject):
                        raise res
                    blob_changed.append(it.rel)  # the server refused bytes that no longer match the hash
                    continue
                objects_sent += 1
                if not immutable and not unchanged(it):
                    # bytes on the server may not be the hashed ones: drop the object, skip the file this time
                    repo.delete([blob_key(it.sha)])
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

    out = Uploaded(files=[], objects_sent=objects_sent, changed=sorted(set(changed)))
    for it in items:
        if it.rel in loc:
            pack, off = loc[it.rel]
        elif it.sha in placed:
            pack, off = placed[it.sha]
            out.files_sent += 1
            out.bytes_sent += it.size
        else:
            continue  # changed while being read: reported, not listed
        out.files.append(ManifestFile(path=it.rel, size=it.size, sha256=it.sha, mtime_ns=it.mtime_ns,
                                      pack=pack, offset=off))
    return out


def fetch(repo: Repo, files: list[ManifestFile], dst: Path, *, where: str, tick: BytesTick | None = None,
          concurrency: int = 8, set_mtime: bool = True) -> None:
    """Write `files` under `dst` byte for byte from their blobs and packs; every file's sha256 is checked
    before it is renamed into place (CorruptObject names the object). Folders must exist."""
    blobs: dict[str, list[ManifestFile]] = {}
    packs: dict[str, list[ManifestFile]] = {}
    for f in files:
        (packs.setdefault(f.pack, []) if f.pack else blobs.setdefault(f.sha256, [])).append(f)

    def done(n: int):
        if tick:
            tick(n)

    def mtime(f: ManifestFile) -> int | None:
        return f.mtime_ns if set_mtime and f.mtime_ns else None

    def write_pack(psha: str):
        data = repo.get_bytes(pack_key(psha), expected_sha256=psha)
        for f in packs[psha]:
            chunk = data[f.offset:f.offset + f.size]
            if len(chunk) != f.size or sha256_bytes(chunk) != f.sha256:
                raise CorruptObject(f"{repo.url}/{pack_key(psha)}", f"bytes for {f.path} do not match the {where}")
            write_atomic(dst / f.path, chunk, fsync=False, mtime_ns=mtime(f))
            done(f.size)

    with ThreadPoolExecutor(max(1, min(concurrency, 8))) as pool:
        futs = [pool.submit(write_pack, p) for p in packs]
        if blobs:
            firsts = [fs[0] for fs in blobs.values()]
            repo.get_files([(blob_key(f.sha256), dst / f.path, f.sha256) for f in firsts], progress=done,
                           concurrency=concurrency)
            for fs in blobs.values():
                if mtime(fs[0]) is not None:
                    os.utime(dst / fs[0].path, ns=(fs[0].mtime_ns, fs[0].mtime_ns))
                for f in fs[1:]:  # identical content stored once
                    write_atomic(dst / f.path, (dst / fs[0].path).read_bytes(), fsync=False, mtime_ns=mtime(f))
                    done(f.size)
        for f in futs:
            f.result()


@contextmanager
def writer_lock(repo: Repo, name: str, now: datetime) -> Iterator[str]:
    """`locks/<name>-<stamp>.json` while objects are being added: prune's garbage collection waits for it
    (an object uploaded but not yet named by a manifest would otherwise look like garbage)."""
    lock = f"locks/{name}-{stamp(now)}.json"
    ACTIVE_LOCKS.add(lock)
    try:
        repo.put_bytes(lock, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                         "time": now.isoformat()}).encode())
        yield lock
    finally:
        ACTIVE_LOCKS.discard(lock)
        try:
            repo.delete([lock])
        except ConveyorError:
            pass  # a stale lock only makes the next prune wait; the writer's own error matters more
