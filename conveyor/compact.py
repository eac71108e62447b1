"""Merge the small files that one-batch-per-commit ingest leaves behind, in one atomic commit.

Consecutive undersized data files (and, per camera, video files) are packed into new files up to the
store's size targets, like Delta Lake's OPTIMIZE; episode metadata is rewritten into one file. Rows and
frames are copied (parquet row groups, stream-copied packets), never re-encoded, so the store decodes
to exactly the same rows and pixels before and after.
"""
from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from conveyor import layout
from conveyor.ingest import Progress
from conveyor.reports import CompactReport
from conveyor.store import Commit, Store
from conveyor.tables import episodes_schema
from conveyor.validate import load_episodes
from conveyor.video import concat, probe

MB = 1024 * 1024


def _bins(files: list[str], size_of, target: int) -> list[list[str]]:
    """Greedy packing of consecutive files up to `target` bytes; only bins of 2+ files need rewriting."""
    bins, cur, size = [], [], 0
    for f in files:
        s = size_of(f)
        if cur and size + s > target:
            bins.append(cur)
            cur, size = [], 0
        cur.append(f)
        size += s
    if cur:
        bins.append(cur)
    return [b for b in bins if len(b) > 1]


def _parquet_bytes(path: Path) -> int:
    md = pq.ParquetFile(path).metadata
    return sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))


def _ordered_files(rows: list[dict], rel_of) -> list[str]:
    out: list[str] = []
    for r in rows:
        rel = rel_of(r)
        if not out or out[-1] != rel:
            out.append(rel)
    return out


def compact(store: str | Path, *, progress: Progress | None = None, lock_timeout: float | None = 60.0
            ) -> CompactReport:
    t0 = time.monotonic()
    s = Store.open(store)
    with s.lock(timeout=lock_timeout):
        before = s.manifest()
        files_before = sum(1 for p in before if layout.kind_of(p))
        info = s.info
        rows = load_episodes(s.root) if info else []
        report = CompactReport(store=str(s.root), version=s.version, files_before=files_before,
                               files_after=files_before)
        if not rows:
            return report
        features = info["features"]
        video_keys = [k for k, f in features.items() if f["dtype"] == "video"]
        commit = s.begin("compact")
        try:
            changed = _compact_data(commit, s, rows, info["data_files_size_in_mb"] * MB)
            for i, k in enumerate(video_keys):
                if progress:
                    progress(i, len(video_keys), f"videos {k}")
                changed |= _compact_videos(commit, s, rows, k, info["video_files_size_in_mb"] * MB)
            meta_files = sorted(p for p in before if layout.kind_of(p) == "meta")
            if not changed and len(meta_files) <= 1:
                commit.abort()
                return report
            linear = s.next_linear("meta")
            mc, mf = layout.split_index(linear)
            for r in rows:
                r["meta/episodes/chunk_index"], r["meta/episodes/file_index"] = mc, mf
            rel = layout.episodes_path(linear)
            pq.write_table(pa.Table.from_pylist(rows, schema=episodes_schema(features)), commit.path(rel),
                           compression="snappy")
            commit.staged(rel)
            commit.remove += meta_files
            report.rewritten = sorted(commit.remove)
            report.version = s.commit(commit, (info["total_episodes"], info["total_frames"]))
        except BaseException:
            commit.abort()
            raise
        report.files_after = sum(1 for p in s.manifest() if layout.kind_of(p))
        report.seconds = time.monotonic() - t0
        return report


def _compact_data(commit: Commit, s: Store, rows: list[dict], target: int) -> bool:
    rel_of = lambda r: layout.DATA_PATH.format(chunk_index=r["data/chunk_index"], file_index=r["data/file_index"])
    files = _ordered_files(rows, rel_of)
    bins = _bins(files, lambda f: _parquet_bytes(s.root / f), target)
    linear = s.next_linear("data")
    new_of: dict[str, int] = {}
    for b in bins:
        rel = layout.data_path(linear)
        writer = None
        try:
            for old in b:
                pf = pq.ParquetFile(s.root / old)
                if writer is None:
                    writer = pq.ParquetWriter(commit.path(rel), pf.schema_arrow, compression="snappy",
                                              use_dictionary=True)
                for i in range(pf.num_row_groups):  # one row group in memory at a time
                    writer.write_table(pf.read_row_group(i))
                new_of[old] = linear
        finally:
            if writer is not None:
                writer.close()
        commit.staged(rel)
        commit.remove += b
        linear += 1
    for r in rows:
        if rel_of(r) in new_of:
            r["data/chunk_index"], r["data/file_index"] = layout.split_index(new_of[rel_of(r)])
    return bool(bins)


def _compact_videos(commit: Commit, s: Store, rows: list[dict], key: str, target: int) -> bool:
    rel_of = lambda r: layout.VIDEO_PATH.format(video_key=key, chunk_index=r[f"videos/{key}/chunk_index"],
                                                file_index=r[f"videos/{key}/file_index"])
    files = _ordered_files(rows, rel_of)
    bins = _bins(files, lambda f: (s.root / f).stat().st_size, target)
    linear = s.next_linear(f"videos/{key}")
    for b in bins:
        rel = layout.video_path(key, linear)
        in_bin = set(b)
        members = [r for r in rows if rel_of(r) in in_bin]
        concat([s.root / f for f in b], commit.path(rel))
        commit.staged(rel)
        # each episode's span comes from the new file's own packets, counted frame by frame
        pr = probe(commit.path(rel))
        i = 0
        vc, vf = layout.split_index(linear)
        for r in members:
            n = r["length"]
            start = pr.pts[i]
            end = pr.pts[i + n] if i + n < len(pr.pts) else pr.pts[-1] + pr.frame_ticks
            r[f"videos/{key}/chunk_index"], r[f"videos/{key}/file_index"] = vc, vf
            r[f"videos/{key}/from_timestamp"] = float(start * pr.time_base)
            r[f"videos/{key}/to_timestamp"] = float(end * pr.time_base)
            i += n
        commit.remove += b
        linear += 1
    return bool(bins)
