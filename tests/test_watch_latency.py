"""Evidence-based completeness: final episodes land without waiting, half-landed ones never do."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import av
import pytest

from conveyor.evidence import mp4_finalized
from conveyor.synthetic.recording import CameraSpec, RecordingSpec, RecordingWriter
from conveyor.watcher import EpisodeWatcher

SPEC = RecordingSpec(fps=30, cameras=(CameraSpec("observation.images.laptop", 48, 64),
                                      CameraSpec("observation.images.phone", 48, 64)))
LEN = 20


def _faststart(src: Path, dst: Path) -> bytes:
    """Stream-copy `src` into an mp4 with its index first (ffmpeg's +faststart), as some recorders write."""
    with av.open(str(src)) as ic, av.open(str(dst), "w", format="mp4", options={"movflags": "faststart"}) as oc:
        s = ic.streams.video[0]
        o = oc.add_stream_from_template(s, opaque=True)
        for pk in ic.demux(s):
            if pk.size:
                pk.stream = o
                oc.mux(pk)
    return dst.read_bytes()


def _run(watcher: EpisodeWatcher):
    stop = threading.Event()
    t = threading.Thread(target=watcher.run, kwargs={"stop": stop}, daemon=True)
    t.start()
    return stop, t


def _wait(cond, seconds: float) -> bool:
    end = time.time() + seconds
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_mp4_finalized_rejects_every_truncation_of_either_layout(tmp_path):
    files = RecordingWriter(tmp_path / "rec", SPEC).write_episode(0, LEN)
    plain = next(iter(files.videos.values()))
    fast = tmp_path / "fast.mp4"
    for data in (plain.read_bytes(), _faststart(plain, fast)):
        whole = tmp_path / "whole.mp4"
        whole.write_bytes(data)
        assert mp4_finalized(whole)
        for cut in (1, 7, 100, len(data) // 2, len(data) - 8):
            part = tmp_path / "part.mp4"
            part.write_bytes(data[: len(data) - cut])
            assert not mp4_finalized(part), f"{cut} bytes short must not count as final"
    assert not mp4_finalized(tmp_path / "missing.mp4")
    (tmp_path / "x.mp4").write_bytes(b"\x00" * 64)
    assert not mp4_finalized(tmp_path / "x.mp4")


def test_finished_episode_lands_at_once_and_a_copy_landing_media_late_waits(tmp_path):
    rec = tmp_path / "rec"
    w = RecordingWriter(rec, SPEC)
    calls: list[tuple[list[int], float]] = []
    watcher = EpisodeWatcher({"rec": rec}, on_ready=lambda n, eps: calls.append((eps, time.time())),
                             settle_seconds=3.0, debounce_seconds=0.3, rescan_seconds=60.0,
                             on_error=lambda n, e: None)
    stop, t = _run(watcher)
    try:
        time.sleep(0.3)
        # the recorder finishes an episode (media first, jsonl line last): no settle wait
        w.write_episode(0, LEN)
        done = time.time()
        assert _wait(lambda: calls, 2.0), "a final episode must land well before settle_seconds (3 s)"
        assert calls[0][0] == [0] and calls[0][1] - done < 1.0

        # a copy that writes the jsonl line first and the media after it, slowly, index first
        files = w.write_episode(1, LEN, finish=False)
        video = files.videos["observation.images.phone"]
        data = _faststart(video, tmp_path / "fast.mp4")
        video.unlink()
        w.finish_episode(1)  # the line is there, one camera file is not
        chunks = [data[i: i + len(data) // 4 + 1] for i in range(0, len(data), len(data) // 4 + 1)]
        with open(video, "wb") as f:
            for c in chunks:
                time.sleep(0.5)  # each pause shorter than settle_seconds, as a copy in progress
                assert len(calls) == 1, "an episode whose camera file is still landing must not be handed over"
                f.write(c)
                f.flush()
        landed = time.time()
        assert _wait(lambda: len(calls) == 2, 2.0), "once the last byte landed the episode is final"
        assert calls[1][0] == [1] and calls[1][1] - landed < 1.5
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()


def test_a_missed_event_is_caught_by_the_rescan(tmp_path):
    """No filesystem observer at all (as on a mount without inotify): only the periodic rescan finds it."""
    rec = tmp_path / "rec"
    w = RecordingWriter(rec, SPEC)
    w.write_episode(0, LEN)
    calls: list[list[int]] = []
    watcher = EpisodeWatcher({"rec": rec}, on_ready=lambda n, eps: calls.append(eps), settle_seconds=5.0,
                             debounce_seconds=0.1, rescan_seconds=0.5)
    watcher.poll()  # the start-up scan (never started: no observer, no events)
    assert calls == [[0]]
    w.write_episode(1, LEN)
    watcher.poll()
    assert calls == [[0]], "not due yet: nothing told the watcher"
    time.sleep(0.6)
    watcher.poll()
    assert calls == [[0], [1]]


@pytest.mark.lerobot
def test_deep_check_runs_lerobot_in_a_child_and_reports_its_failures(tmp_path):
    """The watch/worker process never imports torch for a deep check; a store lerobot cannot load fails."""
    import json
    import subprocess
    import sys

    from conveyor.ingest import convert
    from conveyor.synthetic.recording import write_recording

    src = write_recording(tmp_path / "src", episodes=2, lengths=6, spec=SPEC)
    store = tmp_path / "store"
    convert(src, store)
    code = ("import sys, json; from conveyor.validate import validate_deep; r = validate_deep(sys.argv[1]); "
            "print(json.dumps([r.ok, 'torch' in sys.modules, 'lerobot' in sys.modules, "
            "[c.name for c in r.checks if c.name.startswith('lerobot')]]))")
    out = subprocess.run([sys.executable, "-c", code, str(store)], capture_output=True, text=True, check=True)
    ok, torch_loaded, lerobot_loaded, lerobot_checks = json.loads(out.stdout.strip().splitlines()[-1])
    assert ok and not torch_loaded and not lerobot_loaded and lerobot_checks == ["lerobot LeRobotDataset loads offline"]

    info = json.loads((store / "meta/info.json").read_text())
    info["features"]["action"]["dtype"] = "string"  # lerobot cannot read the rows as this any more
    (store / "meta/info.json").write_text(json.dumps(info))
    from conveyor.validate import validate_deep

    failed = [c.name for c in validate_deep(store).failures]
    assert any("lerobot" in name for name in failed), failed  # reported, not raised or swallowed


def test_an_info_json_caught_mid_write_is_looked_at_again_not_reported(tmp_path):
    """The recorder rewrites info.json (truncate, write) right after the jsonl line the watcher reacts to."""
    rec = tmp_path / "rec"
    w = RecordingWriter(rec, SPEC)
    w.write_episode(0, LEN)
    info = rec / "meta/info.json"
    good = info.read_bytes()
    info.write_bytes(good[: len(good) // 2])  # as read in the middle of the recorder's rewrite
    calls, errors = [], []
    watcher = EpisodeWatcher({"rec": rec}, on_ready=lambda n, eps: calls.append(eps), settle_seconds=5.0,
                             debounce_seconds=0.1, rescan_seconds=60.0, on_error=lambda n, e: errors.append(e))
    watcher.poll()
    assert not calls and not errors, "one failed read is not reported yet"
    info.write_bytes(good)  # the rewrite completes
    time.sleep(0.15)
    watcher.poll()
    assert calls == [[0]] and not errors

    info.write_bytes(good[:10])  # really broken: reported at the next look
    w.write_episode(1, LEN)
    info.write_bytes(good[:10])
    watcher.mark_dirty("rec", urgent=True)  # what the observer does on the recorder's jsonl line
    watcher.poll()
    assert not errors
    time.sleep(0.15)
    watcher.poll()
    assert len(errors) == 1 and "info.json" in str(errors[0]) and calls == [[0]]
