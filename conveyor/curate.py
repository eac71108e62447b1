"""Curation: drop, undrop, trim and re-task episodes, each one commit (a new version) through `Store.transaction`.

Cheap by design: no frame is decoded for the data, re-encoded, or copied, and no video file is rewritten. A
dropped or trimmed span stays as unreferenced bytes in its mp4 (meta/episodes rows point into video files by
from/to timestamps) until `conveyor compact` reclaims it by stream copy. lerobot reads every parquet under
`data/` and `meta/episodes/` in path order and indexes both by position, so `episode_index` must run 0..N-1 and
`index` 0..total-1 in file order: the data and metadata files from the first one that changes onwards are
rewritten with renumbered rows (new file numbers, so path order stays episode order); earlier files stay.

Naming episodes: store indices as `conveyor show` numbers them (`3 7 12-15`). A dropped episode is named by
its drop id: drops are numbered 1, 2, ... in the order they happened (a store's whole history, never reused),
and `conveyor show` lists each dropped episode with its id. `undrop` re-adds the source episode as recorded
(untrimmed, its source task) at the end of the store, read from its source folder, in one commit.
"""
from __future__ import annotations

import re

from conveyor.errors import ConveyorError
from conveyor.reports import CurationReport

ACTIONS = ("drop", "undrop", "trim", "retask", "rename")


def parse_episodes(text: str | list[str]) -> list[int]:
    """`"3 7 12-15"` (or its words as a list; commas allowed) -> [3, 7, 12, 13, 14, 15], sorted, unique."""
    words = text.replace(",", " ").split() if isinstance(text, str) else [w for t in text for w in
                                                                          t.replace(",", " ").split()]
    out: set[int] = set()
    for w in words:
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", w)
        if not m:
            raise ValueError(f"not an episode or range: {w!r} (write e.g. 3 7 12-15)")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise ValueError(f"empty range {w!r}")
        out.update(range(a, b + 1))
    if not out:
        raise ValueError("no episodes given")
    return sorted(out)


def parse_frame(text: str | int, fps: int) -> int:
    """A frame number (`12`) or seconds (`1.5s`) -> a frame number at `fps` (seconds round to the nearest)."""
    if isinstance(text, int):
        return text
    t = text.strip()
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)s", t)
    if m:
        return round(float(m.group(1)) * fps)
    if re.fullmatch(r"\d+", t):
        return int(t)
    raise ValueError(f"not a frame number or seconds: {text!r} (write e.g. 30 or 1.5s)")


def drop(store_path, episodes: list[int], reason: str, *, lock_timeout: float | None = 60.0) -> CurationReport:
    """Take `episodes` out of the store; their source episodes are never re-ingested until undropped."""
    raise NotImplementedError


def undrop(store_path, episodes: list[int], reason: str | None = None, *, lock_timeout: float | None = 60.0
           ) -> CurationReport:
    """Bring dropped episodes (by drop id) back from their source, appended at the end of the store."""
    raise NotImplementedError


def trim(store_path, episode: int, start: int, end: int, *, reason: str = "",
         lock_timeout: float | None = 60.0) -> CurationReport:
    """Keep frames start..end-1 of one episode."""
    raise NotImplementedError


def retask(store_path, episodes: list[int], task: str, *, reason: str = "",
           lock_timeout: float | None = 60.0) -> CurationReport:
    """Set the task text of `episodes` (every frame)."""
    raise NotImplementedError


def rename_task(store_path, old: str, new: str, *, reason: str = "",
                lock_timeout: float | None = 60.0) -> CurationReport:
    """Rename a task everywhere (merging into `new` when it already exists)."""
    raise NotImplementedError


__all__ = ["ACTIONS", "ConveyorError", "CurationReport", "drop", "parse_episodes", "parse_frame", "rename_task",
           "retask", "trim", "undrop"]
