"""`conveyor salvage SESSION OUT`: write a killed session's recoverable episodes (`salvage.read_session`) as a
new lerobot v3.0 dataset folder.

The episodes are renumbered 0..n-1 in session order (lerobot wants them contiguous; the report maps each
session episode to its new number); rows are the session's rows with episode_index and index renumbered,
videos are stream-copied packets (never re-encoded) laid back to back with each episode's span read from the
written timestamps, the task table is the session's own file (task_index unchanged, Chinese included), the
metadata rows and stats are rebuilt (conveyor's per-episode stats: exact numeric quantiles, camera stats from
three keyframes). OUT is built in a hidden sibling folder and renamed into place, so it is either absent or
whole; the session is only read.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conveyor import layout, sizing
from conveyor import stats as st
from conveyor.errors import ConveyorError
from conveyor.salvage import Episode, Session, read_session
from conveyor.tables import data_schema, episodes_schema, int64_array, numeric_stats, stats_columns


@dataclass
class SalvageReport:
    session: Path
    out: Path
    recovered: list[tuple[int, int, int]] = field(default_factory=list)  # (session episode, OUT episode, frames)
    quarantined: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{self.out}: {len(self.recovered)} episodes recovered "
               f"({sum(n for *_, n in self.recovered)} frames), {len(self.quarantined)} quarantined"]
        out += [f"  episode {a} -> {b} ({n} frames)" for a, b, n in self.recovered]
        out += [f"  quarantined episode {i}: {why}" for i, why in sorted(self.quarantined.items())]
        out += [f"  note: {n}" for n in self.notes]
        return out


def salvage(session: str | Path, out: str | Path, data_mb: float = sizing.DATA_MB,
            video_mb: float = sizing.VIDEO_MB) -> SalvageReport:
    session, out = Path(session).resolve(), Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConveyorError(out, "exists and is not empty: salvage writes a new dataset folder")
    if out == session or session in out.parents:
        raise ConveyorError(out, f"is inside the session {session}: the session is never written to")
    s = read_session(session)
    report = SalvageReport(session, out, quarantined=dict(s.quarantined), notes=list(s.notes))
    if s.finalized:
        report.notes.append("the session was finalized (every file closed): nothing was missing, OUT is a copy")
    if not s.episodes:
        raise ConveyorError(session, "no episode is recoverable: "
                            + "; ".join(f"{i}: {w}" for i, w in sorted(s.quarantined.items())))
    part = out.parent / f".{out.name}.salvage-{os.getpid()}"
    shutil.rmtree(part, ignore_errors=True)
    try:
        _write(s, part, data_mb, video_mb)
        if out.exists():
            out.rmdir()
        os.replace(part, out)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    report.recovered = [(e.index, new, e.rows.num_rows) for new, e in enumerate(s.episodes)]
    return report


def _renumbered(e: Episode, new: int, first: int) -> pa.Table:
    n = e.rows.num_rows
    t = e.rows
    t = t.set_column(t.schema.get_field_index("episode_index"), "episode_index", int64_array(np.full(n, new)))
    return t.set_column(t.schema.get_field_index("index"), "index", int64_array(first + np.arange(n)))


def _write(s: Session, root: Path, data_mb: float, video_mb: float) -> None:
    features = s.info["features"]
    (root / "meta").mkdir(parents=True)
    rows: list[dict] = []
    first = 0
    for new, e in enumerate(s.episodes):
        task_ids = list(dict.fromkeys(e.rows.column("task_index").to_pylist()))
        rows.append({"episode_index": new, "tasks": [s.tasks[t] for t in task_ids], "length": e.rows.num_rows,
                     "dataset_from_index": first, "dataset_to_index": first + e.rows.num_rows,
                     "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
        first += e.rows.num_rows
    ep_stats = [numeric_stats(e.rows, features) for e in s.episodes]

    schema = data_schema(features)
    groups = sizing.group(range(len(s.episodes)), lambda i: s.episodes[i].rows.nbytes, sizing.limit_bytes(data_mb))
    for linear, group in enumerate(groups):
        path = root / layout.data_path(linear)
        path.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(path, schema, compression="snappy", use_dictionary=True) as w:
            for i in group:
                w.write_table(_renumbered(s.episodes[i], i, rows[i]["dataset_from_index"]).cast(schema))
                rows[i].update(layout.file_columns("data", linear))

    for key in s.video_keys:
        groups = sizing.group(range(len(s.episodes)), lambda i: s.episodes[i].videos[key].nbytes,
                              sizing.limit_bytes(video_mb))
        for linear, group in enumerate(groups):
            path = root / layout.video_path(key, linear)
            path.parent.mkdir(parents=True, exist_ok=True)
            spans = _copy(s, key, group, path)
            _camera_stats(path, key, [s.episodes[i].rows.num_rows for i in group], [ep_stats[i] for i in group])
            for i, (a, b) in zip(group, spans):
                rows[i] |= layout.file_columns(f"videos/{key}", linear) | {
                    f"videos/{key}/from_timestamp": a, f"videos/{key}/to_timestamp": b}

    for r, one in zip(rows, ep_stats):
        r.update(stats_columns(features, one))
    path = root / layout.episodes_path(0)
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=episodes_schema(features)), path, compression="snappy")
    shutil.copyfile(s.root / layout.TASKS, root / layout.TASKS)
    (root / layout.STATS).write_text(json.dumps(st.to_json(st.aggregate(ep_stats)), indent=4))
    info = dict(s.info)
    info.update(total_episodes=len(rows), total_frames=first, total_tasks=len(s.tasks),
                splits={"train": f"0:{len(rows)}"})
    (root / layout.INFO).write_text(json.dumps(info, indent=4, ensure_ascii=False), encoding="utf-8")


def _copy(s: Session, key: str, group: list[int], out: Path) -> list[tuple[float, float]]:
    """Stream-copy each episode's packets (found by pts in its file, read once front to back) into `out`."""
    import av

    from conveyor.video import StreamCopy

    copy = StreamCopy(out)
    opened: dict[Path, tuple] = {}
    try:
        for i in group:
            seg = s.episodes[i].videos[key]
            if seg.path not in opened:
                c = av.open(str(seg.path))
                opened[seg.path] = (c, c.demux(c.streams.video[0]))
            want, packets = set(seg.pts), []
            for pk in opened[seg.path][1]:
                if pk.size and pk.pts in want:
                    packets.append(pk)
                    if len(packets) == len(want):
                        break
            if len(packets) != len(want):
                raise ConveyorError(seg.path, f"episode {s.episodes[i].index}: {len(packets)} of its "
                                              f"{len(want)} packets could be read")
            copy.add(seg.path, seg.probe, packets)
        return copy.close()
    finally:
        copy.abort()
        for c, _ in opened.values():
            c.close()


def _camera_stats(path: Path, key: str, lengths: list[int], stats: list[dict]) -> None:
    """Each episode's camera stats from the keyframes conveyor samples, decoded from the written file."""
    from conveyor.video import probe, sample_keyframes

    pr = probe(path)
    off = 0
    for n, one in zip(lengths, stats):
        one[key] = st.image_stats(sample_keyframes(path, pr, pr.pts[off:off + n], st.CAMERA_SAMPLES))
        off += n
