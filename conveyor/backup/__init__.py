"""Incremental, verified snapshots of stores and raw recordings in a repository (`conveyor.repo`).

`format` (keys, manifest and report models), `walk` (reading the source, hash index), `objects`
(content-addressed blobs and packs, shared with published dataset versions), `manifests`, `snapshot`
(backup), `restore`, `verify`, `retention` (prune + garbage collection).
"""
from conveyor.backup.format import (BackupReport, Manifest, ManifestFile, PruneReport, RestoreReport, SnapshotInfo,
                                    VerifyReport, blob_key, check_name, manifest_key, pack_key, split_ref, stamp)
from conveyor.backup.manifests import list_snapshots, read_manifest, resolve, snapshot_ids
from conveyor.backup.restore import restore
from conveyor.backup.retention import prune, select_retained
from conveyor.backup.snapshot import backup
from conveyor.backup.verify import verify

__all__ = ["BackupReport", "Manifest", "ManifestFile", "PruneReport", "RestoreReport", "SnapshotInfo",
           "VerifyReport", "backup", "blob_key", "check_name", "list_snapshots", "manifest_key", "pack_key",
           "prune", "read_manifest", "resolve", "restore", "select_retained", "snapshot_ids", "split_ref", "stamp",
           "verify"]
