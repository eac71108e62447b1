"""Backup benchmark: conveyor vs restic vs a plain boto3 upload_file loop, against one local S3 server.

    .venv/bin/python bench/backup.py [--keep]      (needs `restic` on PATH: apt-get install restic)

Data, generated under a temp dir: (a) a ~150 MB store-shaped folder of 7 files (random bytes: video and
parquet do not compress either), (b) a real synthetic v2.1 recording of 200 episodes (~600 small files).
For each tool: first backup, no-change backup, full restore — wall time of a fresh process each (so every
tool pays its start-up). moto's standalone server runs in its own process; each tool gets its own bucket.
Results go to the table printed and to the `## backup` section of bench/README.md.
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

import boto3
from s3_server import bench_env, start_moto  # bench/ is on sys.path as the script's folder

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

BOTO_LOOP = r'''
import os, sys, boto3
from pathlib import Path
mode, src, bucket, endpoint = sys.argv[1:5]
c = boto3.client("s3", endpoint_url=endpoint)
src = Path(src)
if mode == "up":
    for p in sorted(src.rglob("*")):
        if p.is_file():
            c.upload_file(str(p), bucket, p.relative_to(src).as_posix())
else:
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            dst = src / o["Key"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            c.download_file(bucket, o["Key"], str(dst))
'''


def make_store_like(root: Path) -> Path:
    """7 files, ~150 MB, laid out like a v3.0 store."""
    files = {"meta/info.json": 3_000, "meta/stats.json": 12_000, "meta/tasks.parquet": 2_000,
             "meta/episodes/chunk-000/file-000.parquet": 60_000, "data/chunk-000/file-000.parquet": 12_000_000,
             "videos/observation.images.laptop/chunk-000/file-000.mp4": 70_000_000,
             "videos/observation.images.phone/chunk-000/file-000.mp4": 68_000_000}
    for rel, size in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(size))
    return root


def make_recording(root: Path) -> Path:
    from conveyor.synthetic.recording import CameraSpec, RecordingSpec, write_recording
    spec = RecordingSpec(cameras=(CameraSpec("observation.images.laptop", codec="h264"),
                                  CameraSpec("observation.images.phone", codec="h264")))
    return write_recording(root, episodes=200, lengths=20, spec=spec)


def timed(cmd: list[str], env: dict, cwd: Path = ROOT) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return dt


def same_tree(a: Path, b: Path) -> bool:
    return subprocess.run(["diff", "-rq", str(a), str(b)], capture_output=True).returncode == 0


def run(tmp: Path, repeats: int = 3) -> list[dict]:
    moto, endpoint = start_moto()
    env = bench_env(tmp)
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint)
        print("generating data ...", flush=True)
        datasets = {"a: store, 7 large files": make_store_like(tmp / "store"),
                    "b: v2.1 recording, 200 episodes": make_recording(tmp / "rec")}
        cfg = tmp / "conveyor.toml"
        cfg.write_text(f'work_dir = "{tmp / "work"}"\n[s3]\nendpoint_url = "{endpoint}"\n')
        rows = []
        for i, (label, src) in enumerate(datasets.items()):
            files = [p for p in src.rglob("*") if p.is_file()]
            size = sum(p.stat().st_size for p in files)
            for tool in ("conveyor", "restic", "boto3 loop"):
              runs = []
              for rep in range(repeats):
                bucket = f"bench-{i}-{tool.split()[0]}-{rep}"
                s3.create_bucket(Bucket=bucket)
                shutil.rmtree(tmp / "work", ignore_errors=True)  # conveyor's index: each repeat starts cold
                dst = tmp / f"restore-{i}-{tool.split()[0]}-{rep}"
                if tool == "conveyor":
                    url = f"s3://{bucket}/repo"
                    up = [PY, "-m", "conveyor.cli", "--config", str(cfg), "backup", str(src), "--to", url]
                    first, again = timed(up, env), timed(up, env)
                    restore = timed([PY, "-m", "conveyor.cli", "--config", str(cfg), "restore", url, str(dst)], env)
                    restored = dst
                elif tool == "restic":
                    repo = ["restic", "-r", f"s3:{endpoint}/{bucket}", "--no-lock" if False else "-q"]
                    timed([*repo, "init"], env)
                    up = [*repo, "backup", str(src)]
                    first, again = timed(up, env), timed(up, env)
                    restore = timed([*repo, "restore", "latest", "--target", str(dst)], env)
                    restored = dst / str(src).lstrip("/")
                else:
                    up = [PY, "-c", BOTO_LOOP, "up", str(src), bucket, endpoint]
                    first, again = timed(up, env), timed(up, env)
                    restore = timed([PY, "-c", BOTO_LOOP, "down", str(dst), bucket, endpoint], env)
                    restored = dst
                ok = same_tree(src, restored)
                shutil.rmtree(dst, ignore_errors=True)
                runs.append((first, again, restore, ok))
                print(f"{label:34} {tool:11} first {first:6.2f} s  no-change {again:6.2f} s  restore "
                      f"{restore:6.2f} s  identical={ok}", flush=True)
              med = [statistics.median(r[k] for r in runs) for k in range(3)]
              rows.append(dict(data=label, files=len(files), mb=size / 1e6, tool=tool, first=med[0], again=med[1],
                               restore=med[2], identical=all(r[3] for r in runs)))
        return rows
    finally:
        moto.terminate()
        moto.wait()


def table(rows: list[dict]) -> str:
    out = ["| data | files | MB | tool | first backup (s) | no-change backup (s) | full restore (s) | restore identical |",
           "| --- | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        out.append(f"| {r['data']} | {r['files']} | {r['mb']:.0f} | {r['tool']} | {r['first']:.2f} | "
                   f"{r['again']:.2f} | {r['restore']:.2f} | {'yes' if r['identical'] else 'NO'} |")
    return "\n".join(out)


def write_readme(text: str) -> None:
    """Replace only the `## backup` section of bench/README.md (other sections belong to other benchmarks)."""
    path = ROOT / "bench" / "README.md"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"## backup\n\n{text.strip()}\n"
    m = re.search(r"^## backup\n.*?(?=^## |\Z)", old, flags=re.S | re.M)
    new = old[:m.start()] + section + ("\n" + old[m.end():] if old[m.end():] else "") if m else old.rstrip() + "\n\n" + section
    path.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is reported")
    ap.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    a = ap.parse_args()
    if not shutil.which("restic"):
        raise SystemExit("restic not found: apt-get install -y restic")
    restic_version = subprocess.run(["restic", "version"], capture_output=True, text=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="conveyor-bench-backup-"))
    try:
        rows = run(tmp, a.repeats)
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    t = table(rows)
    print("\n" + t)
    if not a.no_readme:
        write_readme(
            f"`python bench/backup.py --repeats {a.repeats}` — median of {a.repeats} runs, wall seconds of a fresh process per step (interpreter start included), "
            f"against moto's S3 server in its own process on 127.0.0.1, {os.cpu_count()} cores; {restic_version}. "
            "The boto3 loop has no incremental logic: its no-change backup uploads everything again.\n\n" + t +
            "\n\nconveyor: content-addressed blobs for files >= 1 MiB, small files packed into <= 8 MiB packs, "
            "a local (path, size, mtime, inode) -> sha256 index, one listing per 1000 objects; every restored "
            "file's sha256 is checked.")


if __name__ == "__main__":
    main()
