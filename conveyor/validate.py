"""Fast (no torch) and deep (lerobot's own loader) checks of a store, optionally against its source.

Fast: totals and lengths agree with the ledger; every episode's frames sit at exactly the right packet
timestamps; data rows and sampled frames equal the source; stats equal a recomputation.
Deep: additionally `LeRobotDataset(..., video_backend="pyav")` loads offline and returns the source's
values for sampled items of every checked episode.
"""
from __future__ import annotations

from dataclasses import asdict
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from conveyor import layout, quantiles, stats as st
from conveyor.episodes import load_episodes
from conveyor.errors import ConveyorError
from conveyor.ledger import LedgerRecord
from conveyor.reports import ValidationReport
from conveyor.source import V21Source
from conveyor.store import Store
from conveyor.tables import numeric_stats, read_tasks, stats_from_row
from conveyor.video import VideoProbe, camera_frames, decode_frames, probe

# what damaged media and tables raise; a check turns them into a FAIL line naming the file
MEDIA_ERRORS = (ConveyorError, av.error.FFmpegError, pa.ArrowException, OSError, ValueError, IndexError,
                KeyError, RuntimeError)

RENUMBERED = ("episode_index", "index", "task_index")


def _read(path) -> pa.Table:
    """`pq.ParquetFile(...).read()`: same table as `pq.read_table` without importing pandas (0.4 s)."""
    return pq.ParquetFile(path).read()


def episodes_table(root: Path) -> pa.Table:
    """Every meta/episodes row, sorted by episode_index, as one arrow table."""
    tables = [_read(f) for f in sorted((root / "meta" / "episodes").glob("*/*.parquet"))]
    if not tables:
        return pa.table({"episode_index": pa.array([], pa.int64())})
    return pa.concat_tables(tables).sort_by("episode_index")


def _stacked(col: pa.ChunkedArray) -> np.ndarray:
    """(n, *shape) numpy array of a list column whose rows all have one shape (the stats columns)."""
        self.renames: list[tuple[int, str, str]] = []  # (commit, old, new) of `retask --rename`
    arr = col.combine_chunks()
    n = len(arr)
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        arr = arr.flatten()
    flat = arr.to_numpy(zero_copy_only=False)
    shape = np.asarray(col[0].as_py()).shape if n else ()
    return flat.reshape((n, *shape))


def stacked_stats(features: dict, table: pa.Table) -> dict[str, st.Stats]:
    """The whole store's stats aggregated from the metadata columns (vectorised `st.aggregate`)."""
    return {k: st.aggregate_stacked({s: _stacked(table.column(f"stats/{k}/{s}")) for s in st.STAT_KEYS})
            for k in sorted(features)}


def _sample(n: int) -> list[int]:
    return sorted({0, n // 2, n - 1})


class _Checker:
    def __init__(self, store: Store, against: Path | None, report: ValidationReport):
        self.store, self.root, self.report = store, store.root, report
        self.info = store.info
        self.fps = int(self.info["fps"])
        self.features = self.info["features"]
        self.video_keys = [k for k, f in self.features.items() if f["dtype"] == "video"]
        self.src = V21Source.open(against) if against else None
        self._probes: dict[str, VideoProbe] = {}
        self._times: dict[str, np.ndarray] = {}
        self._tables: dict[str, pa.Table] = {}
        self._open: dict[str, object] = {}  # rel -> open av container, reused across a file's episodes
        self.tasks = read_tasks(self.root / layout.TASKS)

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
            self._tables[rel] = _read(self.root / rel)
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

    def check_episode(self, row: dict, ledger_rec: LedgerRecord | None) -> None:
        """Per-episode checks; a damaged file fails the episode's check naming camera and file, never raises."""
        ep = row["episode_index"]
        try:
            data = self.episode_rows(row)
        except MEDIA_ERRORS as e:
            self.report.add(f"episode {ep}: data rows readable", False, f"{self.data_rel(row)}: {_why(e)}")
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
        trimmed = rec.start or src_table.num_rows != rec.length
        src_table = src_table.slice(rec.start, rec.length)
        if self.src is not None and ledger_rec is not None and ledger_rec.source == str(self.src.root):
            self.against_source(row, data, ledger_rec)

    def against_source(self, row: dict, data: pa.Table, rec: LedgerRecord) -> None:
        """Rows and frames equal the source episode's (a trimmed one's: source rows start..start+length-1, its
        timestamps counted from 0; a re-tasked or renamed one's task text as curation set it)."""
        ep, add, src_ep = row["episode_index"], self.report.add, rec.source_episode_index
        src_path = self.src.parquet_path(src_ep)
        src_table = _read(src_path)
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
        for commit, old, new in self.renames:  # `conveyor retask --rename` after this episode came in
            if commit > rec.commit:
                want = [new if w == old else w for w in want]
        if rec.task is not None:
            want = [rec.task] * len(want)
            b = src_table.column(f.name).to_pylist()
            if f.name == "timestamp" or self.features[f.name]["dtype"].startswith("float"):
                same = np.array_equal(np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32))
            else:
                same = a == b
            if not same:
                diffs.append(f.name)
        src_tasks = V21Source.tasks(self.src)
        want = [src_tasks.get(int(i), "") for i in src_table.column("task_index").to_pylist()]
        got = [self.tasks[i] for i in data.column("task_index").to_pylist()]
        if [w for w in want if w.strip()] and [g for g, w in zip(got, want) if w.strip()] != [w for w in want if w.strip()]:
            diffs.append("task text")
        add(f"episode {ep}: rows equal source episode {src_ep}", not diffs, ", ".join(diffs) or str(src_path))
        for key in self.video_keys:
            src_video = self.src.video_path(src_ep, key)
            sp = probe(src_video)
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
        orphans = on_disk - referenced - idle
        add("no orphan or missing data/video files", not orphans and referenced <= on_disk,
            f"orphans {sorted(orphans)[:3]}, missing {sorted(referenced - on_disk)[:3]}")
        stats_path = self.root / layout.STATS
        if rows:
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
        chk.check_store(rows, ledger, table, every_row=episodes is None)
        todo = list(range(len(rows))) if episodes is None else [e for e in episodes if 0 <= e < len(rows)]
        report.episodes_checked = todo
        try:
            for e, row in zip(todo, table.take(todo).to_pylist() if todo else []):
                chk.check_episode(row, by_ep.get(e))
        finally:
            chk.close()
    except MEDIA_ERRORS as e:  # a damaged store fails a check, naming the file; it never ends in a traceback
        where = f"{e.path}: {e.problem}" if isinstance(e, ConveyorError) else _why(e)
        report.add("store readable", False, where)
        report.seconds = time.monotonic() - t0
        return report
    if deep:
        _deep(s.root, todo, report)
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


DEEP_NICE = 10  # the deep check yields the CPU to ingest and fast validation (the latency path)


def validate_lerobot(store: str | Path, *, episodes: list[int] | None = None) -> ValidationReport:
    """Only the lerobot part of the deep check, for episodes the fast check already covered (the watch
    flow fast-validates every commit, so its deep check need not redo that work in its own process)."""
    t0 = time.monotonic()
    s = Store.open(store)
    report = ValidationReport(store=str(s.root), deep=True, version=s.version)
    if not s.info:
        report.add("store has committed data", False, "no meta/info.json (empty store)")
        return report
    n = int(s.info["total_episodes"])
    report.episodes_checked = list(range(n)) if episodes is None else [e for e in episodes if 0 <= e < n]
    _deep(s.root, report.episodes_checked, report)
    report.seconds = time.monotonic() - t0
    return report


def _deep(root: Path, todo: list[int], report: ValidationReport) -> None:
    """Run the lerobot part in a niced child process: its imports (torch, datasets: ~7 s and ~1 GB) then
    never hold this process's GIL or memory, which matters in the long-running watch/worker process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="conveyor-deep-") as tmp:
        out = Path(tmp) / "checks.json"
        here = str(Path(__file__).resolve().parents[1])  # the child imports this very conveyor
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
        proc = subprocess.run([sys.executable, "-m", "conveyor.validate", "_deep", str(root), json.dumps(todo),
                               str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0 or not out.exists():
            tail = proc.stdout.decode(errors="replace").strip().splitlines()[-3:]
            report.add("lerobot deep check ran", False, f"exit {proc.returncode}: {' | '.join(tail)}")
            return
        for c in json.loads(out.read_text()):
            report.add(c["name"], c["ok"], c["detail"])


def _deep_child(root: str, todo: str, out: str) -> None:
    """`python -m conveyor.validate _deep ROOT EPISODES_JSON OUT`: the lerobot checks, as JSON in OUT."""
    os.nice(DEEP_NICE)
    s = Store(Path(root))
    report = ValidationReport(store=root, deep=True)
    chk = _Checker(s, None, report)
    _deep_in_process(s, chk, load_episodes(s.root), json.loads(todo))
    Path(out).write_text(json.dumps([asdict(c) for c in report.checks]))


def _deep_in_process(s: Store, chk: _Checker, rows: list[dict], todo: list[int]) -> None:
    """Load through the installed lerobot exactly as lerobot-train does, fully offline."""
    add = chk.report.add
    for attempt in (0, 1):
        head = s.head_commit()
        try:
            from lerobot.datasets.lerobot_dataset import LeRobotDataset

            ds = LeRobotDataset(f"local/{s.root.name}", root=s.root, video_backend="pyav")
            break
        except Exception as e:  # any failure here is exactly what the deep check exists to catch...
            if attempt or s.head_commit() == head:
                add("lerobot LeRobotDataset loads offline", False, f"{type(e).__name__}: {e}")
                return
            # ...unless a commit landed while lerobot read the metadata files one by one: read again
    # the store may have grown by a commit while lerobot imported (seconds): appends keep every checked
    # episode where it was, so lerobot must see either the totals we read or the ones committed since
    now = json.loads((s.root / layout.INFO).read_text())
    seen = (ds.num_episodes, len(ds))
    add("lerobot LeRobotDataset loads offline",
        seen in ((len(rows), chk.info["total_frames"]), (now.get("total_episodes"), now.get("total_frames"))),
        f"{ds.num_episodes} episodes, {len(ds)} frames")
    for e in todo:
        row = rows[e]
        data = chk.episode_rows(row)
        bad = []
        for j in _sample(row["length"]):
            try:
                item = ds[row["dataset_from_index"] + j]
            except Exception as exc:  # noqa: BLE001 - lerobot's decoder on a damaged file: name the camera
                bad.append(f"frame {j}: lerobot cannot load it ({_why(exc)}); {_culprits(chk, s, row, j)}")
                continue
            for key, ft in chk.features.items():
                if ft["dtype"] in ("video", "image"):
                    continue
                want = np.asarray(data.column(key)[j].as_py(), dtype=np.float64).reshape(-1)
                got = item[key].numpy().astype(np.float64).reshape(-1)
                if not np.allclose(want, got, rtol=0, atol=1e-6):
                    bad.append(f"{key}[{j}]")
            if item["task"] != chk.tasks[data.column("task_index")[j].as_py()]:
                bad.append(f"task[{j}]")
            for key in chk.video_keys:
                seg = chk.segment(row, key)
                if len(seg) != row["length"]:
                    bad.append(f"{key} segment")
                    continue
                pr = chk.probe(chk.video_rel(row, key))
                try:
                    ref = decode_frames(s.root / chk.video_rel(row, key), [float(seg[j] * pr.time_base)])[0]
                except MEDIA_ERRORS as exc:
                    bad.append(f"camera {key} frame {j}, file {chk.video_rel(row, key)}: {_why(exc)}")
                    continue
                got = (item[key].numpy().transpose(1, 2, 0) * 255.0)
                if np.abs(got - ref.astype(np.float64)).max() > 1.0:
                    bad.append(f"{key}[{j}]")
        n = len(_sample(row["length"]))
        add(f"episode {e}: lerobot items equal stored data and frames", not bad,
            ", ".join(bad[:5]) if bad else f"{n} items compared, {n * len(chk.video_keys)} frames pixel-identical")


def _culprits(chk: "_Checker", s: Store, row: dict, j: int) -> str:
    """Which camera files of an episode cannot be decoded at frame j (the ones lerobot tripped on)."""
    out = []
    for key in chk.video_keys:
        rel = chk.video_rel(row, key)
        try:
            seg = chk.segment(row, key)
            pr = chk.probe(rel)
            decode_frames(s.root / rel, [float(seg[j] * pr.time_base)])
        except MEDIA_ERRORS as e:
            out.append(f"camera {key}, file {rel}: {_why(e)}")
    return "; ".join(out) or "no camera file fails on its own"


class _Damaged(Exception):
    def __init__(self, what: str, detail: str):
        self.what, self.detail = what, detail


def _why(e: BaseException) -> str:
    """One line: a ConveyorError's problem (its path is named by the caller), else type and message."""
    if isinstance(e, ConveyorError):
        return e.problem
    return f"{type(e).__name__}: {e}".splitlines()[0]


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "_deep":
    _deep_child(*sys.argv[2:])
