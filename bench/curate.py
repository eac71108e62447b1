"""Benchmark for issue 18 §2: curation on a 1,000-episode store, and lerobot 0.6.1's `delete_episodes`.

Not a test. Builds (once, cached under --work, shared with bench/scale.py) the 1,000-episode recording
of bench/scale.py (2 cameras 48x64 AV1, 10-20 frames), converts it (untimed), copies the store (untimed), then
times in this process, one after the other on the same store: dropping 1 episode (the middle one), trimming 1
episode, re-tasking 100 episodes. Seconds are the operation's own (`CurationReport.seconds`: lock, read,
rewrite, commit with fdatasync); bytes written are the bytes of the files the commit added (data/metadata
parquet, stats, info, tasks, the sorted values behind exact quantiles, manifest). Then, on an untouched copy of
the same store, lerobot 0.6.1's `delete_episodes` of the same episode (load + delete + write to a new folder;
bytes written = the size of the folder it writes). Writes the `## curate` section of bench/README.md.

Usage: .venv/bin/python bench/curate.py [--episodes 1000] [--work bench/out] [--no-readme]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from readme_section import write_section  # bench/ is on sys.path when run as a script
from scale import ENV, recording

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "## curate"


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--work", default="bench/out")
    p.add_argument("--no-readme", action="store_true")
    a = p.parse_args()
    os.environ.update(ENV)
    from conveyor import curate
    from conveyor.ingest import convert

    work = Path(a.work) if Path(a.work).is_absolute() else REPO / a.work
    src = recording(work, a.episodes)
    run = work / "curate-run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    base = run / "base"
    t0 = time.perf_counter()
    convert(src, base)
    print(f"converted {a.episodes} episodes in {time.perf_counter() - t0:.1f} s", flush=True)
    store, theirs = run / "store", run / "theirs"
    shutil.copytree(base, store)
    shutil.copytree(base, theirs, ignore=shutil.ignore_patterns(".conveyor"))
    mid = a.episodes // 2
    ops = []
    r = curate.drop(store, [mid], "bench")
    ops.append(("drop 1 episode", r))
    r = curate.trim(store, mid, 2, 9)
    ops.append(("trim 1 episode", r))
    r = curate.retask(store, list(range(0, 200, 2)), "re-tasked by the bench")
    ops.append(("re-task 100 episodes", r))
    from conveyor.validate import validate_fast

    valid = validate_fast(store, against=src).ok

    from lerobot.datasets import LeRobotDataset
    from lerobot.datasets.dataset_tools import delete_episodes

    t0 = time.perf_counter()
    ds = LeRobotDataset("local/theirs", root=theirs, video_backend="pyav")
    out = run / "theirs_deleted"
    delete_episodes(ds, [mid], output_dir=out, repo_id="local/theirs_deleted")
    lr_s = time.perf_counter() - t0
    lr_b = folder_bytes(out)
    drop_s = ops[0][1].seconds
    lines = [SECTION, "",
             f"`bench/curate.py`, {datetime.date.today()}, {platform.node()} ({os.cpu_count()} CPUs, shared with "
             "other jobs: a busy machine, figures are upper bounds), a "
             f"{a.episodes}-episode store (bench/scale.py's recording: 2 cameras 48x64 AV1, 10-20 frames). "
             "Seconds of the operation itself (in process: lock, read, rewrite, durable commit); bytes = what the "
             "commit added. lerobot: `delete_episodes` of the same episode on an untouched copy (load + delete + "
             "write), bytes = the folder it writes.", "",
             "| operation | seconds | bytes written | episodes | frames |", "| --- | ---: | ---: | --- | --- |"]
    for name, r in ops:
        lines.append(f"| {name} | {r.seconds:.3f} | {r.bytes_written:,} | {r.episodes_before} -> "
                     f"{r.episodes_after} | {r.frames_before} -> {r.frames_after} |")
    lines.append(f"| lerobot 0.6.1 `delete_episodes`, 1 episode | {lr_s:.3f} | {lr_b:,} | | |")
    lines += ["", f"drop is **{lr_s / drop_s:.0f}x** faster than lerobot's delete_episodes (target >= 50x); "
                  f"each operation <= 1 s: {'yes' if all(r.seconds <= 1 for _, r in ops) else 'NO'}; "
                  f"the curated store validates against its source: {'yes' if valid else 'NO'}.", ""]
    text = "\n".join(lines)
    print(text)
    if not a.no_readme:
        write_section(SECTION, text)
    shutil.rmtree(run, ignore_errors=True)
    return 0 if valid else 1


if __name__ == "__main__":
    sys.exit(main())
