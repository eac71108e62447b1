"""Append complete v2.1 or v3.0 source episodes to a v3.0 store, one atomic commit per batch.

Cost is O(new episodes): each commit writes new data/video/meta files (stream-copied videos, renumbered
parquet rows) and rewrites only the small metadata files; `compact` merges small files later.
No torch, no lerobot: pyarrow + PyAV only.

`ingest` reads top-down like lerobot's own converter: plan from the ledger, write data, write videos, write
episode metadata, write info/stats/tasks and the ledger, commit (through `Store.transaction`).
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from conveyor import layout, quantiles, sizing, stats as st
from conveyor.episodes import write_episodes
from conveyor.errors import ConveyorError
from conveyor.ledger import LedgerRecord
from conveyor.duplicates import known_duplicates, record_duplicates
from conveyor.ingest_writers import DataWriter, VideoWriter, new_info, write_meta
from conveyor.quarantine import record_quarantine
from conveyor.prepare import PacketCap, Prepared, load_ahead, prepare_episode
from conveyor.reports import Duplicate, EpisodeMapping, IngestReport, Quarantined
from conveyor.source import SourceEpisode, V21Source
from conveyor.sessions import is_session_folder, open_source, session_paths
from conveyor.source_v3 import V30Source
from conveyor.store import Commit, Store, is_store
from conveyor.tables import data_schema, read_tasks, stats_columns

Progress = Callable[[int, int, str], None]


# -- entry points --------------------------------------------------------------------------------------

def ingest(source: str | Path | V21Source | V30Source, store: str | Path, *, task: str | None = None,
           data_mb: float = sizing.DATA_MB, video_mb: float = sizing.VIDEO_MB, lock_timeout: float | None = 60.0,
           progress: Progress | None = None, max_episodes: int | None = None,
           allow_duplicates: bool = False) -> IngestReport:
    """Append every complete source episode not yet in the store (creating it if missing). `source`: a v2.1
    or v3.0 dataset folder, or a folder of v3.0 session datasets (each session its own source and commit).
    An episode whose content the store already holds (another path: a copied recording) is reported in
    `duplicates`, not added, unless `allow_duplicates`."""
    if not isinstance(source, (V21Source, V30Source)) and is_session_folder(source):
        return ingest_sessions(source, store, task=task, data_mb=data_mb, video_mb=video_mb,
                               lock_timeout=lock_timeout, progress=progress, allow_duplicates=allow_duplicates)
    t0 = time.monotonic()
    src = source if isinstance(source, (V21Source, V30Source)) else open_source(source)
    store_root = Path(store).resolve()
    if store_root == src.root or src.root in store_root.parents:
        raise ConveyorError(store_root, "store must not be inside the source folder")
    created = not is_store(store_root)
    if created and store_root.exists() and any(store_root.iterdir()):
        raise ConveyorError(store_root, "exists and is not a conveyor store; refusing to write into it")
    try:
        s = Store.open(store_root, create=True)
        with s.lock(timeout=lock_timeout):
            report, duplicates = _ingest_locked(src, s, task, data_mb, video_mb, progress, max_episodes,
                                                allow_duplicates)
            record_quarantine(s.root, report.source, [(q.source_episode_index, q.reason)
                                                      for q in report.quarantined])
            record_duplicates(s.root, report.source, duplicates)
    except BaseException:
        if created and not Store(store_root).version.commit:
            shutil.rmtree(store_root, ignore_errors=True)  # leave nothing behind for a failed first ingest
        raise
    report.seconds = time.monotonic() - t0
    return report


def ingest_sessions(folder: str | Path, store: str | Path, **kw) -> IngestReport:
    """Each session dataset of `folder`, in name order, appended as its own source (one commit each, O(that
    session)); one report for all of them (`source` is the folder)."""
    from conveyor.pending import nothing_new

    t0 = time.monotonic()
    total: IngestReport | None = None
    for path in session_paths(folder):
        r = nothing_new(path, store) or ingest(path, store, **kw)  # stat calls for a session already landed
        if total is None:
            total = r
            total.source = str(Path(folder).resolve())
            continue
        total.added += r.added
        total.quarantined += r.quarantined
        total.changed += r.changed
        total.incomplete += r.incomplete
        total.already += r.already
        total.duplicates += r.duplicates
        total.version = r.version
    total.seconds = time.monotonic() - t0
    return total


def convert(source: str | Path | V21Source | V30Source, dst: str | Path, *, task: str | None = None, data_mb: float = sizing.DATA_MB,
            video_mb: float = sizing.VIDEO_MB, overwrite: bool = False, progress: Progress | None = None,
            allow_duplicates: bool = False) -> IngestReport:
    """One-shot conversion into a fresh store, built beside `dst` and renamed into place at the end."""
    dst = Path(dst).resolve()
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ConveyorError(dst, "destination exists; pass --overwrite to replace it")
    tmp = dst.with_name(f".{dst.name}.converting-{uuid.uuid4().hex[:8]}")
    try:
        report = ingest(source, tmp, task=task, data_mb=data_mb, video_mb=video_mb, progress=progress,
                        allow_duplicates=allow_duplicates)
        if not report.added:
            raise ConveyorError(Path(report.source), "no complete episodes to convert"
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


def _ingest_locked(src: V21Source, s: Store, task, data_mb, video_mb, progress, max_episodes,
                   allow_duplicates: bool = False) -> tuple[IngestReport, list]:
    """The phases, in order; the transaction commits them as one version, or leaves the store untouched.
    Also returns the duplicates to record (`conveyor.duplicates`)."""
    plan = plan_from_ledger(src, s, task, data_mb, video_mb, max_episodes, allow_duplicates=allow_duplicates)
    if not plan.ready:
        return plan.report, plan.duplicates
    with s.transaction("append") as tx, VideoWriter(tx, s, plan) as video:
        batch = write_data(tx, s, plan, progress, video)
        if not batch.episodes:
            tx.cancel()
            return plan.report, plan.duplicates
        videos = write_videos(plan, video, progress)
        rows = write_episode_metadata(tx, s, plan, batch, videos)
        write_info_stats_tasks_ledger(tx, s, plan, batch, rows)
        video.staged()
    return added_report(plan, batch, rows, tx.version), plan.duplicates


# -- phases --------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """What this ingest appends, decided from the ledger and a scan of the source before writing anything."""

    src: V21Source
    info: dict  # the store's info.json (or a new one)
    task: str | None
    ready: list[SourceEpisode]
    report: IngestReport
    allow_duplicates: bool = False
    seen: dict[str, tuple[int, str, int]] = field(default_factory=dict)  # content hash -> (store ep, source, ep)
    duplicates: list[tuple[Duplicate, dict]] = field(default_factory=list)  # with each one's file fingerprint

    def duplicate(self, ep: int, content_hash: str, files: dict) -> bool:
        """Whether the store (or this batch) already holds this content: then it is reported, not added."""
        hit = None if self.allow_duplicates else self.seen.get(content_hash)
        if hit is None:
            return False
        d = Duplicate(self.report.source, ep, content_hash, *hit)
        self.report.duplicates.append(d)
        self.duplicates.append((d, files))
        return True

    @property
    def features(self) -> dict:
        return self.info["features"]

    @property
    def video_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f["dtype"] == "video"]


@dataclass
class Batch:
    """The episodes written so far, and the task table they extend."""

    episode_start: int
    frame_start: int
    tasks: list[str]
    episodes: list[Prepared] = field(default_factory=list)
    data_files: list[int] = field(default_factory=list)  # file number per episode
    values: list = field(default_factory=list)  # (D, n) numeric values per episode, for exact quantiles

    @property
    def frames(self) -> int:
        return self.frame_start + sum(p.length for p in self.episodes)


def plan_from_ledger(src: V21Source, s: Store, task, data_mb, video_mb, max_episodes, *,
                     allow_duplicates: bool = False) -> Plan:
    """The complete source episodes not in the ledger, plus what to report: changed, bad, still recording,
    already in the store through another path (recorded duplicates whose files are unchanged: no hashing)."""
    info = s.info or new_info(src, data_mb, video_mb)
    if s.info:
        src.check_compatible(info, s.root)
    source_key = str(src.root)
    state = s.ledger_state()
    mine = {r.source_episode_index: r for r in state.records if r.source == source_key}
    dropped = {ep for k, ep in state.dropped if k == source_key}  # curated out: never re-added until undropped
    report = IngestReport(source=source_key, store=str(s.root), version=s.version, already=len(mine))
    # a source episode that changed after ingest is reported, never re-added
    report.changed = [_quarantined(src, ep, f"content changed after it was ingested as store episode "
                                            f"{r.episode_index}")
                      for ep, r in sorted(mine.items()) if src.changed_since(ep, r.files, r.content_hash)]
    # content the store holds, or held until a curation dropped it (store episode -1): not added again
    seen = {r.content_hash: (-1, r.source, r.source_episode_index) for r in state.dropped.values()}
    seen |= {r.content_hash: (r.episode_index, r.source, r.source_episode_index) for r in state.records}
    known = {} if allow_duplicates else known_duplicates(s.root, source_key, set(seen))
    known = {ep: d for ep, d in known.items() if ep not in mine and _fingerprint(src, ep) == d[1]}
    report.duplicates = [d for d, _ in known.values()]
    ready, scan = src.scan(skip=set(mine) | dropped | set(known), probe_videos=False)
    src.check_declared_cameras(ready)
    report.incomplete = scan.incomplete
    report.quarantined = [_quarantined(src, ep, reason) for ep, reason in sorted(scan.bad.items())]
    return Plan(src, info, task, ready[:max_episodes] if max_episodes is not None else ready, report,
                allow_duplicates, seen, list(known.values()))


def _fingerprint(src, ep: int) -> dict | None:
    try:
        return src.fingerprint(ep)
    except (OSError, KeyError, IndexError):
        return None


def write_data(tx: Commit, s: Store, plan: Plan, progress: Progress | None, video: VideoWriter) -> Batch:
    """Load, renumber and write each episode's rows (bad ones are quarantined, the rest still land); each
    landed episode's videos are handed to `video`, which copies them while the next episodes load."""
    src, info, ready = plan.src, plan.info, plan.ready
    tasks = read_tasks(s.root / layout.TASKS)
    batch = Batch(int(info["total_episodes"]), int(info["total_frames"]), tasks)
    task_ids = {t: i for i, t in enumerate(tasks)}
    src_tasks = src.tasks()
    schema = data_schema(plan.features)
    data = DataWriter(tx, s.next_linear("data"), schema, info["data_files_size_in_mb"])
    frame = batch.frame_start
    for i, (ep, loaded) in enumerate(load_ahead(src, ready, PacketCap())):
        if progress:
            progress(i, len(ready), f"episode {ep.index}")
        try:
            lo = loaded()
            if plan.duplicate(ep.index, lo.content_hash, lo.fingerprint):
                continue
            p = prepare_episode(src, ep, lo, batch.episode_start + len(batch.episodes), frame, task_ids,
                                tasks, src_tasks, plan.task, schema)
        except ConveyorError as e:
            plan.report.quarantined.append(_quarantined(src, ep.index, str(e)))
            continue
        plan.seen.setdefault(p.content_hash, (batch.episode_start + len(batch.episodes), plan.report.source,
                                              ep.index))
        batch.data_files.append(data.write(p.table))
        batch.values.append(quantiles.table_values(plan.features, p.table))
        p.table = None
        batch.episodes.append(p)
        video.add(p)
        frame += p.length
    data.close()
    return batch


def write_videos(plan: Plan, video: VideoWriter, progress: Progress | None
                 ) -> dict[str, list[tuple[int, float, float]]]:
    """Per camera: (file number, from, to) of each episode, once the last copies are done."""
    if progress:
        progress(len(plan.ready), len(plan.ready), "writing videos")
    return video.finish()


def write_episode_metadata(tx: Commit, s: Store, plan: Plan, batch: Batch,
                           videos: dict[str, list[tuple[int, float, float]]]) -> list[dict]:
    """One meta/episodes row per new episode, staged in new metadata files."""
    rows, frame = [], batch.frame_start
    for i, p in enumerate(batch.episodes):
        row = {"episode_index": batch.episode_start + i, "tasks": p.tasks, "length": p.length,
               **layout.file_columns("data", batch.data_files[i]),
               "dataset_from_index": frame, "dataset_to_index": frame + p.length}
        for k in plan.video_keys:
            linear, a, b = videos[k][i]
            row |= layout.file_columns(f"videos/{k}", linear)
            row |= {f"videos/{k}/from_timestamp": a, f"videos/{k}/to_timestamp": b}
        row |= stats_columns(plan.features, p.stats)
        rows.append(row)
        frame += p.length
    write_episodes(tx, s.next_linear("meta"), rows, plan.features, plan.info["data_files_size_in_mb"])
    return rows


def write_info_stats_tasks_ledger(tx: Commit, s: Store, plan: Plan, batch: Batch, rows: list[dict]) -> None:
    """Rewrite the three small metadata files and record the new episodes in the ledger."""
    episodes, frames = batch.episode_start + len(batch.episodes), batch.frames
    info = dict(plan.info, total_episodes=episodes, total_frames=frames, total_tasks=len(batch.tasks),
                splits={"train": f"0:{episodes}"})
    agg = st.aggregate(([_load_stats(s)] if batch.episode_start else []) + [p.stats for p in batch.episodes])
    agg = quantiles.appended_stats(tx, plan.features, agg, batch.values, batch.frame_start)  # exact q01..q99
    write_meta(tx, info, batch.tasks, agg)
    tx.record([LedgerRecord(source=plan.report.source, source_episode_index=p.src.index,
                            content_hash=p.content_hash, files=p.fingerprint, episode_index=row["episode_index"],
                            length=row["length"]) for p, row in zip(batch.episodes, rows)])
    tx.set_totals(episodes, frames)


def added_report(plan: Plan, batch: Batch, rows: list[dict], version) -> IngestReport:
    report = plan.report
    report.version = version
    for p, row in zip(batch.episodes, rows):
        report.added.append(EpisodeMapping(
            source=report.source, source_episode_index=p.src.index, episode_index=row["episode_index"],
            length=row["length"], duration_s=row["length"] / plan.src.fps, tasks=p.tasks,
            content_hash=p.content_hash, videos={k: layout.episode_video_path(row, k) for k in plan.video_keys}))
    return report


def _quarantined(src: V21Source, ep: int, reason: str) -> Quarantined:
    return Quarantined(source=str(src.root), source_episode_index=ep, reason=reason)


def _load_stats(store: Store) -> dict:
    p = store.root / layout.STATS
    return st.from_json(json.loads(p.read_text())) if p.exists() else {}
