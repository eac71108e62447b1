"""The writers an ingest stages its files with: new data files (`DataWriter`), stream-copied videos
(`VideoWriter`), the small metadata every commit rewrites (`write_meta`) and a new store's info.json
(`new_info`). Apart from `ingest.py` so that its named phases read top-down on one screen; curation's
rewrites (`curate_rewrite.py`) and `undrop` stage with the same writers.
"""
from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from conveyor import layout, sizing, stats as st
from conveyor.fileio import start_writeback
from conveyor.prepare import Prepared
from conveyor.source import V21Source
from conveyor.store import Commit, Store
from conveyor.tables import tasks_table
from conveyor.video import StreamCopy


class DataWriter:
    """Streams renumbered rows into new data files, one row group per episode, closing a file once it is
    full (`sizing`), so memory holds one episode's rows at a time, however large the batch."""

    def __init__(self, commit: Commit, first_linear: int, schema: pa.Schema, data_mb: float):
        self.commit, self.linear, self.schema = commit, first_linear, schema
        self.limit = sizing.limit_bytes(data_mb)
        self.writer: pq.ParquetWriter | None = None
        self.rel = ""

    def write(self, table: pa.Table) -> int:
        """Append one episode's rows; returns the file number that holds them."""
        if self.writer is None:
            self.rel = layout.data_path(self.linear)
            self.writer = pq.ParquetWriter(self.commit.path(self.rel), self.schema, compression="snappy",
                                           use_dictionary=True)
        self.writer.write_table(table)
        linear = self.linear
        if sizing.is_full(sizing.open_parquet_bytes(self.commit.path(self.rel)), self.limit):
            self.close()
            self.linear += 1
        return linear

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.commit.staged(self.rel)
            self.writer = None


class VideoWriter:
    """Stream-copies each camera's episodes into new files, fed episode by episode, so the copies overlap with
    loading the next episodes instead of following them all. One thread per camera: cameras are independent
    files, and one camera's copies stay in order. A file is full by the one size policy (`sizing`); the next
    episode starts a new file."""

    def __init__(self, commit: Commit, store: Store, plan):  # plan: ingest's Plan (source, info, video_keys)
        self.commit, self.keys, self.src = commit, plan.video_keys, plan.src
        self.limit = sizing.limit_bytes(plan.info["video_files_size_in_mb"])
        self.linear = {k: store.next_linear(f"videos/{k}") for k in self.keys}
        self.size = dict.fromkeys(self.keys, 0)
        self.open: dict[str, tuple[str, StreamCopy] | None] = dict.fromkeys(self.keys)
        self.spans: dict[str, list[tuple[int, float, float]]] = {k: [] for k in self.keys}
        self.threads = {k: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"copy-{k}") for k in self.keys}
        self.jobs: list[Future] = []

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        for t in self.threads.values():
            t.shutdown(wait=True, cancel_futures=True)
        for k, o in self.open.items():  # a failed batch: drop partial outputs (the transaction drops the rest)
            if o is not None:
                o[1].abort()
                self.open[k] = None

    def add(self, p: Prepared) -> None:
        self.jobs += [self.threads[k].submit(self._add, k, p) for k in self.keys]

    def _add(self, key: str, p: Prepared) -> None:
        if self.open[key] is None:
            rel = layout.video_path(key, self.linear[key])
            self.open[key], self.size[key] = (rel, StreamCopy(self.commit.path(rel))), 0
        cam = p.cameras[key]
        packets = cam.packets.packets if cam.packets else None
        if packets is None and cam.nbytes is not None:  # a span of a multi-episode file: demux just the span
            packets = self.src.span_packets(p.src, key)
        self.open[key][1].add(p.src.videos[key], cam.probe, packets)
        if cam.packets:
            cam.packets.release()
        start_writeback(self.open[key][1].tmp)
        self.size[key] += sizing.mp4_bytes(p.src.videos[key]) if cam.nbytes is None else cam.nbytes
        if sizing.is_full(self.size[key], self.limit):
            self._close(key)

    def _close(self, key: str) -> None:
        rel, copy = self.open[key]
        self.open[key] = None
        self.spans[key] += [(self.linear[key], a, b) for a, b in copy.close()]
        self.linear[key] += 1
        self.jobs.append(self.threads[key].submit(self.commit.staged, rel))  # hashed after the spans

    def finish(self) -> dict[str, list[tuple[int, float, float]]]:
        """Wait for the copies, close the last file of each camera; (file, from, to) per camera and episode.
        The last files are still being hashed for the commit (~1 s per GB) while the caller writes the episode
        metadata; `staged` waits for them."""
        self.staged()  # the copies so far (and the hashing of files already full)
        for f in [self.threads[k].submit(self._close, k) for k in self.keys if self.open[k] is not None]:
            f.result()
        return self.spans

    def staged(self) -> None:
        """Wait for every job so far: once `finish` has run, every video file is staged in the commit."""
        for f in self.jobs:
            f.result()


def write_meta(commit: Commit, info: dict, tasks: list[str], stats: dict) -> None:
    """Stage the three small metadata files every commit rewrites (info.json is applied last)."""
    buf = pa.BufferOutputStream()
    pq.write_table(tasks_table(tasks), buf)
    commit.write(layout.TASKS, buf.getvalue().to_pybytes())
    commit.write(layout.STATS, json.dumps(st.to_json(stats), indent=4).encode())
    commit.write(layout.INFO, json.dumps(info, indent=4, ensure_ascii=False).encode("utf-8"))


def new_info(src: V21Source, data_mb: float, video_mb: float) -> dict:
    return {
        "codebase_version": layout.CODEBASE_VERSION,
        "robot_type": src.info.get("robot_type"),
        "total_episodes": 0, "total_frames": 0, "total_tasks": 0,
        "chunks_size": layout.CHUNKS_SIZE,
        "data_files_size_in_mb": data_mb, "video_files_size_in_mb": video_mb,
        "fps": src.fps, "splits": {},
        "data_path": layout.DATA_PATH,
        "video_path": layout.VIDEO_PATH if src.video_keys else None,
        "features": src.store_features(),
    }
