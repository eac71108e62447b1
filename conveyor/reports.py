"""Typed reports of ingest, compaction and validation: flows render them as artifacts, the CLI prints them."""
from __future__ import annotations

from pydantic import BaseModel, Field

from conveyor.version import DatasetVersion


class EpisodeMapping(BaseModel):
    """Which source episode became which store episode."""

    source: str
    source_episode_index: int
    episode_index: int
    length: int
    duration_s: float
    tasks: list[str]
    videos: dict[str, str] = Field(default_factory=dict, description="camera -> store mp4 path")
    content_hash: str = ""


class Quarantined(BaseModel):
    """A source episode that was not ingested, with the reason; the source is untouched."""

    source: str
    source_episode_index: int
    reason: str


class IngestReport(BaseModel):
    source: str
    store: str
    version: DatasetVersion
    added: list[EpisodeMapping] = Field(default_factory=list)
    quarantined: list[Quarantined] = Field(default_factory=list)
    incomplete: list[int] = Field(default_factory=list, description="source episodes still being recorded")
    changed: list[Quarantined] = Field(default_factory=list, description="ingested episodes whose source changed since")
    already: int = Field(0, description="source episodes already in the store")
    seconds: float = 0.0

    @property
    def new_episodes(self) -> int:
        return len(self.added)


class CompactReport(BaseModel):
    store: str
    version: DatasetVersion
    files_before: int
    files_after: int
    rewritten: list[str] = Field(default_factory=list)
    seconds: float = 0.0


class Check(BaseModel):
    name: str
    ok: bool
    detail: str = ""


class ValidationReport(BaseModel):
    store: str
    deep: bool = False
    version: DatasetVersion | None = None
    episodes_checked: list[int] = Field(default_factory=list)
    checks: list[Check] = Field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name=name, ok=bool(ok), detail=detail))
        return bool(ok)
