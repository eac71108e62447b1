"""Readers of a live store while it is written: lerobot's `LeRobotDataset(root=STORE)` opened and read in a loop
(HF_HUB_OFFLINE=1) while one-episode ingests and compactions commit to the same store (issue 21 item 4).

    .venv/bin/python bench/readers.py [--seconds 120] [--every 8] [--readme]

Two reader processes run beside the writer:

* `reopen`: `LeRobotDataset(...)` then three items (first, middle, last: video frames decoded), again and
  again: a notebook or viewer opening the store. A failed open is any exception from the constructor or
  from those reads.
* `held`: one `LeRobotDataset` opened at the start, then every item of it read over and over while the store
  is compacted under it: a notebook that keeps its dataset object. Its reads must keep working for the
  retention period (`conveyor.retained.RETENTION_S`), since compaction retains the files it replaces.

The writer (this process) appends one episode per ingest and compacts after every `--every` ingests.
Results: the printed table and, with --readme, the `## readers` section of bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SECTION = "## readers"


def reader(store: Path, out: Path, until: float, mode: str) -> None:
    """One reader process: counts opens/reads and the failures, by first line of the exception."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    opens = reads = 0
    failures: dict[str, int] = {}

    def fail(e: BaseException) -> None:
        line = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        failures[line] = failures.get(line, 0) + 1

    held = None
    while time.time() < until:
        try:
            if mode == "reopen" or held is None:
                ds = LeRobotDataset("local/store", root=store, video_backend="pyav")
                opens += 1
                held = ds
                if mode == "reopen":
                    for i in (0, len(ds) // 2, len(ds) - 1):
                        ds[i]
                        reads += 1
                    continue
            for i in range(0, len(held), 3):  # every third frame of the version opened at the start
                held[i]
                reads += 1
                if time.time() >= until:
                    break
        except Exception as e:  # noqa: BLE001 - counted, the loop goes on
            fail(e)
            if os.environ.get("READERS_TRACE"):
                listing = sorted(str(p.relative_to(store)) for d in ("data", "meta/episodes")
                                 for p in (store / d).glob("*/*.parquet"))
                print(f"{time.time():.3f} {mode} {type(e).__name__} {listing}", file=sys.stderr)
                traceback.print_exc()
    out.write_text(json.dumps({"mode": mode, "opens": opens, "reads": reads, "failures": failures}))


def run(seconds: float, every: int, episodes_first: int, total: int) -> dict:
    from conveyor.compact import compact
    from conveyor.ingest import ingest
    from conveyor.synthetic.recording import RecordingSpec, RecordingWriter

    tmp = Path(tempfile.mkdtemp(prefix="readers-"))
    rec, store = tmp / "rec", tmp / "store"
    w = RecordingWriter(rec, RecordingSpec())
    for ep in range(total):  # recorded up front: the writer below only ingests, one episode per commit
        w.write_episode(ep, 30)
    ingest(rec, store, max_episodes=episodes_first)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp / "hf"),
               PYTHONPATH=str(ROOT))
    until = time.time() + seconds + 25  # readers start (torch import) while the writer waits below
    procs = {m: subprocess.Popen([sys.executable, __file__, "--reader", str(store), str(tmp / f"{m}.json"),
                                  str(until), m], env=env) for m in ("reopen", "held")}
    time.sleep(25)
    ingests = compactions = 0
    while time.time() < until - 2:
        t = time.time()
        if not ingest(rec, store, max_episodes=1).added:
            break
        ingests += 1
        if os.environ.get("READERS_TRACE"):
            print(f"{t:.3f}-{time.time():.3f} ingest", file=sys.stderr)
        if ingests % every == 0:
            t = time.time()
            compact(store)
            compactions += 1
            if os.environ.get("READERS_TRACE"):
                print(f"{t:.3f}-{time.time():.3f} compact", file=sys.stderr)
    for p in procs.values():
        p.wait(timeout=600)
    results = {m: json.loads((tmp / f"{m}.json").read_text()) for m in procs}
    return {"ingests": ingests, "compactions": compactions, "episodes": episodes_first + ingests,
            "readers": results}


def table(r: dict) -> str:
    lines = [f"{r['ingests']} one-episode ingests and {r['compactions']} compactions (store grew to "
             f"{r['episodes']} episodes) while two readers ran:", "",
             "| reader | opens | items read | failed |", "| --- | --- | --- | --- |"]
    for m, x in r["readers"].items():
        failed = sum(x["failures"].values())
        lines.append(f"| {m} | {x['opens']} | {x['reads']} | {failed} |")
    for m, x in r["readers"].items():
        for line, n in x["failures"].items():
            lines.append(f"\n{m}: {n} x `{line}`")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--reader":
        reader(Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--every", type=int, default=8, help="compact after this many ingests")
    ap.add_argument("--first", type=int, default=4, help="episodes in the store when the readers start")
    ap.add_argument("--episodes", type=int, default=200, help="episodes recorded (the most the writer ingests)")
    ap.add_argument("--readme", action="store_true")
    a = ap.parse_args()
    r = run(a.seconds, a.every, a.first, a.episodes)
    text = table(r)
    print(text)
    print(json.dumps(r))
    if a.readme:
        readme = ROOT / "bench" / "README.md"
        body = readme.read_text()
        section = f"{SECTION}\n\n`python bench/readers.py --seconds {a.seconds:g} --every {a.every}` " \
                  f"(lerobot 0.6.1, a shared busy 2-core machine):\n\n{text}\n"
        if SECTION in body:
            body = re.sub(rf"{SECTION}\n.*?(?=\n## |\Z)", section, body, flags=re.S)
        else:
            body = body.rstrip("\n") + "\n\n" + section
        readme.write_text(body)


if __name__ == "__main__":
    main()
