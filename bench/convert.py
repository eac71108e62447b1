"""Benchmark for issue 2 §7 and issue 13: `conveyor convert` / `conveyor ingest` against lerobot's own tools,
in lerobot 0.6.x (conveyor's environment) and in lerobot 0.4.4 (the cached Python 3.11 venv of
tests/lerobot_envs.py, when it exists).

Not a test: it prints (and writes into the `## convert` section of bench/README.md) a markdown table of
1. one-shot conversion of a ~40-episode, 2-camera 480x640 AV1 recording: `conveyor convert` vs lerobot's
   official conversion functions (`convert_info/tasks/data/videos/episodes_metadata`; 0.6 moved them to
   `lerobot/scripts/convert_dataset_v21_to_v30.py`), wall s + peak RSS;
2. appending one episode to stores of 20 and of 200 episodes while the recording folder grows in place
   (`conveyor ingest SRC STORE`);
3. the same append as a lerobot-only user does it: convert the one new episode with lerobot's functions and
   merge it into the existing dataset with `lerobot.datasets.aggregate.aggregate_datasets`.
`--tiny` shrinks every recording (a few small episodes) to prove the script runs; its figures mean nothing.

Everything timed runs as its own subprocess (interpreter start and imports included); peak RSS is that
command's max RSS as GNU time reports it (`%M`). Recordings are generated once and cached under --work (default bench/out/,
git-ignored); timed runs work on copies. Usage: `.venv/bin/python bench/convert.py [--work DIR] [--reps N]`.

This file is also its own lerobot helper: `python bench/convert.py _lerobot-convert ...` / `_lerobot-append`
(internal subcommands run as the timed child processes), so the parent never imports torch or lerobot.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bytecode import NOTE, compile_conveyor  # bench/ is on sys.path when run as a script
from readme_section import README, write_section

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = VENV_BIN / "python"          # conveyor's interpreter; its lerobot (0.6.x) is the first baseline
CONVEYOR = VENV_BIN / "conveyor"
BASELINES: list[tuple[str, Path]] = []  # (lerobot version, interpreter), filled in main()
TIME = "/usr/bin/time"  # GNU time, for peak RSS (see run_measured)
SELF = Path(__file__).resolve()
SECTION = "## convert"

# Recording shapes. Bump CACHE_VERSION when any of these change so stale caches are regenerated.
CACHE_VERSION = 1
CONVERT_EPISODES = 40
CONVERT_LENGTHS = (90, 130)  # uniform integer lengths, mean ~110 frames (~4,400 frames in all)
# Extra per-pixel noise (+-N of 255) for a second conversion input: synth's frames compress to ~1.3 KB per
# frame and camera, ~10x below camera footage at lerobot's AV1 settings (crf 30, g=2); +-14 gives ~19 KB,
# i.e. the ~160 MB per ~4,400 frames of the reference baseline in ../shared/reference/environment.md.
CAMERA_LIKE_NOISE = 14
APPEND_BASES = (20, 200)
APPEND_BASE_LENGTHS = (25, 35)  # short episodes keep the 200-episode recording's generation bounded
APPEND_LENGTH = 30  # every appended episode, so the 20- and 200-episode appends do the same work
TASKS = ("pick the cube and place it in the bin", "push the cube to the left")

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TQDM_DISABLE": "1", "SVT_LOG": "1", "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------- running children

class Measured:
    def __init__(self, wall_s: float, rss_mb: float, log: Path):
        self.wall_s, self.rss_mb, self.log = wall_s, rss_mb, log


def run_measured(cmd: list[str], log: Path, env: dict[str, str]) -> Measured:
    """Run cmd as a child under GNU time; wall clock from spawn to exit, peak RSS from time's `%M`.

    Not `wait4` on our own child: Linux carries the RSS high-water mark of the pre-exec address space across
    exec, and subprocess spawns with vfork, so a child's ru_maxrss would include this (numpy/av-laden)
    parent's RSS. GNU time is a tiny process, so the command's %M is its own.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    timing = log.with_suffix(".time")
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.run([TIME, "-f", "%e %M", "-o", timing, *map(str, cmd)], stdout=out,
                              stderr=subprocess.STDOUT, env=env, cwd=REPO)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"bench: {' '.join(map(str, cmd))} exited {proc.returncode}; log {log}:\n{tail}")
    rss_kb = float(timing.read_text().split()[-1])
    return Measured(wall, rss_kb / 1024.0, log)


def child_env(work: Path, hf_cache: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, **OFFLINE_ENV)
    env["HF_HOME"] = str(work / "hf_home")  # never the user's cache, never the network
    if hf_cache is not None:  # a fresh datasets Arrow cache per lerobot run: no run profits from another
        env["HF_DATASETS_CACHE"] = str(hf_cache)
    return env


def warm(path: Path) -> None:
    """Read every file once so the first timed run does not pay for the disk and the others for nothing."""
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 20):
                    pass


def du_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def read_info(root: Path) -> dict:
    return json.loads((root / "meta" / "info.json").read_text(encoding="utf-8"))


def fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


# ----------------------------------------------------------------------------- cached recordings

def _spec():
    from conveyor.synthetic.recording import KOCH_480P
    return KOCH_480P


def _real_shape_spec():
    """The shape of a real recording the synthetic writer can make: 3 cameras 480x640, H.264 (x264 defaults:
    B-frames, GOP 250)."""
    from conveyor.synthetic.recording import CameraSpec, RecordingSpec
    return RecordingSpec(cameras=tuple(CameraSpec(k, 480, 640, codec="h264") for k in
                                       ("observation.images.laptop", "observation.images.phone", "observation.images.wrist")))


# (cache key, README label, extra noise, spec, speed-up target): the one-shot conversion inputs
CONVERT_INPUTS = (("convert", "synth", 0, "koch", 3), ("convert_camera_like", "camera-like bitrate", CAMERA_LIKE_NOISE, "koch", 5),
                  ("convert_real_shape", "real-recording shape (3 cameras H.264, B-frames)", CAMERA_LIKE_NOISE, "real", 3))
SPECS = {"koch": _spec, "real": _real_shape_spec}
RSS_TARGET_MB = 250


def _lengths(n: int, bounds: tuple[int, int], seed: int) -> list[int]:
    import numpy as np
    return np.random.default_rng(seed).integers(bounds[0], bounds[1] + 1, n).tolist()


def _cached(path: Path, params: dict) -> bool:
    marker = path / ".bench-complete.json"
    return marker.exists() and json.loads(marker.read_text()) == params


def _mark(path: Path, params: dict) -> None:
    (path / ".bench-complete.json").write_text(json.dumps(params))


@contextlib.contextmanager
def extra_noise(amplitude: int):
    """Generate with synth's frames plus deterministic uniform noise, for a camera-like bitrate.

    Wraps `conveyor.synthetic.recording.frame_pixels` for the duration (bench-only; synth has no bitrate knob)."""
    import numpy as np

    import conveyor.synthetic.recording as synth

    base = synth.frame_pixels

    def noisy(spec, camera, episode_index, frame_index):
        img = base(spec, camera, episode_index, frame_index)
        if not amplitude:
            return img
        rng = np.random.default_rng([spec.seed, 7, episode_index, frame_index, synth._key_seed(camera.key)])
        noise = rng.integers(-amplitude, amplitude + 1, img.shape, dtype=np.int16)
        return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)

    synth.frame_pixels = noisy
    try:
        yield
    finally:
        synth.frame_pixels = base


def ensure_recordings(work: Path) -> dict[str, Path]:
    """The 40-episode conversion inputs (synth as is, and camera-like bitrate) and the 20-/200-episode append
    bases, generated once."""
    from conveyor.synthetic.recording import RecordingWriter

    rec = work / "recordings"
    rec.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, _, noise, spec, _ in CONVERT_INPUTS:
        out[name] = rec / (f"convert{CONVERT_EPISODES}" + (f"-noise{noise}" if noise else "")
                           + ("" if spec == "koch" else f"-{spec}"))
        params = {"v": CACHE_VERSION, "episodes": CONVERT_EPISODES, "lengths": list(CONVERT_LENGTHS),
                  **({"noise": noise} if noise else {}), **({"spec": spec} if spec != "koch" else {})}
        if _cached(out[name], params):
            continue
        lengths = _lengths(CONVERT_EPISODES, CONVERT_LENGTHS, seed=40)
        print(f"generating {out[name]} ({CONVERT_EPISODES} episodes, {sum(lengths)} frames, {spec} cameras, "
              f"extra noise +-{noise}) - first run only", flush=True)
        t0 = time.perf_counter()
        w = RecordingWriter(fresh(out[name]), SPECS[spec]())
        with extra_noise(noise):
            for i, n in enumerate(lengths):
                w.write_episode(i, n, TASKS[i % 2])
        _mark(out[name], params)
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)

    # One writer grows to 200 episodes; a copy is taken at 20, so both bases share their first 20 episodes.
    big, small = max(APPEND_BASES), min(APPEND_BASES)
    out["append_big"], out["append_small"] = rec / f"append{big}", rec / f"append{small}"
    params = {"v": CACHE_VERSION, "episodes": big, "lengths": list(APPEND_BASE_LENGTHS)}
    if not (_cached(out["append_big"], params) and _cached(out["append_small"], {**params, "episodes": small})):
        lengths = _lengths(big, APPEND_BASE_LENGTHS, seed=200)
        print(f"generating {out['append_big']} ({big} episodes, {sum(lengths)} frames) - first run only", flush=True)
        t0 = time.perf_counter()
        w = RecordingWriter(fresh(out["append_big"]), _spec())
        for i, n in enumerate(lengths):
            if i == small:
                shutil.copytree(out["append_big"], fresh(out["append_small"]))
                _mark(out["append_small"], {**params, "episodes": small})
            w.write_episode(i, n, TASKS[i % 2])
        _mark(out["append_big"], params)
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def copy_recording(src: Path, dst: Path) -> Path:
    shutil.copytree(src, fresh(dst), ignore=shutil.ignore_patterns(".bench-complete.json"))
    return dst


def extract_episode(src: Path, episode: int, dst: Path) -> Path:
    """A one-episode v2.1 recording holding source episode `episode` renumbered to 0: what a lerobot-only user
    must hand the official converter, which converts whole folders and requires indices 0..N-1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    info = read_info(src)
    chunk = episode // info["chunks_size"]
    fresh(dst)
    (dst / "meta").mkdir(parents=True)
    lines = lambda name: [json.loads(x) for x in (src / "meta" / name).read_text(encoding="utf-8").splitlines() if x]  # noqa: E731
    ep = next(e for e in lines("episodes.jsonl") if e["episode_index"] == episode)
    st = next(e for e in lines("episodes_stats.jsonl") if e["episode_index"] == episode)
    tasks = {t["task_index"]: t["task"] for t in lines("tasks.jsonl")}

    table = pq.read_table(src / info["data_path"].format(episode_chunk=chunk, episode_index=episode))
    old_tasks = sorted(set(table.column("task_index").to_pylist()))
    remap = {old: new for new, old in enumerate(old_tasks)}
    n = table.num_rows
    cols = {"episode_index": pa.array([0] * n, pa.int64()), "index": pa.array(range(n), pa.int64()),
            "task_index": pa.array([remap[t] for t in table.column("task_index").to_pylist()], pa.int64())}
    for name, arr in cols.items():
        table = table.set_column(table.schema.get_field_index(name), table.schema.field(name), arr)
    out = dst / info["data_path"].format(episode_chunk=0, episode_index=0)
    out.parent.mkdir(parents=True)
    pq.write_table(table, out)
    video_keys = [k for k, f in info["features"].items() if f["dtype"] == "video"]
    for key in video_keys:
        v = dst / info["video_path"].format(episode_chunk=0, video_key=key, episode_index=0)
        v.parent.mkdir(parents=True)
        shutil.copy2(src / info["video_path"].format(episode_chunk=chunk, video_key=key, episode_index=episode), v)

    st["episode_index"] = 0
    for stat in ("min", "max", "mean"):
        st["stats"]["episode_index"][stat] = [0.0]
        st["stats"]["index"][stat] = [st["stats"]["index"][stat][0] - table.column("index")[0].as_py() + 0.0]
    ep["episode_index"] = 0
    (dst / "meta" / "episodes.jsonl").write_text(json.dumps(ep, ensure_ascii=False) + "\n", encoding="utf-8")
    (dst / "meta" / "episodes_stats.jsonl").write_text(json.dumps(st) + "\n", encoding="utf-8")
    (dst / "meta" / "tasks.jsonl").write_text(
        "".join(json.dumps({"task_index": remap[o], "task": tasks[o]}, ensure_ascii=False) + "\n" for o in old_tasks),
        encoding="utf-8")
    info.update(total_episodes=1, total_frames=n, total_tasks=len(old_tasks), total_videos=len(video_keys),
                total_chunks=1, splits={"train": "0:1"})
    (dst / "meta" / "info.json").write_text(json.dumps(info, indent=4, ensure_ascii=False), encoding="utf-8")
    return dst


# ----------------------------------------------------------------------------- lerobot children

def _lerobot_convert(root: Path, new_root: Path) -> None:
    """lerobot's `convert_dataset` minus the Hub, the `<root>/<repo_id>` layout and the folder swaps
    (0.6: `lerobot/scripts/convert_dataset_v21_to_v30.py`; 0.4.4: `lerobot/datasets/v30/...`)."""
    from lerobot.datasets.utils import DEFAULT_DATA_FILE_SIZE_IN_MB, DEFAULT_VIDEO_FILE_SIZE_IN_MB
    try:  # lerobot >= 0.5 moved the converter under lerobot.scripts
        from lerobot.scripts.convert_dataset_v21_to_v30 import (convert_data, convert_episodes_metadata,
                                                                convert_info, convert_tasks, convert_videos)
    except ImportError:
        from lerobot.datasets.v30.convert_dataset_v21_to_v30 import (convert_data, convert_episodes_metadata,
                                                                      convert_info, convert_tasks, convert_videos)

    convert_info(root, new_root, DEFAULT_DATA_FILE_SIZE_IN_MB, DEFAULT_VIDEO_FILE_SIZE_IN_MB)
    convert_tasks(root, new_root)
    episodes = convert_data(root, new_root, DEFAULT_DATA_FILE_SIZE_IN_MB)
    videos = convert_videos(root, new_root, DEFAULT_VIDEO_FILE_SIZE_IN_MB)
    convert_episodes_metadata(root, new_root, episodes, videos)


def _lerobot_append(existing: Path, episode_v21: Path, new_v30: Path, merged: Path) -> None:
    """One-episode convert, then `aggregate_datasets([existing, new])` into a NEW dataset (it cannot append in
    place). Converted datasets carry a per-feature `fps` key; make the new one's features match the existing."""
    from lerobot.datasets.aggregate import aggregate_datasets

    _lerobot_convert(episode_v21, new_v30)
    have = read_info(existing)["features"]
    info = read_info(new_v30)
    for key, ft in info["features"].items():
        if "fps" in ft and "fps" not in have.get(key, {}):
            del ft["fps"]
    (new_v30 / "meta" / "info.json").write_text(json.dumps(info, indent=4, ensure_ascii=False), encoding="utf-8")
    aggregate_datasets(["local/existing", "local/new_episode"], "local/merged", roots=[existing, new_v30],
                       aggr_root=merged)


def _lerobot_check(root: Path) -> None:
    """The merged baseline must be a dataset lerobot loads: open it offline and decode its last frame."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset("local/merged", root=root, video_backend="pyav")
    item = ds[len(ds) - 1]
    assert int(item["episode_index"]) == ds.meta.total_episodes - 1, item["episode_index"]
    print(f"loaded {root}: {ds.meta.total_episodes} episodes, {len(ds)} frames")


# ----------------------------------------------------------------------------- benchmarks

def bench_convert(recording: Path, label: str, run: Path, work: Path, reps: int) -> dict:
    run = run / recording.name
    src = copy_recording(recording, run / "convert" / "src")
    warm(src)
    info = read_info(src)
    conv, lero = [], {v: [] for v, _ in BASELINES}
    for i in range(reps):  # alternate so drift on a shared machine hits every tool alike
        dst = fresh(run / "convert" / "conveyor_out")
        conv.append(run_measured([CONVEYOR, "convert", src, dst], run / "logs" / f"convert_conveyor_{i}.log",
                                 child_env(work)))
        total = read_info(dst)["total_frames"]
        assert total == info["total_frames"], (total, info["total_frames"])
        for version, python in BASELINES:
            out = fresh(run / "convert" / f"lerobot_{version}_out")
            cache = fresh(run / "convert" / f"hf_cache_{i}")
            lero[version].append(run_measured([python, SELF, "_lerobot-convert", src, out],
                                              run / "logs" / f"convert_lerobot_{version}_{i}.log",
                                              child_env(work, cache)))
            shutil.rmtree(cache, ignore_errors=True)
            assert read_info(out)["total_frames"] == info["total_frames"]
    return {"label": label, "episodes": info["total_episodes"], "frames": info["total_frames"], "src_mb": du_mb(src),
            "conveyor": conv, "lerobot": lero,
            "out_mb": {"conveyor": du_mb(run / "convert" / "conveyor_out"),
                       **{v: du_mb(run / "convert" / f"lerobot_{v}_out") for v, _ in BASELINES}}}


def bench_append(base: Path, n: int, run: Path, work: Path, reps: int, lerobot: bool) -> dict:
    from conveyor.synthetic.recording import RecordingWriter

    d = run / f"append{n}"
    src = copy_recording(base, d / "src")
    store = d / "store"
    fresh(store)
    setup = run_measured([CONVEYOR, "convert", src, store], run / "logs" / f"append{n}_convert.log", child_env(work))
    baselines = BASELINES if lerobot else []
    existing = {v: d / f"lerobot_{v}_0" for v, _ in baselines}
    for version, python in baselines:
        cache = fresh(d / "hf_cache_setup")
        run_measured([python, SELF, "_lerobot-convert", src, fresh(existing[version])],
                     run / "logs" / f"append{n}_lerobot_{version}_convert.log", child_env(work, cache))
        shutil.rmtree(cache, ignore_errors=True)
    writer = RecordingWriter(src, _spec())
    ingest, merge = [], {v: [] for v, _ in baselines}
    for i in range(reps):
        ep = n + i
        writer.write_episode(ep, APPEND_LENGTH, TASKS[ep % 2])  # the recorder finishes one more episode
        warm(src / "videos")
        ingest.append(run_measured([CONVEYOR, "ingest", src, store], run / "logs" / f"append{n}_ingest_{i}.log",
                                   child_env(work)))
        got = read_info(store)["total_episodes"]
        assert got == ep + 1, f"store has {got} episodes after ingesting episode {ep}"
        for version, python in baselines:
            one = extract_episode(src, ep, d / f"episode_{ep}_v21")
            new_v30, merged = fresh(d / f"episode_{ep}_v30"), fresh(d / f"lerobot_{version}_{i + 1}")
            cache = fresh(d / "hf_c")
            warm(existing[version])
            merge[version].append(run_measured([python, SELF, "_lerobot-append", existing[version], one, new_v30,
                                                merged], run / "logs" / f"append{n}_lerobot_{version}_merge_{i}.log",
                                               child_env(work, cache)))
            got = read_info(merged)["total_episodes"]
            assert got == ep + 1, f"merged lerobot {version} dataset has {got} episodes, expected {ep + 1}"
            for p in (existing[version], one, new_v30, cache):
                shutil.rmtree(p)
            existing[version] = merged
    check = subprocess.run([CONVEYOR, "validate", store, "--against", src], capture_output=True, text=True,
                           env=child_env(work))
    lerobot_ok = {}
    for version, python in baselines:
        cache = fresh(d / "hf_c")
        lerobot_ok[version] = subprocess.run([python, SELF, "_lerobot-check", existing[version]],
                                             capture_output=True, env=child_env(work, cache)).returncode == 0
    return {"n": n, "setup": setup, "conveyor": ingest, "lerobot": merge, "valid": check.returncode == 0,
            "lerobot_loads": lerobot_ok,
            "validate_out": (check.stdout + check.stderr).strip().splitlines()[-1:]}


# ----------------------------------------------------------------------------- report

def med(ms: list[Measured], attr: str) -> float:
    return statistics.median(getattr(m, attr) for m in ms)


def spread(ms: list[Measured]) -> str:
    w = sorted(m.wall_s for m in ms)
    return f"{w[0]:.2f}–{w[-1]:.2f}" if len(w) > 1 else f"{w[0]:.2f}"


def valid(a: dict, version: str | None = None) -> str:
    """`conveyor validate --against SRC` on the final store; that lerobot loading its final merge."""
    if version is None:
        return f"conveyor validate: {'pass' if a['valid'] else '**FAIL**'}"
    return f"lerobot {version} loads its merge: {'yes' if a['lerobot_loads'][version] else '**NO**'}"


def verdict(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def render(convs: list[dict], apps: list[dict], args: argparse.Namespace, total_s: float) -> str:
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    cpu = "?"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [SECTION, "",
             f"Measured {when} on {platform.node()} ({os.cpu_count()} cores, {cpu}, Python {platform.python_version()}),"
             f" by `bench/convert.py` in {total_s:.0f} s (excluding first-time recording generation); 1-min load average "
             f"at the end {os.getloadavg()[0]:.1f} (other work on the machine makes times noisy: trust the ratios).",
             "Every timed step is its own subprocess, so wall time includes interpreter start and imports; peak RSS "
             "is that process's max RSS (GNU `/usr/bin/time` `%M`). Medians of the repetitions; the range is min–max wall. "
             f"{NOTE[0].upper() + NOTE[1:]}.", ""]
    tools = ", ".join(f"lerobot {v}" for v, _ in BASELINES) or "no lerobot baseline"
    if convs:
        c0 = convs[0]
        lines += [f"### One-shot conversion ({c0['episodes']} episodes, {c0['frames']} frames, 480x640 cameras; "
                  f"{len(c0['conveyor'])} runs of each tool per input, alternating; baselines: {tools})", "",
                  "| input | tool | wall s (median) | range | peak RSS MB | output MB | speed-up |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for conv in convs:
            c = conv["conveyor"]
            inp = f"{conv['label']}, {conv['src_mb']:.0f} MB"
            lines.append(f"| {inp} | `conveyor convert` | {med(c, 'wall_s'):.2f} | {spread(c)} | "
                         f"{med(c, 'rss_mb'):.0f} | {conv['out_mb']['conveyor']:.0f} | 1 |")
            for version, l in conv["lerobot"].items():
                lines.append(f"| {inp} | lerobot {version} `convert_info/tasks/data/videos/episodes_metadata` | "
                             f"{med(l, 'wall_s'):.2f} | {spread(l)} | {med(l, 'rss_mb'):.0f} | "
                             f"{conv['out_mb'][version]:.0f} | conveyor **{med(l, 'wall_s') / med(c, 'wall_s'):.1f}×** |")
        lines.append("")
        for conv in convs:
            c = conv["conveyor"]
            target = next((t for _, lab, _, _, t in CONVERT_INPUTS if lab == conv["label"]), 3)
            for version, l in conv["lerobot"].items():
                speed = med(l, "wall_s") / med(c, "wall_s")
                lines.append(f"- {conv['label']}, vs lerobot {version}: speed-up **{speed:.1f}×** (target ≥ {target}×: "
                             f"{verdict(speed >= target)}); conveyor peak RSS **{med(c, 'rss_mb'):.0f} MB** (target ≤ "
                             f"{RSS_TARGET_MB} MB: {verdict(med(c, 'rss_mb') <= RSS_TARGET_MB)}), "
                             f"lerobot {med(l, 'rss_mb'):.0f} MB.")
        lines += [f"- Inputs: `synth` is `conveyor.synthetic.recording` as is (~1.3 KB per AV1 frame and camera); `camera-like "
                  f"bitrate` adds ±{CAMERA_LIKE_NOISE} uniform pixel noise to the same frames (~19 KB per frame and "
                  f"camera, the size of the reference baseline: 161 MB for 4,417 frames); `real-recording shape` is 3 "
                  f"cameras 480x640 H.264 with x264's defaults (B-frames, GOP 250) and the same noise. The first two "
                  f"are 2 cameras 480x640 AV1 (lerobot's settings: crf 30, g=2).", ""]
    if apps:
        lines += [f"### Append one episode ({APPEND_LENGTH} frames, 2 cameras 480x640 AV1) to a store of N episodes",
                  "",
                  f"The source recording grows in place (`RecordingWriter.write_episode`, untimed), then the store is "
                  f"updated. Base episodes are {APPEND_BASE_LENGTHS[0]}–{APPEND_BASE_LENGTHS[1]} frames (short, to "
                  f"bound generation time of the 200-episode recording). lerobot side ({tools}): the new episode is "
                  f"first copied out as its own one-episode v2.1 folder (renumbered to 0, untimed), then one timed "
                  f"process converts it with the official functions and merges it with "
                  f"`aggregate_datasets([existing, new])` into a new dataset; `existing` is that version's converter "
                  f"output of the first N episodes (then the previous merge).", "",
                  "| N | tool | wall s (median) | range | peak RSS MB | tool / conveyor | valid results |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for a in apps:
            c = a["conveyor"]
            lines.append(f"| {a['n']} | `conveyor ingest` | {med(c, 'wall_s'):.2f} | {spread(c)} | "
                         f"{med(c, 'rss_mb'):.0f} | 1 | {valid(a)} |")
            for version, l in a["lerobot"].items():
                lines.append(f"| {a['n']} | lerobot {version} convert + `aggregate_datasets` | {med(l, 'wall_s'):.2f} | "
                             f"{spread(l)} | {med(l, 'rss_mb'):.0f} | **{med(l, 'wall_s') / med(c, 'wall_s'):.1f}×** | "
                             f"{valid(a, version)} |")
        lines.append("")
        by_n = {a["n"]: a for a in apps}
        lo, hi = min(APPEND_BASES), max(APPEND_BASES)
        if lo in by_n and hi in by_n:
            growth = med(by_n[hi]["conveyor"], "wall_s") / med(by_n[lo]["conveyor"], "wall_s")
            lines.append(f"- {hi}-episode append / {lo}-episode append: **{growth:.2f}×** (target ≤ 1.2×: "
                         f"{verdict(growth <= 1.2)}).")
        if hi in by_n:
            wall = med(by_n[hi]["conveyor"], "wall_s")
            lines.append(f"- append one episode to the {hi}-episode store: **{wall:.2f} s** (target ≤ 0.3 s: "
                         f"{verdict(wall <= 0.3)}).")
        for version, _ in BASELINES:
            ratios = [med(a["lerobot"][version], "wall_s") / med(a["conveyor"], "wall_s") for a in apps
                      if a["lerobot"].get(version)]
            if ratios:
                lines.append(f"- conveyor vs lerobot {version} convert + merge: **{min(ratios):.1f}×** faster or better "
                             f"(target ≥ 10×: {verdict(min(ratios) >= 10)}).")
        lines.append("")
    lines += ["Commands (from the repository root):", "", "```bash",
              f".venv/bin/python bench/convert.py --reps {args.reps} --convert-reps {args.convert_reps}"
              + ("" if args.work == "bench/out" else f" --work {args.work}") + (" --tiny" if args.tiny else ""),
              "# lerobot 0.4.4 baseline: the cached venv of tests/lerobot_envs.py (built by `cd tests && "
              "python -m lerobot_envs`)",
              "# what it times, per run:",
              ".venv/bin/conveyor convert SRC DST",
              ".venv/bin/conveyor ingest SRC STORE",
              "PYTHON bench/convert.py _lerobot-convert SRC DST          # that lerobot's convert_* functions",
              "PYTHON bench/convert.py _lerobot-append EXISTING EP_V21 EP_V30 MERGED",
              "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_lerobot-convert":
        _lerobot_convert(Path(argv[1]), Path(argv[2]))
        return 0
    if argv and argv[0] == "_lerobot-check":
        _lerobot_check(Path(argv[1]))
        return 0
    if argv and argv[0] == "_lerobot-append":
        _lerobot_append(*(Path(a) for a in argv[1:5]))
        return 0

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="bench/out", help="cache + scratch folder (default bench/out, git-ignored)")
    p.add_argument("--reps", type=int, default=5, help="appends per store size (>= 3)")
    p.add_argument("--convert-reps", type=int, default=3, help="runs of each converter")
    p.add_argument("--only", choices=["generate", "convert", "append"], help="run one part")
    p.add_argument("--no-lerobot-append", action="store_true", help="skip the convert + merge baseline")
    p.add_argument("--no-readme", action="store_true", help="do not write bench/README.md")
    p.add_argument("--keep", action="store_true", help="keep the scratch run folder")
    p.add_argument("--venv", default=str(REPO / ".venv"), help="conveyor's venv (default .venv)")
    p.add_argument("--lerobot-044", help="lerobot 0.4.4 venv for the second baseline (default: the cached one "
                                         "of tests/lerobot_envs.py; skipped when missing)")
    p.add_argument("--tiny", action="store_true", help="tiny recordings, to prove the script runs (no figures)")
    args = p.parse_args(argv)
    if args.reps < 1 or args.convert_reps < 1:
        p.error("--reps and --convert-reps must be >= 1")
    work = (REPO / args.work).resolve() if not Path(args.work).is_absolute() else Path(args.work)
    os.environ.update(SVT_LOG="1")
    sys.path.insert(0, str(REPO))
    global PYTHON, CONVEYOR, CONVERT_EPISODES, CONVERT_LENGTHS, APPEND_BASES, APPEND_BASE_LENGTHS, APPEND_LENGTH
    PYTHON, CONVEYOR = Path(args.venv) / "bin/python", Path(args.venv) / "bin/conveyor"
    if args.tiny:
        CONVERT_EPISODES, CONVERT_LENGTHS, APPEND_BASES = 3, (8, 12), (2, 4)
        APPEND_BASE_LENGTHS, APPEND_LENGTH = (6, 8), 6
    BASELINES.clear()
    sys.path.insert(0, str(REPO / "tests"))
    import lerobot_envs

    old = Path(args.lerobot_044) if args.lerobot_044 else lerobot_envs.venv_path()
    for python in (PYTHON, old / "bin/python"):
        version = lerobot_envs.installed_version(python.parent.parent) if python.exists() else None
        if version:
            BASELINES.append((version, python))
        else:
            print(f"no lerobot next to {python}: that baseline is skipped", flush=True)

    recs = ensure_recordings(work)
    compile_conveyor()
    if args.only == "generate":
        return 0
    run = fresh(work / "run")
    t0 = time.perf_counter()
    convs = []
    if args.only in (None, "convert"):
        for key, label, *_ in CONVERT_INPUTS:
            print(f"timing one-shot conversion of {recs[key].name} ...", flush=True)
            convs.append(bench_convert(recs[key], label, run, work, args.convert_reps))
    apps = []
    if args.only in (None, "append"):
        for n, base in ((min(APPEND_BASES), recs["append_small"]), (max(APPEND_BASES), recs["append_big"])):
            print(f"timing appends to a {n}-episode store ...", flush=True)
            apps.append(bench_append(base, n, run, work, args.reps, not args.no_lerobot_append))
    text = render(convs, apps, args, time.perf_counter() - t0)
    print()
    print(text)
    for a in apps:
        if not a["valid"]:
            print(f"WARNING: conveyor validate failed for the {a['n']}-episode store: {a['validate_out']}")
    if not args.no_readme:
        write_section(SECTION, text)
        print(f"wrote the {SECTION!r} section of {README.relative_to(REPO)}")
    if not args.keep:
        shutil.rmtree(run, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
