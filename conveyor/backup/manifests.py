"""Reading snapshot manifests: by id, listing ids, resolving a reference, summaries."""
from __future__ import annotations

import gzip
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from conveyor.backup.format import FORMAT, Manifest, SnapshotInfo, manifest_key, parse_stamp
from conveyor.errors import ConveyorError
from conveyor.repo import Repo


def read_manifest(repo: Repo, snapshot_id: str) -> Manifest:
    key = manifest_key(snapshot_id)
    try:
        raw = repo.get_bytes(key)
        m = Manifest.model_validate_json(gzip.decompress(raw))
    except (OSError, ValueError) as e:
        raise ConveyorError(f"{repo.url}/{key}", f"damaged snapshot manifest: {e}") from None
    if m.format != FORMAT:
        raise ConveyorError(f"{repo.url}/{key}", f"unknown manifest format {m.format!r}")
    return m


def snapshot_ids(repo: Repo, target: str | None = None) -> list[str]:
    """Ids (`target/stamp`) of every snapshot, oldest first — one listing, no manifest reads."""
    ids = []
    for o in repo.list(f"snapshots/{target}/" if target else "snapshots/"):
        if o.key.endswith(".json.gz"):
            ids.append(o.key[len("snapshots/"):-len(".json.gz")])
    return sorted(ids, key=lambda i: (i.split("/", 1)[1], i))


def time_of(snapshot_id: str) -> datetime:
    return parse_stamp(snapshot_id.split("/", 1)[1])


def resolve(repo: Repo, ref: str | None) -> str:
    """A snapshot reference -> one snapshot id (see `split_ref`)."""
    ids = snapshot_ids(repo)
    if not ids:
        raise ConveyorError(repo.url, "no snapshots here")
    targets = sorted({i.split("/", 1)[0] for i in ids})
    if ref in (None, "latest"):
        if len(targets) > 1:
            raise ConveyorError(repo.url, f"snapshots of several targets ({', '.join(targets)}): "
                                          "name one as URL@TARGET or URL@TARGET/STAMP")
        return ids[-1]
    if ref in targets:
        return [i for i in ids if i.startswith(ref + "/")][-1]
    hits = [i for i in ids if i.startswith(ref) or i.split("/", 1)[1].startswith(ref)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ConveyorError(f"{repo.url}@{ref}", "no such snapshot (`conveyor snapshots URL` lists them)")
    raise ConveyorError(f"{repo.url}@{ref}", f"ambiguous: matches {', '.join(hits[:5])}")


def list_snapshots(repo: Repo, target: str | None = None) -> list[SnapshotInfo]:
    ids = snapshot_ids(repo, target)
    with ThreadPoolExecutor(8) as pool:
        manifests = list(pool.map(lambda i: read_manifest(repo, i), ids))
    return [SnapshotInfo(id=m.id, target=m.target, created=m.created, kind=m.kind, source=m.source,
                         version=m.version, files=m.total_files, bytes=m.total_bytes) for m in manifests]
