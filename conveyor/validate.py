"""Fast (no torch) and deep (lerobot's own loader) checks of a store, optionally against its source.

This module holds the fast checks; conveyor/lerobot_check.py starts the deep part as a child process, whose
lerobot loader is conveyor/lerobot_loader.py.

Fast: totals and lengths agree with the ledger; every episode's frames sit at exactly the right packet
timestamps; data rows and sampled frames equal the source; stats equal a recomputation.
Deep: additionally `LeRobotDataset(..., video_backend="pyav")` loads offline and returns the source's
values for sampled items of every checked episode.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from conveyor import layout, quantiles, stats as st
from conveyor.episodes import load_episodes
from conveyor.errors import ConveyorError
from conveyor.ledger import LedgerRecord
from conveyor.lerobot_check import run_lerobot_check
from conveyor.reports import ValidationReport
from conveyor.sessions import open_sources
from conveyor.shared_files import probe_span
from conveyor.source_v3 import V30Source
from conveyor.store import Store
from conveyor.tables import (episodes_table, numeric_stats, read_table, read_tasks, stacked_stats,
                             stats_from_row)
from conveyor.video import VideoProbe, camera_frames, decode_frames, probe

# what damaged media and tables raise; a check turns them into a FAIL line naming the file
MEDIA_ERRORS = (ConveyorError, av.error.FFmpegError, pa.ArrowException, OSError, ValueError, IndexError,
                KeyError, RuntimeError)

RENUMBERED = ("episode_index", "index", "task_index")




def _sample(n: int) -> list[int]:
    return sorted({0, n // 2, n - 1})


class _Checker:
    def __init__(self, store: Store, against: Path | None, report: ValidationReport):
        self.store, self.root, self.report = store, store.root, report
        self.info = store.info
        self.fps = int(self.info["fps"])
        self.features = self.info["features"]
        self.video_keys = [k for k, f in self.features.items() if f["dtype"] == "video"]
        # a v2.1 recording, a v3.0 dataset, or a folder of v3.0 sessions (each its own source in the ledger)
        self.sources = {str(s.root): s for s in open_sources(against)} if against else {}
        self.src = None
        self.renames: list[tuple[int, str, str]] = []  # (commit, old, new) of `retask --rename`
        self._probes: dict[str, VideoProbe] = {}
        self._times: dict[str, np.ndarray] = {}
        self._tables: dict[str, pa.Table] = {}
        self._open: dict[str, object] = {}  # rel -> open av container, reused across a file's episodes
        self.tasks = read_tasks(self.root / layout.TASKS)
        self.unreadable: dict[str, tuple[str, list[int]]] = {}  # data file -> (why, its episodes)

    def container(self, rel: str):
        if rel not in self._open:
            import av

            self._open[rel] = av.open(str(self.root / rel))
        return self._open[rel]

    def close(self) -> None:
        for c in self._open.values():
            c.close()
        self._open.clear()

    def probe(self, rel: str) -> VideoProbe:
        if rel not in self._probes:
            self._probes[rel] = probe(self.root / rel)
        return self._probes[rel]

    def table(self, rel: str) -> pa.Table:
        if rel not in self._tables:
            self._tables[rel] = read_table(self.root / rel)
        return self._tables[rel]

    def episode_rows(self, row: dict) -> pa.Table:
        t = self.table(layout.episode_data_path(row))
        return t.filter(pc.equal(t.column("episode_index"), row["episode_index"]))

    def video_rel(self, row: dict, key: str) -> str:
        return layout.episode_video_path(row, key)

    def segment(self, row: dict, key: str) -> tuple[int, ...]:
        """The episode's packets: pts whose time lies in [from, to) (bisected: files hold many episodes)."""
        rel = self.video_rel(row, key)
        pr = self.probe(rel)
        if rel not in self._times:  # exact int products, one correctly rounded division: = float(pts * tb)
            tb = pr.time_base
            self._times[rel] = np.asarray(pr.pts, dtype=np.int64) * tb.numerator / tb.denominator
        times = self._times[rel]
        a, b = row[f"videos/{key}/from_timestamp"], row[f"videos/{key}/to_timestamp"]
        lo, hi = np.searchsorted(times, [a - 1e-6, b - 1e-6], side="left")
        return pr.pts[int(lo):int(hi)]

    # -- per-episode checks -------------------------------------------------------------------------

    def data_rel(self, row: dict) -> str:
        return layout.episode_data_path(row)

    def readable_rows(self, row: dict) -> pa.Table | None:
        """The episode's data rows; None when its data file does not read (kept for `report_unreadable`,
        which names each such file once with its episodes, instead of one line per episode)."""
        rel = self.data_rel(row)
        if rel in self.unreadable:
            self.unreadable[rel][1].append(row["episode_index"])
            return None
        try:
            return self.episode_rows(row)
        except MEDIA_ERRORS as e:
            self.unreadable[rel] = (_why(e), [row["episode_index"]])
            return None

    def report_unreadable(self) -> None:
        from conveyor.scrub import format_episodes

        for rel, (why, eps) in self.unreadable.items():
            self.report.add(f"file {rel} readable", False, f"episodes {format_episodes(eps)}: {why}")

    def check_episode(self, row: dict, ledger_rec: LedgerRecord | None) -> None:
        """Per-episode checks; a damaged file fails the episode's check naming camera and file, never raises."""
        ep = row["episode_index"]
        data = self.readable_rows(row)
        if data is None:
            return
        try:
            self._check_episode(row, ledger_rec, data)
        except _Damaged as e:
            self.report.add(f"episode {ep}: {e.what} decodes", False, e.detail)

    def media(self, row: dict, key: str, fn, *args):
        """Run `fn(*args)` on one camera's file; a decode failure becomes `_Damaged` naming camera and file."""
        try:
            return fn(*args)
        except MEDIA_ERRORS as e:
            raise _Damaged(f"camera {key}", f"episode {row['episode_index']}, camera {key}, file "
                                            f"{self.video_rel(row, key)}: {_why(e)}") from None

    def _check_episode(self, row: dict, ledger_rec: LedgerRecord | None, data: pa.Table) -> None:
        ep, n = row["episode_index"], row["length"]
        add = self.report.add
        ok = data.num_rows == n
        if ok:
            idx = data.column("index").to_numpy()
            fi = data.column("frame_index").to_numpy()
            ok = (np.array_equal(idx, np.arange(row["dataset_from_index"], row["dataset_to_index"]))
                  and np.array_equal(fi, np.arange(n)))
        add(f"episode {ep}: data rows", ok, f"{data.num_rows} rows for length {n}")
        if ledger_rec is not None:
            add(f"episode {ep}: ledger length", ledger_rec.length == n, f"ledger {ledger_rec.length} vs store {n}")
        for key in self.video_keys:
            pr = self.media(row, key, self.probe, self.video_rel(row, key))
            seg = self.segment(row, key)
            t0 = row[f"videos/{key}/from_timestamp"]
            times = np.array([float(p * pr.time_base) for p in seg])
            expect = t0 + np.arange(n) / self.fps
            ok = len(seg) == n and np.allclose(times, expect, atol=1e-4, rtol=0)
            add(f"episode {ep}: {key} frames", ok, f"{len(seg)} frames in [{t0:.6f}, "
                f"{row[f'videos/{key}/to_timestamp']:.6f}) for length {n}")
            self.report.frames_compared += len(seg)
        # stats equal a recomputation from the stored rows and frames
        recomputed = numeric_stats(data, self.features)
        for key, ft in self.features.items():
            if ft["dtype"] == "video":
                seg = self.segment(row, key)
                rel = self.video_rel(row, key)
                frames = self.media(row, key, lambda: camera_frames(
                    self.root / rel, self.probe(rel), seg, st.CAMERA_SAMPLES, self.container(rel))) if seg else None
                if seg and not frames:
                    raise _Damaged(f"camera {key}", f"episode {ep}, camera {key}, file {rel}: no keyframe in the "
                                                    "episode's packets (damaged or re-muxed file)")
                recomputed[key] = st.image_stats(frames) if seg else {}
            elif ft["dtype"] == "image":
                recomputed[key] = st.image_stats(st.png_frames(data.column(key).to_pylist()))
        bad = st.equal(recomputed, stats_from_row(self.features, row), rtol=1e-6, atol=1e-6)
        add(f"episode {ep}: stats", not bad, ", ".join(bad[:5]))
        self.src = self.sources.get(ledger_rec.source) if ledger_rec is not None else None
        if self.src is not None:
            self.against_source(row, data, ledger_rec)

    def against_source(self, row: dict, data: pa.Table, rec: LedgerRecord) -> None:
        """Rows and frames equal the source episode's (a trimmed one's: source rows start..start+length-1, its
        timestamps counted from 0; a re-tasked or renamed one's task text as curation set it)."""
        ep, add, src_ep = row["episode_index"], self.report.add, rec.source_episode_index
        span = self.src.episode(src_ep) if isinstance(self.src, V30Source) else None  # rows/spans in shared files
        if isinstance(self.src, V30Source) and span is None:
            add(f"episode {ep}: source episode {src_ep} readable", False, f"{self.src.root}: not complete")
            return
        src_path = span.parquet if span else self.src.parquet_path(src_ep)
        src_table = self.src.read_rows(span) if span else read_table(src_path)
        trimmed = rec.start or src_table.num_rows != rec.length
        src_table = src_table.slice(rec.start, rec.length)
        diffs = []
        for f in data.schema:
            if f.name in RENUMBERED or (trimmed and f.name == "frame_index"):
                continue
            if trimmed and f.name == "timestamp":
                ts = src_table.column(f.name).to_numpy().astype(np.float64)
                if not np.allclose(data.column(f.name).to_numpy(), ts - ts[0], atol=1e-5, rtol=0):
                    diffs.append(f.name)
                continue
            a = data.column(f.name).to_pylist()
            b = src_table.column(f.name).to_pylist()
            if f.name == "timestamp" or self.features[f.name]["dtype"].startswith("float"):
                same = np.array_equal(np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32))
            else:
                same = a == b
            if not same:
                diffs.append(f.name)
        src_tasks = self.src.tasks()
        want = [src_tasks.get(int(i), "") for i in src_table.column("task_index").to_pylist()]
        for commit, old, new in self.renames:  # `conveyor retask --rename` after this episode came in
            if commit > rec.commit:
                want = [new if w == old else w for w in want]
        if rec.task is not None:
            want = [rec.task] * len(want)
        got = [self.tasks[i] for i in data.column("task_index").to_pylist()]
        if [w for w in want if w.strip()] and [g for g, w in zip(got, want) if w.strip()] != [w for w in want if w.strip()]:
            diffs.append("task text")
        add(f"episode {ep}: rows equal source episode {src_ep}", not diffs, ", ".join(diffs) or str(src_path))
        for key in self.video_keys:
            src_video = span.videos[key] if span else self.src.video_path(src_ep, key)
            sp = probe_span(src_video, span.spans[key], self.fps)[0] if span else probe(src_video)
            seg = self.segment(row, key)
            picks = _sample(row["length"])
            if len(seg) != row["length"] or sp.frames < rec.start + row["length"]:
                add(f"episode {ep}: {key} frames comparable with source", False,
                    f"store segment has {len(seg)} frames, source {sp.frames}, length {row['length']}")
                continue
            pr = self.probe(self.video_rel(row, key))
            a = self.media(row, key, decode_frames, self.root / self.video_rel(row, key),
                           [float(seg[j] * pr.time_base) for j in picks])
            b = decode_frames(src_video, [float(sp.pts[rec.start + j] * sp.time_base) for j in picks])
            same = all(np.array_equal(x, y) for x, y in zip(a, b))
            add(f"episode {ep}: {key} frames {picks} pixel-identical to source", same, str(src_video))
            self.report.pixel_identical += len(picks) if same else 0

    # -- whole-store checks ---------------------------------------------------------------------------

    def check_store(self, rows: list[dict], ledger: list[LedgerRecord], table: pa.Table, every_row: bool = True
                    ) -> None:
        """Whole-store consistency from metadata only (no pixels, no data rows): cheap at any size."""
        add, info = self.report.add, self.info
        n_eps, n_frames = info["total_episodes"], info["total_frames"]
        add("episode indices contiguous", [r["episode_index"] for r in rows] == list(range(len(rows))),
            f"{len(rows)} metadata rows")
        add("totals match metadata", n_eps == len(rows) and n_frames == sum(r["length"] for r in rows),
            f"info: {n_eps} episodes / {n_frames} frames")
        add("totals match ledger", n_eps == len(ledger) and n_frames == sum(r.length for r in ledger),
            f"ledger: {len(ledger)} episodes")
        add("splits", info.get("splits") == {"train": f"0:{n_eps}"}, json.dumps(info.get("splits")))
        frame, ok = 0, True
        for r in rows:
            ok &= r["dataset_from_index"] == frame and r["dataset_to_index"] == frame + r["length"]
            frame = r["dataset_to_index"]
        add("frame ranges contiguous", ok)
        missing = [rel for rel, e in self.store.manifest().items()
                   if not (self.root / rel).exists() or (self.root / rel).stat().st_size != e.size]
        add("committed files present", not missing, ", ".join(missing[:5]))
        referenced = {layout.episode_data_path(r) for r in rows}
        referenced |= {self.video_rel(r, k) for r in rows for k in self.video_keys}
        on_disk = {p.relative_to(self.root).as_posix() for d in ("data", "videos")
                   for p in (self.root / d).rglob("*") if p.is_file()} if rows else set()
        # a committed video file no episode points into any more (its episodes dropped) waits for compaction
        idle = {rel for rel in self.store.manifest() if rel.startswith("videos/")}
        orphans = on_disk - referenced - idle - set(self.store.retained())  # retained for older readers
        add("no orphan or missing data/video files", not orphans and referenced <= on_disk,
            f"orphans {sorted(orphans)[:3]}, missing {sorted(referenced - on_disk)[:3]}")
        stats_path = self.root / layout.STATS
        if rows and self.unreadable:  # named once above, with its episodes
            add("stats.json equals a recomputation (exact quantiles)", False,
                f"not recomputed: {', '.join(sorted(self.unreadable))} does not read")
        elif rows:
            # min/max/mean/std: the episodes' aggregate; numeric q01..q99: exact over every row (quantiles.py)
            want = quantiles.recomputed_stats(self.store, self.features, stacked_stats(self.features, table), rows,
                                              every_row=every_row)
            stored = st.from_json(json.loads(stats_path.read_text()))
            bad = st.equal(want, stored, rtol=1e-6, atol=1e-6)
            add("stats.json equals a recomputation (exact quantiles)", not bad, ", ".join(bad[:5]))


def _run(store: str | Path, against, episodes, deep: bool) -> ValidationReport:
    t0 = time.monotonic()
    s = Store.open(store)
    report = ValidationReport(store=str(s.root), deep=deep, version=s.version)
    if not (s.root / layout.INFO).exists():
        report.add("store has committed data", False, "no meta/info.json (empty store)")
        return report
    try:
        _check_hashes(s, report, episodes)
        chk = _Checker(s, Path(against).resolve() if against else None, report)
        table = episodes_table(s.root)
        # the whole-store checks need no stats columns: only the checked episodes' rows are read in full
        rows = table.select([c for c in table.column_names if not c.startswith("stats/")]).to_pylist()
        state = s.ledger_state()
        ledger = state.records
        chk.renames = [(c.commit, c.detail["old"], c.detail["new"]) for c in state.curations if c.action == "rename"]
        by_ep = {r.episode_index: r for r in ledger}
        todo = list(range(len(rows))) if episodes is None else [e for e in episodes if 0 <= e < len(rows)]
        report.episodes_checked = todo
        try:
            for e, row in zip(todo, table.take(todo).to_pylist() if todo else []):
                chk.check_episode(row, by_ep.get(e))
            chk.report_unreadable()
        finally:
            chk.close()
        chk.check_store(rows, ledger, table, every_row=episodes is None)  # after: it skips unreadable files
    except MEDIA_ERRORS as e:  # a damaged store fails a check, naming the file; it never ends in a traceback
        where = f"{e.path}: {e.problem}" if isinstance(e, ConveyorError) else _why(e)
        report.add("store readable", False, where)
        report.seconds = time.monotonic() - t0
        return report
    if deep:
        run_lerobot_check(s.root, todo, report)
    report.seconds = time.monotonic() - t0
    return report


def _check_hashes(s: Store, report: ValidationReport, episodes: list[int] | None) -> None:
    """The checked episodes' data, video and metadata files, plus info/stats/tasks, hash as committed:
    the only check that sees bytes damaged where no sampled frame is decoded."""
    from conveyor.scrub import attribute, verify_files

    rels = None  # every committed file
    if episodes is not None:
        try:
            rows = load_episodes(s.root)
            keys = [k for k, f in s.info["features"].items() if f["dtype"] == "video"]
            rels = set(layout.META_FILES) | {p for p in s.manifest() if p.startswith(("meta/episodes/",
                                                                                  quantiles.VALUES_DIR))}
            for r in (rows[e] for e in episodes if 0 <= e < len(rows)):
                rels.add(layout.episode_data_path(r))
                rels |= {layout.episode_video_path(r, k) for k in keys}
            rels = sorted(rels)
        except MEDIA_ERRORS:
            rels = None  # unreadable metadata: check everything
    problems, files, _, _ = verify_files(s, rels if rels is not None else sorted(s.manifest()))
    for d in attribute(s, problems):
        report.add(f"file {d.path} intact", False, f"{d.problem}: {d.holds()}" + (f"; {d.detail}" if d.detail else ""))
    report.add("committed files hash as recorded", not problems, f"{len(problems)} of {files} damaged or missing")


def validate_fast(store: str | Path, *, against: str | Path | None = None,
                  episodes: list[int] | None = None) -> ValidationReport:
    return _run(store, against, episodes, deep=False)


def validate_deep(store: str | Path, *, against: str | Path | None = None,
                  episodes: list[int] | None = None) -> ValidationReport:
    return _run(store, against, episodes, deep=True)


class _Damaged(Exception):
    def __init__(self, what: str, detail: str):
        self.what, self.detail = what, detail


def _why(e: BaseException) -> str:
    """One line: a ConveyorError's problem (its path is named by the caller), else type and message."""
    if isinstance(e, ConveyorError):
        return e.problem
    return f"{type(e).__name__}: {e}".splitlines()[0]
