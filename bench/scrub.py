"""Scrub and repair benchmark: `conveyor scrub` MB/s against `sha256sum` of the same files, and the time to
repair one damaged large file from a file:// backup.

    .venv/bin/python bench/scrub.py [--mb 200] [--big-mb 100] [--repeats 3] [--cold] [--readme]

The store is a real conveyor store (committed through `Store`, manifest with every sha256) holding one
`--big-mb` video-sized file plus files summing to `--mb` in all (random bytes: media does not compress).
Hashing is timed warm (files in page cache: CPU-bound, what a nightly scrub right after compaction sees)
and, with --cold (root: drops the page cache), cold (disk-bound). Each tool runs in a fresh
process, so every figure includes interpreter start-up. Repair: 64 bytes zeroed in the middle of the big
file, then `conveyor repair STORE --from file://...` (scrub, fetch from the snapshot, verify, rename,
final scrub) in a fresh process. Results: the printed table and, with --readme, the `## scrub` section of
bench/README.md.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
PY = sys.executable
SECTION = "## scrub"
MB = 1_000_000


def make_store(root: Path, total_mb: float, big_mb: float) -> Path:
    from conveyor.store import Store

    s = Store.open(root, create=True)
    sizes = {"videos/observation.images.laptop/chunk-000/file-000.mp4": int(big_mb * MB)}
    rest, i = int((total_mb - big_mb) * MB), 0
    while rest > 0:
        n = min(rest, int(25 * MB))
        sizes[f"videos/observation.images.phone/chunk-000/file-{i:03d}.mp4"] = n
        rest -= n
        i += 1
    sizes["data/chunk-000/file-000.parquet"] = MB // 2
    with s.lock(), s.transaction("bench") as c:
        for rel, n in sizes.items():
            with open(c.path(rel), "wb") as f:
                left = n
                while left:
                    k = min(left, 8 << 20)
                    f.write(os.urandom(k))
                    left -= k
            c.staged(rel)
        c.set_totals(0, 0)
    return root


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if p.returncode not in (0,):
        raise SystemExit(f"{cmd[:4]} failed ({p.returncode}): {p.stderr[-500:]}")
    return dt, p.stdout


def own_seconds(out: str) -> float | None:
    """The seconds `conveyor scrub` reports for its own work (hashing, no interpreter start)."""
    m = re.search(r"MB in ([0-9.]+) s", out)
    return float(m.group(1)) if m else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=200, help="store size (MB)")
    ap.add_argument("--big-mb", type=float, default=100, help="size of the file that gets damaged (MB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--readme", action="store_true", help="write the results into bench/README.md")
    ap.add_argument("--cold", action="store_true", help="also time with the page cache dropped (root; affects "
                    "everything else running on the machine)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    a = ap.parse_args()

    from conveyor.backup import backup
    from conveyor.repo import open_repo
    from conveyor.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="conveyor-bench-scrub-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        store = make_store(tmp / "lab", a.mb, a.big_mb)
        files = [str(store / rel) for rel in sorted(Store.open(store).manifest())]
        total = sum(os.path.getsize(f) for f in files)
        url = f"file://{tmp / 'objects'}"
        with open_repo(url) as repo:
            backup(store, repo)
        tools = {
            "conveyor scrub (2 threads)": [PY, "-m", "conveyor.cli", "scrub", str(store)],
            "conveyor scrub (1 thread)": [PY, "-m", "conveyor.cli", "scrub", str(store), "--workers", "1"],
            "sha256sum": ["sha256sum", *files],
            "sha256sum, 2 processes": ["sh", "-c", 'printf "%s\\0" "$@" | xargs -0 -n1 -P2 sha256sum', "sh", *files],
        }
        modes = ["warm"] + (["cold"] if a.cold and drop_caches() else [])
        results: dict[tuple[str, str], list[float]] = {}
        inner: dict[tuple[str, str], list[float]] = {}
        for mode in modes:
            for _ in range(a.repeats):
                for name, cmd in tools.items():  # alternating, so drift hits every tool alike
                    if mode == "cold":
                        drop_caches()
                    else:
                        timed(["sh", "-c", 'cat "$@" > /dev/null', "sh", *files])  # warm the cache
                    dt, out = timed(cmd, env)
                    results.setdefault((mode, name), []).append(dt)
                    if own_seconds(out) is not None:
                        inner.setdefault((mode, name), []).append(own_seconds(out))
        big = store / "videos/observation.images.laptop/chunk-000/file-000.mp4"
        repairs = []
        for _ in range(a.repeats):
            with open(big, "r+b") as f:
                f.seek(os.path.getsize(big) // 2)
                f.write(bytes(64))
            repairs.append(timed([PY, "-m", "conveyor.cli", "repair", str(store), "--from", url], env)[0])
        rows = []
        for (mode, name), ts in results.items():
            med = statistics.median(ts)
            own = statistics.median(inner[(mode, name)]) if (mode, name) in inner else None
            rows.append(f"| {mode} | {name} | {med:.2f} | {total / MB / med:.0f} | "
                        + (f"{own:.2f} s, {total / MB / own:.0f} MB/s |" if own else "- |"))
        text = "\n".join([
            SECTION, "",
            f"`python bench/scrub.py --mb {a.mb:g} --big-mb {a.big_mb:g} --repeats {a.repeats}`, measured "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} cores "
            f"(load average {os.getloadavg()[0]:.1f}): a {total / MB:.0f} MB store of {len(files)} files; medians "
            f"of {a.repeats}, wall seconds of a fresh process (interpreter start included).", "",
            "| page cache | tool | seconds | MB/s | scrub's own hashing time (no start-up) |",
            "| --- | --- | ---: | ---: | ---: |", *rows, "",
            f"Repair of one damaged {a.big_mb:g} MB file (64 bytes zeroed) from a file:// snapshot, "
            f"`conveyor repair` end to end (scrub, fetch, verify, rename, final scrub): "
            f"**{statistics.median(repairs):.2f} s** (median of {a.repeats}).",
            "" if "cold" in modes else "\nCold-cache figures: not measured (run with --cold as root).",
        ])
        print(text)
        if a.readme:
            from readme_section import write_section
            write_section(SECTION, text)
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
