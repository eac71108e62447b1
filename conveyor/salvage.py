"""What a lerobot 0.6.1 recording session killed before `finalize()` still holds, episode by episode.

lerobot's recorder (`LeRobotDataset.create` + `add_frame` + `save_episode` + `finalize`) saves an episode in
this order: its rows as one row group of the open data file (no footer until roll-over or `finalize`), then
per camera its video encoded to `<session>/tmp*/<camera>_<NNN>.mp4` and concatenated onto the current mp4
(muxed into a file in the system temp folder, then moved over the camera file: a rename on one filesystem, a
copy across two), then its metadata row into a buffer of 10 and `info.json`'s totals. Until then its frames
are PNGs under `images/<camera>/episode-NNNNNN/` and its rows only in memory.

**Recoverable** (an episode is recovered when all of these are on disk):
- its rows: a whole row group of a data file, with or without a footer (`footerless` rebuilds the footer),
  one episode_index, frame_index 0..n-1, contiguous index, timestamp = frame_index / fps;
- for every camera, its n frames: n consecutive packets of a camera file (episodes sit in the files in
  episode order, each file's frame count from its index), every one of them whole on disk (a camera file cut
  short by a move across filesystems keeps its index, so the packets before the cut count), or else the
  episode's own finished mp4 left under `tmp*/` by a concatenation that never completed;
- its task strings from `meta/tasks.parquet` (written whole whenever a task is new).
Its metadata row (length, tasks, video spans, stats) is rebuilt from those; a buffered row that never reached
disk is not needed.

**Not recoverable** (quarantined, with the reason): an episode being recorded (rows only in memory, frames as
PNGs), an episode whose row group is torn, an episode whose video was never encoded (still PNGs: the
recorder died in `save_episode` before encoding, or batch encoding had not reached it), an episode whose
frames were in the part of a camera file that a move across filesystems had not rewritten yet (the complete
file was in the system temp folder, outside the session, and is not looked for), an episode whose camera
file holds a frame count that does not split into whole episodes.

Everything here only reads the session.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conveyor import footerless, layout
from conveyor.errors import ConveyorError
from conveyor.evidence import mp4_finalized
from conveyor.tables import data_schema
from conveyor.video import VideoProbe, frame_ticks


@dataclass
class Segment:
    """One episode's frames in one mp4: the pts (presentation order) of its packets in that file."""

    path: Path
    pts: tuple[int, ...]
    probe: VideoProbe  # of this segment alone (what `StreamCopy.add` needs)
    nbytes: int


@dataclass
class Episode:
    index: int  # the session's episode_index
    rows: pa.Table
    videos: dict[str, Segment] = field(default_factory=dict)
    pngs: int = 0  # frames still PNGs under images/ (its video was never encoded)


@dataclass
class Session:
    """A session's recoverable episodes (in episode order), the ones that are not with why, and notes on
    what was found (torn tails, leftovers)."""

    root: Path
    info: dict
    tasks: dict[int, str]
    episodes: list[Episode]
    quarantined: dict[int, str]
    notes: list[str]
    finalized: bool

    @property
    def video_keys(self) -> list[str]:
        return [k for k, f in self.info["features"].items() if f["dtype"] == "video"]


def read_info(root: Path) -> dict:
    path = root / layout.INFO
    if not path.is_file():
        raise ConveyorError(path, "missing: not a LeRobot dataset (no meta/info.json)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConveyorError(path, f"not valid JSON (torn by the recorder's last rewrite?): {e}") from None
    if info.get("codebase_version") != layout.CODEBASE_VERSION:
        raise ConveyorError(path, f"codebase_version {info.get('codebase_version')!r}: salvage reads v3.0 sessions")
    for key in ("fps", "features", "data_path"):
        if key not in info:
            raise ConveyorError(path, f"missing key {key!r}")
    return info


def read_tasks(path: Path) -> dict[int, str]:
    """task_index -> task of a tasks.parquet pandas wrote (lerobot 0.6.1 names its index column `task`,
    0.4.4 and conveyor leave it `__index_level_0__`)."""
    t = pq.ParquetFile(path).read()
    pandas = json.loads((t.schema.metadata or {}).get(b"pandas", b"{}"))
    names = [c for c in pandas.get("index_columns", []) if isinstance(c, str)] + ["task", "__index_level_0__"]
    column = next(c for c in names if c in t.column_names)
    return dict(zip(t.column("task_index").to_pylist(), t.column(column).to_pylist()))


def read_session(root: str | Path) -> Session:
    root = Path(root).resolve()
    if not root.is_dir():
        raise ConveyorError(root, "session folder does not exist")
    info = read_info(root)
    fps = int(info["fps"])
    try:
        schema = data_schema(info["features"])
    except ValueError as e:
        raise ConveyorError(root / layout.INFO, str(e)) from None
    try:
        tasks = read_tasks(root / layout.TASKS)
    except (OSError, pa.ArrowException, StopIteration, KeyError, ValueError) as e:
        raise ConveyorError(root / layout.TASKS, f"unreadable task table: {e!r}") from None
    notes: list[str] = []
    quarantined: dict[int, str] = {}
    tables, finalized = [], True
    for path in _chunked(root, "data", ".parquet"):
        rel = path.relative_to(root)
        try:
            if footerless.has_footer(path):
                tables.append(pq.ParquetFile(path).read())
                continue
            finalized = False
            got = footerless.rescue(path, schema)
        except (OSError, ValueError, pa.ArrowException) as e:
            raise ConveyorError(path, f"unreadable data file: {e}") from None
        tables.append(got.open().read())
        if got.used_bytes < got.total_bytes:
            notes.append(f"{rel}: {got.total_bytes - got.used_bytes} bytes after its last whole row group "
                         "(a row group being written when the recorder died)")
            quarantined[-1] = f"rows torn in {rel}: the recorder died while writing them"
    rows = pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()
    episodes = _split_rows(rows, fps, quarantined)
    if -1 in quarantined:  # the torn row group belongs to the episode after the last whole one
        reason = quarantined.pop(-1)
        quarantined[max([e.index for e in episodes] + list(quarantined), default=-1) + 1] = reason
    if not (root / "meta" / "episodes").is_dir() or any(
            not footerless.has_footer(p) for p in _chunked(root, "meta/episodes", ".parquet")):
        finalized = False
    _unsaved(root, info, episodes, quarantined)
    for key in [k for k, f in info["features"].items() if f["dtype"] == "video"]:
        _attach_videos(root, key, episodes, quarantined, notes)
    return Session(root, info, tasks, [e for e in episodes if e.index not in quarantined], quarantined, notes,
                   finalized and not quarantined)


def _chunked(root: Path, kind: str, suffix: str, key: str | None = None) -> list[Path]:
    """The chunk-NNN/file-NNN files of one kind, in file order."""
    base = root / kind / key if key else root / kind
    files = [p for p in base.glob(f"chunk-*/file-*{suffix}") if layout.linear_index(str(p)) is not None]
    return sorted(files, key=lambda p: layout.linear_index(str(p)))


def _split_rows(rows: pa.Table, fps: int, quarantined: dict[int, str]) -> list[Episode]:
    """One Episode per episode_index; rows that do not form a whole episode are quarantined."""
    ep = rows.column("episode_index").to_numpy()
    if not len(ep):
        return []
    cuts = np.flatnonzero(np.diff(ep)) + 1
    episodes: list[Episode] = []
    seen: set[int] = set()
    for start, stop in zip([0, *cuts.tolist()], [*cuts.tolist(), len(ep)]):
        idx = int(ep[start])
        part = rows.slice(start, stop - start)
        n = part.num_rows
        frame = part.column("frame_index").to_numpy()
        index = part.column("index").to_numpy()
        ts = part.column("timestamp").to_numpy().astype(np.float64)
        if idx in seen:
            quarantined[idx] = "its rows are split across the data files (not one row group)"
        elif not np.array_equal(frame, np.arange(n)) or not np.array_equal(index, index[0] + np.arange(n)):
            quarantined[idx] = "its rows are not frames 0..n-1 with contiguous index"
        elif not np.allclose(ts, frame / fps, atol=1e-4):
            quarantined[idx] = f"its timestamps are not frame_index / {fps}"
        seen.add(idx)
        episodes.append(Episode(idx, part))
    return episodes


_IMAGE_DIR = re.compile(r"episode-(\d+)$")


def _unsaved(root: Path, info: dict, episodes: list[Episode], quarantined: dict[int, str]) -> None:
    """Episodes the session shows signs of (info.json's count, PNG frames under images/) without rows."""
    have = {e.index for e in episodes} | set(quarantined)
    pngs: dict[int, int] = {}
    for d in (root / "images").glob("*/episode-*"):
        m = _IMAGE_DIR.search(d.name)
        if m and d.is_dir():
            pngs[int(m.group(1))] = max(pngs.get(int(m.group(1)), 0), sum(1 for _ in d.glob("*.png")))
    for idx in sorted(set(range(int(info.get("total_episodes", 0)))) | set(pngs)):
        if idx in have:
            continue
        if idx in pngs:
            quarantined[idx] = (f"being recorded: {pngs[idx]} frames as PNG under images/, its rows were only "
                                "in the recorder's memory")
        else:
            quarantined[idx] = "info.json counts it but no data rows of it are on disk"
    for e in episodes:
        if e.index in pngs and e.index not in quarantined:
            e.pngs = pngs[e.index]  # rows on disk, frames still PNGs: read by _attach_videos


@dataclass
class _File:
    path: Path
    declared: int  # frames the file's index lists
    pts: list[int]  # presentation order
    whole: set[int]  # pts of packets entirely on disk
    sizes: dict[int, int]
    dts: dict[int, int]
    probe: VideoProbe


def _scan_mp4(path: Path) -> _File | None:
    import av

    try:
        size = path.stat().st_size
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            declared = s.frames
            pts, whole, sizes, dts, keys = [], set(), {}, {}, set()
            try:
                for pk in c.demux(s):
                    if pk.size == 0 or pk.pts is None:
                        continue
                    pts.append(pk.pts)
                    sizes[pk.pts] = pk.size
                    dts[pk.pts] = pk.dts if pk.dts is not None else pk.pts
                    if pk.is_keyframe:
                        keys.add(pk.pts)
                    if not pk.is_corrupt and pk.pos is not None and pk.pos + pk.size <= size:
                        whole.add(pk.pts)
            except av.error.FFmpegError:
                pass  # the packets before the damage count
            tb = Fraction(s.time_base.numerator, s.time_base.denominator)
            rate = s.average_rate or s.guessed_rate
            ticks = frame_ticks(rate, tb) if rate else 1
            pr = VideoProbe(len(pts), tuple(sorted(pts)), tb, s.codec_context.name, s.codec_context.width,
                            s.codec_context.height, ticks, frozenset(keys), min(dts.values(), default=0))
    except (av.error.FFmpegError, OSError, IndexError):
        return None
    return _File(path, declared or len(pts), sorted(pts), whole, sizes, dts, pr)


def _segment(f: _File, pts: list[int]) -> Segment:
    pr = f.probe
    seg = VideoProbe(len(pts), tuple(pts), pr.time_base, pr.codec, pr.width, pr.height, pr.frame_ticks,
                     frozenset(p for p in pts if p in pr.keyframes), min(f.dts[p] for p in pts))
    return Segment(f.path, tuple(pts), seg, sum(f.sizes[p] for p in pts))


def _attach_videos(root: Path, key: str, episodes: list[Episode], quarantined: dict[int, str],
                   notes: list[str]) -> None:
    """Give each episode its `key` frames: the next n frames of the camera files (episode order), else
    its own finished mp4 under tmp*/; an episode with neither is quarantined."""
    files = [f for f in (_scan_mp4(p) for p in _chunked(root, "videos", ".mp4", key)) if f is not None]
    fi, off = 0, 0
    for e in episodes:
        n = e.rows.num_rows
        while fi < len(files) and off >= files[fi].declared:
            fi, off = fi + 1, 0
        seg, why = None, None
        if fi < len(files):
            f = files[fi]
            if off + n > f.declared:
                why = (f"{f.path.relative_to(root)} lists {f.declared} frames, which do not end with whole "
                       f"episodes at episode {e.index}")
                fi = len(files)  # nothing after this point can be placed
            else:
                pts = f.pts[off:off + n] if len(f.pts) >= off + n else []
                off += n
                if len(pts) == n and all(p in f.whole for p in pts):
                    seg = _segment(f, pts)
                else:
                    have = sum(1 for p in f.pts[off - n:off] if p in f.whole)
                    why = (f"camera {key}: {have} of its {n} frames are on disk in {f.path.relative_to(root)} "
                           "(the file was being rewritten when the recorder died)")
        if seg is None:
            seg = _leftover(root, key, e.index, n)
        if seg is not None:
            e.videos[key] = seg
        elif e.index not in quarantined:
            if why is None:
                why = (f"camera {key}: video never encoded ({e.pngs} frames left as PNG under images/)" if e.pngs
                       else f"camera {key}: no video of it on disk")
            quarantined[e.index] = why
    for f in files:
        if len(f.whole) < f.declared:
            notes.append(f"{f.path.relative_to(root)}: {len(f.whole)} of the {f.declared} frames its index lists "
                         "are on disk (cut short while being rewritten)")


def _leftover(root: Path, key: str, index: int, n: int) -> Segment | None:
    """The episode's own mp4, encoded and left in `tmp*/` by a concatenation that never completed."""
    for path in sorted(root.glob(f"tmp*/{key}_{index:03d}.mp4")):
        if not mp4_finalized(path):
            continue
        f = _scan_mp4(path)
        if f is not None and f.declared == n and len(f.whole) == n:
            return _segment(f, f.pts)
    return None
