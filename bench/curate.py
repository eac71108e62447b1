"""Benchmark for issue 18 §2: curation on a 1,000-episode store, and lerobot 0.6.1's `delete_episodes`.

Not a test. Builds (once, cached under --work, shared with bench/scale.py) the 1,000-episode recording
of bench/scale.py (2 cameras 48x64 AV1, 10-20 frames), converts it (untimed), copies the store (untimed), then
runs, one after the other on the same store, as `conveyor` commands: dropping 1 episode (the middle one),
trimming 1 episode, re-tasking 100 episodes. Seconds are the operation's own as the command prints it (lock,
read, rewrite, commit with fdatasync), wall the whole process; bytes written are the bytes of the files the
commit added (data/metadata parquet, stats, info, tasks, the sorted values behind exact quantiles, manifest).
Then, on an untouched copy of the same store, lerobot 0.6.1's `delete_episodes` of the same episode (load +
delete + write to a new folder; bytes written = the size of the folder it writes). Writes the `## curate`
section of bench/README.md.

Usage: .venv/bin/python bench/curate.py [--episodes 1000] [--reps 3] [--work bench/out] [--no-readme]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

from readme_section import write_section  # bench/ is on sys.path when run as a script
from scale import ENV, recording, run

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "## curate"


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--work", default="bench/out")
    p.add_argument("--reps", type=int, default=3, help="runs of each operation (the median is reported)")
    p.add_argument("--no-readme", action="store_true")
    a = p.parse_args()
    os.environ.update(ENV)
    from conveyor.ingest import convert
    from conveyor.store import Store

    env = {**os.environ, **ENV}

    work = Path(a.work) if Path(a.work).is_absolute() else REPO / a.work
    src = recording(work, a.episodes)
    scratch = work / "curate-run"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    base = scratch / "base"
    t0 = time.perf_counter()
    convert(src, base)
    print(f"converted {a.episodes} episodes in {time.perf_counter() - t0:.1f} s", flush=True)
    store, theirs = scratch / "store", scratch / "theirs"
    shutil.copytree(base, store)
    shutil.copytree(base, theirs, ignore=shutil.ignore_patterns(".conveyor"))
    mid = a.episodes // 2
    ops, split = [], {}
    for name, make in (("drop 1 episode", lambda i: ["drop", str(store), str(mid + i), "--reason", "bench"]),
                       ("trim 1 episode", lambda i: ["trim", str(store), str(mid + i), "--start", "2", "--end", "9"]),
                       ("re-task 100 episodes", lambda i: ["retask", str(store), *map(str, range(i, 200 + i, 2)),
                                                          "--task", f"re-tasked by the bench {i}"])):
        runs = []
        for i in range(a.reps):  # each rep on other episodes of the same store, one after the other
            before = Store.open(store).version
            wall, _, out = run([sys.executable, "-m", "conveyor.cli", *make(i)], env)
            seconds = float(re.search(r"\(([0-9.]+) s\)\s*$", out).group(1))
            after = Store.open(store).version
            record = json.loads((store / f".conveyor/commits/{after.commit:08d}.json").read_text())
            runs.append((seconds, wall, sum(v[0] for v in record["add"].values()), before, after))
            kinds = {}
            for rel, (size, _) in record["add"].items():
                kind = rel.split("/")[0] if not rel.startswith(".conveyor/") else "/".join(rel.split("/")[:2])
                kinds[kind] = kinds.get(kind, 0) + size
            split[name] = kinds
        runs.sort(key=lambda r: r[0])
        ops.append((name, *runs[len(runs) // 2]))  # the median rep
    from conveyor.validate import validate_fast

    valid = validate_fast(store, against=src).ok

    from lerobot.datasets import LeRobotDataset
    from lerobot.datasets.dataset_tools import delete_episodes

    t0 = time.perf_counter()
    ds = LeRobotDataset("local/theirs", root=theirs, video_backend="pyav")
    out = scratch / "theirs_deleted"
    delete_episodes(ds, [mid], output_dir=out, repo_id="local/theirs_deleted")
    lr_s = time.perf_counter() - t0
    lr_b = folder_bytes(out)
    drop_s = ops[0][1]
    lines = [SECTION, "",
             f"`bench/curate.py`, {datetime.date.today()}, {platform.node()} ({os.cpu_count()} CPUs, shared with "
             "other jobs: a busy machine, figures are upper bounds), a "
             f"{a.episodes}-episode store (bench/scale.py's recording: 2 cameras 48x64 AV1, 10-20 frames). "
             f"Each operation is its `conveyor` command, the median of {a.reps} runs on other episodes: "
             "seconds = the operation as the command reports it (lock, "
             "read, rewrite, durable commit), wall = the whole process (interpreter start and imports included); "
             "bytes = the files its commit added (data and metadata parquet, stats/info/tasks, the sorted values "
             "behind exact quantiles, the manifest). lerobot: `delete_episodes` of the same episode on an "
             "untouched copy, in process (load + delete + write), bytes = the folder it writes.", "",
             "| operation | seconds | wall s | bytes written | episodes | frames |",
             "| --- | ---: | ---: | ---: | --- | --- |"]
    for name, seconds, wall, nbytes, before, after in ops:
        lines.append(f"| {name} | {seconds:.2f} | {wall:.2f} | {nbytes:,} | {before.total_episodes} -> "
                     f"{after.total_episodes} | {before.total_frames} -> {after.total_frames} |")
    lines.append(f"| lerobot 0.6.1 `delete_episodes`, 1 episode | {lr_s:.2f} | | {lr_b:,} | | |")
    lines += ["", "Bytes of the last drop by folder: " + ", ".join(f"{k} {v:,}" for k, v in sorted(
        split["drop 1 episode"].items(), key=lambda kv: -kv[1])) + " (a one-shot convert keeps the 1,000 episodes "
        "in one data and one metadata file, which renumbering rewrites whole; `.conveyor/values` are the sorted "
        "values behind exact quantiles)."]
    lines += ["", f"drop is **{lr_s / drop_s:.0f}x** faster than lerobot's delete_episodes (target >= 50x; "
                  f"{lr_s / ops[0][2]:.0f}x counting the command's whole process); "
                  f"each operation <= 1 s: {'yes' if all(o[1] <= 1 for o in ops) else 'NO'}; "
                  f"the curated store validates against its source: {'yes' if valid else 'NO'}.", ""]
    text = "\n".join(lines)
    print(text)
    if not a.no_readme:
        write_section(SECTION, text)
    shutil.rmtree(scratch, ignore_errors=True)
    return 0 if valid else 1


if __name__ == "__main__":
    sys.exit(main())
