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


def load_episodes(root: Path, columns: list[str] | None = None) -> list[dict]:
    """Every committed episode row (only `columns`, when given: they must include episode_index), in order."""
    rows: list[dict] = []
    for f in sorted((root / "meta" / "episodes").glob("*/*.parquet")):
        rows += pq.ParquetFile(f).read(columns=columns).to_pylist()  # not pq.read_table: it imports pandas
    return sorted(rows, key=lambda r: r["episode_index"])


def group_rows(rows: list[dict], features: dict, data_mb: float) -> list[list[dict]]:
    """Which rows share a metadata file under the size policy."""
    return [[rows[i] for i in g] for g in _groups(pa.Table.from_pylist(rows, schema=episodes_schema(features)),
                                                  data_mb)]


def _groups(table: pa.Table, data_mb: float) -> list[list[int]]:
    sizes = sizing.row_bytes(table)
    return sizing.group(range(table.num_rows), sizes.__getitem__, sizing.limit_bytes(data_mb))


def write_episodes(commit: Commit, first_linear: int, rows: list[dict], features: dict, data_mb: float) -> None:
    """Stage `rows` as new meta/episodes files numbered from `first_linear`; fills each row's own file columns."""
    table = pa.Table.from_pylist(rows, schema=episodes_schema(features))
    for linear, group in enumerate(_groups(table, data_mb), start=first_linear):
        columns = layout.file_columns("meta/episodes", linear)
        for i in group:
            rows[i].update(columns)
        part = table.slice(group[0], len(group))
        for name, value in columns.items():
            part = part.set_column(part.schema.get_field_index(name), name, pa.array([value] * len(group), pa.int64()))
        rel = layout.episodes_path(linear)
        pq.write_table(part, commit.path(rel), compression="snappy")
        commit.staged(rel)
