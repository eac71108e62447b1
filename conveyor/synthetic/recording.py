"""Synthetic LeRobot v2.1 recordings, written the way lerobot <= 0.3.x's recorder writes them.

Used by tests, benchmarks and ``--demo``: episodes can be appended one at a time to an
existing folder, optionally leaving an episode half-written (files on disk, no metadata).

Layout (chunk = episode_index // chunks_size)::

    meta/info.json  meta/tasks.jsonl  meta/episodes.jsonl  meta/episodes_stats.jsonl
    data/chunk-000/episode_000000.parquet
    videos/chunk-000/<video_key>/episode_000000.mp4

Fidelity notes:
* Vector features are written like ``datasets.Sequence(length=N)`` (what lerobot's
  ``get_hf_features_from_features`` declares): arrow ``fixed_size_list<float>[N]`` and HF
  metadata ``"length": N``. ``RecordingSpec(fixed_size_vectors=False)`` writes plain
  ``list<float>`` / ``"length": -1`` instead (what some converted Hub datasets carry).
* SVT-AV1 crashes the process (SIGFPE) for frames narrower than ~32 px, so CameraSpec
  rejects width < 32 for av1; the default 64x48 encodes fine.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CHUNKS_SIZE = 1000
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
KOCH_MOTORS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]
_ENCODERS = {"av1": "libsvtav1", "h264": "libx264"}
# lerobot's encode_video_frames defaults for AV1; h264 keeps x264 defaults (B-frames, GOP 250).
_ENCODER_OPTIONS = {"av1": {"g": "2", "crf": "30", "preset": "12"}, "h264": {}}
os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a banner per encoder otherwise


@dataclass(frozen=True)
class CameraSpec:
    key: str
    height: int = 48
    width: int = 64
    codec: str = "av1"  # "av1" | "h264"; ignored for dtype "image"
    dtype: str = "video"  # "video" (mp4 per episode) | "image" (PNG bytes in the parquet)

    def __post_init__(self):
        if self.dtype not in ("video", "image"):
            raise ValueError(f"camera dtype must be 'video' or 'image', not {self.dtype!r}")
        if self.dtype == "video":
            if self.codec not in _ENCODERS:
                raise ValueError(f"codec must be one of {sorted(_ENCODERS)}, not {self.codec!r}")
            if self.height % 2 or self.width % 2:
                raise ValueError("yuv420p needs even height and width")
            if self.codec == "av1" and (self.width < 32 or self.height < 8):
                raise ValueError("libsvtav1 crashes (SIGFPE) below ~32 px width; use width >= 32")


@dataclass(frozen=True)
class RecordingSpec:
    fps: int = 30
    robot_type: str = "koch"
    cameras: tuple[CameraSpec, ...] = (
        CameraSpec("observation.images.laptop"),
        CameraSpec("observation.images.phone"),
    )
    state_dim: int = 6
    action_dim: int = 6
    seed: int = 0
    fixed_size_vectors: bool = True  # see module docstring

    def features(self) -> dict:
        """info.json ``features`` in the recorder's order: robot features, then the defaults."""
        def vec(n):
            names = KOCH_MOTORS if n == len(KOCH_MOTORS) else [f"motor_{i}" for i in range(n)]
            return {"dtype": "float32", "shape": [n], "names": list(names)}

        feats = {"action": vec(self.action_dim), "observation.state": vec(self.state_dim)}
        for cam in self.cameras:
            ft = {"dtype": cam.dtype, "shape": [cam.height, cam.width, 3], "names": ["height", "width", "channels"]}
            if cam.dtype == "video":
                ft["info"] = {
                    "video.fps": float(self.fps), "video.height": cam.height, "video.width": cam.width,
                    "video.channels": 3, "video.codec": cam.codec, "video.pix_fmt": "yuv420p",
                    "video.is_depth_map": False, "has_audio": False,
                }
            feats[cam.key] = ft
        feats["timestamp"] = {"dtype": "float32", "shape": [1], "names": None}
        for k in ("frame_index", "episode_index", "index", "task_index"):
            feats[k] = {"dtype": "int64", "shape": [1], "names": None}
        return feats


KOCH_480P = RecordingSpec(
    cameras=(CameraSpec("observation.images.laptop", 480, 640), CameraSpec("observation.images.phone", 480, 640))
)


@dataclass
class EpisodeFiles:
    parquet: Path
    videos: dict[str, Path] = field(default_factory=dict)


# ----------------------------------------------------------------------------- content


def _key_seed(key: str) -> int:
    """Stable per-camera seed (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


def frame_pixels(spec: RecordingSpec, camera: CameraSpec, episode_index: int, frame_index: int) -> np.ndarray:
    """The deterministic uint8 HxWx3 RGB frame for this camera/episode/frame (before lossy coding).

    A scrolling gradient plus a bouncing square (so content moves and compresses like video)
    plus light noise (so every frame/episode/camera differs even where the motion is slow).
    """
    h, w = camera.height, camera.width
    cs = _key_seed(camera.key)
    rng = np.random.default_rng([spec.seed, cs, episode_index, frame_index])
    t = frame_index / spec.fps
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    phase = (episode_index * 37 + cs) % 256
    img = np.empty((h, w, 3), np.float32)
    img[..., 0] = (x * (256.0 / w) + 64 * t + phase) % 256
    img[..., 1] = (y * (256.0 / h) + 32 * t + 2 * phase) % 256
    img[..., 2] = ((x + y) * (128.0 / (h + w)) + 40 * episode_index + cs % 97) % 256
    side = max(2, min(h, w) // 4)
    px = int((w - side) * (0.5 + 0.5 * np.sin(2.0 * t + episode_index)))
    py = int((h - side) * (0.5 + 0.5 * np.cos(1.3 * t + 0.7 * episode_index)))
    img[py : py + side, px : px + side] = (255.0, 255.0 - 20 * (episode_index % 8), 40.0)
    out = (img * (243.0 / 255.0)).astype(np.uint8)
    out += rng.integers(0, 13, size=out.shape, dtype=np.uint8)  # <= 255, no wrap-around
    return out


def _trajectory(spec: RecordingSpec, episode_index: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth joint-space motion; action leads state by one frame like a teleop follower."""
    rng = np.random.default_rng([spec.seed, 1, episode_index])
    dim = max(spec.state_dim, spec.action_dim)
    t = (np.arange(length + 1) / spec.fps)[:, None]
    freq, phase, amp = rng.uniform(0.2, 1.0, dim), rng.uniform(0, 2 * np.pi, dim), rng.uniform(5, 60, dim)
    q = amp * np.sin(2 * np.pi * freq * t + phase) + rng.normal(0, 0.1, (length + 1, dim))
    q = q.astype(np.float32)
    return q[:-1, : spec.state_dim], q[1:, : spec.action_dim]


# ----------------------------------------------------------------------------- encoding


def _encode_png(frame: np.ndarray) -> bytes:
    """PNG via FFmpeg's encoder (what HF ``Image()`` stores; avoids a PIL dependency)."""
    ctx = av.CodecContext.create("png", "w")
    ctx.width, ctx.height, ctx.pix_fmt = frame.shape[1], frame.shape[0], "rgb24"
    ctx.time_base = Fraction(1, 1)
    vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
    return b"".join(bytes(p) for p in ctx.encode(vf) + ctx.encode(None))


class _VideoSink:
    """One mp4 per episode/camera; codec time_base 1/fps and pts = frame_index."""

    def __init__(self, path: Path, cam: CameraSpec, fps: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream(_ENCODERS[cam.codec], rate=fps, options=_ENCODER_OPTIONS[cam.codec])
        self.stream.width, self.stream.height, self.stream.pix_fmt = cam.width, cam.height, "yuv420p"
        self.stream.codec_context.time_base = Fraction(1, fps)

    def add(self, frame: np.ndarray, pts: int):
        vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
        vf.pts = pts
        self.container.mux(self.stream.encode(vf))

    def close(self):
        self.container.mux(self.stream.encode(None))
        self.container.close()


class _PixelStats:
    """Running per-channel min/max/mean/std in [0, 1], shaped (3,1,1) like v2.1 image stats.

    Accumulates a 256-bin histogram per channel: exact and ~20x faster than float sums at 480p."""

    def __init__(self):
        self.hist = np.zeros((3, 256), np.int64)
        self.count = 0

    def add(self, frame: np.ndarray):
        for c in range(3):
            self.hist[c] += np.bincount(frame[..., c].ravel(), minlength=256)
        self.count += 1

    def result(self) -> dict:
        v = np.arange(256, dtype=np.float64) / 255.0
        n = self.hist.sum(1)
        mean = self.hist @ v / n
        std = np.sqrt(np.maximum(self.hist @ (v * v) / n - mean**2, 0.0))
        nz = [np.flatnonzero(h) for h in self.hist]
        lo, hi = [v[i[0]] for i in nz], [v[i[-1]] for i in nz]
        c = lambda a: np.asarray(a, np.float64).reshape(3, 1, 1).tolist()  # noqa: E731
        return {"min": c(lo), "max": c(hi), "mean": c(mean), "std": c(std), "count": [self.count]}


def _array_stats(a: np.ndarray) -> dict:
    """v2.1 numeric stats: reduce over frames; scalars keep a length-1 axis."""
    a = np.asarray(a)
    keep = a.ndim == 1
    return {
        "min": np.min(a, axis=0, keepdims=keep).tolist(),
        "max": np.max(a, axis=0, keepdims=keep).tolist(),
        "mean": np.mean(a, axis=0, keepdims=keep).tolist(),
        "std": np.std(a, axis=0, keepdims=keep).tolist(),
        "count": [len(a)],
    }


def _hf_feature(ft: dict, fixed: bool) -> dict:
    if ft["dtype"] == "image":
        return {"_type": "Image"}
    if ft["shape"] == [1]:
        return {"dtype": ft["dtype"], "_type": "Value"}
    return {"feature": {"dtype": ft["dtype"], "_type": "Value"}, "length": ft["shape"][0] if fixed else -1,
            "_type": "Sequence"}


def _arrow_type(ft: dict, fixed: bool) -> pa.DataType:
    if ft["dtype"] == "image":
        return pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    if ft["shape"] == [1]:
        return pa.from_numpy_dtype(np.dtype(ft["dtype"]))
    value = pa.from_numpy_dtype(np.dtype(ft["dtype"]))
    return pa.list_(value, ft["shape"][0]) if fixed else pa.list_(value)


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _append_jsonl(path: Path, obj: dict):
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- writer


class RecordingWriter:
    """Writes a v2.1 recording into root the way the old recorder does: per-episode parquet and
    mp4s first, then the jsonl lines, then info.json. Continues an existing recording in root."""

    def __init__(self, root, spec: RecordingSpec = RecordingSpec()):
        self.root = Path(root)
        self.spec = spec
        self.meta = self.root / "meta"
        self.meta.mkdir(parents=True, exist_ok=True)
        info_path = self.meta / "info.json"
        if info_path.exists():
            self.info = json.loads(info_path.read_text(encoding="utf-8"))
            if self.info.get("fps") != spec.fps or self.info["features"] != spec.features():
                raise ValueError(f"{root} holds a recording with different fps/features than spec")
        else:
            self.info = self._new_info()
            self._write_info()
        self.tasks = {t["task"]: t["task_index"] for t in _jsonl(self.meta / "tasks.jsonl")}
        self._pending: dict[int, tuple[int, str, dict]] = {}  # episode -> (length, task, stats)
        self._planned: list[str] = []  # new tasks given an index by an unfinished episode
        self._next_index = self.info["total_frames"]

    def _new_info(self) -> dict:
        has_video = any(c.dtype == "video" for c in self.spec.cameras)
        return {
            "codebase_version": "v2.1", "robot_type": self.spec.robot_type,
            "total_episodes": 0, "total_frames": 0, "total_tasks": 0, "total_videos": 0, "total_chunks": 0,
            "chunks_size": CHUNKS_SIZE, "fps": self.spec.fps, "splits": {},
            "data_path": DATA_PATH, "video_path": VIDEO_PATH if has_video else None,
            "features": self.spec.features(),
        }

    def _write_info(self):
        (self.meta / "info.json").write_text(json.dumps(self.info, indent=4, ensure_ascii=False), encoding="utf-8")

    def _task_index(self, task: str) -> int:
        """Known tasks keep their index; new ones get the next free one in first-seen order, even
        while their episode is unfinished (finish_episode writes them to tasks.jsonl in that order)."""
        if task in self.tasks:
            return self.tasks[task]
        if task not in self._planned:
            self._planned.append(task)
        return len(self.tasks) + self._planned.index(task)

    def episode_files(self, episode_index: int) -> EpisodeFiles:
        chunk = episode_index // self.info["chunks_size"]
        fmt = dict(episode_chunk=chunk, episode_index=episode_index)
        videos = {
            c.key: self.root / VIDEO_PATH.format(video_key=c.key, **fmt) for c in self.spec.cameras if c.dtype == "video"
        }
        return EpisodeFiles(self.root / DATA_PATH.format(**fmt), videos)

    def write_episode(self, episode_index: int, length: int, task: str | None = "pick the cube", *,
                      finish: bool = True) -> EpisodeFiles:
        """Write parquet + mp4s; with finish=True also the metadata (else call finish_episode later)."""
        if length < 1:
            raise ValueError("an episode needs at least one frame")
        done = {e["episode_index"] for e in _jsonl(self.meta / "episodes.jsonl")}
        if episode_index in done or episode_index in self._pending:
            raise ValueError(f"episode {episode_index} already written")
        spec, task = self.spec, task or ""
        files = self.episode_files(episode_index)
        state, action = _trajectory(spec, episode_index, length)
        frame_index = np.arange(length, dtype=np.int64)
        columns = {
            "action": action,
            "observation.state": state,
            "timestamp": (frame_index / spec.fps).astype(np.float32),
            "frame_index": frame_index,
            "episode_index": np.full(length, episode_index, np.int64),
            "index": self._next_index + frame_index,
            "task_index": np.full(length, self._task_index(task), np.int64),
        }
        stats = {k: _array_stats(v) for k, v in columns.items()}
        for cam in spec.cameras:
            px = _PixelStats()
            sink = _VideoSink(files.videos[cam.key], cam, spec.fps) if cam.dtype == "video" else None
            pngs = []
            for i in range(length):
                frame = frame_pixels(spec, cam, episode_index, i)
                px.add(frame)
                if sink:
                    sink.add(frame, i)
                else:
                    pngs.append({"bytes": _encode_png(frame), "path": f"frame_{i:06d}.png"})
            if sink:
                sink.close()
            else:
                columns[cam.key] = pngs
            stats[cam.key] = px.result()
        self._write_parquet(files.parquet, columns)
        self._next_index += length
        self._pending[episode_index] = (length, task, {k: stats[k] for k in spec.features() if k in stats})
        if finish:
            self.finish_episode(episode_index)
        return files

    def _write_parquet(self, path: Path, columns: dict):
        """Like ``datasets.Dataset.to_parquet``: HF features in the ``huggingface`` schema metadata."""
        fixed = self.spec.fixed_size_vectors
        feats = {k: ft for k, ft in self.info["features"].items() if ft["dtype"] != "video"}
        arrays, fields = [], []
        for k, ft in feats.items():
            typ = _arrow_type(ft, fixed)
            v = columns[k]
            if isinstance(typ, pa.FixedSizeListType):
                arr = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(v).ravel()), ft["shape"][0])
            elif isinstance(typ, pa.ListType):
                arr = pa.array(list(v), type=typ)
            else:
                arr = pa.array(v, type=typ)
            arrays.append(arr)
            fields.append(pa.field(k, typ))
        hf = {"info": {"features": {k: _hf_feature(ft, fixed) for k, ft in feats.items()}}}
        schema = pa.schema(fields, metadata={"huggingface": json.dumps(hf)})
        path.parent.mkdir(parents=True, exist_ok=True)
        has_images = any(ft["dtype"] == "image" for ft in feats.values())
        pq.write_table(pa.Table.from_arrays(arrays, schema=schema), path, row_group_size=100 if has_images else None)

    def finish_episode(self, episode_index: int) -> None:
        """Metadata for an episode whose files exist: tasks.jsonl, episodes(_stats).jsonl, then info.json."""
        length, task, stats = self._pending.pop(episode_index)
        while task not in self.tasks:
            new = self._planned.pop(0)
            self.tasks[new] = len(self.tasks)
            _append_jsonl(self.meta / "tasks.jsonl", {"task_index": self.tasks[new], "task": new})
        _append_jsonl(self.meta / "episodes.jsonl",
                      {"episode_index": episode_index, "tasks": [task] if task else [], "length": length})
        _append_jsonl(self.meta / "episodes_stats.jsonl", {"episode_index": episode_index, "stats": stats})
        info = self.info
        info["total_episodes"] += 1
        info["total_frames"] += length
        info["total_tasks"] = len(self.tasks)
        info["total_videos"] += sum(c.dtype == "video" for c in self.spec.cameras)
        info["total_chunks"] = max(info["total_chunks"], episode_index // info["chunks_size"] + 1)
        info["splits"] = {"train": f"0:{info['total_episodes']}"}
        self._write_info()


def write_recording(root, episodes: int | Sequence[int] = 3, *, lengths: int | Sequence[int] = 12,
                    tasks: str | None | Sequence[str | None] = "pick the cube",
                    spec: RecordingSpec = RecordingSpec()) -> Path:
    """One-shot: write a complete recording with these episode indices (int -> range(n)) and lengths."""
    eps = list(range(episodes)) if isinstance(episodes, int) else list(episodes)
    lens = [lengths] * len(eps) if isinstance(lengths, int) else list(lengths)
    tsks = [tasks] * len(eps) if tasks is None or isinstance(tasks, str) else list(tasks)
    if not len(eps) == len(lens) == len(tsks):
        raise ValueError("episodes, lengths and tasks must have the same length")
    writer = RecordingWriter(root, spec)
    for ep, n, t in zip(eps, lens, tsks):
        writer.write_episode(ep, n, t)
    return Path(root)


def _main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="python -m conveyor.synthetic.recording", description="write a synthetic LeRobot v2.1 recording")
    p.add_argument("root")
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--length", type=int, default=12)
    p.add_argument("--codec", choices=sorted(_ENCODERS), default="av1")
    p.add_argument("--size", default="48x64", help="HEIGHTxWIDTH of both cameras")
    p.add_argument("--task", default="pick the cube")
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    h, w = (int(v) for v in a.size.lower().split("x"))
    spec = RecordingSpec(fps=a.fps, seed=a.seed, cameras=tuple(
        CameraSpec(k, h, w, a.codec) for k in ("observation.images.laptop", "observation.images.phone")))
    print(write_recording(a.root, a.episodes, lengths=a.length, tasks=a.task or None, spec=spec))


if __name__ == "__main__":
    _main()
