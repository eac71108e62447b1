"""`backup()`: one incremental snapshot of a store or folder.

A no-change backup reads no file: the local index supplies the hashes, one listing of ``blobs/`` and
``packs/`` (one request per 1000 objects) plus the target's previous manifest (and, for a store, its newest
published version: publish packs small files its own way) tell what is already stored, and the only write is
the new manifest.
"""
from __future__ import annotations

import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from conveyor.backup.format import BackupReport, Manifest, check_name, encode, manifest_key, stamp
from conveyor.backup.manifests import read_manifest, snapshot_ids
from conveyor.backup.objects import DAMAGED, Present, upload, writer_lock
from conveyor.backup.walk import Progress, View, apply_index, hash_items, load_index, save_index, source_view
from conveyor.errors import ConveyorError
from conveyor.repo import Repo


def backup(source: str | os.PathLike, repo: Repo, *, name: str | None = None,
           index_dir: str | os.PathLike | None = None, now: datetime | None = None,
           progress: Progress | None = None, workers: int = 2, concurrency: int = 8) -> BackupReport:
    """Write one snapshot of `source` (a conveyor store or any folder) to `repo`; see the module doc."""
    t0 = time.perf_counter()
    start_ns = time.time_ns()
    source = Path(source).expanduser().resolve()
    if not source.is_dir():
        raise ConveyorError(source, "backup source is not a folder")
    name = check_name(name or source.name)
    now = now or datetime.now(timezone.utc)
    snap_id = f"{name}/{stamp(now)}"
    index_dir = Path(index_dir) if index_dir else None

    with source_view(source) as view:
        if view.kind == "folder":
            apply_index(view.items, load_index(index_dir, source))
        with writer_lock(repo, name, now):
            try:
                report = _backup_locked(repo, view, name, snap_id, source, now, progress, workers, concurrency)
            except ConveyorError as e:
                if e.problem == DAMAGED:  # name the store's file, not its hard link in the snapshot folder
                    raise ConveyorError(source / e.path, e.problem) from None
                raise
        if view.kind == "folder":
            skip = set(report.changed)
            save_index(index_dir, source, [i for i in view.items if i.rel not in skip], start_ns)
    report.seconds = time.perf_counter() - t0
    return report


def _backup_locked(repo: Repo, view: View, name: str, snap_id: str, source: Path, now: datetime,
                   progress: Progress | None, workers: int, concurrency: int) -> BackupReport:
    present = Present.list(repo)  # what the repository already holds: two listings + the previous manifest
    prev_ids = snapshot_ids(repo, name)
    if snap_id in prev_ids:
        raise ConveyorError(f"{repo.url}/{manifest_key(snap_id)}", "a snapshot with this id already exists")
    if prev_ids:
        present.learn(read_manifest(repo, prev_ids[-1]).files)
    if view.kind == "store":  # a published version's small files sit in its own packs: refer to them there
        # imported here: conveyor.datasets.format builds on conveyor.backup.format, so a module-level import
        # would close a loop through conveyor/backup/__init__.py
        from conveyor.datasets.format import list_versions, read_version

        published = list_versions(repo, name)
        if published:
            present.learn(read_version(repo, published[-1].key).files)

    changed = hash_items(view.items, view.immutable, progress, workers)
    items = [i for i in view.items if i.sha is not None]
    sent = [0]
    total = sum(i.size for i in items if i.sha not in present.blobs and i.sha not in present.in_packs)

    def tick(n: int):
        sent[0] += n
        if progress:
            progress(min(sent[0], total), total, "uploading")

    up = upload(repo, items, present, immutable=view.immutable, total_cb=tick, concurrency=concurrency)
    manifest = Manifest(id=snap_id, target=name, kind=view.kind, source=str(source), host=socket.gethostname(),
                        created=now, version=view.version, total_files=len(up.files),
                        total_bytes=sum(f.size for f in up.files), files=up.files)
    repo.put_bytes(manifest_key(snap_id), encode(manifest))  # the commit point: written last
    return BackupReport(target=name, url=repo.url, snapshot=snap_id, kind=view.kind, version=view.version,
                        files_total=len(up.files), files_sent=up.files_sent,
                        files_skipped=len(up.files) - up.files_sent, bytes_total=manifest.total_bytes,
                        bytes_sent=up.bytes_sent, objects_sent=up.objects_sent,
                        changed=sorted(set(changed) | set(up.changed)))
