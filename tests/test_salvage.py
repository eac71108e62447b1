"""Salvage a killed lerobot 0.6.1 recording session (issue 19 item 3).

A real lerobot 0.6.1 recorder (tests/salvage_recorder.py: `LeRobotDataset.create` + `add_frame` +
`save_episode` [+ `finalize`], synthetic frames) is SIGKILLed at several points; `conveyor salvage` must give
back exactly the episodes whose bytes are on disk, with the rows and frames the recorder was given, as a
folder lerobot opens, without touching the session. The footer rebuild is also checked alone, at every cut.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conveyor.footerless import has_footer, rescue
from conveyor.tables import data_schema

ROOT = Path(__file__).resolve().parents[1]
RECORDER = Path(__file__).with_name("salvage_recorder.py")
EPISODES, FRAMES = 4, 12

# kill point -> (session episodes recovered, {session episode quarantined: words its reason must hold})
MATRIX = {
    "after_save:1": ([0], {}),
    "after_save:4": ([0, 1, 2, 3], {}),
    "mid_frames:2:5": ([0, 1], {2: "being recorded"}),
    "encode:2": ([0, 1], {2: "never encoded"}),
    "concat:3": ([0, 1, 2, 3], {}),
    "copy:3:60": ([0, 1, 3], {2: "being rewritten"}),
    "no_finalize": ([0, 1, 2, 3], {}),
    "os_exit": ([0, 1, 2, 3], {}),
    "finalize": ([0, 1, 2, 3], {}),
}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rec = _load("salvage_recorder", RECORDER)


def conveyor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conveyor.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, timeout=300)


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# -- the footer rebuild alone (no lerobot: fast tier) --------------------------------------------------

def test_footerless_gives_back_every_whole_row_group_at_every_cut(tmp_path):
    features = rec.features()
    schema = data_schema(features)
    path = tmp_path / "open.parquet"
    tables, ends = [], []
    w = pq.ParquetWriter(path, schema, compression="snappy", use_dictionary=True)  # lerobot's writer options
    for ep, n in enumerate([7, 12, 3, 9]):
        rows = [rec.frame_values(ep, i) for i in range(n)]
        t = pa.table({"observation.state": [r["observation.state"] for r in rows],
                      "action": [r["action"] for r in rows],
                      "timestamp": np.arange(n, dtype=np.float32) / rec.FPS,
                      "frame_index": np.arange(n), "episode_index": np.full(n, ep),
                      "index": np.arange(n) + sum(len(x) for x in tables), "task_index": np.full(n, ep % 2)},
                     schema=schema)
        w.write_table(t)
        tables.append(t)
        ends.append(path.stat().st_size)
    open_bytes = path.read_bytes()  # what a SIGKILL now leaves: row groups, no footer
    w.close()
    assert not has_footer(tmp_path / "x.parquet") if (tmp_path / "x.parquet").write_bytes(open_bytes) else True
    assert has_footer(path)
    closed = rescue(path, schema).open().read()  # a closed file walks the same (its footer is ignored)
    assert closed.equals(pa.concat_tables(tables))

    cut_path = tmp_path / "cut.parquet"
    cuts = sorted(set(range(4, len(open_bytes), 13)) | set(ends) | {e - 1 for e in ends} | {e + 1 for e in ends})
    for cut in cuts:
        if cut > len(open_bytes):
            continue
        cut_path.write_bytes(open_bytes[:cut])
        got = rescue(cut_path, schema)
        whole = sum(1 for e in ends if e <= cut)
        assert got.row_groups == whole, cut
        assert got.used_bytes == (ends[whole - 1] if whole else 4), cut
        table = got.open().read()
        assert table.equals(pa.concat_tables(tables[:whole]) if whole else schema.empty_table()), cut


# -- killed recorders ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sessions(tmp_path_factory) -> Path:
    """One session per kill point, recorded by lerobot 0.6.1 (imported once, one fork per session)."""
    parent = tmp_path_factory.mktemp("sessions")
    env = dict(os.environ, HF_HUB_OFFLINE="1", SVT_LOG="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(RECORDER), str(parent), "--episodes", str(EPISODES), "--frames",
                        str(FRAMES), "--batch", *MATRIX], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return parent


@pytest.fixture(scope="module")
def lerobot_dump():
    return _load("lerobot_dump", Path(__file__).with_name("lerobot_dump.py")).dump


def session_frames(session: Path, ep: int) -> list[str]:
    """sha256 of episode `ep`'s frames decoded from the session's own mp4: its place in the camera file
    where all its frames decode there, else the episode mp4 the recorder left under tmp*/."""
    import av

    def decode(path: Path) -> list[np.ndarray]:
        out = []
        with av.open(str(path)) as c:
            try:
                for f in c.decode(video=0):
                    out.append(f.to_ndarray(format="rgb24"))
            except av.error.FFmpegError:
                pass
        return out

    frames = decode(session / "videos" / rec.CAMERA / "chunk-000" / "file-000.mp4")[ep * FRAMES:(ep + 1) * FRAMES]
    if len(frames) < FRAMES or ep == EPISODES - 1 and list(session.glob(f"tmp*/{rec.CAMERA}_{ep:03d}.mp4")):
        frames = decode(next(session.glob(f"tmp*/{rec.CAMERA}_{ep:03d}.mp4")))
    assert len(frames) == FRAMES
    for i, f in enumerate(frames):  # the frame the recorder was given, through a lossy codec: close
        assert np.abs(f.astype(int) - rec.frame_values(ep, i)[rec.CAMERA]).mean() < 8, (ep, i)
    return [hashlib.sha256(f.tobytes()).hexdigest() for f in frames]


@pytest.mark.lerobot
@pytest.mark.parametrize("kill", list(MATRIX))
def test_salvage_after_a_kill(kill, sessions, lerobot_dump, tmp_path):
    recovered, quarantined = MATRIX[kill]
    session = sessions / rec.session_name(kill)
    before = tree_hashes(session)
    out = tmp_path / "out"
    r = conveyor("salvage", str(session), str(out), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert tree_hashes(session) == before  # the session is only read

    assert [x["session_episode"] for x in report["recovered"]] == recovered
    assert [x["episode"] for x in report["recovered"]] == list(range(len(recovered)))
    assert {int(k) for k in report["quarantined"]} == set(quarantined)
    for ep, words in quarantined.items():
        assert words in report["quarantined"][str(ep)]

    # rows: exactly what the recorder was given, renumbered
    rows = pq.ParquetFile(next((out / "data").rglob("*.parquet"))).read().to_pylist()
    assert len(rows) == FRAMES * len(recovered)
    for new, ep in enumerate(recovered):
        mine = [row for row in rows if row["episode_index"] == new]
        assert [row["frame_index"] for row in mine] == list(range(FRAMES))
        assert [row["index"] for row in mine] == list(range(new * FRAMES, (new + 1) * FRAMES))
        for i, row in enumerate(mine):
            given = rec.frame_values(ep, i)
            assert np.array_equal(np.float32(row["observation.state"]), given["observation.state"])
            assert np.array_equal(np.float32(row["action"]), given["action"])

    # lerobot 0.6.1 opens OUT; tasks and frames are the session's (pixel-exact: packets copied, not re-encoded)
    dump = lerobot_dump(str(out))
    assert dump["len"] == FRAMES * len(recovered) and dump["episodes"] == len(recovered)
    for new, ep in enumerate(recovered):
        items = [it for it in dump["items"] if it["episode_index"] == new]
        assert {it["task"] for it in items} == {rec.task_of(ep)}
        assert [it[rec.CAMERA] for it in items] == session_frames(session, ep), (kill, ep)

    if kill == "finalize":  # nothing to salvage: the same rows as the session's own file
        mine = pq.ParquetFile(next((out / "data").rglob("*.parquet"))).read()
        assert mine.equals(pq.ParquetFile(session / "data/chunk-000/file-000.parquet").read().cast(mine.schema))


@pytest.mark.lerobot
def test_salvage_refuses_a_non_empty_out_and_takes_an_empty_one(sessions, tmp_path):
    session = sessions / rec.session_name("after_save:4")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = conveyor("salvage", str(session), str(out))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "not empty" in r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    r = conveyor("salvage", str(session), str(out))
    assert r.returncode == 0, r.stderr
    assert "4 episodes recovered" in r.stdout and (out / "meta/info.json").is_file()
    assert not list(tmp_path.glob(".out.salvage-*"))


@pytest.mark.lerobot
def test_a_killed_session_lands_in_a_store_through_salvage_then_ingest(sessions, tmp_path):
    """The killed session as a source holds nothing complete (its files were never closed: ingest waits for
    it forever); its salvaged folder is a finalized v3.0 source whose recovered episodes land exactly."""
    from conveyor.validate import validate_fast

    session = sessions / rec.session_name("after_save:4")
    store, out = tmp_path / "store", tmp_path / "salvaged"
    r = conveyor("ingest", str(session), str(store))
    assert r.returncode == 0 and "still being recorded: [0, 1, 2, 3]" in r.stdout and "0 new episode(s)" in r.stdout
    assert conveyor("salvage", str(session), str(out)).returncode == 0
    r = conveyor("ingest", str(out), str(store))
    assert r.returncode == 0 and "4 new episode(s)" in r.stdout, r.stdout + r.stderr
    assert "0 new episode(s), 4 already" in conveyor("ingest", str(out), str(store)).stdout
    report = validate_fast(store, against=out)
    assert report.ok, report
    rows = pq.ParquetFile(next((store / "data").rglob("*.parquet"))).read()
    assert rows.column("observation.state").to_pylist() == [
        rec.frame_values(ep, i)["observation.state"].tolist() for ep in range(4) for i in range(FRAMES)]


@pytest.mark.lerobot
def test_a_row_group_torn_mid_write_quarantines_its_episode(sessions, tmp_path):
    """The recorder died inside `write_table` of episode 3: its row group is cut in the middle (the other
    episodes' and its video are whole). Episodes 0-2 come back; 3 is quarantined for its rows."""
    import shutil

    session = tmp_path / "session"
    shutil.copytree(sessions / rec.session_name("after_save:4"), session)
    data = session / "data/chunk-000/file-000.parquet"
    schema = data_schema(json.loads((session / "meta/info.json").read_text())["features"])
    meta = rescue(data, schema).open().metadata
    assert meta.num_row_groups == 4
    raw = data.read_bytes()
    start3 = meta.row_group(3).column(0).dictionary_page_offset  # episode 3's row group begins here
    cut = start3 + (len(raw) - start3) // 2
    data.write_bytes(raw[:cut])
    r = conveyor("salvage", str(session), str(tmp_path / "out"), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert [x["session_episode"] for x in report["recovered"]] == [0, 1, 2]
    assert list(report["quarantined"]) == ["3"] and "rows torn" in report["quarantined"]["3"]
    assert any("after its last whole row group" in n for n in report["notes"])
