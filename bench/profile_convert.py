"""Where `conveyor convert` spends its CPU: each step of the conversion timed on its own, single-threaded.

Not a test. CPU seconds (process time), not wall, so the split is meaningful on a busy machine; the
steps are the ones `conveyor.ingest` runs per episode (read rows, demux, decode the stats keyframes,
stats, hash) and per camera (stream copy), plus the interpreter + imports of a `conveyor convert` run and
that run's total CPU (user + sys of the child, threads included).

Usage: .venv/bin/python bench/profile_convert.py RECORDING   (e.g. bench/out/recordings/convert40-noise14,
       which `python bench/convert.py --only generate` builds)
"""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def child_cpu(cmd: list[str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO)))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str]) -> int:
    rec = Path(argv[0]).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="profile-convert-"))
    try:
        conveyor = [sys.executable, "-m", "conveyor.cli"]
        total = min(child_cpu(conveyor + ["convert", str(rec), str(tmp / f"out{i}")]) for i in range(3))
        # as the command imports them (lean_process: no OpenBLAS threads)
        imports = min(child_cpu([sys.executable, "-c", "from conveyor.cli.store import lean_process; lean_process(); "
                                 "import conveyor.ingest"]) for _ in range(3))

        import pyarrow.parquet as pq

        from conveyor import stats as st
        from conveyor.fileio import sha256_file
        from conveyor.source import V21Source
        from conveyor.video import StreamCopy, probe

        src = V21Source.open(rec)
        ready, _ = src.scan(probe_videos=False)
        cpu: dict[str, float] = dict.fromkeys(
            ["read rows (parquet)", "demux (probe packets, kept for the copy)", "decode stats keyframes",
             "camera stats (histograms)", "sha256 of source files (a child process, during start-up)",
             "stream copy (mux the kept packets + spans)", "sha256 of the written videos (staging)"], 0.0)
        frames_decoded = 0

        def timed(key, fn, *a, **k):
            t = time.process_time()
            out = fn(*a, **k)
            cpu[key] += time.process_time() - t
            return out

        copies = {key: StreamCopy(tmp / f"{key}.mp4") for key in src.video_keys}
        for ep in ready:
            timed("read rows (parquet)", lambda: pq.ParquetFile(ep.parquet).read())
            for key, path in ep.videos.items():
                packets: list = []
                pr = timed("demux (probe packets, kept for the copy)", probe, path, packets=packets)
                t = time.process_time()
                _, frames = probe(path, sample=st.CAMERA_SAMPLES, packets=[])
                cpu["decode stats keyframes"] += time.process_time() - t
                frames_decoded += len(frames)
                timed("camera stats (histograms)", st.image_stats, frames)
                timed("stream copy (mux the kept packets + spans)", copies[key].add, path, pr, packets)
            timed("sha256 of source files (a child process, during start-up)", src.content_hash, ep.index)
        # probe(sample) demuxes too (its frames come back as RGB: the conversion counts as decoding)
        cpu["decode stats keyframes"] -= cpu["demux (probe packets, kept for the copy)"]
        for key, copy in copies.items():
            timed("stream copy (mux the kept packets + spans)", copy.close)
            timed("sha256 of the written videos (staging)", sha256_file, tmp / f"{key}.mp4")

        steps = sum(cpu.values())
        print(f"recording: {rec} ({len(ready)} episodes, {len(src.video_keys)} cameras, "
              f"{sum(p.stat().st_size for p in rec.rglob('*') if p.is_file()) / 1e6:.0f} MB)")
        print(f"`conveyor convert` total CPU (user+sys, all threads): {total:.2f} s; interpreter + imports "
              f"{imports:.2f} s\n")
        print("| step (single-threaded) | CPU s | share of convert CPU |")
        print("| --- | --- | --- |")
        print(f"| interpreter start + imports | {imports:.2f} | {imports / total:.0%} |")
        for k, v in cpu.items():
            print(f"| {k} | {v:.2f} | {v / total:.0%} |")
        rest = total - imports - steps
        print(f"| rest (rows renumbering, row stats, parquet/meta writes, threads, commit) | {rest:.2f} | "
              f"{rest / total:.0%} |")
        print(f"\n{frames_decoded} keyframes decoded: {cpu['decode stats keyframes'] / max(1, frames_decoded) * 1e3:.1f} "
              f"ms each")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
