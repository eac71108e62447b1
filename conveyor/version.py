"""The identity of a committed store state: what training pins, backups record and artifacts show.

A stdlib dataclass, not a pydantic model: every store command (an append, `ingest` with nothing new) builds
one, and pydantic's import alone costs them ~0.13 s. pydantic models still validate it where it is a field
(train requests, published-version and backup manifests)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class DatasetVersion:
    """Identifies a committed state of a store; `content_hash` chains every commit's file hashes."""

    commit: int  # commit sequence number, 0 = empty store
    commit_id: str = ""
    total_episodes: int = 0
    total_frames: int = 0
    content_hash: str = ""

    @property
    def short(self) -> str:
        return f"c{self.commit}-{self.content_hash[:12]}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> DatasetVersion:
        """From a JSON object; ValueError names what is wrong (the caller names the file)."""
        if not isinstance(data, dict) or "commit" not in data:
            raise ValueError(f"not a dataset version: {str(data)[:80]}")
        out = {}
        for f in fields(cls):
            if f.name in data:
                v, want = data[f.name], int if f.type == "int" else str
                if not isinstance(v, want) or isinstance(v, bool):
                    raise ValueError(f"{f.name}: expected {want.__name__}, got {v!r}")
                out[f.name] = v
        return cls(**out)

    @classmethod
    def from_json(cls, text: str | bytes) -> DatasetVersion:
        return cls.from_dict(json.loads(text))
