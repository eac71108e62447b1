"""The identity of a committed store state: what training pins, backups record and artifacts show."""
from __future__ import annotations

from pydantic import BaseModel, Field


class DatasetVersion(BaseModel):
    """Identifies a committed state of a store; `content_hash` chains every commit's file hashes."""

    commit: int = Field(description="commit sequence number, 0 = empty store")
    commit_id: str = ""
    total_episodes: int = 0
    total_frames: int = 0
    content_hash: str = ""

    @property
    def short(self) -> str:
        return f"c{self.commit}-{self.content_hash[:12]}"
