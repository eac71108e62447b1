"""Curation on real stores: drop, trim, retask, rename, undrop as commits; bad input; kill -9; the lock; the ledger
keeping dropped source episodes out; compaction after curation; lerobot reading a curated version exactly."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conveyor import curate
from conveyor.compact import compact
from conveyor.episodes import load_episodes
from conveyor.errors import ConveyorError, StoreLocked
from conveyor.ingest import ingest
from conveyor.store import CRASH_ENV, Store
from conveyor.synthetic.recording import CameraSpec, RecordingSpec, write_recording
from conveyor.validate import validate_fast

CLI = [sys.executable, "-m", "conveyor.cli"]
SPEC = RecordingSpec(fps=10, cameras=(CameraSpec("observation.images.cam", height=48, width=64, codec="h264"),))
LENGTHS = [14, 20, 17, 25, 12, 18]
TASKS = ["pick", "place", "pick", "抓取方块", "place", "pick"]
CAM = "observation.images.cam"


def tree_hash(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in ("lock", "apply.lock")}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_recording(tmp_path_factory.mktemp("curate") / "src", episodes=len(LENGTHS), lengths=LENGTHS,
                           tasks=TASKS, spec=SPEC)


@pytest.fixture(scope="module")
def base(source, tmp_path_factory) -> Path:
    """A store grown in two appends (two data files), so a curation rewrites some files and keeps others."""
    store = tmp_path_factory.mktemp("base") / "store"
    ingest(source, store, max_episodes=3)
    ingest(source, store)
    return store


@pytest.fixture
def store(base, tmp_path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(base, dst)
    return dst


def _ok(store: Path, source: Path) -> None:
    r = validate_fast(store, against=source)
    assert r.ok, [(c.name, c.detail) for c in r.failures]


def _src_frames(source: Path, ep: int) -> list[bytes]:
    import av

    with av.open(str(source / f"videos/chunk-000/{CAM}/episode_{ep:06d}.mp4")) as c:
        return [f.to_ndarray(format="rgb24").tobytes() for f in c.decode(video=0)]


def test_drop_renumbers_and_keeps_videos(store, source):
    videos = {p: p.stat().st_mtime_ns for p in (store / "videos").rglob("*.mp4")}
    before = Store.open(store).version
    r = curate.drop(store, [1, 4], "operator bumped the arm")
    assert (r.episodes_before, r.episodes_after) == (6, 4)
    assert (r.frames_before, r.frames_after) == (sum(LENGTHS), sum(LENGTHS) - LENGTHS[1] - LENGTHS[4])
    assert r.version.commit == before.commit + 1 and r.parent == before
    rows = load_episodes(store)
    assert [x["episode_index"] for x in rows] == [0, 1, 2, 3]
    assert [x["length"] for x in rows] == [LENGTHS[i] for i in (0, 2, 3, 5)]
    assert {p: p.stat().st_mtime_ns for p in (store / "videos").rglob("*.mp4")} == videos  # no video rewritten
    state = Store.open(store).ledger_state()
    assert [r.source_episode_index for r in state.records] == [0, 2, 3, 5]
    assert sorted(k[1] for k in state.dropped) == [1, 4]
    assert state.curations[-1].reason == "operator bumped the arm"
    _ok(store, source)
    # the dropped source episodes are never brought back by ingest, until undropped
    assert ingest(source, store).added == []
    from conveyor.pending import nothing_new
    assert nothing_new(source, store) is not None
    ids = curate.drop_ids(Store.open(store).ledger_state())
    u = curate.undrop(store, [ids[(str(source), 4)]])
    assert u.added == [4] and u.episodes_after == 5
    assert [x.source_episode_index for x in Store.open(store).ledger()] == [0, 2, 3, 5, 4]
    _ok(store, source)


def test_trim_keeps_exact_frames_and_stats(store, source):
    r = curate.trim(store, 3, 5, 19)
    assert r.frames_after == sum(LENGTHS) - (LENGTHS[3] - 14)
    row = load_episodes(store)[3]
    assert row["length"] == 14
    rec = Store.open(store).ledger()[3]
    assert (rec.start, rec.length) == (5, 14)
    _ok(store, source)  # rows equal source rows 5..18, frames pixel-identical, stats recomputed
    data = pq.ParquetFile(store / f"data/chunk-000/file-{row['data/file_index']:03d}.parquet").read().to_pylist()
    mine = [d for d in data if d["episode_index"] == 3]
    assert [d["frame_index"] for d in mine] == list(range(14))
    # trimming again moves further into the source
    curate.trim(store, 3, 2, 10)
    assert Store.open(store).ledger()[3].start == 7
    _ok(store, source)


def test_retask_and_rename(store, source):
    curate.retask(store, [0, 2], "stack the cups")
    rows = load_episodes(store)
    assert rows[0]["tasks"] == ["stack the cups"] and rows[2]["tasks"] == ["stack the cups"]
    _ok(store, source)
    r = curate.rename_task(store, "place", "put down")  # in place: no data file changes
    data_before = {p.name for p in (store / "data").rglob("*.parquet")}
    assert r.episodes == [1, 4]
    assert {p.name for p in (store / "data").rglob("*.parquet")} == data_before
    assert load_episodes(store)[1]["tasks"] == ["put down"]
    _ok(store, source)
    curate.rename_task(store, "put down", "stack the cups")  # into an existing task: rows move to it
    assert {tuple(x["tasks"]) for x in load_episodes(store)} == {("stack the cups",), ("pick",), ("抓取方块",)}
    _ok(store, source)


@pytest.mark.parametrize("args", [
    ["drop", "{s}", "9", "--reason", "x"],            # unknown episode
    ["drop", "{s}", "0-5", "--reason", "x"],          # every episode
    ["drop", "{s}", "1", "--reason", " "],            # empty reason
    ["drop", "{s}", "x1", "--reason", "x"],           # not an episode
    ["trim", "{s}", "2", "--start", "3", "--end", "40"],  # range outside the episode
    ["trim", "{s}", "2", "--start", "5", "--end", "5"],
    ["trim", "{s}", "7", "--start", "0", "--end", "3"],
    ["retask", "{s}", "1", "--task", ""],             # empty task
    ["retask", "{s}", "--rename", "nope", "new"],     # unknown task
    ["undrop", "{s}", "1"],                           # nothing dropped
])
def test_bad_input_exits_1_one_line_nothing_written(store, args):
    before = tree_hash(store)
    r = subprocess.run(CLI + [a.format(s=store) for a in args], capture_output=True, text=True)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("conveyor: error: "), r.stderr
    assert tree_hash(store) == before


def test_cli_commands_and_seconds(store, source):
    r = subprocess.run(CLI + ["trim", str(store), "1", "--start", "0.5s", "--end", "1.5s"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "trim 1 episode(s)" in r.stdout
    assert load_episodes(store)[1]["length"] == 10 and Store.open(store).ledger()[1].start == 5
    r = subprocess.run(CLI + ["drop", str(store), "0", "2-3", "--reason", "failed grasp"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "6 -> 3 episodes" in r.stdout
    r = subprocess.run(CLI + ["retask", str(store), "--rename", "pick", "pick up"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(CLI + ["undrop", str(store), "1-3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert Store.open(store).version.total_episodes == 6
    _ok(store, source)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["staged", "recorded", "renamed:meta/tasks.parquet", "renamed:meta/info.json",
                                   "ledger", "head"])
def test_sigkill_during_a_drop_leaves_old_or_new(store, source, point):
    before = tree_hash(store)
    old = Store.open(store).version
    r = subprocess.run(CLI + ["drop", str(store), "2", "--reason", "x"], capture_output=True, text=True,
                       env={**os.environ, CRASH_ENV: point})
    assert r.returncode == -signal.SIGKILL, r.stderr
    s = Store.open(store)  # recovery
    if point == "staged":
        assert tree_hash(store) == before and s.version == old
    else:
        assert s.version.commit == old.commit + 1 and s.version.total_episodes == 5
        assert sorted(k[1] for k in s.ledger_state().dropped) == [2]
    _ok(store, source)
    assert ingest(source, store).added == ([] if point != "staged" else [])


def test_sigkill_during_a_trim_leaves_old_or_new(store, source):
    for point, end, episodes in (("recorded", "9", 6), ("staged", "5", 6)):
        r = subprocess.run(CLI + ["trim", str(store), "0", "--start", "2", "--end", end], capture_output=True,
                           text=True, env={**os.environ, CRASH_ENV: point})
        assert r.returncode == -signal.SIGKILL, r.stderr
        s = Store.open(store)
        assert s.version.total_episodes == episodes
        _ok(store, source)
    assert load_episodes(store)[0]["length"] == 7  # the recorded one rolled forward, the staged one vanished


def test_curation_takes_the_one_writer_lock(store):
    s = Store.open(store)
    with s.lock():
        with pytest.raises(StoreLocked):
            curate.drop(store, [0], "x", lock_timeout=0.3)
    assert Store.open(store).version.total_episodes == 6


@pytest.mark.slow
def test_curation_racing_an_ingest(source, tmp_path):
    """An ingest and a drop started together: each waits for the other's lock; both land, in some order."""
    more = write_recording(tmp_path / "more", episodes=3, lengths=[30, 30, 30], spec=SPEC)
    store = tmp_path / "store"
    ingest(source, store)
    p = subprocess.Popen(CLI + ["ingest", str(more), str(store)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.2)
    r = subprocess.run(CLI + ["drop", str(store), "1", "--reason", "race"], capture_output=True, text=True)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert r.returncode == 0, r.stderr
    s = Store.open(store)
    assert s.version.total_episodes == 6 + 3 - 1
    assert validate_fast(store).ok
    assert len(s.ledger_state().dropped) == 1


def test_curate_then_compact_validates(store, source):
    """Compaction keeps a file with unreferenced spans as it is (its spans stay exact) and removes a video file
    no episode points into any more; the store validates against the source throughout."""
    videos = sorted(p.relative_to(store).as_posix() for p in (store / "videos").rglob("*.mp4"))
    assert len(videos) == 2  # one per append
    curate.drop(store, [0, 3, 4, 5], "x")
    curate.trim(store, 1, 3, 12)
    _ok(store, source)
    assert sorted(p.relative_to(store).as_posix() for p in (store / "videos").rglob("*.mp4")) == videos
    r = compact(store)
    assert r.version.total_episodes == 2 and videos[1] in r.rewritten
    # the removed file stays readable for readers of the older version until vacuum (store.RETENTION_S)
    assert set(Store.open(store).retained()) >= {videos[1]} and (store / videos[1]).is_file()
    _ok(store, source)
    s = Store.open(store)
    with s.lock():
        s.vacuum(0)
    assert sorted(rel for rel in Store.open(store).manifest() if rel.startswith("videos/")) == videos[:1]
    _ok(store, source)


@pytest.mark.lerobot
def test_lerobot_06_reads_a_curated_version_exactly(store, source, tmp_path):
    from conveyor.validate import validate_deep

    _lerobot_reads_curated(sys.executable, store, source, tmp_path)
    r = validate_deep(store, against=source)  # the deep check (lerobot in a child) passes on the curated store
    assert r.ok, [(c.name, c.detail) for c in r.failures]


@pytest.mark.lerobot
@pytest.mark.slow
def test_lerobot_044_reads_a_curated_version_exactly(store, source, tmp_path):
    import lerobot_envs

    venv = lerobot_envs.venv_path()
    if lerobot_envs.installed_version(venv) != lerobot_envs.VERSION:
        pytest.skip(f"no lerobot 0.4.4 venv at {venv} (cd tests && python -m lerobot_envs)")
    _lerobot_reads_curated(venv / "bin/python", store, source, tmp_path)


def _lerobot_reads_curated(python, store: Path, source: Path, tmp: Path) -> None:
    curate.drop(store, [1], "x")        # source episodes 0, 2, 3, 4, 5
    curate.trim(store, 2, 4, 21)        # source 3, frames 4..20
    curate.retask(store, [3], "sort the blocks")  # source 4
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp / "hf")}
    r = subprocess.run([str(python), str(Path(__file__).with_name("lerobot_dump.py")), str(store)],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    dump = json.loads(r.stdout.strip().splitlines()[-1])
    items = dump["items"]
    want_src = [0, 2, 3, 4, 5]
    want_len = [LENGTHS[0], LENGTHS[2], 17, LENGTHS[4], LENGTHS[5]]
    assert dump["episodes"] == 5 and dump["len"] == sum(want_len)
    assert [it["index"] for it in items] == list(range(sum(want_len)))
    assert [it["episode_index"] for it in items] == [e for e, n in enumerate(want_len) for _ in range(n)]
    frame = 0
    for e, (src_ep, n) in enumerate(zip(want_src, want_len)):
        mine = items[frame:frame + n]
        frame += n
        assert [it["frame_index"] for it in mine] == list(range(n))
        start = 4 if e == 2 else 0
        src = _src_frames(source, src_ep)
        for j in (0, n // 2, n - 1):  # first, middle, last kept frame, pixel-identical
            assert mine[j][CAM] == hashlib.sha256(src[start + j]).hexdigest(), (e, j)
        task = "sort the blocks" if e == 3 else TASKS[src_ep]
        assert {it["task"] for it in mine} == {task}
    src_rows = pq.ParquetFile(source / "data/chunk-000/episode_000003.parquet").read().to_pylist()
    trimmed = items[LENGTHS[0] + LENGTHS[2]:][:17]
    assert np.allclose([it["action"] for it in trimmed], [x["action"] for x in src_rows[4:21]])


def test_show_lists_curated_episodes(store):
    from conveyor.inventory import describe

    curate.drop(store, [2], "failed grasp")
    curate.trim(store, 0, 1, 10, reason="bumped at the end")
    d = describe(store)
    dropped = [e for e in d.curated if e.episode is None]
    assert [(e.action, e.drop_id, e.source_episode_index, e.reason) for e in dropped] == [
        ("drop", 1, 2, "failed grasp")]
    trimmed = [e for e in d.curated if e.action == "trim"]
    assert trimmed[0].episode == 0 and trimmed[0].detail == "start 1, end 10" and trimmed[0].version == "c4"
    r = subprocess.run(CLI + ["show", str(store), "--json"], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["curated"][0]["drop_id"] == 1


@pytest.mark.slow
def test_curate_compact_scrub_backup_restore_and_the_earlier_version(store, source, tmp_path):
    """Curation then compaction, scrub, backup and restore give the exact store; the version published before
    the curation still materializes file for file."""
    from conveyor.backup.restore import restore
    from conveyor.backup.snapshot import backup
    from conveyor.datasets.format import read_version
    from conveyor.datasets.materialize import materialize
    from conveyor.datasets.publish import publish
    from conveyor.fileio import sha256_file
    from conveyor.repo import open_repo
    from conveyor.scrub import scrub
    from conveyor.settings import S3Settings

    repo = open_repo(f"file://{tmp_path / 'repo'}", S3Settings())
    before = Store.open(store).manifest()
    pre = publish(store, repo, name="koch")
    curate.drop(store, [1, 5], "failed grasp")
    curate.trim(store, 0, 2, 11)
    curate.retask(store, [2], "stack the cups")
    compact(store)
    _ok(store, source)
    assert scrub(store).ok
    backup(store, repo, name="koch")
    out = tmp_path / "restored"
    restore(repo, None, out)
    manifest = Store.open(store).manifest()
    assert {rel: sha256_file(out / rel) for rel in manifest} == {rel: e.sha256 for rel, e in manifest.items()}
    assert (out / ".conveyor/ledger.jsonl").read_bytes() == (store / ".conveyor/ledger.jsonl").read_bytes()
    assert Store.open(out).version == Store.open(store).version
    _ok(out, source)
    # the version before curation, as published, is still there to pin and train on
    m = materialize(read_version(repo, pre.key), tmp_path / "cache", repo=repo, live_store=store)
    got = {p.relative_to(m.path).as_posix(): sha256_file(p) for p in Path(m.path).rglob("*") if p.is_file()}
    dataset = {rel: e.sha256 for rel, e in before.items() if not rel.startswith(".conveyor/")}
    assert {rel: got.get(rel) for rel in dataset} == dataset
    assert json.loads((Path(m.path) / "meta/info.json").read_text())["total_episodes"] == 6


@pytest.mark.slow
def test_dropping_while_the_watcher_runs(tmp_path):
    """The watcher hands every complete episode to ingest (as the watch flow does); a dropped source episode is
    not brought back, by new episodes landing or by a restarted watcher offering every episode again."""
    import threading

    from conveyor.synthetic.recording import RecordingWriter
    from conveyor.watcher import EpisodeWatcher

    rec, store = tmp_path / "rec", tmp_path / "store"
    w = RecordingWriter(rec, SPEC)
    offered: list[list[int]] = []

    def on_ready(name, eps):
        offered.append(eps)
        ingest(rec, store)

    def run_watcher():
        watcher = EpisodeWatcher({"rec": rec}, on_ready=on_ready, settle_seconds=2.0, debounce_seconds=0.1,
                                 rescan_seconds=0.5, on_error=lambda n, e: None)
        stop = threading.Event()
        t = threading.Thread(target=watcher.run, kwargs={"stop": stop}, daemon=True)
        t.start()
        return stop, t

    def landed(n):
        end = time.time() + 30
        while time.time() < end:
            if Store.open(store).version.total_episodes == n if (store / ".conveyor").is_dir() else False:
                return True
            time.sleep(0.1)
        return False

    stop, t = run_watcher()
    try:
        for ep in range(3):
            w.write_episode(ep, 12, "pick")
        assert landed(3)
        curate.drop(store, [1], "bumped", lock_timeout=30)
        w.write_episode(3, 12, "pick")
        assert landed(3)  # 3 - 1 + 1
    finally:
        stop.set()
        t.join(10)
    stop, t = run_watcher()  # a fresh watcher offers every complete episode again
    try:
        n = len(offered)
        end = time.time() + 20
        while len(offered) == n and time.time() < end:
            time.sleep(0.1)
        assert len(offered) > n and 1 in offered[-1]
    finally:
        stop.set()
        t.join(10)
    assert [r.source_episode_index for r in Store.open(store).ledger()] == [0, 2, 3]
    _ok(store, rec)


def test_drop_then_compact_gives_the_files_of_a_one_shot_convert_of_the_kept(tmp_path):
    """Compaction reclaims dropped episodes' spans by stream copy: a store grown one episode at a time, curated
    and compacted, has exactly the file grouping and content of a one-shot convert of the kept episodes."""
    from conveyor.ingest import convert
    from conveyor.synthetic.recording import RecordingWriter
    from test_store import AV1_ONLY, assert_same_content, file_groups

    src, store = tmp_path / "src", tmp_path / "store"
    limits = dict(data_mb=5400 / 2**20, video_mb=3000 / 2**20)
    lengths = [4, 1, 3, 5, 2, 4, 3, 2]
    w = RecordingWriter(src, AV1_ONLY)
    for ep, n in enumerate(lengths):
        w.write_episode(ep, n, "抓取方块")
        ingest(src, store, **limits)
    compact(store)  # a few episodes per file: the drops leave spans inside merged files
    curate.drop(store, [1, 5], "x")
    curate.drop(store, [3], "y")  # source episodes 1, 5, 4
    r = compact(store)
    assert any(rel.startswith("videos/") for rel in r.rewritten)
    kept = [0, 2, 3, 6, 7]
    one = RecordingWriter(tmp_path / "kept", AV1_ONLY)
    for ep in kept:
        one.write_episode(ep, lengths[ep], "抓取方块")
    convert(tmp_path / "kept", tmp_path / "oneshot", **limits)
    assert file_groups(store) == file_groups(tmp_path / "oneshot")
    assert_same_content(store, tmp_path / "oneshot")
    _ok(store, src)
    for rel in Store.open(store).manifest():  # the reclaimed files hold only what episodes point into
        if rel.endswith(".mp4"):
            from conveyor.video import probe
            n = sum(x["length"] for x in load_episodes(store)
                    if rel in {f"videos/{k}/chunk-000/file-{x[f'videos/{k}/file_index']:03d}.mp4"
                               for k in ("observation.images.laptop", "observation.images.phone")})
            assert probe(store / rel).frames == n, rel


TINY_ACT = {"policy.pretrained_backbone_weights": None, "policy.dim_model": 32, "policy.dim_feedforward": 64,
            "policy.n_heads": 2, "policy.n_encoder_layers": 1, "policy.n_decoder_layers": 1,
            "policy.n_vae_encoder_layers": 1, "policy.chunk_size": 5, "policy.n_action_steps": 5}


@pytest.mark.lerobot
@pytest.mark.slow
def test_a_short_training_run_on_a_curated_version_pins_it(prefect_server, tmp_path):
    """The train flow on a curated store: it starts, trains on the curated version's episodes, and its run
    record pins that version."""
    from conveyor.ingest import convert
    from conveyor.training.request import TrainRequest
    from conveyor.version import DatasetVersion
    from flows.train import train

    rec = write_recording(tmp_path / "rec", episodes=4, lengths=16, tasks="pick", spec=SPEC)
    store = tmp_path / "stores" / "grasp"
    convert(rec, store)
    curate.drop(store, [1], "bad take")
    curate.trim(store, 0, 2, 14)
    version = Store.open(store).version
    config = tmp_path / "conveyor.toml"
    config.write_text(f'store_root = "{tmp_path / "stores"}"\nwork_dir = "{tmp_path / "work"}"\n')
    request = TrainRequest(store="grasp", policy_type="act", device="cpu", batch_size=2, num_workers=0, log_freq=1,
                           steps=2, save_freq=2, archive=False, run_name="act-curated", options=dict(TINY_ACT))
    result = train.with_options(retries=0)(request=request, config=str(config))
    assert result["final_step"] == 2
    pins = list(Path(result["output_dir"]).rglob("dataset.json"))
    assert pins, "the run records its pinned dataset version"
    pin = json.loads(pins[0].read_text())
    assert DatasetVersion.from_dict(pin["version"]) == version and version.total_episodes == 3
    # evaluate reads the run's pinned, materialized version: an episode dropped from the store since is not
    # there to be picked, and nothing of that version counts as held out
    import io
    from contextlib import redirect_stdout

    from conveyor.cli import main

    curate.drop(store, [2], "dropped after the run")
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["--config", str(config), "evaluate", "act-curated"]) == 0
    assert "episodes [2] (seen in training)" in out.getvalue(), out.getvalue()
