"""Merge the small files that one-batch-per-commit ingest leaves behind, in one atomic commit.

Consecutive data files (and, per camera, video files) are regrouped under the store's size targets with the
same rule ingest writes by (`sizing`), like Delta Lake's OPTIMIZE; only groups of 2+ files are rewritten.
Episode metadata is regrouped the same way. Rows and frames are copied (parquet row groups, stream-copied
packets), never re-encoded, so the store decodes to exactly the same rows and pixels before and after.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from conveyor import layout, quantiles, sizing, stats as st
from conveyor.episodes import group_rows, load_episodes, write_episodes
from conveyor.ingest import Progress
from conveyor.reports import CompactReport
from conveyor.retained import RETENTION_S
from conveyor.store import Commit, Store
from conveyor.video import StreamCopy, VideoProbe, probe


def _merges(s: Store, rows: list[dict], rel_of: Callable[[dict], str], mb: float) -> list[list[str]]:
    """Groups of 2+ consecutive files (in episode order) that the size policy puts into one file."""
    files: list[str] = []
    for r in rows:
        if not files or files[-1] != rel_of(r):
            files.append(rel_of(r))
    groups = sizing.group(files, lambda f: sizing.file_bytes(s.root / f), sizing.limit_bytes(mb))
    return [g for g in groups if len(g) > 1]


def compact(store: str | Path, *, progress: Progress | None = None, lock_timeout: float | None = 60.0
            ) -> CompactReport:
    t0 = time.monotonic()
    s = Store.open(store)
    with s.lock(timeout=lock_timeout):
        vacuumed = s.vacuum(RETENTION_S)  # what earlier commits replaced, once past the retention period
        before = s.manifest()
        files_before = sum(1 for p in before if layout.kind_of(p))
        info = s.info
        rows = load_episodes(s.root) if info else []
        report = CompactReport(store=str(s.root), version=s.version, files_before=files_before,
                               files_after=files_before, vacuumed=vacuumed[0])
        if not rows:
            return report
        features = info["features"]
        video_keys = [k for k, f in features.items() if f["dtype"] == "video"]
        with s.transaction("compact") as tx:
            changed = _compact_data(tx, s, rows, info["data_files_size_in_mb"])
            for i, k in enumerate(video_keys):
                if progress:
                    progress(i, len(video_keys), f"videos {k}")
                changed |= _compact_videos(tx, s, rows, k, info["video_files_size_in_mb"])
            meta_files = sorted(p for p in before if layout.kind_of(p) == "meta")
            if not changed and quantiles.is_current(s, features) and _meta_grouped(rows, features, info["data_files_size_in_mb"]):
                tx.cancel()
                return report
            write_episodes(tx, s.next_linear("meta"), rows, features, info["data_files_size_in_mb"])
            # the sorted values follow the new data files (and a store made before them gets exact quantiles)
            stats = quantiles.version_stats(tx, features, rows, st.from_json(json.loads((s.root / layout.STATS)
                                                                                      .read_text())))
            tx.write(layout.STATS, json.dumps(st.to_json(stats), indent=4).encode())
            tx.delete(meta_files)
            tx.set_totals(info["total_episodes"], info["total_frames"])
            report.rewritten = sorted(tx.remove)
        report.version = tx.version
        report.files_after = sum(1 for p in s.manifest() if layout.kind_of(p))
        report.seconds = time.monotonic() - t0
        return report


def _meta_grouped(rows: list[dict], features: dict, data_mb: float) -> bool:
    """Whether the metadata files already hold exactly the rows the size policy groups together."""
    want = [[r["episode_index"] for r in g] for g in group_rows(rows, features, data_mb)]
    have: dict[str, list[int]] = {}
    for r in rows:
        have.setdefault(layout.episode_meta_path(r), []).append(r["episode_index"])
    return want == list(have.values())


def _compact_data(commit: Commit, s: Store, rows: list[dict], data_mb: float) -> bool:
    merges = _merges(s, rows, layout.episode_data_path, data_mb)
    linear = s.next_linear("data")
    new_of: dict[str, int] = {}
    for group in merges:
        rel = layout.data_path(linear)
        writer = None
        try:
            for old in group:
                pf = pq.ParquetFile(s.root / old)
                if writer is None:
                    writer = pq.ParquetWriter(commit.path(rel), pf.schema_arrow, compression="snappy",
                                              use_dictionary=True)
                for i in range(pf.num_row_groups):  # one row group (episode) in memory at a time
                    writer.write_table(pf.read_row_group(i))
                new_of[old] = linear
        finally:
            if writer is not None:
                writer.close()
        commit.staged(rel)
        commit.delete(group)
        linear += 1
    for r in rows:
        if layout.episode_data_path(r) in new_of:
            r.update(layout.file_columns("data", new_of[layout.episode_data_path(r)]))
    return bool(merges)


def _compact_videos(commit: Commit, s: Store, rows: list[dict], key: str, video_mb: float) -> bool:
    used: dict[str, int] = {}
    for r in rows:
        rel = layout.episode_video_path(r, key)
        used[rel] = used.get(rel, 0) + r["length"]
    # a file none points into any more (curation dropped its episodes) is removed; a file with spans no episode
    # points into is reclaimed: its episodes' packets are copied without the rest (stream copy) when each is a
    # closed run (a dropped episode's neighbours), else (a trimmed episode: its kept frames may need packets
    # outside them to decode) it stays as it is and is not merged
    idle = [rel for rel in s.manifest() if rel.startswith(f"videos/{key}/") and rel not in used]
    spans: dict[str, list[tuple[VideoProbe, list]]] = {}
    stay: set[str] = set()
    for rel, n in used.items():
        if probe(s.root / rel).frames != n:
            runs = _closed_runs(s.root / rel, [r for r in rows if layout.episode_video_path(r, key) == rel], key)
            if runs is None:
                stay.add(rel)
            else:
                spans[rel] = runs
    files = list(dict.fromkeys(layout.episode_video_path(r, key) for r in rows))
    size = (lambda f: sum(pk.size for _, pks in spans[f] for pk in pks) if f in spans
            else sizing.file_bytes(s.root / f))
    merges = [run for g in sizing.group(files, size, sizing.limit_bytes(video_mb)) for run in _runs(g, stay)
              if len(run) > 1 or (run and run[0] in spans)]
    commit.delete(idle)
    linear = s.next_linear(f"videos/{key}")
    for group in merges:
        rel = layout.video_path(key, linear)
        in_group = set(group)
        members = [r for r in rows if layout.episode_video_path(r, key) in in_group]
        copy = StreamCopy(commit.path(rel))
        for f in group:
            for sub, packets in spans.get(f, [(None, None)]):
                copy.add(s.root / f, sub, packets)
        copy.close()
        commit.staged(rel)
        # each episode's span comes from the new file's own packets, counted frame by frame
        pr = probe(commit.path(rel))
        i = 0
        for r in members:
            n = r["length"]
            start = pr.pts[i]
            end = pr.pts[i + n] if i + n < len(pr.pts) else pr.pts[-1] + pr.frame_ticks
            r.update(layout.file_columns(f"videos/{key}", linear))
            r[f"videos/{key}/from_timestamp"] = float(start * pr.time_base)
            r[f"videos/{key}/to_timestamp"] = float(end * pr.time_base)
            i += n
        commit.delete(group)
        linear += 1
    return bool(merges) or bool(idle)


def _closed_runs(path: Path, members: list[dict], key: str) -> list[tuple[VideoProbe, list]] | None:
    """Per episode of `path`, its packets (file order) and their probe, when each episode's packets are one
    run that starts at a keyframe and is followed by a keyframe or the file's end; else None."""
    packets: list = []
    pr = probe(path, packets=packets)
    tb = pr.time_base
    times = np.array([pk.pts for pk in packets], dtype=np.int64) * tb.numerator / tb.denominator
    out = []
    for r in members:
        a, b = r[f"videos/{key}/from_timestamp"], r[f"videos/{key}/to_timestamp"]
        idx = np.flatnonzero((times >= a - 1e-6) & (times < b - 1e-6))
        if len(idx) != r["length"] or not len(idx) or idx[-1] - idx[0] + 1 != len(idx):
            return None
        i0, i1 = int(idx[0]), int(idx[-1]) + 1
        if not packets[i0].is_keyframe or (i1 < len(packets) and not packets[i1].is_keyframe):
            return None
        run = packets[i0:i1]
        pts = sorted(pk.pts for pk in run)
        out.append((VideoProbe(len(run), tuple(pts), tb, pr.codec, pr.width, pr.height, pr.frame_ticks,
                               frozenset(pk.pts for pk in run if pk.is_keyframe),
                               min(pk.dts if pk.dts is not None else pk.pts for pk in run)), run))
    return out


def _runs(group: list[str], gaps: set[str]) -> list[list[str]]:
    """`group` split around the files in `gaps`."""
    out: list[list[str]] = [[]]
    for rel in group:
        if rel in gaps:
            out.append([])
        else:
            out[-1].append(rel)
    return out
