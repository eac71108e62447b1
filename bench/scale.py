"""Benchmark for issue 12 §4-5: how store operations grow from 200 to 1,000 episodes.

Not a test. For each size N it builds (once, cached under --work) a generated v2.1 recording of N
episodes with small frames (2 cameras 48x64 AV1, 10-20 frames: what grows with N is metadata, not
pixels), converts it into a store (untimed), then times, each as its own process (interpreter start and
imports included, like a user's command; wall seconds and CPU seconds of the child):

  append-1        the recorder finishes one more episode (untimed), `conveyor ingest SRC STORE`
  nothing new     `conveyor ingest SRC STORE` again
  fast-validate 1 `validate_fast(store, episodes=[new])`: what the watch flow runs after each commit
                  (the new episode in full + the whole-store consistency checks)
  validate        `conveyor validate STORE`: every episode, fast checks
  deep-validate 1 `validate_deep(store, episodes=[new])` (lerobot in a child process; --deep only)
  compact         `conveyor compact STORE` after the appends (merges their small files)
  backup no-change `conveyor backup STORE --to file://...` a second time (the first is untimed)

and writes the `## scale` section of bench/README.md (medians of --reps runs; compact and the deep
check once per size). Usage: .venv/bin/python bench/scale.py [--sizes 200 1000] [--reps 3] [--deep]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bytecode import NOTE, compile_conveyor  # bench/ is on sys.path when run as a script
from readme_section import write_section

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "## scale"
CACHE_VERSION = 1
LENGTHS = (10, 20)
APPEND_LENGTH = 15
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "SVT_LOG": "1",
       "TQDM_DISABLE": "1"}


def _spec():
    from conveyor.synthetic.recording import CameraSpec, RecordingSpec

    return RecordingSpec(fps=30, cameras=(CameraSpec("observation.images.laptop", 48, 64),
                                          CameraSpec("observation.images.phone", 48, 64)))


def run(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall s, CPU s of the child, stdout) of one command; fails loudly."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"bench: {' '.join(map(str, cmd))} exited {p.returncode}:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), p.stdout


def recording(work: Path, n: int) -> Path:
    import numpy as np

    from conveyor.synthetic.recording import RecordingWriter

    path = work / "recordings" / f"scale{n}"
    params = {"v": CACHE_VERSION, "episodes": n, "lengths": list(LENGTHS)}
    marker = path / ".bench-complete.json"
    if marker.exists() and json.loads(marker.read_text()) == params:
        return path
    print(f"generating {path} ({n} episodes, 2 cameras 48x64) - first run only", flush=True)
    t0 = time.perf_counter()
    if path.exists():
        shutil.rmtree(path)
    w = RecordingWriter(path, _spec())
    for i, length in enumerate(np.random.default_rng(n).integers(LENGTHS[0], LENGTHS[1] + 1, n).tolist()):
        w.write_episode(i, length, "pick the cube" if i % 2 else "push the cube")
    marker.write_text(json.dumps(params))
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def bench_size(n: int, base: Path, run_dir: Path, reps: int, deep: bool, env: dict) -> dict:
    from conveyor.synthetic.recording import RecordingWriter

    d = run_dir / f"n{n}"
    src, store = d / "src", d / "store"
    shutil.copytree(base, src, ignore=shutil.ignore_patterns(".bench-complete.json"))
    cli = [sys.executable, "-m", "conveyor.cli"]
    py = [sys.executable, "-c"]
    run(cli + ["convert", str(src), str(store)], env)
    cfg = d / "conveyor.toml"
    cfg.write_text(f'store_root = "{d}"\nwork_dir = "{d / "work"}"\nstorage_url = "file://{d / "objects"}"\n')
    backup = cli + ["--config", str(cfg), "backup", str(store), "--to", f"file://{d / 'objects'}"]
    out: dict[str, list[tuple[float, float]]] = {k: [] for k in
                                                 ("append-1", "nothing new", "fast-validate 1", "validate")}
    w = RecordingWriter(src, _spec())
    for i in range(reps):
        ep = n + i
        w.write_episode(ep, APPEND_LENGTH, "pick the cube")
        wall, cpu, _ = run(cli + ["ingest", str(src), str(store)], env)
        out["append-1"].append((wall, cpu))
        got = json.loads((store / "meta/info.json").read_text())["total_episodes"]
        assert got == ep + 1, f"store has {got} episodes after appending source episode {ep}"
        out["nothing new"].append(run(cli + ["ingest", str(src), str(store)], env)[:2])
        code = ("import sys; from conveyor.cli.store import lean_process; lean_process(); "
                "from conveyor.validate import validate_fast; "
                f"r = validate_fast(sys.argv[1], against=sys.argv[2], episodes=[{ep}]); sys.exit(0 if r.ok else 1)")
        out["fast-validate 1"].append(run(py + [code, str(store), str(src)], env)[:2])
        out["validate"].append(run(cli + ["validate", str(store)], env)[:2])
    if deep:
        code = ("import sys; from conveyor.validate import validate_deep; "
                f"r = validate_deep(sys.argv[1], episodes=[{n + reps - 1}]); sys.exit(0 if r.ok else 1)")
        out["deep-validate 1"] = [run(py + [code, str(store)], env)[:2]]
    run(backup, env)  # first snapshot, untimed
    out["backup no-change"] = [run(backup, env)[:2] for _ in range(reps)]
    files_before = sum(1 for p in (store / "data").rglob("*.parquet"))
    out["compact"] = [run(cli + ["compact", str(store)], env)[:2]]
    files_after = sum(1 for p in (store / "data").rglob("*.parquet"))
    valid = subprocess.run(cli + ["validate", str(store), "--against", str(src)], capture_output=True,
                           env=env).returncode == 0
    return {"n": n, "times": out, "valid": valid, "data_files": (files_before, files_after)}


def render(results: list[dict], args, total_s: float) -> str:
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    ns = [r["n"] for r in results]
    keys = [k for k in results[0]["times"]]
    lines = [SECTION, "",
             f"`python bench/scale.py --sizes {' '.join(map(str, ns))} --reps {args.reps}{' --deep' if args.deep else ''}`: "
             f"generated recordings of N episodes (2 cameras 48x64 AV1, {LENGTHS[0]}-{LENGTHS[1]} frames), converted "
             "into a store, then each step as its own process (interpreter start and imports included). Wall "
             "seconds (median) and the child's CPU seconds (user + sys, median; steadier than wall on a shared machine). "
             f"Measured {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} on {platform.machine()}, "
             f"{os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.1f}; {total_s:.0f} s in all. "
             f"{NOTE[0].upper() + NOTE[1:]}.", "",
             "| step | " + " | ".join(f"N={n} wall s | N={n} CPU s" for n in ns)
             + (f" | growth {ns[0]} -> {ns[-1]} (wall) |" if len(ns) > 1 else " |"),
             "| --- | " + " | ".join("--- | ---" for _ in ns) + (" | --- |" if len(ns) > 1 else " |")]
    for k in keys:
        cells = [f"{med(r['times'][k], 0):.2f} | {med(r['times'][k], 1):.2f}" for r in results]
        growth = ""
        if len(ns) > 1:
            growth = f" | {med(results[-1]['times'][k], 0) / med(results[0]['times'][k], 0):.2f}×"
        lines.append(f"| {k} | " + " | ".join(cells) + growth + " |")
    lines += ["", "Stores valid after the run (`conveyor validate --against SRC`): "
              + ", ".join(f"N={r['n']}: {'yes' if r['valid'] else '**NO**'}" for r in results)
              + "; data files before -> after compaction: "
              + ", ".join(f"N={r['n']}: {r['data_files'][0]} -> {r['data_files'][1]}" for r in results) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[200, 1000])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--deep", action="store_true", help="also time the deep check of one new episode (~10 s each)")
    p.add_argument("--work", default="bench/out", help="cache + scratch folder (default bench/out, git-ignored)")
    p.add_argument("--no-readme", action="store_true")
    a = p.parse_args(argv)
    work = Path(a.work) if Path(a.work).is_absolute() else REPO / a.work
    env = dict(os.environ, **ENV, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    run_dir = work / "scale-run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    bases = {n: recording(work, n) for n in a.sizes}
    compile_conveyor()
    t0 = time.perf_counter()
    results = []
    for n in a.sizes:
        print(f"timing a {n}-episode store ...", flush=True)
        results.append(bench_size(n, bases[n], run_dir, a.reps, a.deep, env))
    text = render(results, a, time.perf_counter() - t0)
    print(text)
    if not a.no_readme:
        write_section(SECTION, text)
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0 if all(r["valid"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
