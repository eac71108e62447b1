"""Publishing dataset versions and materializing them on a worker, against restic and `conveyor restore`.

    .venv/bin/python bench/publish.py [--mb 150] [--repeats 3] [--no-readme] [--keep]
    .venv/bin/python bench/publish.py --tiny            (a ~3 MB store: proves the script runs)

A real conveyor store (made through the store's commit protocol; file contents are random bytes, shaped
like a compacted v3.0 store: one data file, two camera files, metadata) of about `--mb` MB, then one
commit that adds one episode's files (data, two videos, episode metadata) and rewrites info/stats/tasks:

* publish cost of that one-episode commit (bytes sent, seconds), after the first full publish;
* materialize version N+1 on a worker whose cache holds version N (bytes fetched vs. the commit's new
  bytes; seconds), against restoring the same version whole with restic (`restic restore latest`) and with
  `conveyor restore` — each a fresh process, interpreter start included;
* hard-link materialization of the whole store on its own filesystem (no byte copied).

S3 is moto's server in its own process on 127.0.0.1. Needs `restic` on PATH for its row (apt-get install
restic); without it the row says so. Figures go to the `## publish` section of bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable

from s3_server import bench_env, start_moto  # noqa: E402  (bench/ is on sys.path as the script's folder)

EPISODE = {"data": 0.006, "video": 0.0045, "meta": 0.0004}   # one episode's share of the store, per file kind


def make_store(root: Path, mb: float) -> Path:
    """A store of ~`mb` MB in one commit, laid out like a compacted v3.0 store."""
    from conveyor.store import Store

    total = int(mb * 1e6)
    files = {"meta/info.json": 3_000, "meta/stats.json": 12_000, "meta/tasks.parquet": 2_000,
             "meta/episodes/chunk-000/file-000.parquet": 60_000, "data/chunk-000/file-000.parquet": total * 8 // 100,
             "videos/observation.images.laptop/chunk-000/file-000.mp4": total * 46 // 100,
             "videos/observation.images.phone/chunk-000/file-000.mp4": total * 45 // 100}
    store = Store.open(root, create=True)
    with store.lock(), store.transaction("bench") as c:
        for rel, size in files.items():
            c.write(rel, os.urandom(size))
        c.set_totals(100, 100 * 300)
    return root


def add_episode(root: Path, mb: float) -> int:
    """One append commit: the episode's new files plus the three rewritten metadata files; returns new bytes."""
    from conveyor.store import Store

    total = int(mb * 1e6)
    files = {"meta/info.json": 3_000, "meta/stats.json": 12_000, "meta/tasks.parquet": 2_000,
             "meta/episodes/chunk-000/file-001.parquet": int(total * EPISODE["meta"]),
             "data/chunk-000/file-001.parquet": int(total * EPISODE["data"]),
             "videos/observation.images.laptop/chunk-000/file-001.mp4": int(total * EPISODE["video"]),
             "videos/observation.images.phone/chunk-000/file-001.mp4": int(total * EPISODE["video"])}
    store = Store.open(root)
    with store.lock(), store.transaction("bench") as c:
        for rel, size in files.items():
            c.write(rel, os.urandom(size))
        c.set_totals(101, 101 * 300)
    return sum(files.values())


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:5])}... failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return dt, r.stdout


def materialize_main(argv: list[str]) -> None:
    """Child process: materialize one published version into a cache; print the report as JSON."""
    url, key, cache, live = argv
    from conveyor.datasets.format import read_version
    from conveyor.datasets.materialize import materialize
    from conveyor.repo import open_repo
    from conveyor.settings import S3Settings

    repo = open_repo(url, S3Settings(endpoint_url=os.environ.get("BENCH_ENDPOINT")))
    r = materialize(read_version(repo, key), Path(cache), repo=repo, live_store=Path(live) if live != "-" else None)
    print(r.model_dump_json())


def run(tmp: Path, mb: float, repeats: int) -> dict:
    from conveyor import backup as B
    from conveyor.datasets.format import read_version
    from conveyor.datasets.materialize import materialize
    from conveyor.datasets.publish import publish
    from conveyor.repo import open_repo
    from conveyor.settings import S3Settings

    moto, endpoint = start_moto()
    env = bench_env(tmp, BENCH_ENDPOINT=endpoint)
    try:
        import boto3
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3cfg = S3Settings(endpoint_url=endpoint)
        cfg = tmp / "conveyor.toml"
        cfg.write_text(f'work_dir = "{tmp / "work"}"\n[s3]\nendpoint_url = "{endpoint}"\n')
        runs = []
        for rep in range(repeats):
            d = tmp / f"r{rep}"
            store = make_store(d / "stores" / "lab", mb)
            size_n = tree_bytes(store) - tree_bytes(store / ".conveyor")
            bucket = f"bench-publish-{rep}"
            s3.create_bucket(Bucket=bucket)
            url = f"s3://{bucket}/repo"
            repo = open_repo(url, s3cfg)
            first = publish(store, repo)
            B.backup(store, repo)                       # conveyor restore and publish share this repository
            # worker holding version N
            t, out = timed([PY, __file__, "--materialize", url, first.key, str(d / "worker-cache"), "-"], env)
            new_bytes = add_episode(store, mb)
            # the one-episode commit
            t0 = time.perf_counter()
            second = publish(store, repo)
            publish_s = time.perf_counter() - t0
            B.backup(store, repo)
            # worker materializes N+1 from its cache + S3
            mat_s, out = timed([PY, __file__, "--materialize", url, second.key, str(d / "worker-cache"), "-"], env)
            mat = json.loads(out)
            # conveyor restore of the same version, whole
            rest_s, _ = timed([PY, "-m", "conveyor.cli", "--config", str(cfg), "restore", f"{url}@lab",
                               str(d / "restored")], env)
            # restic: back up N and N+1, restore N+1 whole
            restic_s = None
            if shutil.which("restic"):
                rbucket = f"bench-restic-{rep}"
                s3.create_bucket(Bucket=rbucket)
                rr = ["restic", "-q", "-r", f"s3:{endpoint}/{rbucket}"]
                timed([*rr, "init"], env)
                live = d / "restic-src"
                shutil.copytree(store, live, ignore=shutil.ignore_patterns(".conveyor"))
                timed([*rr, "backup", str(live)], env)
                restic_s, _ = timed([*rr, "restore", "latest", "--target", str(d / "restic-restored")], env)
            # hard-link materialization of the whole store on its own filesystem (a fresh cache)
            t0 = time.perf_counter()
            hl = materialize(read_version(repo, second.key), d / "local-cache", repo=repo, live_store=store)
            hl_s = time.perf_counter() - t0
            runs.append(dict(size=size_n, new_bytes=new_bytes, publish_bytes=second.bytes_sent, publish_s=publish_s,
                             publish_first_s=first.seconds, fetched=mat["fetched_bytes"], mat_s=mat_s,
                             restore_s=rest_s, restic_s=restic_s, hardlink_s=hl_s, hardlinked=hl.linked_store,
                             files=len(read_version(repo, second.key).files)))
            print(json.dumps(runs[-1]), flush=True)
            shutil.rmtree(d, ignore_errors=True)
        med = {k: (statistics.median(r[k] for r in runs) if runs[0][k] is not None else None) for k in runs[0]}
        return med
    finally:
        moto.terminate()
        moto.wait()


def table(m: dict) -> str:
    restic = f"{m['restic_s']:.2f}" if m["restic_s"] is not None else "not measured (restic not installed)"
    return "\n".join([
        "| step | bytes | seconds |", "| --- | ---: | ---: |",
        f"| publish the one-episode commit (first full publish: {m['publish_first_s']:.2f} s) | "
        f"{m['publish_bytes'] / 1e6:.2f} MB sent (commit's new bytes {m['new_bytes'] / 1e6:.2f} MB) | {m['publish_s']:.2f} |",
        f"| materialize N+1 on a worker holding N (fresh process) | {m['fetched'] / 1e6:.2f} MB fetched | {m['mat_s']:.2f} |",
        f"| `conveyor restore` of N+1, whole (fresh process) | {m['size'] / 1e6:.0f} MB | {m['restore_s']:.2f} |",
        f"| `restic restore latest` of N+1, whole (fresh process) | {m['size'] / 1e6:.0f} MB | {restic} |",
        f"| hard-link materialization of the whole store ({m['hardlinked']:.0f} of {m['files']:.0f} files linked) "
        f"| 0 copied | {m['hardlink_s']:.3f} |"])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--materialize":
        return materialize_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=150.0, help="store size in MB")
    ap.add_argument("--tiny", action="store_true", help="a ~3 MB store, 1 repeat, README untouched")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    a = ap.parse_args()
    if a.tiny:
        a.mb, a.repeats, a.no_readme = 3.0, 1, True
    tmp = Path(tempfile.mkdtemp(prefix="conveyor-bench-publish-"))
    try:
        med = run(tmp, a.mb, a.repeats)
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    t = table(med)
    print("\n" + t)
    if not a.no_readme:
        from readme_section import write_section

        restic = subprocess.run(["restic", "version"], capture_output=True, text=True).stdout.strip() \
            if shutil.which("restic") else "restic not installed"
        write_section("## publish", f"## publish\n\n`python bench/publish.py --mb {a.mb:g} --repeats {a.repeats}` — "
                      f"median of {a.repeats} runs, {os.cpu_count()} cores, moto S3 in its own process on 127.0.0.1; "
                      f"{restic}. A {a.mb:g} MB store (one commit) then a one-episode commit "
                      f"({med['new_bytes'] / 1e6:.2f} MB of new files).\n\n{t}\n")


if __name__ == "__main__":
    main()
