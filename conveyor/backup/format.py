"""The repository's format: object keys, snapshot names, manifest and report models.

Repository layout under the storage URL (one repository can hold many targets; objects are shared)::

    blobs/<sha[:2]>/<sha256>            a whole file >= PACK_MIN bytes, named by the sha256 of its bytes
    packs/<sha[:2]>/<sha256>            small files concatenated (<= PACK_TARGET bytes), named by the pack's sha256
    snapshots/<target>/<stamp>.json.gz  a backup manifest (below); <stamp> = UTC time, 20250131T033000.123Z
    datasets/<store>/versions/*.json.gz a published dataset version (`conveyor.datasets`), same file entries
    locks/<target>-<stamp>.json         "a writer is adding objects": a concurrent prune skips garbage collection

Manifest (gzip-compressed JSON, ``format: "conveyor-snapshot/1"``), written last — it is the commit point,
so a snapshot either lists only objects that exist or does not exist at all::

    {"format": "conveyor-snapshot/1", "id": "lab/20250131T033000.123Z", "target": "lab",
     "kind": "store" | "folder", "source": "/abs/path", "host": "...", "created": "2025-01-31T03:30:00.123Z",
     "version": {DatasetVersion} | null,  "total_files": N, "total_bytes": B,
     "files": [{"path": "data/chunk-000/file-000.parquet", "size": 123, "sha256": "<hex>",
                "mtime_ns": 1738290000000000000, "pack": null | "<pack sha256>", "offset": 0}, ...]}

A file with ``pack: null`` is the blob ``blobs/<sha[:2]>/<sha256>``; otherwise it is ``size`` bytes at
``offset`` in ``packs/<pack[:2]>/<pack>``.
"""
from __future__ import annotations

import gzip
from datetime import datetime, timezone

from pydantic import BaseModel, Field

from conveyor.errors import ConveyorError
from conveyor.version import DatasetVersion

FORMAT = "conveyor-snapshot/1"
PACK_MIN = 1 << 20        # files smaller than this go into packs
PACK_TARGET = 8 << 20     # a pack is closed once it reaches this size


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
    incomplete_cleaned: int = 0  # temporary objects / multipart uploads of killed writers removed
    locks_removed: int = 0  # writer locks of dead or expired writers removed


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
    authority, _, path = url.partition("://")[2].partition("/")
    user, at, _ = authority.rpartition("@")
    if "@" in path or (at and ":" not in user):  # `KEY:SECRET@bucket` is userinfo (open_repo refuses it), no ref
        base, ref = url.rsplit("@", 1)
        if not ref:
            raise ConveyorError(url, "empty snapshot after '@'")
        return base, ref
    return url, None


def check_name(name: str) -> str:
    """A backup target's name follows the one store-name rule (conveyor/stores.py): a store backs up by its name."""
    from conveyor.stores import check_name as check

    return check(name, "backup target")


def encode(m: BaseModel) -> bytes:
    """A manifest as stored: gzip'd JSON, byte-stable (no gzip timestamp)."""
    return gzip.compress(m.model_dump_json(exclude_none=False).encode(), compresslevel=6, mtime=0)
