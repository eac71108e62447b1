"""The salvage matrix (issue 19 item 3): kill a real lerobot 0.6.1 recorder at each point, salvage the session,
and tabulate what comes back; writes the `## salvage` section of bench/README.md.

    .venv/bin/python bench/salvage_matrix.py [--episodes 4] [--frames 12] [--keep DIR] [--no-readme]

Each session is recorded by tests/salvage_recorder.py (synthetic 64x96 frames, one camera, SVT-AV1,
lerobot's defaults otherwise) and salvaged with `conveyor salvage SESSION OUT --json`; LeRobotDataset then
opens each OUT (one child for all, tests/lerobot_dump.py) and the check column says whether it did with the recovered
frame count. The tests (tests/test_salvage.py) check the same kill points row by row and frame by frame.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RECORDER = ROOT / "tests" / "salvage_recorder.py"
DUMP = ROOT / "tests" / "lerobot_dump.py"
sys.path.insert(0, str(HERE))

KILLS = {
    "after_save:1": "SIGKILL after the 1st save_episode",
    "after_save:4": "SIGKILL after the 4th save_episode",
    "mid_frames:2:5": "SIGKILL in episode 2 after 5 add_frame",
    "encode:2": "SIGKILL in episode 2's save_episode: rows written, video not encoded",
    "concat:3": "SIGKILL in episode 3's save_episode: video encoded, being concatenated (temp file)",
    "copy:3:60": "SIGKILL in episode 3's save_episode: concatenated file 60 % copied over the camera file "
                 "(temp folder on another filesystem)",
    "no_finalize": "exit without finalize() (interpreter shutdown runs lerobot's __del__)",
    "os_exit": "exit without finalize() and without cleanup (os._exit)",
    "finalize": "finalize(), normal exit (nothing to salvage)",
}


def held(session: Path) -> str:
    """What the killed recorder left, in a few words."""
    from conveyor.footerless import has_footer

    data = sorted((session / "data").rglob("*.parquet"))
    parts = [f"data {'closed' if data and all(has_footer(p) for p in data) else 'without footer'}"]
    meta = sorted((session / "meta" / "episodes").rglob("*.parquet"))
    parts.append("meta/episodes " + ("closed" if meta and all(has_footer(p) for p in meta) else
                                     "open" if meta else "missing"))
    if list(session.glob("tmp*/*.mp4")):
        parts.append("episode mp4 in tmp*/")
    if list((session / "images").glob("*/episode-*")):
        parts.append("PNG frames in images/")
    return ", ".join(parts)


def lerobot_opens(outs: list[Path], env: dict) -> dict[str, object]:
    """OUT -> the frame count LeRobotDataset (lerobot 0.6.1) reads from it, or why it does not open; one child
    for all (importing lerobot is most of the cost)."""
    code = (f"import json, sys; sys.path.insert(0, {str(DUMP.parent)!r}); from lerobot_dump import dump\n"
            "out = {}\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n"
            "        out[p] = dump(p)['len']\n"
            "    except Exception as e:\n"
            "        out[p] = repr(e)[:200]\n"
            "print(json.dumps(out))\n")
    r = subprocess.run([sys.executable, "-c", code, *map(str, outs)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return {str(o): r.stderr.strip().splitlines()[-1] for o in outs}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--keep", type=Path, help="record the sessions here and keep them (default: a temp folder); "
                                             "sessions already there are reused")
    p.add_argument("--no-readme", action="store_true", help="print the table only")
    a = p.parse_args()
    work = a.keep or Path(tempfile.mkdtemp(prefix="salvage-matrix-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", SVT_LOG="1", PYTHONPATH=str(ROOT),
               HF_HOME=str(work / "hf"))
    sessions = work / "sessions"
    t0 = time.perf_counter()
    if a.keep and all((sessions / k.replace(":", "_")).is_dir() for k in KILLS):
        recorded = "the sessions were recorded by an earlier run of this script (--keep)"
    else:
        subprocess.run([sys.executable, str(RECORDER), str(sessions), "--episodes", str(a.episodes), "--frames",
                        str(a.frames), "--batch", *KILLS], check=True, env=env, capture_output=True)
        recorded = f"recording the {len(KILLS)} sessions took {time.perf_counter() - t0:.0f} s"
    shutil.rmtree(work / "out", ignore_errors=True)
    rows, outs = [], {}
    for kill, what in KILLS.items():
        session = sessions / kill.replace(":", "_")
        before = {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in session.rglob("*") if f.is_file()}
        out = work / "out" / kill.replace(":", "_")
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "conveyor.cli", "salvage", str(session), str(out), "--json"],
                           capture_output=True, text=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - t
        after = {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in session.rglob("*") if f.is_file()}
        if r.returncode != 0:
            rows.append((kill, what, held(session), "-", r.stderr.strip(), f"{wall:.2f}", "-"))
            continue
        rep = json.loads(r.stdout)
        outs[kill] = out
        rec = ", ".join(f"{x['session_episode']}" for x in rep["recovered"])
        quar = "; ".join(f"ep {k}: {v}" for k, v in rep["quarantined"].items()) or "none"
        rows.append([kill, what, held(session), f"{len(rep['recovered'])} ({rec})", quar, f"{wall:.2f}",
                     "" if after == before else "SESSION CHANGED; "])
    opened = lerobot_opens(list(outs.values()), env)
    for row in rows:
        if row[0] in outs:
            n = opened.get(str(outs[row[0]]))
            row[6] += f"opens, {n} frames" if isinstance(n, int) else f"does NOT open: {n}"
    table = ["| kill point | recorder state | session holds | recovered (session episodes) | quarantined, why "
             "| salvage s | LeRobotDataset on OUT |", "|---|---|---|---|---|---|---|"]
    table += ["| `" + " | ".join([r[0] + "`", *r[1:]]) + " |" for r in rows]
    text = "\n".join([
        "## salvage",
        "",
        f"`bench/salvage_matrix.py` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): a lerobot 0.6.1 "
        f"recorder (`LeRobotDataset.create` + `add_frame` + `save_episode`, {a.episodes} episodes x {a.frames} "
        "frames of 64x96, one camera, SVT-AV1) killed at each point, then `conveyor salvage SESSION OUT`. "
        "Every session's files hash the same before and after. `salvage s` is the whole command, process "
        "start included (pyarrow, PyAV and fastparquet imports are most of it at this size). Times were taken "
        f"on a shared, busy machine (2 cores, other benchmarks running, load average {os.getloadavg()[0]:.0f}; "
        f"{recorded}).",
        "",
        *table,
        "",
    ])
    print(text)
    if not a.no_readme:
        from readme_section import write_section

        write_section("## salvage", text)


if __name__ == "__main__":
    main()
