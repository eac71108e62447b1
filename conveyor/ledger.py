"""`.conveyor/ledger.jsonl`: which source episode (and content) became which store episode, one JSON line each.

Records are appended by the commit that adds the episodes and carry that commit's number; a rolled-forward
commit may append its records twice, so the last line per store episode wins and lines of commits past HEAD
are ignored.

Curation (`conveyor/curate.py`) renumbers episodes, so its commit appends one `{"curation": ...}` line that
states the whole new order of source episodes (absolute, so a line applied twice is harmless) plus a record for
each episode whose own entry changed (trimmed: `start`/`length`; re-tasked: `task`). A source episode in no
position of the order is dropped: it stays known (ingest never brings it back) until an undrop re-adds it.
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
    start: int = 0  # first source frame kept (a trimmed episode holds source rows start..start+length-1)
    task: str | None = None  # the task text set by `retask` (None: the source's)

    @property
    def key(self) -> tuple[str, int]:
        """The source episode's identity."""
        return self.source, self.source_episode_index

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.start:
            del d["start"]
        if self.task is None:
            del d["task"]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "LedgerRecord":
        return cls(**d)


@dataclass(frozen=True)
class Curation:
    """One curation commit: what was done to which episodes, why, and the store's order of source episodes
    after it (`sources[i]`, source episode index pairs)."""

    action: str  # drop | undrop | trim | retask | rename
    episodes: list[int]  # store episode indices in the parent version (undrop: drop ids)
    touched: list[tuple[str, int]]  # the source episodes acted on
    reason: str
    time: str
    detail: dict
    sources: list[str]
    order: list[tuple[int, int]]
    commit: int = 0

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        return {"curation": d, "commit": d.pop("commit")}

    @classmethod
    def from_json(cls, d: dict) -> "Curation":
        c = d["curation"]
        return cls(**{**c, "touched": [tuple(t) for t in c["touched"]], "order": [tuple(o) for o in c["order"]]},
                   commit=d["commit"])

    def keys(self) -> list[tuple[str, int]]:
        return [(self.sources[s], e) for s, e in self.order]


@dataclass
class LedgerState:
    """The ledger as of one commit: the store's episodes in order, the dropped source episodes, the curations."""

    records: list[LedgerRecord]
    dropped: dict[tuple[str, int], LedgerRecord]  # source episode -> its last record while in the store
    curations: list[Curation]


def read_state(path: Path, head: int) -> LedgerState:
    """Records and curations of commits up to `head`."""
    by_key: dict[tuple[str, int], LedgerRecord] = {}
    order: dict[int, tuple[str, int]] = {}
    curations: dict[int, Curation] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            d = json.loads(line)
            if d.get("commit", 0) > head:
                continue
            if "curation" in d:
                c = Curation.from_json(d)
                curations[c.commit] = c
                order = dict(enumerate(c.keys()))
            else:
                r = LedgerRecord.from_json(d)
                by_key[r.key] = r
                order[r.episode_index] = r.key
    live = {k: i for i, k in order.items()}
    records = [r if (r := by_key[order[i]]).episode_index == i else dataclasses.replace(r, episode_index=i)
               for i in sorted(order)]
    dropped = {k: r for k, r in by_key.items() if k not in live}
    return LedgerState(records, dropped, [curations[k] for k in sorted(curations)])


def read_ledger(path: Path, head: int) -> list[LedgerRecord]:
    """Records of commits up to `head`, one per store episode, in store order."""
    return read_state(path, head).records


def append_ledger(path: Path, records: list[dict]) -> None:
    """Append (JSON form) records durably."""
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
