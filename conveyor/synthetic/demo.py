"""`conveyor up --demo`: a pretend recorder, so a newcomer sees episodes flow into the store.

Writes a small generated v2.1 recording (two 64x48 AV1 cameras) into the demo source folder over about
a minute, exactly as the old recorder does (media first, jsonl lines last), via `conveyor.synthetic.recording`.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from conveyor.synthetic.recording import RecordingSpec, RecordingWriter

DEMO_TASKS = ("pick the cube", "place the cube in the bowl")


def record_demo(root: Path, *, episodes: int = 8, interval: float = 7.0, length: int = 60,
                stop: threading.Event | None = None, out: Callable[[str], None] = print) -> int:
    """Append `episodes` episodes to `root`, one every `interval` seconds; returns how many were written.

    Continues a demo recording left by an earlier run (new indices after the last one).
    """
    stop = stop or threading.Event()
    writer = RecordingWriter(root, RecordingSpec(fps=30))
    start = int(writer.info.get("total_episodes", 0))
    written = 0
    for i in range(episodes):
        if stop.wait(interval if i else 2.0):
            break
        ep = start + i
        writer.write_episode(ep, length, DEMO_TASKS[ep % len(DEMO_TASKS)])
        written += 1
        out(f"demo: recorded episode {ep} ({length} frames)")
    if written:
        out(f"demo: done, {written} episode(s) recorded; watch them land as `ingest` runs in the UI")
    return written
