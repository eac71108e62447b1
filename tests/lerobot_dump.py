"""Load a dataset with whatever lerobot this interpreter has and print every item as JSON (one line).

Standalone (standard library + lerobot + torch), so the cross-version test runs it in lerobot 0.4.4's
Python 3.11 venv and in conveyor's 0.6 venv alike: `python lerobot_dump.py ROOT > dump.json`.
Frames are reported as sha256 of their uint8 pixels (HWC, RGB), rows as plain numbers.
"""
from __future__ import annotations

import hashlib
import json
import sys
from importlib import metadata


def dump(root: str) -> dict:
    try:
        from lerobot.datasets.lerobot_dataset import LeRobotDataset
    except ImportError:                                   # 0.6 moved it into a package of its own
        from lerobot.datasets import LeRobotDataset

    ds = LeRobotDataset("local/store", root=root, video_backend="pyav")
    cams = list(ds.meta.camera_keys)
    items = []
    for i in range(len(ds)):
        it = ds[i]
        row = {k: (it[k].tolist() if hasattr(it[k], "tolist") else it[k])
               for k in ("index", "episode_index", "frame_index", "timestamp", "task", "action",
                         "observation.state")}
        for cam in cams:
            px = (it[cam] * 255).round().clamp(0, 255).to(dtype=__import__("torch").uint8).permute(1, 2, 0)
            row[cam] = hashlib.sha256(px.contiguous().numpy().tobytes()).hexdigest()
        items.append(row)
    return {"lerobot": metadata.version("lerobot"), "len": len(ds), "episodes": ds.meta.total_episodes,
            "fps": ds.fps, "cameras": cams, "items": items}


if __name__ == "__main__":
    print(json.dumps(dump(sys.argv[1]), ensure_ascii=False))
