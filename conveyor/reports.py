"""Typed reports of ingest, compaction and validation: flows render them as artifacts, the CLI prints them.

Stdlib dataclasses (outputs, built by conveyor itself, never parsed from user input): the store commands
that return them stay free of pydantic's ~0.13 s import."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from conveyor.version import DatasetVersion


def md_text(text: str) -> str:
    """Text safe in a markdown artifact, table cell included: Prefect's UI renders raw HTML, so `<run>` would
    vanish as a tag, and `|` would end the cell. The one markdown escaper (artifacts, views, review sheets)."""
    return text.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")


@dataclass
class EpisodeMapping:
    """Which source episode became which store episode."""

    source: str
    source_episode_index: int
    episode_index: int
    length: int
    duration_s: float
    tasks: list[str]
    videos: dict[str, str] = field(default_factory=dict)  # camera -> store mp4 path
    content_hash: str = ""


@dataclass
class Quarantined:
    """A source episode that was not ingested, with the reason; the source is untouched."""

    source: str
    source_episode_index: int
    reason: str


@dataclass
class Duplicate:
    """A source episode not added because the store already holds its exact content (same content hash),
    ingested from another path (a copied or moved recording)."""

    source: str
    source_episode_index: int
    content_hash: str
    store_episode_index: int  # the store episode that holds this content (-1: one a curation dropped)
    store_source: str  # where that one came from
    store_source_episode_index: int

    @property
    def reason(self) -> str:
        if self.store_episode_index < 0:
            return (f"{self.source} episode {self.source_episode_index} has the content of "
                    f"{self.store_source} episode {self.store_source_episode_index}, which a curation dropped "
                    "from the store; not added again (undrop that one to bring it back)")
        return (f"{self.source} episode {self.source_episode_index} is already in the store as episode "
                f"{self.store_episode_index}, ingested from {self.store_source} episode "
                f"{self.store_source_episode_index} (same content); not added again")


@dataclass
class IngestReport:
    source: str
    store: str
    version: DatasetVersion
    added: list[EpisodeMapping] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)
    incomplete: list[int] = field(default_factory=list)  # source episodes still being recorded
    changed: list[Quarantined] = field(default_factory=list)  # ingested episodes whose source changed since
    already: int = 0  # source episodes already in the store
    duplicates: list[Duplicate] = field(default_factory=list)  # same content already in the store, other path
    seconds: float = 0.0

    @property
    def new_episodes(self) -> int:
        return len(self.added)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CompactReport:
    store: str
    version: DatasetVersion
    files_before: int
    files_after: int
    rewritten: list[str] = field(default_factory=list)
    seconds: float = 0.0
    vacuumed: int = 0  # files earlier commits replaced, removed now that the retention period has passed


@dataclass
class CurationReport:
    """One curation commit (`conveyor/curate.py`): what it did and the store before -> after."""

    store: str
    action: str  # drop | undrop | trim | retask | rename
    episodes: list[int]  # store episode indices acted on, as numbered before (undrop: drop ids; after: `added`)
    version: DatasetVersion  # the new version
    parent: DatasetVersion  # the version it was made from
    episodes_before: int = 0
    episodes_after: int = 0
    frames_before: int = 0
    frames_after: int = 0
    fps: int = 0
    reason: str = ""
    added: list[int] = field(default_factory=list)  # undrop: the store indices the episodes came back as
    bytes_written: int = 0
    seconds: float = 0.0

    @property
    def minutes_before(self) -> float:
        return self.frames_before / self.fps / 60 if self.fps else 0.0

    @property
    def minutes_after(self) -> float:
        return self.frames_after / self.fps / 60 if self.fps else 0.0

    def summary(self) -> str:
        """One line: what changed, before -> after, and the new version."""
        return (f"{self.action} {len(self.episodes)} episode(s): {self.episodes_before} -> {self.episodes_after} "
                f"episodes, {self.frames_before} -> {self.frames_after} frames, {self.minutes_before:.1f} -> "
                f"{self.minutes_after:.1f} min; version {self.version.short}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"minutes_before": self.minutes_before, "minutes_after": self.minutes_after}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class ValidationReport:
    store: str
    deep: bool = False
    version: DatasetVersion | None = None
    episodes_checked: list[int] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    frames_compared: int = 0  # store frames whose timestamps (fast) or lerobot items (deep) were checked
    pixel_identical: int = 0  # sampled frames decoded equal to the source's (fast) or lerobot's (deep)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name=name, ok=bool(ok), detail=detail))
        return bool(ok)
