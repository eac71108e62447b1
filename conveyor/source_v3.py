"""Read a LeRobot v3.0 dataset (a lerobot 0.6 recording session) as a source, including one still recording.

A v3.0 session holds many episodes per file: rows of several episodes in one data parquet (one row group
each), several episodes' video in one mp4 (each episode a span `[from_timestamp, to_timestamp)` of it), and
one `meta/episodes` row per episode saying where its rows and spans are. An episode is complete, and lands,
once everything it needs is readable and final:

- its `meta/episodes` row, in a parquet file with its footer;
- its data file, with its footer, holding exactly `length` rows of the episode;
- each camera's mp4 finalized (`conveyor.evidence.mp4_finalized`: every top-level box, moov included,
  ends inside the file), and its span holding exactly `length` frames, starting at a keyframe (copied
  packet for packet, never re-encoded).

What lerobot 0.6.1's recorder (`lerobot-record`: `DatasetWriter` + `LeRobotDatasetMetadata`) writes that
cannot be read safely while it runs, and so is never taken before it is closed:

- the data parquet: `DatasetWriter._pq_writer` stays open across episodes, one row group per
  `save_episode`; the footer (and so any reader) only comes at roll-over (`data_files_size_in_mb`) or
  `finalize()`;
- `meta/episodes/*.parquet`: `LeRobotDatasetMetadata._pq_writer` buffers rows (`metadata_buffer_size`,
  10) and writes them into another open writer whose footer only comes at its roll-over or `finalize()`.
  This is what holds a running session back: its episodes land when the recorder finalizes (or rolls the
  metadata file over), not one by one;
- the current mp4: `concatenate_video_files` writes the grown file to a temporary file and `shutil.move`s it
  over the old one, which is a copy in place (truncate, write) when the temporary folder is on another
  filesystem, so a reader can catch it half-written: taken only when finalized;
- `meta/info.json`: rewritten in place after every episode (`total_episodes` grows; it counts episodes whose
  metadata rows are still buffered): read with the v2.1 reader's settle time, and used only to report
  episodes still being recorded.

Files are only read here; a session is never modified. Each source episode's identity (ledger) is its
metadata row's location columns, the bytes of the row groups holding its rows and the bytes of its video
packets, so it is stable while other episodes are appended to the same files.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from conveyor.cameras import check_declared_cameras
from conveyor.errors import BadEpisode, ConveyorError
from conveyor.shared_files import parquet_closed, probe_span
from conveyor.source import (DEFAULT_FEATURE_KEYS, INFO_SETTLE_S, SourceEpisode, SourceScan, V21Source,
                             _read_info, comparable_features, scan_records)

KIND = "v3.0"
# A session that holds unfinished files (a footer-less parquet, or no closed meta/episodes file) and has not
# changed at all for this long is taken as a recorder killed before finalize(): its episodes are quarantined with a pointer to
# `conveyor salvage`, instead of waiting forever as "still being recorded". A live recorder writes a data row
# group, a video and info.json at every save_episode, so ten idle minutes is far past any episode's length.
ABANDONED_AFTER_S = 600


@dataclass(frozen=True)
class V30Episode(SourceEpisode):
    """A complete episode of a v3.0 source: `parquet` and `videos` are the multi-episode files holding it."""

    rows: tuple[int, int] = (0, 0)  # (first row in the data file, row count)
    spans: dict = field(default_factory=dict)  # camera -> (from_timestamp, to_timestamp) in its mp4
    location: str = ""  # the metadata row's location columns as canonical JSON (part of the identity)


# -- the source ----------------------------------------------------------------------------------------

_LOCATION = ("episode_index", "length", "data/chunk_index", "data/file_index", "dataset_from_index",
             "dataset_to_index")


class V30Source:
    """A v3.0 dataset folder (one lerobot 0.6 recording session); construct with `V30Source.open(path)`.

    Offers what ingest needs, like `V21Source`: `scan`, `tasks`, `fingerprint`, `content_hash`,
    `changed_since`, `store_features`, `check_compatible`, plus the reads of one episode out of the shared
    files (`read_rows`, `probe_camera`, `span_packets`)."""

    kind = KIND

    def __init__(self, root: Path, info: dict):
        self.root = root
        self.root_str = str(root)
        self.info = info
        self.fps = int(info["fps"])
        self.features: dict = info["features"]
        self.chunks_size = int(info.get("chunks_size", 1000))
        self.video_keys = [k for k, f in self.features.items() if f["dtype"] == "video"]
        self.image_keys = [k for k, f in self.features.items() if f["dtype"] == "image"]
        self._lock = threading.Lock()
        self._records: dict[int, dict] | None = None
        self._row_index: dict[str, tuple[tuple, dict]] = {}  # data file -> (stat, {ep: (start, count)})
        self._rg: dict[str, object] = {}  # data file -> its parquet FileMetaData

    @classmethod
    def open(cls, root: str | Path, info_settle_s: float = INFO_SETTLE_S) -> "V30Source":
        root = Path(root).resolve()
        info_path = root / "meta" / "info.json"
        if not root.is_dir():
            raise ConveyorError(root, "source folder does not exist")
        if not info_path.is_file():
            raise ConveyorError(info_path, "missing: not a LeRobot dataset (no meta/info.json)")
        info = _read_info(info_path, info_settle_s)
        if info.get("codebase_version") != KIND:
            raise ConveyorError(info_path, f"codebase_version {info.get('codebase_version')!r}, expected {KIND!r}")
        for key in ("fps", "features", "data_path"):
            if key not in info:
                raise ConveyorError(info_path, f"missing key {key!r}")
        missing = [k for k in DEFAULT_FEATURE_KEYS if k not in info["features"]]
        if missing:
            raise ConveyorError(info_path, f"features lack required columns {missing}")
        for key in ("data_path", "video_path"):
            template = info.get(key)
            if template and not ("{chunk_index" in template and "{file_index" in template):
                raise ConveyorError(info_path, f"codebase_version v3.0 but {key} {template!r} is not a v3.0 path "
                                               "template (chunk_index, file_index)")
        src = cls(root, info)
        if src.video_keys and not info.get("video_path"):
            raise ConveyorError(info_path, "video features present but video_path is null")
        return src

    # -- paths ----------------------------------------------------------------------------------------

    def _data_rel(self, rec: dict) -> str:
        return self.info["data_path"].format(chunk_index=rec["data/chunk_index"], file_index=rec["data/file_index"])

    def _video_rel(self, rec: dict, key: str) -> str:
        return self.info["video_path"].format(video_key=key, chunk_index=rec[f"videos/{key}/chunk_index"],
                                              file_index=rec[f"videos/{key}/file_index"])

    def _meta_rel(self, rec: dict) -> str:
        return "meta/episodes/chunk-{:03d}/file-{:03d}.parquet".format(
            rec["meta/episodes/chunk_index"], rec["meta/episodes/file_index"])

    def _rels(self, rec: dict) -> list[str]:
        return [self._meta_rel(rec), self._data_rel(rec)] + [self._video_rel(rec, k) for k in self.video_keys]

    def episode_paths(self, ep: int) -> list[str]:
        rec = self.episode_records().get(ep)
        return [os.path.join(self.root_str, r) for r in self._rels(rec)] if rec else []

    def episode_files(self, ep: int) -> list[Path]:
        return [Path(p) for p in self.episode_paths(ep)]

    # -- metadata -------------------------------------------------------------------------------------

    def meta_files(self) -> list[tuple[Path, bool]]:
        """Every meta/episodes parquet and whether its writer closed it."""
        base = self.root / "meta" / "episodes"
        out = []
        try:
            chunks = sorted(e.path for e in os.scandir(base) if e.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        for chunk in chunks:
            for e in sorted(os.scandir(chunk), key=lambda e: e.name):
                if e.name.endswith(".parquet"):
                    out.append((Path(e.path), parquet_closed(e.path)))
        return out

    def episode_records(self) -> dict[int, dict]:
        """episode_index -> its metadata row (location columns, no stats), from the closed metadata files."""
        with self._lock:
            if self._records is not None:
                return self._records
        import pyarrow.parquet as pq

        recs: dict[int, dict] = {}
        for path, closed in self.meta_files():
            if not closed:
                continue
            try:
                f = pq.ParquetFile(path)
                cols = [c for c in f.schema_arrow.names if not c.startswith("stats/")]
                rows = f.read(columns=cols).to_pylist()
            except Exception as e:  # noqa: BLE001 - a closed file that does not parse is damaged, not in progress
                raise ConveyorError(path, f"corrupt episode metadata: {e}") from None
            for r in rows:
                try:
                    recs[int(r["episode_index"])] = r
                except (KeyError, TypeError, ValueError):
                    raise ConveyorError(path, f"episode row without a valid episode_index: {r}") from None
        with self._lock:
            self._records = recs
        return recs

    def saved_episodes(self) -> int:
        """How many episodes the recorder has saved (info.json; includes rows it still buffers)."""
        return int(self.info.get("total_episodes") or 0)

    def unrecorded(self, records: dict[int, dict] | set[int]) -> list[int]:
        """Episodes saved by the recorder whose metadata rows are not readable yet (buffered, or in a
        metadata file still being written)."""
        return [ep for ep in range(self.saved_episodes()) if ep not in records]

    def tasks(self) -> dict[int, str]:
        """task_index -> task string, exactly as recorded (meta/tasks.parquet)."""
        import pyarrow.parquet as pq

        path = self.root / "meta" / "tasks.parquet"
        if not path.exists():
            return {}
        try:
            t = pq.ParquetFile(path).read()
        except Exception as e:  # noqa: BLE001
            raise ConveyorError(path, f"corrupt task table: {e}") from None
        names = t.column_names
        text = "task" if "task" in names else "__index_level_0__"
        if "task_index" not in names or text not in names:
            raise ConveyorError(path, f"task table without task_index/task columns: {names}")
        return {int(i): str(s) for i, s in zip(t.column("task_index").to_pylist(), t.column(text).to_pylist())}

    # -- completeness ---------------------------------------------------------------------------------

    def _rows_of(self, rel: str) -> dict[int, tuple[int, int]] | None:
        """Data file -> {episode: (first row, count)} from its episode_index column; None while it is open."""
        import pyarrow.parquet as pq

        path = os.path.join(self.root_str, rel)
        if not parquet_closed(path):
            return None
        st = os.stat(path)
        key = (st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._row_index.get(rel)
        if hit and hit[0] == key:
            return hit[1]
        try:
            f = pq.ParquetFile(path)
            col = f.read(columns=["episode_index"]).column("episode_index").to_pylist()
        except Exception as e:  # noqa: BLE001 - closed but unreadable: damaged
            raise ConveyorError(path, f"corrupt parquet: {e}") from None
        out: dict[int, tuple[int, int]] = {}
        bad: set[int] = set()
        for i, ep in enumerate(col):
            if ep in out:
                a, n = out[ep]
                if a + n != i:
                    bad.add(ep)  # not contiguous
                out[ep] = (a, n + 1)
            else:
                out[ep] = (i, 1)
        for ep in bad:
            out[ep] = (-1, out[ep][1])
        with self._lock:
            self._row_index[rel] = (key, out)
            self._rg[rel] = f.metadata
        return out

    def check_episode(self, ep: int, rec: dict, probe_videos: bool = True) -> V30Episode | None:
        """The episode if complete and consistent, None while a file it needs is still being written,
        BadEpisode if broken."""
        from conveyor.evidence import mp4_finalized

        length = int(rec.get("length", -1))
        rel = self._data_rel(rec)
        data = self.root / rel
        if not data.exists():
            raise BadEpisode(data, "missing data file for a recorded episode", ep)
        rows = self._rows_of(rel)
        if rows is None:
            return None  # the recorder's data writer has not closed this file yet
        start, count = rows.get(ep, (0, 0))
        if start < 0:
            raise BadEpisode(data, f"episode {ep}'s rows are not contiguous", ep)
        if count != length:
            raise BadEpisode(data, f"length mismatch: {count} rows of episode {ep} but meta/episodes says "
                                   f"{length}", ep)
        videos, spans = {}, {}
        for key in self.video_keys:
            vp = self.root / self._video_rel(rec, key)
            if not vp.exists():
                raise BadEpisode(vp, f"missing camera file for {key}", ep)
            if not mp4_finalized(vp):
                return None  # being rewritten (concatenation) or copied
            span = (float(rec[f"videos/{key}/from_timestamp"]), float(rec[f"videos/{key}/to_timestamp"]))
            if probe_videos:
                pr, _ = probe_span(vp, span, self.fps)
                if pr.frames != length:
                    raise BadEpisode(vp, f"length mismatch: {pr.frames} video frames in "
                                         f"[{span[0]:.6f}, {span[1]:.6f}) but meta/episodes says {length}", ep)
            videos[key], spans[key] = vp, span
        location = json.dumps({k: rec.get(k) for k in _LOCATION}
                              | {k: rec.get(k) for k in sorted(rec) if k.startswith("videos/")}, sort_keys=True)
        tasks = [str(t) for t in rec.get("tasks") or []]
        return V30Episode(ep, length, tasks, data, videos, (start, count), spans, location)

    def scan(self, skip: set[int] | frozenset[int] = frozenset(), probe_videos: bool = True
             ) -> tuple[list[V30Episode], SourceScan]:
        """Complete episodes in episode_index order, plus which ones are still being recorded or broken.
        `skip`: episodes already handled (in the store), not looked at again."""
        records = self.episode_records()
        # a ConveyorError is a damaged shared file: every episode in it is bad
        ready, result = scan_records(records, skip, lambda ep, rec: self.check_episode(ep, rec, probe_videos),
                                     bad=(ConveyorError,))
        result.incomplete = sorted(set(result.incomplete) | set(self.unrecorded(records)))
        if result.incomplete and (idle := self.abandoned_for()) is not None:
            reason = (f"looks abandoned (no change for {idle // 60:.0f} min): recover it with "
                      f"`conveyor salvage {self.root} OUT`, then ingest OUT")
            result.bad.update({ep: reason for ep in result.incomplete})
            result.incomplete = []
        return ready, result

    def abandoned_for(self, after_s: float = ABANDONED_AFTER_S) -> float | None:
        """Seconds since any file of the session changed, when it holds unfinished files (a footer-less
        data or meta/episodes parquet, or no closed meta/episodes file) and that is at least `after_s`; else
        None (finalized, or maybe still recording)."""
        meta = self.meta_files()
        files = [os.path.join(d, n) for d, _, names in os.walk(self.root) for n in names]
        data_dir = os.path.join(self.root_str, "data", "")
        data = [f for f in files if f.startswith(data_dir) and f.endswith(".parquet")]
        if meta and all(closed for _, closed in meta) and all(parquet_closed(f) for f in data):
            return None
        newest = 0.0
        for f in files:
            try:
                newest = max(newest, os.stat(f).st_mtime)
            except FileNotFoundError:  # replaced while we looked: it just changed
                return None
        idle = time.time() - newest
        return idle if idle >= after_s else None

    def episode(self, ep: int) -> V30Episode | None:
        """One complete episode (None: not recorded, or not complete yet); BadEpisode if broken."""
        rec = self.episode_records().get(ep)
        return self.check_episode(ep, rec, probe_videos=False) if rec else None

    def check_declared_cameras(self, ready: list[V30Episode]) -> V30Episode | None:
        for episode in ready:
            if check_declared_cameras(self.root, self.features, episode.videos):
                return episode
        return None

    # -- one episode out of the shared files ----------------------------------------------------------

    def read_rows(self, ep: V30Episode):
        """The episode's rows (only the row groups that hold them are read)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        start, count = ep.rows
        try:
            f = pq.ParquetFile(ep.parquet)
            md = f.metadata
            groups, first, at = [], None, 0
            for g in range(md.num_row_groups):
                n = md.row_group(g).num_rows
                if at + n > start and at < start + count:
                    groups.append(g)
                    first = at if first is None else first
                at += n
            table = f.read_row_groups(groups) if groups else f.schema_arrow.empty_table()
        except Exception as e:  # noqa: BLE001
            raise BadEpisode(ep.parquet, f"corrupt parquet: {e}", ep.index) from None
        table = table.slice(start - (first or 0), count)
        eps = set(table.column("episode_index").to_pylist())
        if table.num_rows != count or eps != {ep.index}:
            raise BadEpisode(ep.parquet, f"rows {start}..{start + count - 1} are not episode {ep.index}'s", ep.index)
        return pa.table(table.columns, schema=table.schema)

    def probe_camera(self, ep: V30Episode, key: str, sample: int = 0):
        """(probe, sampled keyframes, packets, packet bytes) of the episode's span of one camera."""
        packets: list = []
        pr, frames = probe_span(ep.videos[key], ep.spans[key], self.fps, sample=sample, packets=packets)
        return pr, frames, packets, sum(p.size for p in packets)

    def span_packets(self, ep: V30Episode, key: str) -> list:
        packets: list = []
        probe_span(ep.videos[key], ep.spans[key], self.fps, packets=packets)
        return packets

    # -- identity -------------------------------------------------------------------------------------

    def fingerprint(self, ep: int) -> dict[str, list[int]]:
        """Relative path -> [size, mtime_ns] of the files holding the episode: the cheap check."""
        rec = self.episode_records().get(ep)
        if rec is None:
            raise FileNotFoundError(f"{self.root}: no metadata row for episode {ep}")
        return fingerprint_files(self.root, self._rels(rec))

    def content_hash(self, ep: int) -> str:
        """sha256 over the episode's location, the bytes of the row groups holding its rows, and each
        camera's span packets: its own content, unchanged when other episodes join the same files."""
        rec = self.episode_records().get(ep)
        se = self.check_episode(ep, rec, probe_videos=False) if rec else None
        if se is None:
            raise FileNotFoundError(f"{self.root}: episode {ep} is not complete")
        h = hashlib.sha256(se.location.encode())
        rel = self._data_rel(rec)
        with self._lock:
            md = self._rg.get(rel)
        start, count = se.rows
        with open(se.parquet, "rb") as f:
            at = 0
            for g in range(md.num_row_groups):
                rg = md.row_group(g)
                if at + rg.num_rows > start and at < start + count:
                    for c in range(rg.num_columns):
                        cc = rg.column(c)
                        off = cc.dictionary_page_offset if cc.has_dictionary_page and cc.dictionary_page_offset \
                            else cc.data_page_offset
                        f.seek(off)
                        h.update(f.read(cc.total_compressed_size))
                at += rg.num_rows
        for key in self.video_keys:
            for pk in self.span_packets(se, key):
                h.update(bytes(pk))
        return h.hexdigest()

    def hash_ahead(self, episodes: list[int]) -> None:
        """Nothing to start: an episode's identity is read out of shared files when it is loaded."""

    def changed_since(self, ep: int, fingerprint: dict, content_hash: str) -> bool:
        """True when the episode is still there and its content differs from the recorded identity."""
        try:
            if fingerprint_files(self.root, list(fingerprint)) == fingerprint:
                return False
            return self.content_hash(ep) != content_hash
        except (FileNotFoundError, ConveyorError):
            return False

    # -- features -------------------------------------------------------------------------------------

    def store_features(self) -> dict:
        feats = json.loads(json.dumps(self.features))
        for f in feats.values():
            f.pop("fps", None)
        return feats

    def check_compatible(self, info: dict, store_root: Path) -> None:
        """Raise naming the source's info.json unless fps and features match the store's `info`."""
        V21Source.check_compatible(self, info, store_root)


def fingerprint_files(root: Path, rels: list[str]) -> dict[str, list[int]]:
    out = {}
    for rel in rels:
        st = os.stat(os.path.join(root, rel))
        out[rel] = [st.st_size, st.st_mtime_ns]
    return out
