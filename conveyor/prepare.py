"""One source episode turned into store rows: read and checked (on loader threads), renumbered, task indices
mapped to the store's task table, and its per-episode stats computed. Videos are only probed here; ingest
stream-copies them later."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conveyor import stats as st
from conveyor.errors import BadEpisode, ConveyorError
from conveyor.source import SourceEpisode, V21Source, check_video_length
from conveyor.tables import column_array
from conveyor.video import probe

LOAD_THREADS = 2  # measured: halves a 40-episode convert's load time for +13 MB RSS


@dataclass
class Prepared:
    """A source episode turned into store rows, stats and video spans (videos not yet copied)."""

    src: SourceEpisode
    table: pa.Table | None  # dropped once written
    length: int
    stats: dict
    tasks: list[str]
    video_pts: dict[str, tuple[int, ...]]
    video_starts: dict[str, tuple[int, int]]
    content_hash: str
    fingerprint: dict


@dataclass
class Loaded:
    """The per-episode work that needs no store state: read rows, sample camera keyframes, hash files."""

    table: pa.Table
    video_stats: dict
    video_pts: dict[str, tuple[int, ...]]
    video_starts: dict[str, tuple[int, int]]  # first pts, first dts: lets concat skip a demux pass
    content_hash: str
    fingerprint: dict


def _load_rows(src: V21Source, ep: SourceEpisode) -> tuple[pa.Table, str, dict]:
    try:
        table = pq.ParquetFile(ep.parquet).read()  # not pq.read_table: that imports pandas (0.4 s)
    except Exception as e:
        raise BadEpisode(ep.parquet, f"corrupt parquet: {e}", ep.index) from None
    return table, src.content_hash(ep.index), src.fingerprint(ep.index)


def _load_camera(ep: SourceEpisode, path) -> tuple[dict, tuple[int, ...], tuple[int, int]]:
    """One camera of one episode: demux once, decode its stats keyframes, stats; (stats, pts, (pts0, dts0))."""
    try:
        pr, frames = probe(path, sample=st.CAMERA_SAMPLES)
    except ConveyorError as e:
        raise BadEpisode(path, e.problem, ep.index) from None
    check_video_length(path, pr.frames, ep.length, ep.index)  # scan left this to the one demux pass
    return st.image_stats(frames), pr.pts, (pr.pts[0], pr.first_dts)


def _assemble(rows: Future, cameras: dict[str, Future]) -> Loaded:
    table, content_hash, fingerprint = rows.result()
    loaded = {k: f.result() for k, f in cameras.items()}
    return Loaded(table, {k: v[0] for k, v in loaded.items()}, {k: v[1] for k, v in loaded.items()},
                  {k: v[2] for k, v in loaded.items()}, content_hash, fingerprint)


def load_ahead(src: V21Source, ready: list[SourceEpisode]) -> Iterator[tuple[SourceEpisode, Callable[[], Loaded]]]:
    """Load episodes on LOAD_THREADS threads (keyframe decoding and hashing release the GIL), at most
    LOAD_THREADS episodes ahead of the consumer so memory stays bounded; yields them in order. Rows and each
    camera are separate jobs, so even a one-episode append decodes its cameras in parallel."""
    with ThreadPoolExecutor(max_workers=LOAD_THREADS) as pool:
        pending: dict[int, tuple[Future, dict[str, Future]]] = {}
        for i, ep in enumerate(ready):
            for j in range(i, min(i + LOAD_THREADS + 1, len(ready))):
                if j not in pending:
                    e = ready[j]
                    pending[j] = (pool.submit(_load_rows, src, e),
                                  {k: pool.submit(_load_camera, e, path) for k, path in e.videos.items()})
            rows, cameras = pending.pop(i)
            yield ep, partial(_assemble, rows, cameras)


def prepare_episode(src: V21Source, ep: SourceEpisode, loaded: Loaded, episode_index: int, first_frame: int,
                    task_ids: dict[str, int], task_list: list[str], src_tasks: dict[int, str],
                    default_task: str | None, schema: pa.Schema) -> Prepared:
    """Renumber rows, map task text to store task indices, and compute the row stats (sequential)."""
    table = loaded.table
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise BadEpisode(ep.parquet, f"missing columns {missing}", ep.index)
    n = table.num_rows
    # task text: per frame from the source's task_index, falling back to the default for empty ones
    src_idx = table.column("task_index").to_numpy(zero_copy_only=False)
    texts = []
    for i in np.unique(src_idx):
        t = src_tasks.get(int(i), "")
        if not t.strip():
            if not ep.tasks or not "".join(ep.tasks).strip():
                t = default_task or ""
            else:
                t = ep.tasks[0]
        texts.append((int(i), t))
    remap = {}
    for i, t in texts:
        if t not in task_ids:
            task_ids[t] = len(task_list)
            task_list.append(t)
        remap[i] = task_ids[t]
    new_task_idx = np.vectorize(remap.__getitem__, otypes=[np.int64])(src_idx) if n else src_idx
    cols = {}
    for f in schema:
        if f.name == "episode_index":
            cols[f.name] = pa.array(np.full(n, episode_index, dtype=np.int64))
        elif f.name == "index":
            cols[f.name] = pa.array(np.arange(first_frame, first_frame + n, dtype=np.int64))
        elif f.name == "task_index":
            cols[f.name] = pa.array(new_task_idx)
        else:
            col = table.column(f.name)
            if col.type == f.type:  # the usual case; cast() would import pyarrow.compute (~50 ms)
                cols[f.name] = col
                continue
            try:
                cols[f.name] = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise BadEpisode(ep.parquet, f"column {f.name!r} has type {col.type}, expected {f.type}: {e}",
                                 ep.index) from None
    out = pa.table(cols, schema=schema)
    ep_stats: dict = {}
    features = src.features
    for key, ft in features.items():
        if ft["dtype"] == "video":
            continue
        if ft["dtype"] == "image":
            ep_stats[key] = st.image_stats(st.png_frames(out.column(key).to_pylist()))
        else:
            ep_stats[key] = st.numeric_stats(column_array(out, key))
    ep_stats |= loaded.video_stats
    tasks = sorted({task_list[i] for i in remap.values()}, key=task_list.index)
    return Prepared(ep, out, n, ep_stats, tasks, loaded.video_pts, loaded.video_starts, loaded.content_hash,
                    loaded.fingerprint)


