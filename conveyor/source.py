"""Read a LeRobot v2.1 recording, including one that is still being recorded.

The recorder writes an episode's parquet and mp4s first and its episodes.jsonl line last, so an episode
counts as complete only when its line, its parquet and every camera's mp4 are present and agree on the
frame count (parquet rows = `length` = video packets). Also the source side of ingest: an episode's identity
(fingerprint, content hash) and whether the source's features fit a store. Everything here only reads.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from conveyor.cameras import check_declared_cameras
from conveyor.errors import BadEpisode, ConveyorError
from conveyor.fileio import group_digest, group_digests_in_child

if TYPE_CHECKING:
    from concurrent.futures import Future

SUPPORTED_VERSION = "v2.1"
DEFAULT_FEATURE_KEYS = ("timestamp", "frame_index", "episode_index", "index", "task_index")


@dataclass(frozen=True)
class SourceEpisode:
    """One complete, consistent source episode, ready to convert."""

    index: int
    length: int
    tasks: list[str]
    parquet: Path
    videos: dict[str, Path]


INFO_SETTLE_S = 1.0  # how long a torn info.json may take to become whole before it is an error


@dataclass
class SourceScan:
    complete: list[int] = field(default_factory=list)
    incomplete: list[int] = field(default_factory=list)
    bad: dict[int, str] = field(default_factory=dict)


def scan_records(records: dict[int, dict], skip: set[int] | frozenset[int],
                 check: Callable[[int, dict], SourceEpisode | None],
                 bad: tuple[type[Exception], ...] = (BadEpisode,)) -> tuple[list, SourceScan]:
    """The scan every source kind shares: each recorded episode in episode_index order is already handled
    (`skip`), complete (`check` returns it), still being recorded (`check` returns None) or broken (`check`
    raises one of `bad`)."""
    result = SourceScan()
    ready: list = []
    for ep in sorted(records):
        if ep in skip:
            result.complete.append(ep)
            continue
        try:
            se = check(ep, records[ep])
        except bad as e:
            result.bad[ep] = str(e)
            continue
        if se is None:
            result.incomplete.append(ep)
            continue
        ready.append(se)
        result.complete.append(ep)
    return ready, result


class V21Source:
    """A v2.1 dataset folder; construct with `V21Source.open(path)`."""

    def __init__(self, root: Path, info: dict):
        self.root = root
        self.root_str = str(root)
        self.info = info
        self.fps = int(info["fps"])
        self.features: dict = info["features"]
        self.chunks_size = int(info.get("chunks_size", 1000))
        self.video_keys = [k for k, f in self.features.items() if f["dtype"] == "video"]
        self.image_keys = [k for k, f in self.features.items() if f["dtype"] == "image"]
        self._hashed_ahead: dict[int, tuple[dict, Future]] = {}

    @classmethod
    def open(cls, root: str | Path, info_settle_s: float = INFO_SETTLE_S) -> "V21Source":
        """`info_settle_s`: how long a torn info.json may take to become whole (the watcher, which looks again
        at its next scan anyway, passes 0 so one broken source cannot stall it)."""
        root = Path(root).resolve()
        info_path = root / "meta" / "info.json"
        if not root.is_dir():
            raise ConveyorError(root, "source folder does not exist")
        if not info_path.is_file():
            raise ConveyorError(info_path, "missing: not a LeRobot dataset (no meta/info.json)")
        info = _read_info(info_path, info_settle_s)
        version = info.get("codebase_version")
        if version == "v3.0":
            raise ConveyorError(info_path, "this is already a v3.0 dataset; conveyor reads v2.1 sources")
        if version == "v2.0":
            raise ConveyorError(info_path, "v2.0 dataset: convert it to v2.1 with lerobot <= 0.3 first "
                                           "(lerobot 0.4.4 has no v2.0 -> v3.0 path)")
        if version != SUPPORTED_VERSION:
            raise ConveyorError(info_path, f"unknown codebase_version {version!r}; expected {SUPPORTED_VERSION!r}")
        for key in ("fps", "features", "data_path"):
            if key not in info:
                raise ConveyorError(info_path, f"missing key {key!r}")
        missing = [k for k in DEFAULT_FEATURE_KEYS if k not in info["features"]]
        if missing:
            raise ConveyorError(info_path, f"features lack required columns {missing}")
        src = cls(root, info)
        if src.video_keys and not info.get("video_path"):
            raise ConveyorError(info_path, "video features present but video_path is null")
        return src

    # -- metadata -------------------------------------------------------------------------------------

    def _jsonl(self, name: str) -> list[dict]:
        """Parse a jsonl file; a torn last line (recorder mid-write) is ignored, a torn middle line is an error."""
        path = self.root / "meta" / name
        if not path.exists():
            return []
        raw = path.read_bytes()
        lines = raw.split(b"\n")
        out = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line.decode("utf-8")))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                if i == len(lines) - 1:  # no trailing newline yet: still being written
                    break
                raise ConveyorError(path, f"line {i + 1} is not valid JSON: {e}") from None
        return out

    def episode_records(self) -> dict[int, dict]:
        recs: dict[int, dict] = {}
        path = self.root / "meta" / "episodes.jsonl"
        for r in self._jsonl("episodes.jsonl"):
            try:
                recs[int(r["episode_index"])] = r
            except (KeyError, TypeError, ValueError):
                raise ConveyorError(path, f"episode record without a valid episode_index: {r}") from None
        return recs

    def tasks(self) -> dict[int, str]:
        """task_index -> task string, exactly as recorded (Chinese included)."""
        return {int(r["task_index"]): str(r["task"]) for r in self._jsonl("tasks.jsonl")}

    # -- paths ----------------------------------------------------------------------------------------

    # strings first: an append checks every ingested episode's files, and pathlib's objects cost more there
    # than the stat calls
    def _data_file(self, ep: int) -> str:
        return os.path.join(self.root_str, self.info["data_path"].format(
            episode_chunk=ep // self.chunks_size, episode_index=ep))

    def _video_file(self, ep: int, key: str) -> str:
        return os.path.join(self.root_str, self.info["video_path"].format(
            episode_chunk=ep // self.chunks_size, video_key=key, episode_index=ep))

    def episode_paths(self, ep: int) -> list[str]:
        """`episode_files` as strings."""
        return [self._data_file(ep)] + [self._video_file(ep, k) for k in self.video_keys]

    def parquet_path(self, ep: int) -> Path:
        return Path(self._data_file(ep))

    def video_path(self, ep: int, key: str) -> Path:
        return Path(self._video_file(ep, key))

    def episode_files(self, ep: int) -> list[Path]:
        return [Path(p) for p in self.episode_paths(ep)]

    # -- identity: what the ledger records, so a changed episode is noticed ---------------------------

    def fingerprint(self, ep: int) -> dict[str, list[int]]:
        """File name -> [size, mtime_ns] of the episode's files: the cheap check."""
        out = {}
        for path in self.episode_paths(ep):
            st = os.stat(path)
            out[os.path.basename(path)] = [st.st_size, st.st_mtime_ns]
        return out

    def content_hash(self, ep: int) -> str:
        """sha256 over the sha256 of each of the episode's files: the exact check. Taken from `hash_ahead`
        when it hashed this episode and the files have not changed since (size, mtime)."""
        ahead = self._hashed_ahead.pop(ep, None)
        if ahead is not None:
            before, job = ahead
            digest = job.result()
            if digest is not None and before == self.fingerprint(ep):
                return digest
        return group_digest(self.episode_paths(ep))

    def hash_ahead(self, episodes: list[int]) -> None:
        """Start hashing these episodes' files in a child process, for `content_hash` to pick up.

        A one-shot convert starts this before importing pyarrow, numpy and PyAV (~0.2 s on one core), so
        the hashing (~1 ms per MB) runs on the idle core instead of competing with the keyframe decoding
        later. Each episode's fingerprint is taken before its files are read: a file changed since is
        hashed again."""
        todo = {}
        for ep in episodes:
            try:
                todo[ep] = self.fingerprint(ep)
            except OSError:  # not all there (yet): hashed, or reported, when asked for
                continue
        jobs = group_digests_in_child([self.episode_paths(ep) for ep in todo])
        self._hashed_ahead.update({ep: (before, job) for (ep, before), job in zip(todo.items(), jobs)})

    def changed_since(self, ep: int, fingerprint: dict, content_hash: str) -> bool:
        """True when the episode's files all exist and their content differs from the recorded identity."""
        try:
            now = self.fingerprint(ep)  # one stat per file: an append checks every ingested episode
        except FileNotFoundError:
            return False
        return now != fingerprint and self.content_hash(ep) != content_hash

    # -- features: what a v3.0 store of this source holds ---------------------------------------------

    def store_features(self) -> dict:
        """The features as lerobot's `create` writes them (no per-feature `fps`)."""
        feats = json.loads(json.dumps(self.features))
        for f in feats.values():
            f.pop("fps", None)
        return feats

    def check_compatible(self, info: dict, store_root: Path) -> None:
        """Raise naming the source's info.json unless fps and features match the store's `info`."""
        if int(info["fps"]) != self.fps:
            raise ConveyorError(self.root / "meta/info.json",
                                f"fps mismatch: source has {self.fps}, store {store_root} has {info['fps']}")
        a, b = comparable_features(self.store_features()), comparable_features(info["features"])
        if a != b:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ConveyorError(self.root / "meta/info.json",
                                f"feature mismatch with store {store_root}: {', '.join(diff)}")

    def check_declared_cameras(self, ready: list[SourceEpisode]) -> SourceEpisode | None:
        """Refuse declared camera streams the first complete, readable episode's files do not have
        (conveyor/cameras.py); an episode whose video does not open is left for ingest to quarantine.
        Returns the episode checked, None when no episode's videos open."""
        for episode in ready:
            if check_declared_cameras(self.root, self.features, episode.videos):
                return episode
        return None

    # -- completeness ---------------------------------------------------------------------------------

    def check_episode(self, ep: int, record: dict, probe_videos: bool = True) -> SourceEpisode:
        """The episode if complete and consistent; BadEpisode if broken.

        A missing file while the jsonl line exists means the episode is broken (the recorder writes
        the line last), so it is reported rather than waited for. `probe_videos=False` leaves the
        frame-count check to a caller that demuxes the videos anyway (ingest).
        """
        import pyarrow.parquet as pq  # here, not at the top: `conveyor ingest` with nothing new needs neither

        from conveyor.video import probe

        length = int(record.get("length", -1))
        pq_path = self.parquet_path(ep)
        if not pq_path.exists():
            raise BadEpisode(pq_path, "missing data parquet for a recorded episode", ep)
        try:
            rows = pq.ParquetFile(pq_path).metadata.num_rows
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError for truncated files
            raise BadEpisode(pq_path, f"corrupt parquet: {e}", ep) from None
        if rows != length:
            raise BadEpisode(pq_path, f"length mismatch: {rows} rows but episodes.jsonl says {length}", ep)
        videos = {}
        for key in self.video_keys:
            vp = self.video_path(ep, key)
            if not vp.exists():
                raise BadEpisode(vp, f"missing camera file for {key}", ep)
            if probe_videos:
                try:
                    check_video_length(vp, probe(vp).frames, length, ep)
                except ConveyorError as e:
                    raise BadEpisode(vp, e.problem, ep) from None
            videos[key] = vp
        tasks = [str(t) for t in record.get("tasks") or []]
        return SourceEpisode(ep, length, tasks, pq_path, videos)

    def scan(self, skip: set[int] | frozenset[int] = frozenset(), probe_videos: bool = True
             ) -> tuple[list[SourceEpisode], SourceScan]:
        """Complete episodes in episode_index order, plus which ones are incomplete or broken.

        `skip` lists episodes already handled (in the store), which are not re-probed.
        """
        records = self.episode_records()
        ready, result = scan_records(records, skip, lambda ep, rec: self.check_episode(ep, rec, probe_videos))
        result.incomplete = self.unrecorded(records)
        return ready, result

    def unrecorded(self, records: dict[int, dict] | set[int]) -> list[int]:
        """Episodes with a data file but no jsonl line yet: still being recorded."""
        out = []
        try:  # os.scandir, not Path.glob: this runs on every append and costs O(episodes) either way
            chunks = [e.path for e in os.scandir(self.root / "data") if e.is_dir()]
        except (FileNotFoundError, NotADirectoryError):
            return []
        for chunk in chunks:
            for e in os.scandir(chunk):
                name = e.name
                if not (name.startswith("episode_") and name.endswith(".parquet")):
                    continue
                try:
                    ep = int(name[len("episode_"):-len(".parquet")])
                except ValueError:
                    continue
                if ep not in records:
                    out.append(ep)
        return sorted(out)


def _read_info(path: Path, settle_s: float) -> dict:
    """info.json, waiting out a recorder that is rewriting it: lerobot's recorder rewrites it in place after
    each episode's jsonl lines (truncate, then write), so a reader can catch it empty or half-written; a file
    still unreadable after `settle_s` is an error."""
    deadline = time.monotonic() + settle_s
    while True:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if time.monotonic() >= deadline:
                raise ConveyorError(path, f"not valid JSON: {e}") from None
            time.sleep(0.02)


def comparable_features(features: dict) -> dict:
    """What must agree between a source's and a store's features: dtype, shape, names."""
    return {k: (f["dtype"], list(f["shape"]), f.get("names")) for k, f in features.items()}


def check_video_length(path: Path, frames: int, length: int, ep: int) -> None:
    if frames != length:
        raise BadEpisode(path, f"length mismatch: {frames} video frames but episodes.jsonl says {length}", ep)


def scan_source(path: str | Path) -> SourceScan:
    """Which episodes of a recording are complete, still being written, or broken."""
    return V21Source.open(path).scan()[1]
