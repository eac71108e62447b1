"""Synthetic LeRobot v3.0 recording sessions, written by lerobot 0.6.1's own recorder API.

`LeRobotDataset.create` -> `add_frame` x L -> `save_episode`, N times -> `finalize()` (or not), with synthetic
frames (smooth moving gradients: SVT-AV1 encodes them fast) and Koch-shaped vectors. Nothing is hand-written:
the files are exactly what `lerobot-record` leaves, including what it leaves when it dies.

Run it in a child process (it imports lerobot and torch), e.g. from a test that kills it:

    python -m conveyor.synthetic.v30_session ROOT [--episodes 3] [--length 20] [--size 96x128]
        [--cameras 1] [--fps 30] [--task TEXT]... [--seed 0] [--end finalize|exit|kill]
        [--wait-after K] [--data-mb N] [--video-mb N] [--meta-buffer N] [--batch-encoding N]

- prints `saved I` (flushed) after each `save_episode` and `done` at the end;
- `--wait-after K`: after the K-th episode prints `waiting K`, then blocks until a line arrives on stdin (the
  parent inspects or kills the half-recorded session meanwhile), then goes on;
- `--end finalize` calls `finalize()`; `exit` returns without it (interpreter exit: the data writer is closed
  by garbage collection, `meta/episodes` is lost in the buffer); `kill` SIGKILLs itself after the last
  `save_episode` (nothing is closed);
- `--task` repeats cycle over episodes (default: one English and one Chinese task).

`frame_value(seed, ep, i)` is the state/action vector of frame i of episode ep, for tests that check rows.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SVT_LOG", "1")

MOTORS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]
DEFAULT_TASKS = ("pick the cube", "把方块放进盒子")
CAMERA_NAMES = ("top", "wrist", "side")


def features(height: int, width: int, cameras: int) -> dict:
    """lerobot-record's feature dict for a Koch arm with `cameras` cameras."""
    out = {
        "action": {"dtype": "float32", "shape": (6,), "names": MOTORS},
        "observation.state": {"dtype": "float32", "shape": (6,), "names": MOTORS},
    }
    for name in CAMERA_NAMES[:cameras]:
        out[f"observation.images.{name}"] = {"dtype": "video", "shape": (height, width, 3),
                                             "names": ["height", "width", "channels"]}
    return out


def frame_value(seed: int, ep: int, i: int) -> np.ndarray:
    """Deterministic 6-vector for frame i of episode ep."""
    return (np.sin(np.arange(6, dtype=np.float32) + 0.1 * i + ep + seed) * 10).astype(np.float32)


def image(height: int, width: int, ep: int, i: int, cam: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    r = (x * 2 + i * 3 + ep * 40) % 256
    g = (y * 2 + i * 5 + cam * 60) % 256
    b = ((x + y) + i * 7) % 256
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def record(root: Path, episodes: int = 3, length: int = 20, size: tuple[int, int] = (96, 128), cameras: int = 1,
           fps: int = 30, tasks: tuple[str, ...] = DEFAULT_TASKS, seed: int = 0, end: str = "finalize",
           wait_after: int | None = None, data_mb: int | None = None, video_mb: int | None = None,
           meta_buffer: int = 10, batch_encoding: int = 1) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    h, w = size
    ds = LeRobotDataset.create(repo_id=f"synthetic/{root.name}", fps=fps, features=features(h, w, cameras),
                               root=root, robot_type="koch", use_videos=True, metadata_buffer_size=meta_buffer,
                               batch_encoding_size=batch_encoding, data_files_size_in_mb=data_mb,
                               video_files_size_in_mb=video_mb)
    for ep in range(episodes):
        for i in range(length):
            frame = {"action": frame_value(seed, ep, i), "observation.state": frame_value(seed + 1, ep, i),
                     "task": tasks[ep % len(tasks)]}
            for c, name in enumerate(CAMERA_NAMES[:cameras]):
                frame[f"observation.images.{name}"] = image(h, w, ep, i, c)
            ds.add_frame(frame)
        ds.save_episode()
        print(f"saved {ep}", flush=True)
        if wait_after is not None and ep + 1 == wait_after:
            print(f"waiting {ep + 1}", flush=True)
            sys.stdin.readline()
    if end == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if end == "finalize":
        ds.finalize()
    print("done", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m conveyor.synthetic.v30_session", description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path, help="the session folder to create (must not exist)")
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--length", type=int, default=20, help="frames per episode")
    p.add_argument("--size", default="96x128", help="HxW of each camera")
    p.add_argument("--cameras", type=int, default=1, choices=range(0, len(CAMERA_NAMES) + 1))
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--task", action="append", help="task text (repeat: cycled over episodes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--end", choices=("finalize", "exit", "kill"), default="finalize")
    p.add_argument("--wait-after", type=int, help="after this many episodes, wait for a line on stdin")
    p.add_argument("--data-mb", type=int, help="lerobot's data_files_size_in_mb (roll-over size)")
    p.add_argument("--video-mb", type=int, help="lerobot's video_files_size_in_mb")
    p.add_argument("--meta-buffer", type=int, default=10, help="lerobot's metadata_buffer_size")
    p.add_argument("--batch-encoding", type=int, default=1, help="lerobot's batch_encoding_size")
    a = p.parse_args(argv)
    h, w = (int(v) for v in a.size.lower().split("x"))
    record(a.root, a.episodes, a.length, (h, w), a.cameras, a.fps, tuple(a.task or DEFAULT_TASKS), a.seed, a.end,
           a.wait_after, a.data_mb, a.video_mb, a.meta_buffer, a.batch_encoding)


if __name__ == "__main__":
    main()
