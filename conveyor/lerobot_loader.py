"""The lerobot part of deep validation, run as a niced child process by conveyor/lerobot_check.py (its imports, torch
and datasets, cost ~7 s and ~1 GB and never enter the caller): `LeRobotDataset(..., video_backend="pyav")` loads
the store offline exactly as lerobot-train does, and sampled items of every checked episode equal the stored
rows and frames. The checks go back as JSON; a damaged file fails a check naming it, never a traceback.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from conveyor import layout
from conveyor.episodes import load_episodes
from conveyor.reports import ValidationReport
from conveyor.store import Store
from conveyor.validate import MEDIA_ERRORS, _Checker, _sample, _why
from conveyor.video import decode_frames

DEEP_NICE = 10  # the deep check yields the CPU to ingest and fast validation (the latency path)


def main(root: str, todo: str, out: str) -> None:
    """`python -m conveyor.lerobot_loader ROOT EPISODES_JSON OUT`: the lerobot checks, as JSON in OUT."""
    os.nice(DEEP_NICE)
    s = Store(Path(root))
    report = ValidationReport(store=root, deep=True)
    chk = _Checker(s, None, report)
    check_with_lerobot(s, chk, load_episodes(s.root), json.loads(todo))
    chk.report_unreadable()
    Path(out).write_text(json.dumps({"checks": [asdict(c) for c in report.checks],
                                     "frames_compared": report.frames_compared,
                                     "pixel_identical": report.pixel_identical}))


def check_with_lerobot(s: Store, chk: _Checker, rows: list[dict], todo: list[int]) -> None:
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
        data = chk.readable_rows(row)  # an unreadable data file is named once, with its episodes
        if data is None:
            continue
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
        chk.report.frames_compared += n
        chk.report.pixel_identical += 0 if bad else n * len(chk.video_keys)


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


if __name__ == "__main__" and len(sys.argv) == 4:
    main(*sys.argv[1:])
