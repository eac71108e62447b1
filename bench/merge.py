"""Benchmark for issue 19 item 4: many v3.0 session datasets -> one store, against lerobot 0.6.1's merge.

Not a test. Records N+1 sessions once with lerobot 0.6.1's own recorder (`conveyor.synthetic.v30_session`,
cached under --work, default bench/out/merge/), then times, each command a child process under GNU time
(wall s, peak RSS `%M`) with its storage writes read from its own /proc/self/io (`write_bytes`) at exit:

1. N sessions -> one dataset:
   - `conveyor ingest FOLDER STORE` (a folder of the N sessions; one commit per session);
   - `lerobot-edit-dataset --operation.type merge` (loads each session as a LeRobotDataset, then
     `merge_datasets` -> `aggregate_datasets`);
   - `aggregate_datasets(...)` called directly (the same copy without the dataset loading);
2. one more session:
   - `conveyor ingest FOLDER STORE` after the (N+1)-th session joined the folder, on a store of N/2
     and of N sessions (O(that session): the same time and bytes at either size);
   - lerobot: merge the N+1 sessions again, or `aggregate_datasets([merged N, new])`: both copy everything.

Usage: .venv/bin/python bench/merge.py [--sessions 6] [--episodes 4] [--length 60] [--size 240x320]
       [--reps 3] [--work DIR] [--no-readme]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import runpy
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SELF = Path(__file__).resolve()
SECTION = "## merge sessions (v3.0)"
TIME = "/usr/bin/time"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", SVT_LOG="1", PYTHONPATH=str(REPO))


def _io_main(argv: list[str]) -> None:
    """`merge.py _io OUT MODULE ARGS...`: run MODULE as __main__, then write this process's /proc/self/io."""
    out, module, args = argv[0], argv[1], argv[2:]
    sys.argv = [module, *args]
    try:
        if module == "_aggregate":
            from lerobot.datasets.aggregate import aggregate_datasets

            spec = json.loads(args[0])
            aggregate_datasets([f"local/{Path(r).name}" for r in spec["roots"]], "local/merged",
                               roots=[Path(r) for r in spec["roots"]], aggr_root=Path(spec["out"]))
        else:
            try:
                runpy.run_module(module, run_name="__main__")
            except SystemExit as e:
                if e.code not in (0, None):
                    raise
    finally:
        Path(out).write_text(Path("/proc/self/io").read_text())


def measured(cmd: list[str], log: Path) -> dict:
    """wall s, peak RSS MB and storage bytes written by one child command."""
    io = log.with_suffix(".io")
    timing = log.with_suffix(".time")
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        p = subprocess.run([TIME, "-f", "%e %M", "-o", str(timing), sys.executable, str(SELF), "_io", str(io),
                            *cmd], stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=REPO)
        wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"bench: {cmd} exited {p.returncode}; log {log}:\n{log.read_text(errors='replace')[-3000:]}")
    rss = int(timing.read_text().split()[-1]) / 1024
    counters = dict(line.split(": ") for line in io.read_text().splitlines())
    return {"wall": wall, "rss": rss, "written": int(counters["write_bytes"]), "wchar": int(counters["wchar"])}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def record_sessions(work: Path, n: int, episodes: int, length: int, size: str) -> list[Path]:
    sessions = work / f"sessions-{n}x{episodes}x{length}-{size}"
    paths = [sessions / f"session-{i:03d}" for i in range(n)]
    todo = [p for p in paths if not (p / "meta/episodes").is_dir()]
    for p in todo:
        shutil.rmtree(p, ignore_errors=True)
    running: list[subprocess.Popen] = []
    for i, p in enumerate(todo):  # two recorders at a time (2 cores)
        running.append(subprocess.Popen([sys.executable, "-m", "conveyor.synthetic.v30_session", str(p), "--episodes",
                                         str(episodes), "--length", str(length), "--size", size, "--cameras", "2",
                                         "--seed", str(i)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env=ENV, cwd=REPO))
        if len(running) == 2:
            for r in running:
                r.wait()
            running = []
    for r in running:
        r.wait()
    return paths


def conveyor_ingest(folder: Path, store: Path, log: Path) -> dict:
    return measured(["conveyor.cli", "ingest", str(folder), str(store)], log)


def lerobot_merge(roots: list[Path], out: Path, log: Path) -> dict:
    ids = "[" + ",".join(f"local/{r.name}" for r in roots) + "]"
    return measured(["lerobot.scripts.lerobot_edit_dataset", "--new_repo_id", "local/merged", "--new_root", str(out),
                     "--operation.type", "merge", f"--operation.repo_ids={ids}",
                     "--operation.roots=[" + ",".join(str(r) for r in roots) + "]"], log)


def lerobot_aggregate(roots: list[Path], out: Path, log: Path) -> dict:
    return measured(["_aggregate", json.dumps({"roots": [str(r) for r in roots], "out": str(out)})], log)


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_io":
        _io_main(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=6)
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--length", type=int, default=60)
    p.add_argument("--size", default="240x320")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "merge")
    p.add_argument("--no-readme", action="store_true")
    a = p.parse_args(argv)
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    n = a.sessions
    paths = record_sessions(work, n + 1, a.episodes, a.length, a.size)
    base, extra = paths[:n], paths[n]
    half = base[: max(1, n // 2)]
    runs = work / "runs"
    runs.mkdir(exist_ok=True)

    def folder_of(sessions: list[Path], name: str) -> Path:
        f = fresh(runs / name)
        f.mkdir()
        for s in sessions:
            os.symlink(s, f / s.name)
        return f

    res: dict[str, list[dict]] = {k: [] for k in ("conveyor", "lerobot-merge", "aggregate", "conveyor+1@half",
                                                   "conveyor+1@full", "lerobot-merge+1", "aggregate+1")}
    for rep in range(a.reps):
        folder = folder_of(base, "folder")
        store = fresh(runs / "store")
        res["conveyor"].append(conveyor_ingest(folder, store, runs / f"conveyor-{rep}.log"))
        res["lerobot-merge"].append(lerobot_merge(base, fresh(runs / "merged"), runs / f"merge-{rep}.log"))
        res["aggregate"].append(lerobot_aggregate(base, fresh(runs / "aggregated"), runs / f"aggregate-{rep}.log"))
        # one more session
        half_folder, half_store = folder_of(half, "half-folder"), fresh(runs / "half-store")
        conveyor_ingest(half_folder, half_store, runs / f"half-{rep}.log")
        os.symlink(extra, half_folder / extra.name)
        res["conveyor+1@half"].append(conveyor_ingest(half_folder, half_store, runs / f"half+1-{rep}.log"))
        os.symlink(extra, folder / extra.name)
        res["conveyor+1@full"].append(conveyor_ingest(folder, store, runs / f"conveyor+1-{rep}.log"))
        res["lerobot-merge+1"].append(lerobot_merge(base + [extra], fresh(runs / "merged+1"),
                                                    runs / f"merge+1-{rep}.log"))
        res["aggregate+1"].append(lerobot_aggregate([runs / "aggregated", extra], fresh(runs / "aggregated+1"),
                                                    runs / f"aggregate+1-{rep}.log"))
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]['wall']:.2f} s" for k, v in res.items()), flush=True)

    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall", "rss", "written")} for k, v in res.items()}
    session_mb = folder_bytes(extra) / 1e6
    all_mb = sum(folder_bytes(s) for s in base) / 1e6

    def row(label: str, key: str, vs: str | None = None) -> str:
        m = med[key]
        walls = ", ".join(f"{r['wall']:.2f}" for r in res[key])
        speed = f"{med[vs]['wall'] / m['wall']:.1f}x" if vs else ""
        return (f"| {label} | {m['wall']:.2f} ({walls}) | {m['rss']:.0f} | {m['written'] / 1e6:.2f} | {speed} |")

    text = "\n".join([
        SECTION, "",
        f"`python bench/merge.py --sessions {n} --episodes {a.episodes} --length {a.length} --size {a.size} "
        f"--reps {a.reps}`: {n} session datasets recorded by lerobot 0.6.1's own recorder "
        f"(`conveyor.synthetic.v30_session`: {a.episodes} episodes x {a.length} frames at 30 fps, two {a.size} "
        f"SVT-AV1 cameras; {all_mb:.1f} MB in all, {session_mb:.1f} MB per session) become one dataset. Each "
        "command is a child process (interpreter start and imports included) under GNU time (peak RSS `%M`); "
        "bytes written are its own `/proc/self/io` `write_bytes` at exit. Medians of "
        f"{a.reps} runs (each run's wall time in brackets). Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"shared with 7 other sessions' work (busy: figures are noisy); {datetime.date.today().isoformat()}.", "",
        "| command | wall s | peak RSS MB | MB written | conveyor faster by |", "| --- | --- | --- | --- | --- |",
        row(f"`conveyor ingest FOLDER STORE`, {n} sessions -> new store", "conveyor"),
        row("`lerobot-edit-dataset --operation.type merge` of the same sessions", "lerobot-merge", None)
        .replace(" |\n", " |\n"),
        row("`aggregate_datasets(...)` of the same sessions", "aggregate"),
        row(f"one more session: `conveyor ingest` into the store of {len(half)} sessions", "conveyor+1@half"),
        row(f"one more session: `conveyor ingest` into the store of {n} sessions", "conveyor+1@full"),
        row(f"one more session, lerobot: merge all {n + 1} sessions again", "lerobot-merge+1"),
        row(f"one more session, lerobot: `aggregate_datasets([merged {n}, new])`", "aggregate+1"),
        "",
    ])
    # the speed-up column: lerobot / conveyor for the matching conveyor row
    lines = text.splitlines()
    for i, line in enumerate(lines):
        for key, vs in (("lerobot-edit-dataset", "conveyor"), ("`aggregate_datasets(...)` of", "conveyor"),
                        ("merge all", "conveyor+1@full"), ("merged ", "conveyor+1@full")):
            if key in line and line.endswith("|  |"):
                k = {"lerobot-edit-dataset": "lerobot-merge", "`aggregate_datasets(...)` of": "aggregate",
                     "merge all": "lerobot-merge+1", "merged ": "aggregate+1"}[key]
                lines[i] = line[:-3] + f" {med[k]['wall'] / med[vs]['wall']:.1f}x |"
                break
    text = "\n".join(lines)
    print(text)
    print(json.dumps(res))
    if not a.no_readme:
        sys.path.insert(0, str(SELF.parent))
        from readme_section import write_section

        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
