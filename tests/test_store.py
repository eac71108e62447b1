"""The v2.1 -> v3.0 store on real files: exactness, incremental growth, compaction, rollover, crashes."""
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
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conveyor import layout, stats as st
from conveyor.compact import compact
from conveyor.errors import StoreLocked
from conveyor.ingest import convert, ingest
from conveyor.store import CRASH_ENV, Store
from conveyor.synthetic.recording import CameraSpec, RecordingSpec, RecordingWriter, write_recording
from conveyor.episodes import load_episodes
from conveyor.validate import validate_deep, validate_fast
from conveyor.video import decode_frames, probe

MIXED = RecordingSpec(cameras=(CameraSpec("observation.images.laptop", codec="av1"),
                               CameraSpec("observation.images.phone", codec="h264"),
                               CameraSpec("observation.images.wrist", dtype="image")))
AV1_ONLY = RecordingSpec(cameras=(CameraSpec("observation.images.laptop"), CameraSpec("observation.images.phone")))
CLI = [sys.executable, "-m", "conveyor.cli"]


def tree_hash(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".lock") and p.name != "lock"
            and p.name != "quarantine.json"}  # ingest's record of refused episodes, not dataset content


def store_content(root: Path) -> dict:
    """Everything a reader sees, independent of file layout: rows, tasks, stats, and decoded frames."""
    rows = load_episodes(root)
    info = json.loads((root / "meta/info.json").read_text())
    data = pa.concat_tables([pq.read_table(p) for p in sorted((root / "data").glob("*/*.parquet"))])
    data = data.sort_by("index").replace_schema_metadata(None)
    frames = {}
    for r in rows:
        for k, f in info["features"].items():
            if f["dtype"] != "video":
                continue
            rel = root / layout.episode_video_path(r, k)
            pr = probe(rel)
            a, b = r[f"videos/{k}/from_timestamp"], r[f"videos/{k}/to_timestamp"]
            seg = [float(p * pr.time_base) for p in pr.pts if a - 1e-6 <= float(p * pr.time_base) < b - 1e-6]
            frames[(r["episode_index"], k)] = [x.tobytes() for x in decode_frames(rel, seg)]
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith(("videos/", "data/", "meta/"))}
    return {"rows": [strip(r) for r in rows], "data": data.to_pylist(), "frames": frames,
            "tasks": pq.read_table(root / "meta/tasks.parquet").to_pylist(),
            "stats": json.loads((root / "meta/stats.json").read_text()),
            "totals": (info["total_episodes"], info["total_frames"], info["total_tasks"])}


def assert_same_content(a: Path, b: Path) -> None:
    """Same rows, frames, tasks and totals; stats equal up to float summation order."""
    ca, cb = store_content(a), store_content(b)
    sa, sb = ca.pop("stats"), cb.pop("stats")
    assert ca == cb
    assert not st.equal(st.from_json(sa), st.from_json(sb), rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def mixed_source(tmp_path_factory) -> Path:
    """AV1 + H.264 (B-frames) + image feature, a gap (2 deleted), 1- and 3-frame episodes, Chinese, no task."""
    root = tmp_path_factory.mktemp("mixed") / "src"
    return write_recording(root, episodes=[0, 1, 3, 4, 5], lengths=[9, 1, 3, 7, 5],
                           tasks=["抓取方块", None, "stack the cups", "抓取方块", ""], spec=MIXED)


@pytest.fixture(scope="module")
def mixed_store(mixed_source, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("mixed_store") / "store"
    report = convert(mixed_source, dst, task="把方块放进盒子")
    assert [m.source_episode_index for m in report.added] == [0, 1, 3, 4, 5]
    assert [m.episode_index for m in report.added] == [0, 1, 2, 3, 4]
    return dst


def test_layout_is_lerobot_0_4_4(mixed_store):
    names = {p.relative_to(mixed_store).as_posix() for p in mixed_store.rglob("*") if p.is_file()
             and ".conveyor" not in p.parts}
    assert names == {"meta/info.json", "meta/stats.json", "meta/tasks.parquet",
                     "meta/episodes/chunk-000/file-000.parquet", "data/chunk-000/file-000.parquet",
                     "videos/observation.images.laptop/chunk-000/file-000.mp4",
                     "videos/observation.images.phone/chunk-000/file-000.mp4"}
    info = json.loads((mixed_store / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 5 and info["total_frames"] == 25
    assert info["splits"] == {"train": "0:5"} and "total_chunks" not in info and "total_videos" not in info
    stats = json.loads((mixed_store / "meta/stats.json").read_text())
    for feat in ("action", "observation.state", "observation.images.laptop", "observation.images.wrist"):
        assert {"min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"} <= set(stats[feat])
    assert np.asarray(stats["observation.images.laptop"]["q50"]).shape == (3, 1, 1)
    schemas = {pq.read_schema(p) for p in (mixed_store / "meta/episodes").glob("*/*.parquet")}
    assert any("stats/action/q99" in s.names for s in schemas)


def test_rows_frames_and_tasks_exact(mixed_source, mixed_store):
    report = validate_fast(mixed_store, against=mixed_source)
    assert report.ok, [c for c in report.failures]
    assert report.episodes_checked == [0, 1, 2, 3, 4]
    names = " ".join(c.name for c in report.checks)
    assert "pixel-identical" in names and "rows equal source" in names
    tasks = pq.read_table(mixed_store / "meta/tasks.parquet").column("__index_level_0__").to_pylist()
    assert tasks == ["抓取方块", "把方块放进盒子", "stack the cups"]  # empty task -> settings text


@pytest.mark.lerobot
def test_lerobot_loads_store_with_source_values(mixed_source, mixed_store):
    report = validate_deep(mixed_store, against=mixed_source)
    assert report.ok, report.failures
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset("local/mixed", root=mixed_store, video_backend="pyav")
    src = pq.read_table(mixed_source / "data/chunk-000/episode_000003.parquet")
    item = ds[9 + 1 + 1]  # store episode 2 = source episode 3, frame 1 (after 9 + 1 frames)
    assert item["episode_index"].item() == 2 and item["frame_index"].item() == 1
    assert item["task"] == "stack the cups"
    np.testing.assert_array_equal(item["action"].numpy(), np.asarray(src.column("action")[1].as_py(), np.float32))
    assert ds[9]["task"] == "把方块放进盒子"  # store episode 1 had no task text


def test_tiny_mutation_is_caught(mixed_source, mixed_store, tmp_path):
    """The fast check is not vacuous: a changed stats value and a shifted timestamp both fail it."""
    copy = tmp_path / "copy"
    shutil.copytree(mixed_store, copy)
    rows = load_episodes(copy)
    rows[3]["videos/observation.images.laptop/from_timestamp"] += 1 / 30
    rows[1]["stats/action/q50"] = [x + 1e-3 for x in rows[1]["stats/action/q50"]]
    meta = copy / "meta/episodes/chunk-000/file-000.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(meta)), meta)
    failed = {c.name for c in validate_fast(copy, against=mixed_source).failures}
    assert "episode 3: observation.images.laptop frames" in failed
    assert "episode 1: stats" in failed


@pytest.mark.lerobot
def test_no_camera_dataset(tmp_path):
    src = write_recording(tmp_path / "src", episodes=3, lengths=[4, 1, 6], spec=RecordingSpec(cameras=()))
    convert(src, tmp_path / "store")
    assert json.loads((tmp_path / "store/meta/info.json").read_text())["video_path"] is None
    assert validate_deep(tmp_path / "store", against=src).ok


@pytest.mark.lerobot
def test_matches_lerobot_official_converter(tmp_path):
    """On input the official converter handles, both outputs load to identical items."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.scripts import convert_dataset_v21_to_v30 as official

    src = write_recording(tmp_path / "src", episodes=3, lengths=[6, 4, 5], tasks=["抓取方块", "b", "抓取方块"],
                          spec=AV1_ONLY)
    convert(src, tmp_path / "ours")
    theirs = tmp_path / "theirs"
    official.convert_info(src, theirs, 100, 200)
    official.convert_tasks(src, theirs)
    data_meta = official.convert_data(src, theirs, 100)
    video_meta = official.convert_videos(src, theirs, 200)
    official.convert_episodes_metadata(src, theirs, data_meta, video_meta)
    a = LeRobotDataset("local/ours", root=tmp_path / "ours", video_backend="pyav")
    b = LeRobotDataset("local/theirs", root=theirs, video_backend="pyav")
    assert len(a) == len(b) == 15
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x["task"] == y["task"]
        for k in ("action", "observation.state", "timestamp", "index", "episode_index", "frame_index"):
            np.testing.assert_array_equal(x[k].numpy(), y[k].numpy(), err_msg=f"{k} at {i}")
        for k in ("observation.images.laptop", "observation.images.phone"):
            np.testing.assert_array_equal(x[k].numpy(), y[k].numpy(), err_msg=f"{k} at {i}")


def test_incremental_growth_equals_one_shot_and_is_idempotent(tmp_path):
    src = tmp_path / "src"
    w = RecordingWriter(src, MIXED)
    lengths = [5, 3, 1, 6, 2]
    store = tmp_path / "store"
    for upto in (2, 4, 5):
        for ep in range(len(list((src / "data").glob("*/*.parquet"))) if (src / "data").exists() else 0, upto):
            w.write_episode(ep, lengths[ep], "抓取方块" if ep % 2 else "push")
        r = ingest(src, store)
        assert r.new_episodes == upto - (0 if upto == 2 else (2 if upto == 4 else 4))
    before = tree_hash(store)
    again = ingest(src, store)
    assert again.new_episodes == 0 and again.already == 5 and tree_hash(store) == before
    convert(src, tmp_path / "oneshot")
    assert_same_content(store, tmp_path / "oneshot")
    assert len(list((store / "data").glob("*/*.parquet"))) == 3  # one new file per commit, none rewritten


@pytest.mark.lerobot
def test_compaction_after_many_one_episode_ingests(tmp_path):
    src, store = tmp_path / "src", tmp_path / "store"
    w = RecordingWriter(src, MIXED)
    for ep, n in enumerate([4, 1, 3, 5, 2, 4]):
        w.write_episode(ep, n, "抓取方块")
        ingest(src, store)
    content = store_content(store)
    r = compact(store)
    assert r.files_before == 6 * 4 and r.files_after == 4  # data, meta and two cameras per commit
    assert store_content(store) == content
    assert validate_deep(store, against=src).ok
    assert compact(store).rewritten == []  # already compact: no new commit
    w.write_episode(6, 3, "抓取方块")  # appending after compaction still works
    assert ingest(src, store).new_episodes == 1 and validate_fast(store, against=src).ok


def file_groups(root: Path) -> dict[str, list[list[int]]]:
    """Which episodes share a file, per kind (data, each camera, episode metadata), whatever the files' numbers."""
    rows = load_episodes(root)
    info = json.loads((root / "meta/info.json").read_text())
    kinds = {"data": layout.episode_data_path, "meta": layout.episode_meta_path}
    kinds |= {k: (lambda r, k=k: layout.episode_video_path(r, k)) for k, f in info["features"].items()
              if f["dtype"] == "video"}
    out = {}
    for kind, rel_of in kinds.items():
        files: dict[str, list[int]] = {}
        for r in rows:
            files.setdefault(rel_of(r), []).append(r["episode_index"])
        out[kind] = sorted(files.values())
    return out


def test_one_at_a_time_then_compact_gives_the_files_of_a_one_shot_convert(tmp_path):
    """One size policy: ingest's data writer, video grouping, episode metadata and compaction agree."""
    src, store = tmp_path / "src", tmp_path / "store"
    limits = dict(data_mb=5400 / 2**20, video_mb=3000 / 2**20)  # a few episodes per file, several files
    w = RecordingWriter(src, AV1_ONLY)
    for ep, n in enumerate([4, 1, 3, 5, 2, 4, 3, 2]):
        w.write_episode(ep, n, "抓取方块")
        ingest(src, store, **limits)
    assert all(len(g) == 1 for groups in file_groups(store).values() for g in groups)  # one file per commit
    compact(store)
    convert(src, tmp_path / "oneshot", **limits)
    merged, oneshot = file_groups(store), file_groups(tmp_path / "oneshot")
    assert merged == oneshot
    for kind, groups in oneshot.items():  # the limits really grouped and rolled every kind of file
        assert len(groups) > 1 and max(map(len, groups)) > 1, (kind, groups)
    assert_same_content(store, tmp_path / "oneshot")
    assert validate_fast(store, against=src).ok


@pytest.mark.lerobot
def test_rollover_with_tiny_size_limits(tmp_path):
    src = write_recording(tmp_path / "src", episodes=5, lengths=[6, 2, 5, 3, 4], spec=AV1_ONLY)
    convert(src, tmp_path / "store", data_mb=0.0008, video_mb=0.004)  # ~800 B and ~4 KB
    rows = load_episodes(tmp_path / "store")
    files = [r["data/file_index"] for r in rows]
    assert len(set(files)) > 1, files
    for r in rows:  # every episode points at the data file that really holds it (upstream #2401)
        t = pq.read_table(tmp_path / f"store/data/chunk-000/file-{r['data/file_index']:03d}.parquet")
        assert r["episode_index"] in set(t.column("episode_index").to_pylist())
    assert len({r["videos/observation.images.laptop/file_index"] for r in rows}) > 1
    assert validate_deep(tmp_path / "store", against=src).ok


def test_late_completing_episode_lands_when_complete(tmp_path):
    src, store = tmp_path / "src", tmp_path / "store"
    w = RecordingWriter(src, AV1_ONLY)
    w.write_episode(0, 3, "a")
    w.write_episode(1, 4, "a", finish=False)  # still recording: files there, no jsonl line
    w.write_episode(2, 2, "a")
    r = ingest(src, store)
    assert [m.source_episode_index for m in r.added] == [0, 2] and r.incomplete == [1]
    w.finish_episode(1)
    r = ingest(src, store)
    assert [(m.source_episode_index, m.episode_index) for m in r.added] == [(1, 2)]
    ledger = {(e.source_episode_index, e.episode_index) for e in Store.open(store).ledger()}
    assert ledger == {(0, 0), (2, 1), (1, 2)}
    assert validate_fast(store, against=src).ok


def test_changed_source_episode_is_reported_not_readded(tmp_path):
    src = write_recording(tmp_path / "src", episodes=2, lengths=3, spec=AV1_ONLY)
    store = tmp_path / "store"
    ingest(src, store)
    p = src / "data/chunk-000/episode_000001.parquet"
    t = pq.read_table(p)
    pq.write_table(t.set_column(t.schema.get_field_index("action"), "action",
                                pa.array([[9.0] * 6] * 3, pa.list_(pa.float32(), 6))), p)
    r = ingest(src, store)
    assert r.new_episodes == 0 and [c.source_episode_index for c in r.changed] == [1]
    assert Store.open(store).version.total_episodes == 2


def test_transaction_is_the_one_door(tmp_path):
    """An error or a cancel inside `store.transaction()` leaves the store byte-identical; no lock, no commit."""
    src = write_recording(tmp_path / "src", episodes=1, lengths=2, spec=AV1_ONLY)
    store = tmp_path / "store"
    ingest(src, store)
    s, before = Store.open(store), tree_hash(store)
    with pytest.raises(RuntimeError, match="needs the store lock"):
        with s.transaction("append"):
            pass
    with s.lock():
        with pytest.raises(RuntimeError, match="boom"):
            with s.transaction("append") as tx:
                tx.write("meta/stats.json", b"{}")
                tx.set_totals(9, 9)
                raise RuntimeError("boom")
        with s.transaction("append") as tx:
            tx.write("meta/stats.json", b"{}")
            tx.cancel()
        assert tx.version is None
        with pytest.raises(RuntimeError, match="set_totals"):
            with s.transaction("append"):
                pass
    assert tree_hash(store) == before and s.version.commit == 1
    assert not list((store / ".conveyor/staging").iterdir())


def test_second_writer_gets_clear_lock_error(tmp_path):
    src = write_recording(tmp_path / "src", episodes=1, lengths=2, spec=AV1_ONLY)
    store = tmp_path / "store"
    ingest(src, store)
    s = Store.open(store)
    with s.lock():
        with pytest.raises(StoreLocked, match=r"store is locked by pid \d+"):
            ingest(src, store, lock_timeout=0.2)


# -- crashes ---------------------------------------------------------------------------------------------

CRASH_POINTS = ["staged", "recorded", "renamed:data/chunk-000/file-001.parquet",
                "renamed:meta/stats.json", "renamed:meta/info.json", "ledger", "head"]


def _run_ingest(src, store, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(CLI + ["ingest", str(src), str(store)], env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def crash_source(tmp_path_factory):
    return write_recording(tmp_path_factory.mktemp("crash") / "src", episodes=4, lengths=[3, 2, 4, 1],
                           spec=AV1_ONLY)


@pytest.fixture(scope="module")
def crash_base(crash_source, tmp_path_factory):
    """A store holding the first two episodes; each crash test appends the other two."""
    base = tmp_path_factory.mktemp("crash_base") / "store"
    ingest(crash_source, base, max_episodes=2)
    return base


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_at_each_commit_step_then_rerun(point, crash_source, crash_base, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(crash_base, store)
    before = tree_hash(store)
    r = _run_ingest(crash_source, store, {CRASH_ENV: point})
    assert r.returncode == -signal.SIGKILL, r.stderr
    s = Store.open(store)  # recovery: roll back before the record, forward after it
    if point == "staged":
        assert tree_hash(store) == before
    else:
        assert s.version.total_episodes == 4
    r = _run_ingest(crash_source, store)
    assert r.returncode == 0, r.stderr
    report = validate_fast(store, against=crash_source)
    assert report.ok, report.failures
    assert Store.open(store).version.total_episodes == 4
    assert sorted(e.source_episode_index for e in Store.open(store).ledger()) == [0, 1, 2, 3]


def test_sigkill_at_random_times_then_rerun(crash_source, crash_base, tmp_path):
    for i, delay in enumerate([0.3, 0.6, 0.9, 1.2, 1.5]):
        store = tmp_path / f"store{i}"
        shutil.copytree(crash_base, store)
        p = subprocess.Popen(CLI + ["ingest", str(crash_source), str(store)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert _run_ingest(crash_source, store).returncode == 0
        assert validate_fast(store, against=crash_source).ok
        assert Store.open(store).version.total_episodes == 4


@pytest.mark.strace
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (.ci/run installs it)")
def test_a_commit_flushes_every_file_it_adds_before_its_record(crash_source, crash_base, tmp_path):
    """Power loss cannot be staged here, so watch the system calls: every file the commit makes visible is
    fdatasync'd, and its folder fsync'd, before the commit record is renamed into place."""
    store = tmp_path / "store"
    shutil.copytree(crash_base, store)
    trace = tmp_path / "strace.txt"
    r = subprocess.run(["strace", "-f", "-y", "-e", "trace=fdatasync,fsync,rename,renameat,renameat2", "-o",
                        str(trace)] + CLI + ["ingest", str(crash_source), str(store)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    commits = sorted((store / ".conveyor" / "commits").glob("*.json"))
    record = json.loads(commits[-1].read_text())
    staging = store.resolve() / ".conveyor" / "staging" / record["id"]
    lines = trace.read_text().splitlines()
    point = next(i for i, l in enumerate(lines) if "rename" in l and f'{commits[-1].resolve()}"' in l)
    synced, dirs = _completed(lines[:point], "fdatasync"), _completed(lines[:point], "fsync")
    added = [str(staging / rel) for rel in record["add"]]
    assert {"data/chunk-000/file-001.parquet", "meta/info.json"} <= set(record["add"])
    assert [p for p in added if p not in synced] == []
    assert [p for p in added if str(Path(p).parent) not in dirs] == []


def _completed(lines: list[str], call: str) -> set[str]:
    """Paths (strace -y) whose `call` returned 0 within these lines; with -f a call may be split into an
    `<unfinished ...>` line and a `<... call resumed>` line of the same pid."""
    done, pending = set(), {}
    for line in lines:
        pid, rest = line.split(None, 1)  # strace pads short pids to a column: "6684  fdatasync(..."
        if rest.startswith(f"{call}("):
            path = rest.split("<", 1)[1].split(">", 1)[0]
            if rest.endswith("<unfinished ...>"):
                pending[pid] = path
            elif rest.rstrip().endswith("= 0"):
                done.add(path)
        elif rest.startswith(f"<... {call} resumed>") and rest.rstrip().endswith("= 0") and pid in pending:
            done.add(pending.pop(pid))
    return done


# -- bad input -------------------------------------------------------------------------------------------

def _cli(*args):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True)


def _one_line_error(r, *needles):
    assert r.returncode == 1, (r.stdout, r.stderr)
    errors = [l for l in r.stderr.splitlines() if l.startswith("conveyor: error:")]
    assert errors and all(n in errors[0] for n in needles), r.stderr


@pytest.fixture()
def good(tmp_path):
    """A good 2-episode source already ingested, plus a third episode that each case breaks."""
    src, store = tmp_path / "src", tmp_path / "store"
    w = RecordingWriter(src, AV1_ONLY)
    w.write_episode(0, 3, "a")
    w.write_episode(1, 2, "a")
    ingest(src, store)
    w.write_episode(2, 4, "a")
    return src, store, w


def _break_parquet(src, w):
    p = w.episode_files(2).parquet
    p.write_bytes(p.read_bytes()[:40])
    return p, "corrupt parquet"


def _truncate_mp4(src, w):
    p = w.episode_files(2).videos["observation.images.phone"]
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    return p, ""


def _delete_camera(src, w):
    p = w.episode_files(2).videos["observation.images.laptop"]
    p.unlink()
    return p, "missing camera file"


def _wrong_length(src, w):
    lines = (src / "meta/episodes.jsonl").read_text().splitlines()
    rec = json.loads(lines[-1])
    rec["length"] = 9
    lines[-1] = json.dumps(rec)
    (src / "meta/episodes.jsonl").write_text("\n".join(lines) + "\n")
    return w.episode_files(2).parquet, "length mismatch"


@pytest.mark.parametrize("breaker", [_break_parquet, _truncate_mp4, _delete_camera, _wrong_length])
def test_bad_episode_named_and_quarantined_store_untouched(good, breaker):
    src, store, w = good
    path, needle = breaker(src, w)
    src_before, store_before = tree_hash(src), tree_hash(store)
    r = _cli("ingest", src, store)
    _one_line_error(r, str(path), needle)
    assert tree_hash(src) == src_before and tree_hash(store) == store_before


@pytest.mark.parametrize("breaker", [_break_parquet, _truncate_mp4, _delete_camera, _wrong_length])
def test_bad_episode_does_not_block_the_rest(good, breaker):
    src, store, w = good
    path, _ = breaker(src, w)
    w.write_episode(3, 2, "a")
    r = ingest(src, store)
    assert [q.source_episode_index for q in r.quarantined] == [2] and str(path) in r.quarantined[0].reason
    assert [m.source_episode_index for m in r.added] == [3]


def _set_info(src, **kw):
    p = src / "meta/info.json"
    info = json.loads(p.read_text())
    info.update(kw)
    p.write_text(json.dumps(info))


@pytest.mark.parametrize("change,needle", [
    ({"codebase_version": "v2.0"}, "v2.0 dataset"),
    ({"codebase_version": "v3.0"}, "codebase_version v3.0 but data_path"),  # v2.1 files, v3.0 declared
    ({"codebase_version": "v9.9"}, "unknown codebase_version"),
    ({"fps": 15}, "fps mismatch"),
])
def test_bad_source_info_named_and_nothing_written(good, change, needle):
    src, store, _ = good
    _set_info(src, **change)
    store_before = tree_hash(store)
    _one_line_error(_cli("ingest", src, store), str(src / "meta/info.json"), needle)
    assert tree_hash(store) == store_before


def test_feature_mismatch_between_source_and_store(good, tmp_path):
    _, store, _ = good
    other = write_recording(tmp_path / "other", episodes=1, lengths=2, spec=RecordingSpec(cameras=(), state_dim=4))
    before = tree_hash(store)
    _one_line_error(_cli("ingest", other, store), "feature mismatch")
    assert tree_hash(store) == before


def test_paths_and_usage(good, tmp_path):
    src, store, _ = good
    _one_line_error(_cli("ingest", src, src / "inside"), "must not be inside the source")
    _one_line_error(_cli("validate", tmp_path / "nowhere"), "not a conveyor store")
    _one_line_error(_cli("convert", tmp_path / "nowhere", tmp_path / "x"), "source folder does not exist")
    _one_line_error(_cli("convert", src, store), "destination exists")
    assert _cli("ingest", src).returncode == 2
    assert not (tmp_path / "x").exists() and not (src / "inside").exists()


# -- lerobot-train accepts the store ---------------------------------------------------------------------

@pytest.mark.lerobot
@pytest.mark.slow
def test_lerobot_train_act_two_steps_on_converted_store(mixed_store, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [str(Path(sys.executable).with_name("lerobot-train")), "--policy.type=act", "--policy.device=cpu",
           "--policy.push_to_hub=false", "--policy.pretrained_backbone_weights=null", "--policy.dim_model=32",
           "--policy.n_encoder_layers=1", "--policy.n_decoder_layers=1", "--policy.chunk_size=2",
           "--policy.n_action_steps=2", "--policy.dim_feedforward=64",
           "--dataset.repo_id=local/mixed", f"--dataset.root={mixed_store}", "--dataset.video_backend=pyav",
           f"--output_dir={tmp_path / 'out'}", "--steps=2", "--save_freq=2", "--batch_size=2", "--num_workers=0",
           "--wandb.enable=false", "--log_freq=1"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out/checkpoints/000002/pretrained_model/model.safetensors").exists()
