"""`publish()`: put a store's committed version into the repository, incrementally.

Only files whose bytes the repository lacks travel: big files are blobs named by their sha256 (shared with
backups of the same store), small files go into new packs, and small files already packed by the previous
published version or the store's newest backup are referenced where they are. Store files are immutable after
commit, so publishing a one-episode commit sends that episode's files plus the three rewritten metadata files.
The version manifest is written last; publishing an already published version is a no-op (one listing).
"""
from __future__ import annotations

import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel

from conveyor.backup.format import check_name
from conveyor.backup.manifests import read_manifest, snapshot_ids
from conveyor.backup.objects import Present, upload, writer_lock
from conveyor.backup.walk import Item
from conveyor.datasets.format import PublishedVersion, encode, list_versions, read_version, version_key
from conveyor.errors import ConveyorError
from conveyor.models import DatasetVersion
from conveyor.repo import Repo
from conveyor.store import DOT, Store, is_store


class PublishReport(BaseModel):
    store: str
    url: str
    version: DatasetVersion
    key: str
    published: bool            # False: this version was already there (no-op)
    files_total: int = 0
    files_sent: int = 0
    bytes_total: int = 0
    bytes_sent: int = 0
    objects_sent: int = 0
    seconds: float = 0.0


def publish(store_path: str | os.PathLike, repo: Repo, *, name: str | None = None, now: datetime | None = None,
            concurrency: int = 8) -> PublishReport:
    """Publish the store's current commit as `datasets/<name>/versions/...` (name: the store's folder name)."""
    t0 = time.perf_counter()
    root = Path(store_path).expanduser().resolve()
    if not is_store(root):
        raise ConveyorError(root, "not a conveyor store (no .conveyor/ folder); publish a store made by "
                                  "`conveyor convert` or the ingest flow")
    name = check_name(name or root.name)
    store = Store.open(root)
    if store.version.commit == 0:
        raise ConveyorError(root, "the store has no commits yet; ingest episodes before publishing")
    existing = {r.key for r in list_versions(repo, name)}
    key = version_key(name, store.version)
    if key in existing:
        return _noop(name, repo, store.version, key, t0)

    with store.snapshot() as snap:
        version = snap.version
        key = version_key(name, version)
        if key in existing:  # a commit landed between the check and the snapshot, and it is published
            return _noop(name, repo, version, key, t0)
        items = []
        for rel, entry in sorted(snap.files.items()):
            if rel.startswith(DOT + "/"):
                continue
            st = (snap.dir / rel).stat()
            items.append(Item(rel, snap.dir / rel, entry.size, st.st_mtime_ns, st.st_ino, entry.sha256))
        now = now or datetime.now(timezone.utc)
        with writer_lock(repo, f"publish-{name}", now):
            present = Present.list(repo)
            refs = list_versions(repo, name)
            if refs:
                present.learn(read_version(repo, refs[-1].key).files)
            snaps = snapshot_ids(repo, name)
            if snaps:
                present.learn(read_manifest(repo, snaps[-1]).files)
            up = upload(repo, items, present, immutable=True, concurrency=concurrency)
            pv = PublishedVersion(store=name, version=version, created=now, host=socket.gethostname(),
                                  total_files=len(up.files), total_bytes=sum(f.size for f in up.files),
                                  files=up.files)
            repo.put_bytes(key, encode(pv))  # the commit point: written last
    return PublishReport(store=name, url=repo.url, version=version, key=key, published=True,
                         files_total=pv.total_files, files_sent=up.files_sent, bytes_total=pv.total_bytes,
                         bytes_sent=up.bytes_sent, objects_sent=up.objects_sent, seconds=time.perf_counter() - t0)


def _noop(name: str, repo: Repo, version: DatasetVersion, key: str, t0: float) -> PublishReport:
    return PublishReport(store=name, url=repo.url, version=version, key=key, published=False,
                         seconds=time.perf_counter() - t0)
