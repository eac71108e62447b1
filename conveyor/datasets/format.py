"""Published dataset versions in a repository (next to the backup's blobs/ and packs/, which they share)::

    datasets/<store>/versions/<commit:08d>-<content_hash[:16]>.json.gz   one committed version (gzip JSON)
    datasets/<store>/pins/<run>.json                                      a training run that needs a version

A version manifest names every dataset file (data/, videos/, meta/ — not the store's `.conveyor/` bookkeeping)
with its size, sha256 and object (blob or pack + offset), exactly as a backup manifest does, so garbage
collection and `fetch` treat both alike. It is written last: a version is published or absent, never partial.
"""
from __future__ import annotations

import gzip
import re
from datetime import datetime

from pydantic import BaseModel, Field

from conveyor.backup.format import ManifestFile
from conveyor.errors import ConveyorError
from conveyor.models import DatasetVersion
from conveyor.repo import MissingObject, Repo

FORMAT = "conveyor-dataset-version/1"
PREFIX = "datasets/"
_VERSION_RE = re.compile(r"^(\d{8})-([0-9a-f]{1,64})\.json\.gz$")


class PublishedVersion(BaseModel):
    format: str = FORMAT
    store: str
    version: DatasetVersion
    created: datetime
    host: str = ""
    total_files: int = 0
    total_bytes: int = 0
    files: list[ManifestFile] = Field(default_factory=list)

    @property
    def name(self) -> str:
        """Folder name of this version in a cache: commit and content hash, sortable."""
        return version_name(self.version)


class VersionRef(BaseModel):
    """A published version as one listing shows it (no manifest read)."""

    store: str
    commit: int
    hash_prefix: str
    key: str
    modified: datetime | None = None


def version_name(v: DatasetVersion) -> str:
    return f"{v.commit:08d}-{v.content_hash[:16]}"


def version_key(store: str, v: DatasetVersion) -> str:
    return f"{PREFIX}{store}/versions/{version_name(v)}.json.gz"


def pin_key(store: str, run: str) -> str:
    return f"{PREFIX}{store}/pins/{run}.json"


def encode(pv: PublishedVersion) -> bytes:
    return gzip.compress(pv.model_dump_json().encode(), compresslevel=6, mtime=0)


def list_versions(repo: Repo, store: str | None = None) -> list[VersionRef]:
    """Every published version (of `store`, or of all stores), oldest commit first — one listing."""
    out = []
    for o in repo.list(f"{PREFIX}{store}/versions/" if store else PREFIX):
        parts = o.key.split("/")
        if len(parts) == 4 and parts[2] == "versions" and (m := _VERSION_RE.match(parts[3])):
            out.append(VersionRef(store=parts[1], commit=int(m.group(1)), hash_prefix=m.group(2), key=o.key,
                                  modified=o.modified))
    return sorted(out, key=lambda r: (r.store, r.commit, r.key))


def read_version(repo: Repo, key: str) -> PublishedVersion:
    try:
        pv = PublishedVersion.model_validate_json(gzip.decompress(repo.get_bytes(key)))
    except MissingObject:
        raise ConveyorError(f"{repo.url}/{key}", "published version is gone (removed by retention?); "
                                                 "publish it again with `conveyor publish STORE` or pin another") from None
    except (OSError, ValueError) as e:
        raise ConveyorError(f"{repo.url}/{key}", f"damaged published version manifest ({e}); "
                                                 "publish the store again with `conveyor publish STORE`") from None
    if pv.format != FORMAT:
        raise ConveyorError(f"{repo.url}/{key}", f"unknown dataset version format {pv.format!r}")
    return pv


def matches(v: DatasetVersion | VersionRef, pin: str) -> bool:
    """A pin is a commit number (`12`), a short name (`c12-<hash12>`) or a content-hash prefix (>= 6 hex)."""
    pin = pin.strip().lower()
    commit = v.commit
    digest = v.content_hash if isinstance(v, DatasetVersion) else v.hash_prefix
    if pin.isdigit():
        return int(pin) == commit
    m = re.fullmatch(r"c(\d+)-([0-9a-f]+)", pin)
    if m:
        return int(m.group(1)) == commit and (digest.startswith(m.group(2)) or m.group(2).startswith(digest))
    return len(pin) >= 6 and (digest.startswith(pin) or (len(digest) < len(pin) and pin.startswith(digest)))


def find_version(repo: Repo, store: str, pin: str | None) -> PublishedVersion:
    """The published version of `store` that `pin` names (None = the newest); one sentence when there is none."""
    refs = list_versions(repo, store)
    if not refs:
        raise ConveyorError(f"{repo.url}/{PREFIX}{store}/", f"store `{store}` has no published versions here; run "
                                                            f"`conveyor publish {store}` where the store lives")
    if pin is None:
        return read_version(repo, refs[-1].key)
    hits = [r for r in refs if matches(r, pin)]
    if not hits:
        newest = refs[-1]
        raise ConveyorError(f"{repo.url}/{PREFIX}{store}/", f"dataset version `{pin}` of `{store}` is not published "
                                                            f"(gone by retention or never published); pin one that "
                                                            f"`conveyor datasets` lists, e.g. {newest.commit}, or leave "
                                                            "dataset_version empty")
    for r in reversed(hits):  # a hash-prefix hit is confirmed against the full hash in the manifest
        pv = read_version(repo, r.key)
        if matches(pv.version, pin):
            return pv
    raise ConveyorError(f"{repo.url}/{PREFIX}{store}/", f"dataset version `{pin}` of `{store}` is not published")
