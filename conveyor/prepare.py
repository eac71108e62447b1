"""One source episode turned into store rows: read and checked (on loader threads), renumbered, task indices
mapped to the store's task table, and its per-episode stats computed. Videos are only probed here (their
packets kept, within a cap, for the copy); ingest stream-copies them later."""
from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conveyor import sizing, stats as st
from conveyor.errors import BadEpisode, ConveyorError
from conveyor.source import SourceEpisode, V21Source, check_video_length
from conveyor.source_v3 import V30Episode
from conveyor.tables import int64_array, numeric_stats
from conveyor.video import VideoProbe, probe

LOAD_THREADS = 2  # measured: halves a 40-episode convert's load time for +13 MB RSS


class PacketCap:
    """A cap on the bytes of demuxed packets held between loading an episode and copying its videos, so memory
    stays bounded however long the episodes are: a file that does not fit is demuxed again by the copy."""

    def __init__(self, limit: int | None = None):
        self.limit = sizing.limit_bytes(sizing.HELD_PACKETS_MB) if limit is None else limit
        self.held, self._lock = 0, threading.Lock()

    def reserve(self, nbytes: int) -> HeldPackets | None:
        with self._lock:
            if self.held + nbytes > self.limit:
                return None
            self.held += nbytes
        return HeldPackets(self, nbytes)

    def _give(self, nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes


class HeldPackets:
    """One video file's packets, filled by its probe and consumed by the copy. The bytes go back to the cap on
    `release`, or when the holder is dropped (a quarantined episode, a failed batch), so the cap cannot leak."""

    def __init__(self, cap: PacketCap, nbytes: int):
        self.packets: list[av.Packet] = []
        self.release = weakref.finalize(self, cap._give, nbytes)


@dataclass
class Camera:
    """One camera file of a loaded episode."""

    probe: VideoProbe
    stats: st.Stats
    packets: HeldPackets | None  # None: the copy demuxes the file itself
    nbytes: int | None = None  # packet bytes of a span of a multi-episode file (None: the whole file)


@dataclass
class Prepared:
    """A source episode turned into store rows and stats; its videos not yet copied."""

    src: SourceEpisode
    table: pa.Table | None  # dropped once written
    length: int
    stats: dict
    tasks: list[str]
    cameras: dict[str, Camera]
    content_hash: str
    fingerprint: dict


@dataclass
class Loaded:
    """The per-episode work that needs no store state: read rows, demux and sample each camera, hash files."""

    table: pa.Table
    cameras: dict[str, Camera]
    content_hash: str
    fingerprint: dict


def _load_rows(src: V21Source, ep: SourceEpisode) -> tuple[pa.Table, str, dict]:
    if isinstance(ep, V30Episode):  # its rows are a slice of a multi-episode file
        return src.read_rows(ep), src.content_hash(ep.index), src.fingerprint(ep.index)
    try:
        table = pq.ParquetFile(ep.parquet).read()  # not pq.read_table: that imports pandas (0.4 s)
    except Exception as e:
        raise BadEpisode(ep.parquet, f"corrupt parquet: {e}", ep.index) from None
    return table, src.content_hash(ep.index), src.fingerprint(ep.index)


def _load_camera(src: V21Source, ep: SourceEpisode, key: str, path, cap: PacketCap) -> Camera:
    """One camera of one episode: demux once (keeping the packets for the copy if the cap allows), decode its
    stats keyframes, stats."""
    if isinstance(ep, V30Episode):  # a span of a multi-episode mp4: demux just that span
        try:
            pr, frames, packets, nbytes = src.probe_camera(ep, key, st.CAMERA_SAMPLES)
        except ConveyorError as e:
            raise BadEpisode(path, e.problem, ep.index) from None
        check_video_length(path, pr.frames, ep.length, ep.index)
        held = cap.reserve(nbytes)
        if held:
            held.packets.extend(packets)
        return Camera(pr, st.image_stats(frames), held, nbytes)
    held = cap.reserve(os.path.getsize(path))
    try:
        pr, frames = probe(path, sample=st.CAMERA_SAMPLES, packets=held.packets if held else None)
    except ConveyorError as e:
        raise BadEpisode(path, e.problem, ep.index) from None
    check_video_length(path, pr.frames, ep.length, ep.index)  # scan left this to the one demux pass
    return Camera(pr, st.image_stats(frames), held)


def _assemble(rows: Future, cameras: dict[str, Future]) -> Loaded:
    table, content_hash, fingerprint = rows.result()
    return Loaded(table, {k: f.result() for k, f in cameras.items()}, content_hash, fingerprint)


def load_ahead(src: V21Source, ready: list[SourceEpisode], cap: PacketCap
               ) -> Iterator[tuple[SourceEpisode, Callable[[], Loaded]]]:
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
                                  {k: pool.submit(_load_camera, src, e, k, path, cap) for k, path in e.videos.items()})
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
            cols[f.name] = int64_array(np.full(n, episode_index))
        elif f.name == "index":
            cols[f.name] = int64_array(np.arange(first_frame, first_frame + n))
        elif f.name == "task_index":
            cols[f.name] = int64_array(new_task_idx)
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
    features = src.features
    ep_stats = numeric_stats(out, features)
    for key, ft in features.items():
        if ft["dtype"] == "image":
            ep_stats[key] = st.image_stats(st.png_frames(out.column(key).to_pylist()))
    ep_stats |= {k: cam.stats for k, cam in loaded.cameras.items()}
    tasks = sorted({task_list[i] for i in remap.values()}, key=task_list.index)
    return Prepared(ep, out, n, ep_stats, tasks, loaded.cameras, loaded.content_hash, loaded.fingerprint)


