"""v3.0 sources: sessions recorded by lerobot 0.6.1's own recorder (in a child process) ingested into a store.

Rows and frames are compared with lerobot's own reading of each session (tests/lerobot_dump.py in a child
process); video packets with the session's (stream copy, no re-encode).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import pyarrow.parquet as pq
import pytest

from conveyor.ingest import ingest
from conveyor.shared_files import parquet_closed
from conveyor.source_v3 import V30Source
from conveyor.tables import read_tasks
from conveyor.synthetic.recording import CameraSpec, RecordingSpec, write_recording
from conveyor.validate import validate_fast
from conveyor.watcher import EpisodeWatcher

pytestmark = pytest.mark.lerobot

CAM = "observation.images.top"
DUMP = Path(__file__).with_name("lerobot_dump.py")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", SVT_LOG="1")


def record(root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "conveyor.synthetic.v30_session", str(root), "--cameras", "1",
                             "--length", "10", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=ENV)


def finish(p: subprocess.Popen) -> None:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0 and "done" in out, out


@pytest.fixture(scope="module")
def sessions(tmp_path_factory) -> Path:
    """Two finalized sessions: a (3 episodes) and b (2 episodes, other tasks)."""
    root = tmp_path_factory.mktemp("v30")
    a = record(root / "a", "--episodes", "3", "--seed", "0")
    b = record(root / "b", "--episodes", "2", "--seed", "3", "--task", "stack the blocks", "--task", "叠起积木")
    finish(a)
    finish(b)
    return root


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conveyor.cli", *args], capture_output=True, text=True,
                          timeout=300, env=ENV)


def dump(root: Path) -> list[dict]:
    out = subprocess.run([sys.executable, str(DUMP), str(root)], capture_output=True, text=True, timeout=300,
                         env=ENV, check=True).stdout
    return json.loads(out)["items"]


def same_items(store_items: list[dict], session_items: list[dict], first_episode: int, first_index: int) -> None:
    """The store holds the session's every row and frame, renumbered."""
    assert len(store_items) == len(session_items)
    for got, want in zip(store_items, session_items):
        assert got["episode_index"] == want["episode_index"] + first_episode
        assert got["index"] == want["index"] + first_index
        for k in ("frame_index", "timestamp", "task", "action", "observation.state", CAM):
            assert got[k] == want[k], k


def packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.video[0]) if p.size]


def store_files(store: Path) -> dict[str, int]:
    return {str(p.relative_to(store)): p.stat().st_mtime_ns for p in store.rglob("*")
            if p.is_file() and p.name != "lock"}


def test_a_session_ingests_and_converts_exactly_and_idempotently(sessions, tmp_path):
    store, dst = tmp_path / "store", tmp_path / "converted"
    r = cli("ingest", str(sessions / "a"), str(store))
    assert r.returncode == 0, r.stderr
    assert "3 new episode(s)" in r.stdout
    before = store_files(store)
    again = cli("ingest", str(sessions / "a"), str(store))
    assert again.returncode == 0 and "0 new episode(s), 3 already" in again.stdout
    assert store_files(store) == before  # nothing rewritten
    r = cli("convert", str(sessions / "a"), str(dst))
    assert r.returncode == 0, r.stderr
    want = dump(sessions / "a")
    same_items(dump(store), want, 0, 0)
    same_items(dump(dst), want, 0, 0)
    # stream-copied: the store's packets are the session's packets, byte for byte
    rel = f"videos/{CAM}/chunk-000/file-000.mp4"
    assert packets(store / rel) == packets(sessions / "a" / rel)
    report = validate_fast(store, against=sessions / "a")  # rows and sampled frames against the session's
    assert report.ok and any("pixel-identical to source" in c.name for c in report.checks), report
    assert read_tasks(store / "meta/tasks.parquet") == ["pick the cube", "把方块放进盒子"]


def test_a_folder_of_sessions_lands_each_new_session_in_its_own_commit(sessions, tmp_path):
    folder, store = tmp_path / "lab", tmp_path / "store"
    folder.mkdir()
    shutil.copytree(sessions / "a", folder / "2026-12-01")
    r = ingest(folder, store)
    assert len(r.added) == 3 and r.version.commit == 1
    shutil.copytree(sessions / "b", folder / "2026-12-02")  # the next day's session
    files_before = set(store_files(store))
    r = ingest(folder, store)
    assert [m.source_episode_index for m in r.added] == [0, 1] and r.already == 3 and r.version.commit == 2
    new = set(store_files(store)) - files_before
    assert {f for f in new if not f.startswith(".conveyor")} == {
        "data/chunk-000/file-001.parquet", f"videos/{CAM}/chunk-000/file-001.mp4",
        "meta/episodes/chunk-000/file-001.parquet"}  # O(that session): only its own files are new
    items = dump(store)
    same_items(items[:30], dump(sessions / "a"), 0, 0)
    same_items(items[30:], dump(sessions / "b"), 3, 30)
    assert ingest(folder, store).added == []
    assert validate_fast(store, against=folder).ok


def test_v21_and_v30_sources_feed_one_store(sessions, tmp_path):
    v21 = write_recording(tmp_path / "v21", 2, lengths=10, spec=RecordingSpec(
        cameras=(CameraSpec(CAM, 96, 128, "av1"),)))
    store = tmp_path / "store"
    assert len(ingest(v21, store).added) == 2
    assert len(ingest(sessions / "a", store).added) == 3
    assert len(ingest(v21, store).added) == 0 and len(ingest(sessions / "a", store).added) == 0
    report = validate_fast(store, against=v21)
    assert report.ok, report
    show = cli("show", str(store), "--json")
    assert show.returncode == 0, show.stderr
    kinds = {s["path"]: s["kind"] for s in json.loads(show.stdout)["sources"]}
    assert kinds == {str(v21.resolve()): "v2.1", str((sessions / "a").resolve()): "v3.0"}


def test_a_feature_or_fps_mismatch_is_refused_in_one_line(sessions, tmp_path):
    store = tmp_path / "store"
    assert cli("ingest", str(sessions / "a"), str(store)).returncode == 0
    other_fps = write_recording(tmp_path / "fps15", 1, lengths=5, spec=RecordingSpec(
        fps=15, cameras=(CameraSpec(CAM, 96, 128, "av1"),)))
    other_shape = write_recording(tmp_path / "small", 1, lengths=5, spec=RecordingSpec(
        cameras=(CameraSpec(CAM, 48, 64, "av1"),)))
    for src, what in ((other_fps, "fps mismatch"), (other_shape, f"feature mismatch with store {store}: {CAM}")):
        r = cli("ingest", str(src), str(store))
        assert r.returncode == 1
        assert len(r.stderr.strip().splitlines()) == 1 and what in r.stderr, r.stderr
    # and the other way round: a v3.0 session into a store of another shape
    small = tmp_path / "small-store"
    assert cli("ingest", str(other_shape), str(small)).returncode == 0
    r = cli("ingest", str(sessions / "a"), str(small))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "feature mismatch" in r.stderr


def test_a_bad_episode_is_quarantined_and_the_rest_lands(sessions, tmp_path):
    src = tmp_path / "session"
    shutil.copytree(sessions / "a", src)
    meta = src / "meta/episodes/chunk-000/file-000.parquet"
    t = pq.read_table(meta)
    lengths = t.column("length").to_pylist()
    lengths[1] += 1  # episode 1's metadata row disagrees with its rows
    pq.write_table(t.set_column(t.column_names.index("length"), "length",
                                __import__("pyarrow").array(lengths, t.schema.field("length").type)), meta)
    r = ingest(src, tmp_path / "store")
    assert [m.source_episode_index for m in r.added] == [0, 2]
    assert [q.source_episode_index for q in r.quarantined] == [1]
    assert "length mismatch: 10 rows of episode 1 but meta/episodes says 11" in r.quarantined[0].reason


def test_a_session_still_being_recorded_lands_only_once_its_files_are_closed(tmp_path):
    session, store = tmp_path / "live", tmp_path / "store"
    p = record(session, "--episodes", "3", "--wait-after", "2")
    try:
        for line in p.stdout:
            if line.startswith("waiting"):
                break
        data = session / "data/chunk-000/file-000.parquet"
        assert data.exists() and not parquet_closed(data)  # lerobot's data writer is still open
        assert not (session / "meta/episodes").exists() or not any(
            closed for _, closed in V30Source.open(session).meta_files())
        r = ingest(session, store)
        assert r.added == [] and r.incomplete == [0, 1]
        p.stdin.write("\n")
        p.stdin.flush()
        finish(p)
    finally:
        p.kill()
    r = ingest(session, store)
    assert [m.source_episode_index for m in r.added] == [0, 1, 2]
    same_items(dump(store), dump(session), 0, 0)


def test_the_watcher_sees_a_finalized_session_within_seconds(sessions, tmp_path):
    folder = tmp_path / "lab"
    folder.mkdir()
    seen: list[tuple[float, list[int]]] = []
    w = EpisodeWatcher({"lab": folder}, on_ready=lambda name, eps: seen.append((time.monotonic(), eps)),
                       rescan_seconds=60)
    stop = threading.Event()
    t = threading.Thread(target=w.run, kwargs={"stop": stop}, daemon=True)
    t.start()
    try:
        time.sleep(1.0)
        staged = tmp_path / "staged"
        shutil.copytree(sessions / "a", staged)
        t0 = time.monotonic()
        os.rename(staged, folder / "s1")  # a finalized session appears
        deadline = t0 + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen and seen[0][1] == [0, 1, 2]
        assert seen[0][0] - t0 < 5
    finally:
        stop.set()
        t.join(timeout=10)
