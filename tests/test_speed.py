"""The fast paths give the same answers as the slow ones: `conveyor ingest` with nothing new."""
from __future__ import annotations

import json
import subprocess
import sys

from conveyor.ingest import ingest
from conveyor.pending import nothing_new
from conveyor.synthetic.recording import CameraSpec, RecordingSpec, RecordingWriter

SPEC = RecordingSpec(fps=30, cameras=(CameraSpec("observation.images.laptop", 48, 64),))


def test_nothing_new_answers_like_the_full_ingest_and_defers_everything_else(tmp_path):
    rec, store = tmp_path / "rec", tmp_path / "store"
    w = RecordingWriter(rec, SPEC)
    for ep in range(3):
        w.write_episode(ep, 6)
    assert nothing_new(rec, store) is None  # no store yet: the full ingest creates it
    ingest(rec, store)
    w.write_episode(3, 6, finish=False)  # still recording: reported as incomplete by both paths
    fast = nothing_new(rec, store)
    full = ingest(rec, store)
    assert fast is not None and not full.added
    keep = {"seconds"}
    assert ({k: v for k, v in fast.to_dict().items() if k not in keep}
            == {k: v for k, v in full.to_dict().items() if k not in keep}) and fast.incomplete == [3]

    w.finish_episode(3)
    assert nothing_new(rec, store) is None, "a new episode goes through the full ingest"
    ingest(rec, store)
    assert nothing_new(rec, store) is not None
    parquet = rec / "data/chunk-000/episode_000001.parquet"
    parquet.write_bytes(parquet.read_bytes())  # same bytes, new mtime: the full path compares content
    assert nothing_new(rec, store) is None
    assert not ingest(rec, store).changed


def test_cli_ingest_with_nothing_new_imports_no_media_or_table_library(tmp_path):
    rec, store = tmp_path / "rec", tmp_path / "store"
    RecordingWriter(rec, SPEC).write_episode(0, 5)
    ingest(rec, store)
    code = ("import sys, json; from conveyor.cli import main; rc = main(['ingest', sys.argv[1], sys.argv[2]]); "
            "print(json.dumps([rc, sorted(m for m in ('numpy', 'pyarrow', 'av', 'rich') if m in sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code, str(rec), str(store)], capture_output=True, text=True,
                         check=True)
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == [0, []], out.stdout
    assert "0 new episode(s), 1 already in store" in lines[0]
    # the store named as a store under store_root (`conveyor ingest rec koch_grasp`) takes the same path
    cfg = tmp_path / "conveyor.toml"
    cfg.write_text(f'store_root = "{tmp_path}"\n')
    named = code.replace("main(['ingest',", f"main(['--config', {str(cfg)!r}, 'ingest',")
    out = subprocess.run([sys.executable, "-c", named, str(rec), "store"], capture_output=True, text=True,
                         check=True, cwd=tmp_path / "rec")
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == [0, []], out.stdout
    assert "0 new episode(s), 1 already in store" in lines[0]


def test_cli_store_commands_never_import_pandas_and_write_the_same_bytes(tmp_path):
    """pyarrow is told there is no pandas (0.3 s of imports); the files must not change because of it."""
    import hashlib

    import pandas  # noqa: F401  (this process: the API path with pandas loaded, as in a worker)

    from conveyor.ingest import convert

    rec = tmp_path / "rec"
    w = RecordingWriter(rec, SPEC)
    for ep in range(3):
        w.write_episode(ep, 5 + ep)
    convert(rec, tmp_path / "api")
    code = ("import sys, json; from conveyor.cli import main; rc = main(['convert', sys.argv[1], sys.argv[2]]); "
            "rc |= main(['validate', sys.argv[2], '--against', sys.argv[1]]); "
            "print(json.dumps([rc, 'pandas' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code, str(rec), str(tmp_path / "cli")], capture_output=True,
                         text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [0, False], out.stdout

    def digest(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file() and ".conveyor" not in p.parts}

    assert digest(tmp_path / "cli") == digest(tmp_path / "api")


def test_keyframe_choice_is_the_same_from_a_set_or_the_sorted_tuple():
    """Validation bisects a sorted tuple; ingest passes the file's set: both must pick the same frames."""
    import random

    from conveyor.video import pick_keyframes

    rng = random.Random(7)
    for _ in range(300):
        pts = sorted(rng.sample(range(0, 5000, 3), rng.randint(1, 400)))
        keys = frozenset(p for p in pts if rng.random() < 0.3) | {pts[0]}
        a = rng.randrange(len(pts))
        seg = tuple(pts[a:rng.randint(a + 1, len(pts))])
        assert pick_keyframes(seg, keys, 3) == pick_keyframes(seg, tuple(sorted(keys)), 3)


def test_stream_copy_spans_from_written_timestamps_equal_a_full_read_back(tmp_path):
    """The spans a copy computes from what it wrote equal the ones read back from every packet of the file
    (AV1, and H.264 with B-frames, whose mp4 gets an edit list), and a file that does not show the written
    timestamps falls back to the read-back."""
    from conveyor.video import StreamCopy, segment_spans

    spec = RecordingSpec(fps=30, cameras=(CameraSpec("observation.images.av1", 48, 64),
                                          CameraSpec("observation.images.h264", 48, 64, codec="h264")))
    w = RecordingWriter(tmp_path / "rec", spec)
    files = [w.write_episode(ep, n) for ep, n in enumerate((7, 1, 30, 3))]
    for key in ("observation.images.av1", "observation.images.h264"):
        copy = StreamCopy(tmp_path / f"{key}.mp4")
        for f in files:
            copy.add(f.videos[key])
        copy.oc.close()
        copy.oc = None
        fast = copy._spans_from_written()
        assert fast is not None and fast == segment_spans(copy.tmp, copy.lengths), key
        if key.endswith("h264"):
            assert fast[0][0] > 0, "B-frames: the first frame is presented after the first decoded one"
        assert len(copy.head) == 41, "the first packets, across inputs, are compared"
        copy.head[5] += 1  # what a muxer that moved a packet would show
        assert copy._spans_from_written() is None
        copy.head[5] -= 1
        copy.lengths[-1] += 1  # a frame missing from the file
        assert copy._spans_from_written() is None
        copy.abort()


def test_copy_from_the_probes_packets_writes_the_files_a_second_demux_writes(tmp_path, monkeypatch):
    """Ingest copies each video from the packets its probe demuxed; with no room under the cap it demuxes
    the file again. Both give the same bytes (AV1, and H.264 with B-frames)."""
    import hashlib

    from conveyor import sizing, video
    from conveyor.ingest import convert

    spec = RecordingSpec(fps=30, cameras=(CameraSpec("observation.images.av1", 48, 64),
                                          CameraSpec("observation.images.h264", 48, 64, codec="h264")))
    rec = tmp_path / "rec"
    w = RecordingWriter(rec, spec)
    for ep, n in enumerate((7, 1, 30, 3)):
        w.write_episode(ep, n)
    fed: list[str] = []
    append = video.StreamCopy._append

    def spy(self, path, probed, packets):
        fed.append("held" if isinstance(packets, list) else "demuxed")
        return append(self, path, probed, packets)

    monkeypatch.setattr(video.StreamCopy, "_append", spy)
    convert(rec, tmp_path / "held")
    assert fed == ["held"] * 8
    fed.clear()
    monkeypatch.setattr(sizing, "HELD_PACKETS_MB", 0)
    convert(rec, tmp_path / "demuxed")
    assert fed == ["demuxed"] * 8

    def videos(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((root / "videos").rglob("*.mp4"))}

    assert len(videos(tmp_path / "held")) == 2
    assert videos(tmp_path / "held") == videos(tmp_path / "demuxed")


def test_packet_cap_bounds_what_is_held_and_gets_back_what_is_dropped():
    import gc

    from conveyor.prepare import PacketCap

    cap = PacketCap(100)
    a = cap.reserve(60)
    assert a is not None and cap.reserve(50) is None, "over the cap: the copy demuxes that file itself"
    b = cap.reserve(40)
    assert b is not None and cap.held == 100
    b.release()
    b.release()  # idempotent
    assert cap.held == 60
    del a  # a quarantined episode's packets: dropped, never copied
    gc.collect()
    assert cap.held == 0 and cap.reserve(100) is not None


def test_hashed_ahead_equals_hashing_now_and_a_file_changed_since_is_hashed_again(tmp_path):
    import hashlib
    import os

    import pytest

    from conveyor.fileio import group_digests_in_child
    from conveyor.source import V21Source

    rec = tmp_path / "rec"
    w = RecordingWriter(rec, SPEC)
    for ep in range(3):
        w.write_episode(ep, 5 + ep)
    now = V21Source.open(rec)
    expected = {ep: now.content_hash(ep) for ep in range(3)}

    src = V21Source.open(rec)
    src.hash_ahead([0, 1, 2, 7])  # 7 is not recorded: left for content_hash to report
    assert sorted(src._hashed_ahead) == [0, 1, 2]
    assert {ep: job.result() for ep, (_, job) in src._hashed_ahead.items()} == expected
    assert src.content_hash(0) == expected[0]
    parquet = src.parquet_path(1)  # rewritten after it was hashed ahead
    data = bytearray(parquet.read_bytes())
    data[len(data) // 2] ^= 0xFF
    parquet.write_bytes(bytes(data))
    os.utime(parquet, ns=(parquet.stat().st_atime_ns, parquet.stat().st_mtime_ns + 10**9))
    changed = src.content_hash(1)
    assert changed != expected[1] and changed == V21Source.open(rec).content_hash(1)
    src.video_path(2, "observation.images.laptop").unlink()
    with pytest.raises(FileNotFoundError):  # gone since: named by hashing it here, as without hash_ahead
        src.content_hash(2)
    # the child answers None for a group it cannot read (content_hash then hashes here and names the file)
    jobs = group_digests_in_child([[str(src.parquet_path(0))], [str(tmp_path / "missing")]])
    assert [j.result(timeout=30) for j in jobs] == [hashlib.sha256(
        hashlib.sha256(src.parquet_path(0).read_bytes()).digest()).hexdigest(), None]


def test_a_reused_keyframe_decoder_gives_the_pixels_of_a_fresh_one(tmp_path):
    """probe() decodes stats keyframes with one decoder per thread and codec parameters, across files; the
    frames equal those validate decodes by seeking in each file with its own decoder (AV1, H.264 with
    B-frames, two sizes interleaved)."""
    import numpy as np

    from conveyor.video import probe, sample_keyframes

    spec = RecordingSpec(fps=30, cameras=(CameraSpec("observation.images.av1", 48, 64),
                                          CameraSpec("observation.images.av1_big", 96, 128),
                                          CameraSpec("observation.images.h264", 48, 64, codec="h264")))
    w = RecordingWriter(tmp_path / "rec", spec)
    files = [w.write_episode(ep, n) for ep, n in enumerate((9, 1, 30, 4))]
    for f in files:
        for key, path in f.videos.items():
            pr, frames = probe(path, sample=3)
            fresh = sample_keyframes(path, pr, pr.pts, 3)
            assert len(frames) == len(fresh) >= 1
            assert all(np.array_equal(a, b) for a, b in zip(frames, fresh)), (path, key)
