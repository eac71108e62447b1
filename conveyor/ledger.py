"""`.conveyor/ledger.jsonl`: which source episode (and content) became which store episode, one JSON line each.

Records are appended by the commit that adds the episodes and carry that commit's number; a rolled-forward
commit may append its records twice, so the last line per store episode wins and lines of commits past HEAD
are ignored.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LedgerRecord:
    source: str  # the source folder, resolved
    source_episode_index: int
    content_hash: str  # sha256 over the sha256 of the episode's source files
    files: dict[str, list[int]]  # source file name -> [size, mtime_ns]: the cheap "unchanged" check
    episode_index: int
    length: int
    commit: int = 0  # set by the commit that adds it

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "LedgerRecord":
        return cls(**d)


def read_ledger(path: Path, head: int) -> list[LedgerRecord]:
    """Records of commits up to `head`, one per store episode, in store order."""
    if not path.exists():
        return []
    seen: dict[int, LedgerRecord] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = LedgerRecord.from_json(json.loads(line))
            if r.commit <= head:
                seen[r.episode_index] = r
    return [seen[k] for k in sorted(seen)]


def append_ledger(path: Path, records: list[dict]) -> None:
    """Append (JSON form) records durably."""
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
