"""The synthetic v2.1 recorder writes what lerobot <= 0.3.x's recorder wrote."""

import json

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conveyor.synthetic.recording import CameraSpec, RecordingSpec, RecordingWriter, frame_pixels, write_recording

MIXED = RecordingSpec(cameras=(
    CameraSpec("observation.images.laptop"),
    CameraSpec("observation.images.phone"),
    CameraSpec("observation.images.wrist", 48, 64, codec="h264"),
    CameraSpec("observation.images.top", 32, 32, dtype="image"),
))
VIDEO_KEYS = ["observation.images.laptop", "observation.images.phone", "observation.images.wrist"]


def jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_mixed_recording(tmp_path):
    eps, lengths, tasks = [0, 1, 3], [12, 1, 3], ["pick the cube", "抓取方块", None]
    root = write_recording(tmp_path / "rec", eps, lengths=lengths, tasks=tasks, spec=MIXED)

    info = json.loads((root / "meta/info.json").read_text(encoding="utf-8"))
    assert info["codebase_version"] == "v2.1"
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (3, 16, 3)
    assert (info["total_videos"], info["total_chunks"], info["splits"]) == (9, 1, {"train": "0:3"})
    assert list(info["features"])[-5:] == ["timestamp", "frame_index", "episode_index", "index", "task_index"]
    assert info["features"]["observation.images.wrist"]["info"]["video.codec"] == "h264"
    assert info["features"]["observation.images.top"]["dtype"] == "image"

    assert jsonl(root / "meta/episodes.jsonl") == [
        {"episode_index": 0, "tasks": ["pick the cube"], "length": 12},
        {"episode_index": 1, "tasks": ["抓取方块"], "length": 1},
        {"episode_index": 3, "tasks": [], "length": 3},
    ]
    assert "抓取方块" in (root / "meta/tasks.jsonl").read_text(encoding="utf-8")  # not \\u-escaped
    assert jsonl(root / "meta/tasks.jsonl") == [
        {"task_index": 0, "task": "pick the cube"}, {"task_index": 1, "task": "抓取方块"},
        {"task_index": 2, "task": ""},
    ]
    stats = jsonl(root / "meta/episodes_stats.jsonl")
    assert [s["episode_index"] for s in stats] == eps
    s0 = stats[0]["stats"]
    assert set(s0) == set(info["features"])
    assert np.array(s0["observation.images.laptop"]["mean"]).shape == (3, 1, 1)
    assert s0["index"]["count"] == [12] and len(s0["timestamp"]["min"]) == 1 and "q01" not in s0["action"]

    index = []
    writer = RecordingWriter(root, MIXED)  # re-opening continues the existing recording
    for ep, n, task_index in zip(eps, lengths, [0, 1, 2]):
        files = writer.episode_files(ep)
        t = pq.read_table(files.parquet)
        assert t.num_rows == n
        assert t.column_names == ["action", "observation.state", "observation.images.top", "timestamp",
                                  "frame_index", "episode_index", "index", "task_index"]
        assert t.schema.field("action").type == pa.list_(pa.float32(), 6)
        assert t.schema.field("timestamp").type == pa.float32()
        assert t.schema.field("index").type == pa.int64()
        assert json.loads(t.schema.metadata[b"huggingface"])["info"]["features"]["observation.images.top"] == {
            "_type": "Image"}
        d = t.to_pydict()
        assert d["frame_index"] == list(range(n)) and set(d["episode_index"]) == {ep}
        assert set(d["task_index"]) == {task_index}
        np.testing.assert_allclose(d["timestamp"], np.arange(n) / 30, rtol=1e-6)
        png = d["observation.images.top"][0]["bytes"]
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        (img,) = av.CodecContext.create("png", "r").decode(av.Packet(png))  # lossless
        assert np.array_equal(img.to_ndarray(format="rgb24"), frame_pixels(MIXED, MIXED.cameras[3], ep, 0))
        index += d["index"]

        assert sorted(files.videos) == sorted(VIDEO_KEYS)
        for key, path in files.videos.items():
            with av.open(str(path)) as c:
                assert sum(1 for p in c.demux(c.streams.video[0]) if p.size) == n
            with av.open(str(path)) as c:
                frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
            assert len(frames) == n and frames[0].shape == (48, 64, 3)
            ref = frame_pixels(MIXED, next(c for c in MIXED.cameras if c.key == key), ep, 0)
            assert np.abs(frames[0].astype(int) - ref).mean() < 20  # lossy, but the same picture
    assert index == list(range(16))  # global index contiguous across the gap at episode 2


def test_frames_vary():
    cam = MIXED.cameras[0]
    a, b, c = (frame_pixels(MIXED, cam, e, f) for e, f in [(0, 0), (0, 1), (1, 0)])
    assert a.dtype == np.uint8 and a.shape == (48, 64, 3)
    assert np.array_equal(a, frame_pixels(MIXED, cam, 0, 0))
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a, frame_pixels(MIXED, MIXED.cameras[1], 0, 0))


def test_unfinished_episode(tmp_path):
    spec = RecordingSpec(cameras=(CameraSpec("observation.images.laptop"),))
    w = RecordingWriter(tmp_path, spec)
    w.write_episode(0, 4)
    files = w.write_episode(1, 5, "new task", finish=False)
    assert files.parquet.exists() and files.videos["observation.images.laptop"].exists()
    assert [e["episode_index"] for e in jsonl(tmp_path / "meta/episodes.jsonl")] == [0]
    assert len(jsonl(tmp_path / "meta/tasks.jsonl")) == 1
    assert json.loads((tmp_path / "meta/info.json").read_text())["total_episodes"] == 1
    assert pq.read_table(files.parquet).column("task_index").to_pylist() == [1] * 5
    w.finish_episode(1)
    assert [e["episode_index"] for e in jsonl(tmp_path / "meta/episodes.jsonl")] == [0, 1]
    assert jsonl(tmp_path / "meta/tasks.jsonl")[1] == {"task_index": 1, "task": "new task"}
    info = json.loads((tmp_path / "meta/info.json").read_text())
    assert (info["total_episodes"], info["total_frames"], info["splits"]) == (2, 9, {"train": "0:2"})
    with pytest.raises(ValueError):
        w.write_episode(1, 3)


def test_no_cameras(tmp_path):
    root = write_recording(tmp_path, 2, lengths=[3, 4], spec=RecordingSpec(cameras=()))
    info = json.loads((root / "meta/info.json").read_text())
    assert info["video_path"] is None and info["total_videos"] == 0
    assert not (root / "videos").exists()
    assert pq.read_table(root / "data/chunk-000/episode_000001.parquet").column("index").to_pylist() == [3, 4, 5, 6]


def test_reopen_continues_and_cli(tmp_path):
    from conveyor.synthetic.recording import _main

    _main([str(tmp_path), "--episodes", "2", "--length", "3", "--codec", "h264", "--size", "32x48", "--task", ""])
    spec = RecordingSpec(cameras=tuple(CameraSpec(k, 32, 48, "h264") for k in
                                       ("observation.images.laptop", "observation.images.phone")))
    files = RecordingWriter(tmp_path, spec).write_episode(5, 2, "other")
    assert pq.read_table(files.parquet).column("index").to_pylist() == [6, 7]
    info = json.loads((tmp_path / "meta/info.json").read_text())
    assert (info["total_episodes"], info["total_tasks"], info["total_videos"]) == (3, 2, 6)
    assert jsonl(tmp_path / "meta/episodes.jsonl")[0]["tasks"] == []
    with pytest.raises(ValueError):
        RecordingWriter(tmp_path, RecordingSpec())  # different camera sizes/codec → refuse to mix
