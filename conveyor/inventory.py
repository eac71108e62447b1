"""What is in a store, as a person asks it: totals, features, cameras, tasks, lengths, versions, quarantine.

Read-only and cheap (metadata, manifest, commit records; no video decoding), so `conveyor stores`, `conveyor
show` and the per-store Prefect artifact can run after every commit. Quarantine is not part of a commit, so
ingest records the latest one per source (`conveyor/quarantine.py`).
"""
from __future__ import annotations

import json
import statistics
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, Field

from conveyor import layout
from conveyor.episodes import load_episodes
from conveyor.quarantine import read_quarantine_entries
from conveyor.store import Store, is_store



class StoreSummary(BaseModel):
    """One line of `conveyor stores`."""

    name: str
    path: str
    episodes: int = 0
    frames: int = 0
    hours: float = 0.0
    size_bytes: int = 0
    version: str = Field("c0", description="current version: commit number and content-hash prefix")
    last_commit: datetime | None = None


class Feature(BaseModel):
    name: str
    dtype: str
    shape: list[int]


class Camera(BaseModel):
    key: str
    width: int | None = None
    height: int | None = None
    codec: str | None = None
    pix_fmt: str | None = None
    fps: float | None = None


class TaskCount(BaseModel):
    task: str
    episodes: int


class Lengths(BaseModel):
    """Per-episode length in frames, and its summary."""

    frames: list[int] = Field(default_factory=list)
    min: int = 0
    median: float = 0.0
    mean: float = 0.0
    max: int = 0


class VersionEntry(BaseModel):
    """One commit and what it added."""

    commit: int
    kind: str
    time: datetime | None = None
    episodes_added: int = 0
    frames_added: int = 0
    total_episodes: int = 0
    total_frames: int = 0
    files_added: int = 0
    files_removed: int = 0
    sources: list[str] = Field(default_factory=list, description="source folders the added episodes came from")
    version: str = ""


class QuarantineEntry(BaseModel):
    source: str
    source_episode_index: int
    reason: str
    time: datetime | None = None


class CuratedEntry(BaseModel):
    """One curation of one episode (`conveyor drop | trim | retask | undrop`), from the ledger."""

    action: str
    episode: int | None = Field(None, description="store index now (None: dropped)")
    drop_id: int | None = Field(None, description="the id `conveyor undrop` takes (dropped episodes)")
    source: str
    source_episode_index: int
    detail: str = ""
    reason: str = ""
    time: datetime | None = None
    version: str = Field("", description="the version (commit) it was done in")


class SourceEntry(BaseModel):
    """A source folder that fed the store, and its kind (read from its info.json now)."""

    path: str
    kind: str = Field(description="v2.1 | v3.0 (a lerobot 0.6 session) | missing | unknown")
    episodes: int = 0


class StoreDetail(StoreSummary):
    """Everything `conveyor show` prints."""

    fps: int | None = None
    robot_type: str | None = None
    features: list[Feature] = Field(default_factory=list)
    cameras: list[Camera] = Field(default_factory=list)
    tasks: list[TaskCount] = Field(default_factory=list)
    lengths: Lengths = Field(default_factory=Lengths)
    versions: list[VersionEntry] = Field(default_factory=list)
    quarantined: list[QuarantineEntry] = Field(default_factory=list)
    sources: list[SourceEntry] = Field(default_factory=list)
    curated: list[CuratedEntry] = Field(default_factory=list, description="dropped episodes, then the latest "
                                                                         "curation of each curated one")


# -- reading -----------------------------------------------------------------------------------------

def list_stores(store_root: Path) -> list[StoreSummary]:
    """Every store directly under `store_root`, by name."""
    root = Path(store_root)
    if not root.is_dir():
        return []
    return [summarize(p) for p in sorted(root.iterdir()) if p.is_dir() and is_store(p)]


def summarize(path: Path, name: str | None = None) -> StoreSummary:
    s = Store(Path(path).resolve())  # no recovery: a reader never writes
    info, version = s.info, s.version
    fps = info.get("fps") or 0
    records = _commit_records(s)
    return StoreSummary(
        name=name or s.root.name, path=str(s.root), episodes=version.total_episodes, frames=version.total_frames,
        hours=version.total_frames / fps / 3600 if fps else 0.0,
        size_bytes=sum(e.size for e in s.manifest().values()),
        version=version.short if version.commit else "c0",
        last_commit=_time(records[-1]) if records else None)


def describe(path: Path, name: str | None = None) -> StoreDetail:
    """The whole picture of one store (metadata only)."""
    s = Store(Path(path).resolve())
    detail = StoreDetail(**summarize(s.root, name).model_dump())
    info = s.info
    detail.fps, detail.robot_type = info.get("fps"), info.get("robot_type")
    for key, ft in (info.get("features") or {}).items():
        detail.features.append(Feature(name=key, dtype=ft["dtype"], shape=list(ft.get("shape") or [])))
        if ft["dtype"] in ("video", "image"):
            vi = ft.get("info") or {}
            shape = list(ft.get("shape") or [0, 0, 0])
            detail.cameras.append(Camera(
                key=key, height=vi.get("video.height", shape[0]), width=vi.get("video.width", shape[1]),
                codec=vi.get("video.codec", "png" if ft["dtype"] == "image" else None),
                pix_fmt=vi.get("video.pix_fmt"), fps=vi.get("video.fps", info.get("fps"))))
    rows = load_episodes(s.root, columns=["episode_index", "tasks", "length"])
    counts: dict[str, int] = {}
    for r in rows:
        for t in r["tasks"] or []:
            counts[t] = counts.get(t, 0) + 1
    detail.tasks = [TaskCount(task=t, episodes=n) for t, n in sorted(counts.items(), key=lambda x: -x[1])]
    frames = [int(r["length"]) for r in rows]
    if frames:
        detail.lengths = Lengths(frames=frames, min=min(frames), median=statistics.median(frames),
                                 mean=statistics.fmean(frames), max=max(frames))
    detail.versions = _versions(s)
    detail.quarantined = read_quarantine(s.root)
    counts: dict[str, int] = {}
    for r in s.ledger():
        counts[r.source] = counts.get(r.source, 0) + 1
    detail.sources = [SourceEntry(path=p, kind=source_kind(Path(p)), episodes=n) for p, n in sorted(counts.items())]
    detail.curated = curated(s)
    return detail


def curated(s: Store) -> list[CuratedEntry]:
    """What curation did, per source episode: the dropped ones (with their drop id), then each live episode's
    latest trim / retask / rename / undrop."""
    from conveyor.curate import drop_ids

    state = s.ledger_state()
    ids, live = drop_ids(state), {r.key: r.episode_index for r in state.records}
    latest: dict[tuple[str, int], tuple] = {}
    for c in state.curations:
        detail = ", ".join(f"{k} {v!r}" if isinstance(v, str) else f"{k} {v}" for k, v in c.detail.items())
        for k in c.touched:
            latest[tuple(k)] = (c, detail)
    out = []
    for k, (c, detail) in latest.items():
        if k not in live and c.action != "drop":
            continue
        out.append(CuratedEntry(action=c.action if k in live else "drop", episode=live.get(k),
                                drop_id=ids.get(k) if k not in live else None, source=k[0],
                                source_episode_index=k[1], detail=detail, reason=c.reason,
                                time=datetime.fromisoformat(c.time), version=f"c{c.commit}"))
    return sorted(out, key=lambda e: (e.episode is not None, e.drop_id or 0, e.episode or 0))


def source_kind(path: Path) -> str:
    """A source folder's kind from its info.json's codebase_version."""
    try:
        version = json.loads((path / "meta" / "info.json").read_text(encoding="utf-8")).get("codebase_version")
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, AttributeError):
        return "unknown"
    return version if version in ("v2.1", "v3.0") else "unknown"


def _commit_records(s: Store) -> list[dict]:
    head = s.version.commit
    out = []
    for p in sorted((s.root / layout.COMMITS).glob("*.json")):
        if int(p.stem) <= head:
            try:
                out.append(json.loads(p.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue
    return out


def _time(record: dict) -> datetime | None:
    try:
        return datetime.fromisoformat(record["time"])
    except (KeyError, TypeError, ValueError):
        return None


def _versions(s: Store) -> list[VersionEntry]:
    out: list[VersionEntry] = []
    eps, frames = 0, 0
    for r in _commit_records(s):
        v = r.get("version") or {}
        te, tf = int(v.get("total_episodes", eps)), int(v.get("total_frames", frames))
        out.append(VersionEntry(
            commit=r["commit"], kind=r.get("kind", "?"), time=_time(r), episodes_added=te - eps,
            frames_added=tf - frames, total_episodes=te, total_frames=tf, files_added=len(r.get("add") or {}),
            files_removed=len(r.get("remove") or []),
            sources=sorted({x["source"] for x in r.get("ledger") or [] if "source" in x}),
            version=f"c{r['commit']}-{str(v.get('content_hash', ''))[:12]}"))
        eps, frames = te, tf
    return out


# -- quarantine ----------------------------------------------------------------------------------------

def read_quarantine(store_root: Path) -> list[QuarantineEntry]:
    return [QuarantineEntry(**q) for q in read_quarantine_entries(store_root)]
