"""A lerobot 0.6.1 recorder (`LeRobotDataset.create` + `add_frame` + `save_episode` [+ `finalize`]) with
synthetic frames, that SIGKILLs itself at a chosen point: what a recording PC's crash or `kill -9` leaves.

    python salvage_recorder.py ROOT --episodes 4 --frames 12 --kill after_save:1
    python salvage_recorder.py PARENT --batch after_save:1 concat:2 ...   # one session per kill: PARENT/<kill>

`--batch` imports lerobot once and records each session in a forked child (lerobot's import is most of a
recording's time here); `no_finalize` always runs as a process of its own, since it is about interpreter exit.

Kill points (`--kill`):
  after_save:K    right after the K-th `save_episode` returned (K counts from 1)
  mid_frames:K:F  during episode K (from 0) after F `add_frame` calls
  encode:K        inside episode K's `save_episode`: its data rows written, its video not encoded yet
  concat:K        inside episode K's `save_episode`: its video encoded, being concatenated into the camera file
                  (the concatenation runs into a temporary file, so the camera file is still the old one)
  copy:K:PCT      inside episode K's `save_episode`: the concatenated file being moved onto the camera file
                  across filesystems (shutil.move = copy): only PCT % of its bytes are there
  no_finalize     records every episode, exits normally without `finalize()` (the interpreter's shutdown runs
                  lerobot's `__del__` safety nets)
  os_exit         records every episode, then the process ends without `finalize()` or any cleanup (os._exit)
  finalize        records every episode, `finalize()`, exits (nothing to salvage)

Everything it gives the recorder is a pure function of (episode, frame): `frame_values` (tests compare to it).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import numpy as np

FPS = 10
HEIGHT, WIDTH = 64, 96
CAMERA = "observation.images.top"
TASKS = ["抓取方块并放入盒子", "pick up the cube"]


def features() -> dict:
    return {
        "observation.state": {"dtype": "float32", "shape": (6,), "names": [f"j{i}" for i in range(6)]},
        "action": {"dtype": "float32", "shape": (6,), "names": [f"j{i}" for i in range(6)]},
        CAMERA: {"dtype": "video", "shape": (HEIGHT, WIDTH, 3), "names": ["height", "width", "channels"]},
    }


def task_of(ep: int) -> str:
    return TASKS[ep % len(TASKS)]


def frame_values(ep: int, i: int) -> dict:
    """The frame the recorder is given for episode `ep`, frame `i` (smooth image: codecs keep it close)."""
    state = (np.arange(6, dtype=np.float32) + 10 * ep + 0.1 * i).astype(np.float32)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    img = np.stack([(xx * 2 + 40 * ep) % 256, (yy * 3 + 8 * i) % 256,
                    np.full_like(xx, (60 * ep + 5 * i) % 256)], axis=-1).astype(np.uint8)
    return {"observation.state": state, "action": state * 2, CAMERA: img}


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def session_name(kill: str) -> str:
    return kill.replace(":", "_")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--kill", default="finalize")
    p.add_argument("--batch", nargs="+", metavar="KILL")
    a = p.parse_args(argv)
    if a.batch:
        batch(Path(a.root), a.batch, a.episodes, a.frames)
    else:
        record(a.root, a.kill, a.episodes, a.frames)


def batch(parent: Path, kills: list[str], episodes: int, frames: int) -> None:
    import subprocess

    import lerobot.datasets.lerobot_dataset  # noqa: F401  (imported once, before the forks)

    for kill in kills:
        root = parent / session_name(kill)
        if kill == "no_finalize":
            subprocess.run([sys.executable, __file__, str(root), "--kill", kill, "--episodes", str(episodes),
                            "--frames", str(frames)], check=True, stdout=subprocess.DEVNULL)
            continue
        pid = os.fork()
        if pid == 0:
            try:
                record(str(root), kill, episodes, frames)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    print("recorded", flush=True)


def record(root: str, kill: str, episodes: int, frames: int) -> None:
    what, *args = kill.split(":")
    nums = [int(x) for x in args]

    from lerobot.datasets import dataset_writer
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    state = {"ep": -1}
    if what in ("encode", "concat", "copy"):
        if what == "encode":
            original_encode = dataset_writer._encode_video_worker

            def encode(video_key, episode_index, *rest, **kw):
                if episode_index == nums[0]:
                    _die()
                return original_encode(video_key, episode_index, *rest, **kw)

            dataset_writer._encode_video_worker = encode
        else:
            original_concat = dataset_writer.concatenate_video_files

            def concat(inputs, output, *rest, **kw):
                if state["ep"] != nums[0]:
                    return original_concat(inputs, output, *rest, **kw)
                if what == "concat":
                    _die()
                # the real concatenation into a side file, then a cross-filesystem move cut short
                side = Path(str(output) + ".side.mp4")
                original_concat(inputs, side, *rest, **kw)
                data = side.read_bytes()
                side.unlink()
                with open(output, "wb") as f:
                    f.write(data[: len(data) * nums[1] // 100])
                    f.flush()
                    os.fsync(f.fileno())
                _die()

            dataset_writer.concatenate_video_files = concat

    ds = LeRobotDataset.create(repo_id="lab/session", fps=FPS, features=features(), root=root,
                               robot_type="so101", use_videos=True)
    for ep in range(episodes):
        state["ep"] = ep
        for i in range(frames):
            if what == "mid_frames" and nums == [ep, i]:
                _die()
            ds.add_frame({**frame_values(ep, i), "task": task_of(ep)})
        ds.save_episode()
        if what == "after_save" and ep + 1 == nums[0]:
            _die()
    if what == "finalize":
        ds.finalize()
    if what == "os_exit":
        os._exit(0)


if __name__ == "__main__":
    main()
