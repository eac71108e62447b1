"""meta/episodes: one row per episode (length, tasks, which data/video file holds it, stats), read whole and
written into files rolled at the data size target, like lerobot's own writer. Ingest and compaction both
write through `write_episodes`."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from conveyor import layout, sizing
from conveyor.tables import episodes_schema

if TYPE_CHECKING:
    from conveyor.store import Commit


def load_episodes(root: Path) -> list[dict]:
    """Every committed episode row, in episode order."""
    rows: list[dict] = []
    for f in sorted((root / "meta" / "episodes").glob("*/*.parquet")):
        rows += pq.ParquetFile(f).read().to_pylist()  # not pq.read_table: that imports pandas (0.4 s)
    return sorted(rows, key=lambda r: r["episode_index"])


def group_rows(rows: list[dict], features: dict, data_mb: float) -> list[list[dict]]:
    """Which rows share a metadata file under the size policy."""
    sizes = sizing.row_bytes(rows, episodes_schema(features))
    pairs = sizing.group(zip(rows, sizes), lambda p: p[1], sizing.limit_bytes(data_mb))
    return [[r for r, _ in g] for g in pairs]


def write_episodes(commit: Commit, first_linear: int, rows: list[dict], features: dict, data_mb: float) -> None:
    """Stage `rows` as new meta/episodes files numbered from `first_linear`; fills each row's own file columns."""
    schema = episodes_schema(features)
    for linear, group in enumerate(group_rows(rows, features, data_mb), start=first_linear):
        for r in group:
            r.update(layout.file_columns("meta/episodes", linear))
        rel = layout.episodes_path(linear)
        pq.write_table(pa.Table.from_pylist(group, schema=schema), commit.path(rel), compression="snappy")
        commit.staged(rel)
