"""Append complete v2.1 source episodes to a v3.0 store, one atomic commit per batch.

Cost is O(new episodes): each commit writes new data/video/meta files (stream-copied videos, renumbered
parquet rows) and rewrites only the small metadata files; `compact` merges small files later.
No torch, no lerobot: pyarrow + PyAV only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conveyor import layout, stats as st
from conveyor.errors import BadEpisode, ConveyorError
from conveyor.inventory import record_quarantine
from conveyor.models import EpisodeMapping, IngestReport, Quarantined
from conveyor.source import SourceEpisode, V21Source, check_video_length
from conveyor.store import Commit, Store, is_store
from conveyor.tables import (column_array, data_schema, episodes_schema, read_tasks, stats_columns,
                             tasks_table)
from conveyor.video import concat, probe

Progress = Callable[[int, int, str], None]
MB = 1024 * 1024
LOAD_THREADS = 2  # measured: halves a 40-episode convert's load time for +13 MB RSS


def _file_fingerprint(paths: list[Path]) -> dict[str, list[int]]:
    return {p.name: [info.st_size, info.st_mtime_ns] for p in paths for info in [p.stat()]}


def _content_hash(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


# -- features ------------------------------------------------------------------------------------------

def store_features(src: V21Source) -> dict:
    """The source's features as lerobot's `create` writes them (no per-feature `fps`)."""
    feats = json.loads(json.dumps(src.features))
    for f in feats.values():
        f.pop("fps", None)
    return feats


def _comparable(features: dict) -> dict:
    return {k: (f["dtype"], list(f["shape"]), f.get("names")) for k, f in features.items()}


def new_info(src: V21Source, data_mb: int, video_mb: int) -> dict:
    return {
        "codebase_version": layout.CODEBASE_VERSION,
        "robot_type": src.info.get("robot_type"),
        "total_episodes": 0, "total_frames": 0, "total_tasks": 0,
        "chunks_size": layout.CHUNKS_SIZE,
        "data_files_size_in_mb": data_mb, "video_files_size_in_mb": video_mb,
        "fps": src.fps, "splits": {},
        "data_path": layout.DATA_PATH,
        "video_path": layout.VIDEO_PATH if src.video_keys else None,
        "features": store_features(src),
    }


def check_compatible(src: V21Source, info: dict, store_root: Path) -> None:
    if int(info["fps"]) != src.fps:
        raise ConveyorError(src.root / "meta/info.json",
                            f"fps mismatch: source has {src.fps}, store {store_root} has {info['fps']}")
    a, b = _comparable(store_features(src)), _comparable(info["features"])
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise ConveyorError(src.root / "meta/info.json",
                            f"feature mismatch with store {store_root}: {', '.join(diff)}")


# -- one episode ---------------------------------------------------------------------------------------

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


def load_episode(src: V21Source, ep: SourceEpisode) -> Loaded:
    try:
        table = pq.ParquetFile(ep.parquet).read()  # not pq.read_table: that imports pandas (0.4 s)
    except Exception as e:
        raise BadEpisode(ep.parquet, f"corrupt parquet: {e}", ep.index) from None
    video_stats, video_pts, video_starts = {}, {}, {}
    for key, path in ep.videos.items():
        try:
            pr, frames = probe(path, sample=st.CAMERA_SAMPLES)
        except ConveyorError as e:
            raise BadEpisode(path, e.problem, ep.index) from None
        check_video_length(path, pr.frames, ep.length, ep.index)  # scan left this to the one demux pass
        video_pts[key] = pr.pts
        video_starts[key] = (pr.pts[0], pr.first_dts)
        video_stats[key] = st.image_stats(frames)
    files = src.episode_files(ep.index)
    return Loaded(table, video_stats, video_pts, video_starts, _content_hash(files), _file_fingerprint(files))


def _load_ahead(src: V21Source, ready: list[SourceEpisode]) -> Iterator[tuple[SourceEpisode, Callable[[], Loaded]]]:
    """Load episodes on LOAD_THREADS threads (keyframe decoding and hashing release the GIL), at most
    LOAD_THREADS episodes ahead of the consumer so memory stays bounded; yields them in order."""
    with ThreadPoolExecutor(max_workers=LOAD_THREADS) as pool:
        pending: dict[int, Future] = {}
        for i, ep in enumerate(ready):
            for j in range(i, min(i + LOAD_THREADS + 1, len(ready))):
                if j not in pending:
                    pending[j] = pool.submit(load_episode, src, ready[j])
            yield ep, pending.pop(i).result


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


# -- batches -------------------------------------------------------------------------------------------

class DataWriter:
    """Streams renumbered rows into new data files, rolling over at data_mb (uncompressed, like lerobot),
    so memory holds one episode's rows at a time, however large the batch."""

    def __init__(self, commit: Commit, first_linear: int, schema: pa.Schema, data_mb: float):
        self.commit, self.linear, self.schema, self.limit = commit, first_linear, schema, data_mb * MB
        self.writer: pq.ParquetWriter | None = None
        self.size = 0
        self.rel = ""

    def write(self, table: pa.Table) -> int:
        """Append one episode's rows; returns the file number that holds them."""
        if self.writer is not None and self.size + table.nbytes >= self.limit:
            self.close()
            self.linear += 1
        if self.writer is None:
            self.rel = layout.data_path(self.linear)
            self.writer = pq.ParquetWriter(self.commit.path(self.rel), self.schema, compression="snappy",
                                           use_dictionary=True)
        self.writer.write_table(table)
        self.size += table.nbytes
        return self.linear

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.commit.staged(self.rel)
            self.writer, self.size = None, 0


def _write_videos(commit: Commit, store: Store, batch: list[Prepared], key: str, video_mb: int
                  ) -> list[tuple[int, float, float]]:
    """Stream-copy each episode's mp4 into new files (rolled at video_mb); (file, from, to) per episode."""
    linear = store.next_linear(f"videos/{key}")
    groups: list[list[Prepared]] = [[]]
    size = 0
    for p in batch:
        s = p.src.videos[key].stat().st_size
        if groups[-1] and size + s >= video_mb * MB:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += s
    out = []
    for g in groups:
        rel = layout.video_path(key, linear)
        spans = concat([p.src.videos[key] for p in g], commit.path(rel), [p.video_starts[key] for p in g])
        commit.staged(rel)
        out += [(linear, a, b) for a, b in spans]
        linear += 1
    return out


def _episode_rows(batch, episode_start, frame_start, data_files, video_files, features, video_keys,
                  meta_linear) -> list[dict]:
    rows, frame = [], frame_start
    mc, mf = layout.split_index(meta_linear)
    for i, p in enumerate(batch):
        n = p.length
        dc, df = layout.split_index(data_files[i])
        row = {"episode_index": episode_start + i, "tasks": p.tasks, "length": n,
               "data/chunk_index": dc, "data/file_index": df,
               "dataset_from_index": frame, "dataset_to_index": frame + n}
        for k in video_keys:
            lin, a, b = video_files[k][i]
            vc, vf = layout.split_index(lin)
            row |= {f"videos/{k}/chunk_index": vc, f"videos/{k}/file_index": vf,
                    f"videos/{k}/from_timestamp": a, f"videos/{k}/to_timestamp": b}
        row |= stats_columns(features, p.stats)
        row |= {"meta/episodes/chunk_index": mc, "meta/episodes/file_index": mf}
        rows.append(row)
        frame += n
    return rows


def write_meta(commit: Commit, info: dict, tasks: list[str], stats: dict) -> None:
    """Stage the three small metadata files every commit rewrites (info.json is applied last)."""
    buf = pa.BufferOutputStream()
    pq.write_table(tasks_table(tasks), buf)
    commit.write(layout.TASKS, buf.getvalue().to_pybytes())
    commit.write(layout.STATS, json.dumps(st.to_json(stats), indent=4).encode())
    commit.write(layout.INFO, json.dumps(info, indent=4, ensure_ascii=False).encode("utf-8"))


def _load_stats(store: Store) -> dict:
    p = store.root / layout.STATS
    return st.from_json(json.loads(p.read_text())) if p.exists() else {}


# -- entry points --------------------------------------------------------------------------------------

def ingest(source: str | Path, store: str | Path, *, task: str | None = None, data_mb: float = 100,
           video_mb: float = 200, lock_timeout: float | None = 60.0, progress: Progress | None = None,
           max_episodes: int | None = None) -> IngestReport:
    """Append every complete source episode not yet in the store (creating it if missing)."""
    t0 = time.monotonic()
    src = V21Source.open(source)
    store_root = Path(store).resolve()
    if store_root == src.root or src.root in store_root.parents:
        raise ConveyorError(store_root, "store must not be inside the source folder")
    created = not is_store(store_root)
    if created and store_root.exists() and any(store_root.iterdir()):
        raise ConveyorError(store_root, "exists and is not a conveyor store; refusing to write into it")
    try:
        s = Store.open(store_root, create=True)
        with s.lock(timeout=lock_timeout):
            report = _ingest_locked(src, s, task, data_mb, video_mb, progress, max_episodes)
            record_quarantine(s, report)
    except BaseException:
        if created and not Store(store_root).version.commit:
            shutil.rmtree(store_root, ignore_errors=True)  # leave nothing behind for a failed first ingest
        raise
    report.seconds = time.monotonic() - t0
    return report


def _ingest_locked(src: V21Source, s: Store, task, data_mb, video_mb, progress, max_episodes) -> IngestReport:
    info = s.info or new_info(src, data_mb, video_mb)
    if s.info:
        check_compatible(src, info, s.root)
        data_mb, video_mb = info["data_files_size_in_mb"], info["video_files_size_in_mb"]
    source_key = str(src.root)
    ledger = s.ledger()
    mine = {r["source_episode_index"]: r for r in ledger if r["source"] == source_key}
    report = IngestReport(source=source_key, store=str(s.root), version=s.version, already=len(mine))
    # a source episode that changed after ingest is reported, never re-added
    for ep_idx, r in sorted(mine.items()):
        files = src.episode_files(ep_idx)
        if not all(p.exists() for p in files):
            continue
        if _file_fingerprint(files) != r["files"] and _content_hash(files) != r["content_hash"]:
            report.changed.append(Quarantined(source=source_key, source_episode_index=ep_idx,
                                              reason=f"content changed after it was ingested as store "
                                                     f"episode {r['episode_index']}"))
    ready, scan = src.scan(skip=set(mine), probe_videos=False)
    src.check_declared_cameras(ready)
    report.incomplete = scan.incomplete
    for ep_idx, reason in sorted(scan.bad.items()):
        report.quarantined.append(Quarantined(source=source_key, source_episode_index=ep_idx, reason=reason))
    if max_episodes is not None:
        ready = ready[:max_episodes]
    if not ready:
        return report

    features = info["features"]
    schema = data_schema(features)
    task_list = read_tasks(s.root / layout.TASKS)
    task_ids = {t: i for i, t in enumerate(task_list)}
    src_tasks = src.tasks()
    episode_start, frame_start = int(info["total_episodes"]), int(info["total_frames"])
    batch: list[Prepared] = []
    data_files: list[int] = []
    frame = frame_start
    commit = s.begin("append")
    try:
        data = DataWriter(commit, s.next_linear("data"), schema, data_mb)
        for i, (ep, loaded) in enumerate(_load_ahead(src, ready)):
            if progress:
                progress(i, len(ready), f"episode {ep.index}")
            try:
                p = prepare_episode(src, ep, loaded(), episode_start + len(batch), frame, task_ids, task_list,
                                    src_tasks, task, schema)
            except ConveyorError as e:
                report.quarantined.append(Quarantined(source=source_key, source_episode_index=ep.index,
                                                      reason=str(e)))
                continue
            data_files.append(data.write(p.table))
            p.table = None
            batch.append(p)
            frame += p.length
        data.close()
        if not batch:
            commit.abort()
            return report
        if progress:
            progress(len(ready), len(ready), "writing videos")
        video_keys = [k for k, f in features.items() if f["dtype"] == "video"]
        with ThreadPoolExecutor(max_workers=LOAD_THREADS) as pool:  # cameras are independent files
            futures = {k: pool.submit(_write_videos, commit, s, batch, k, video_mb) for k in video_keys}
            video_files = {k: f.result() for k, f in futures.items()}
        meta_linear = s.next_linear("meta")
        rows = _episode_rows(batch, episode_start, frame_start, data_files, video_files, features, video_keys,
                             meta_linear)
        rel = layout.episodes_path(meta_linear)
        pq.write_table(pa.Table.from_pylist(rows, schema=episodes_schema(features)), commit.path(rel),
                       compression="snappy")
        commit.staged(rel)
        total_eps, total_frames = episode_start + len(batch), frame
        info = dict(info, total_episodes=total_eps, total_frames=total_frames, total_tasks=len(task_list),
                    splits={"train": f"0:{total_eps}"})
        agg = st.aggregate(([_load_stats(s)] if episode_start else []) + [p.stats for p in batch])
        write_meta(commit, info, task_list, agg)
        for p, row in zip(batch, rows):
            commit.ledger.append({"source": source_key, "source_episode_index": p.src.index,
                                  "content_hash": p.content_hash, "files": p.fingerprint,
                                  "episode_index": row["episode_index"], "length": row["length"]})
        version = s.commit(commit, (total_eps, total_frames))
    except BaseException:
        commit.abort()
        raise
    report.version = version
    fps = src.fps
    for p, row in zip(batch, rows):
        report.added.append(EpisodeMapping(
            source=source_key, source_episode_index=p.src.index, episode_index=row["episode_index"],
            length=row["length"], duration_s=row["length"] / fps, tasks=p.tasks, content_hash=p.content_hash,
            videos={k: layout.VIDEO_PATH.format(video_key=k, chunk_index=row[f"videos/{k}/chunk_index"],
                                                file_index=row[f"videos/{k}/file_index"]) for k in video_keys}))
    return report


def convert(source: str | Path, dst: str | Path, *, task: str | None = None, data_mb: float = 100,
            video_mb: float = 200, overwrite: bool = False, progress: Progress | None = None) -> IngestReport:
    """One-shot conversion into a fresh store, built beside `dst` and renamed into place at the end."""
    dst = Path(dst).resolve()
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ConveyorError(dst, "destination exists; pass --overwrite to replace it")
    tmp = dst.with_name(f".{dst.name}.converting-{uuid.uuid4().hex[:8]}")
    try:
        report = ingest(source, tmp, task=task, data_mb=data_mb, video_mb=video_mb, progress=progress)
        if not report.added:
            raise ConveyorError(Path(source), "no complete episodes to convert"
                                + (f" ({len(report.quarantined)} quarantined: {report.quarantined[0].reason})"
                                   if report.quarantined else ""))
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.store = str(dst)
    return report
