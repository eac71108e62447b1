"""The same episodes arriving through another path (a copied or moved recording) are not added twice
(issue 21 item 3): the content hash of each episode is compared with every episode the store holds."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conveyor.duplicates import DUPLICATES
from conveyor.store import Store
from conveyor.synthetic.recording import write_recording
from conveyor.validate import validate_fast

ROOT = Path(__file__).resolve().parents[1]


def conveyor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conveyor.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, timeout=300)


def copy_first(src: Path, dst: Path, n: int) -> Path:
    """What a lab does by hand: copy a recording, keep its first `n` episodes (files, metadata lines, totals)."""
    shutil.copytree(src, dst)
    for p in list(dst.rglob("episode_*")):
        if int(p.stem.split("_")[1]) >= n:
            p.unlink()
    for name in ("episodes.jsonl", "episodes_stats.jsonl"):
        f = dst / "meta" / name
        f.write_text("".join(line + "\n" for line in f.read_text().splitlines()
                             if json.loads(line)["episode_index"] < n))
    info = json.loads((dst / "meta/info.json").read_text())
    lengths = [json.loads(line)["length"] for line in (dst / "meta/episodes.jsonl").read_text().splitlines()]
    cams = sum(1 for f in info["features"].values() if f["dtype"] == "video")
    info.update(total_episodes=n, total_frames=sum(lengths), total_videos=n * cams, splits={"train": f"0:{n}"})
    (dst / "meta/info.json").write_text(json.dumps(info, indent=4))
    return dst


def test_a_copied_recording_does_not_duplicate_episodes(tmp_path):
    rec = write_recording(tmp_path / "rec", episodes=16, lengths=5)
    copy = copy_first(rec, tmp_path / "elsewhere" / "copy", 10)
    store = tmp_path / "S"
    assert conveyor("convert", str(copy), str(store)).returncode == 0

    p = conveyor("ingest", str(rec), str(store))
    assert p.returncode == 0, p.stderr
    assert "6 new episode(s), 0 already in store, 10 already present from another path" in p.stdout
    present = [line for line in p.stdout.splitlines() if "already present:" in line]
    assert len(present) == 10
    assert f"{rec} episode 3 is already in the store as episode 3, ingested from {copy} episode 3" in p.stdout
    s = Store.open(store)
    assert s.version.total_episodes == 16
    hashes = [r.content_hash for r in s.ledger()]
    assert len(hashes) == len(set(hashes)) == 16
    assert validate_fast(store).ok

    # the next tick: nothing new, answered by the fast path (no hashing), still naming the 10
    p = conveyor("ingest", str(rec), str(store))
    assert p.returncode == 0 and "0 new episode(s), 6 already in store, 10 already present" in p.stdout
    from conveyor.pending import nothing_new
    from conveyor.source import V21Source
    fast = nothing_new(V21Source.open(rec), store)
    assert fast is not None and len(fast.duplicates) == 10 and Store.open(store).version == s.version

    # a duplicate whose files change is looked at again (the fast path does not answer for it)
    (rec / "data/chunk-000/episode_000002.parquet").touch()
    assert nothing_new(V21Source.open(rec), store) is None
    assert "10 already present" in conveyor("ingest", str(rec), str(store)).stdout

    # the user says otherwise
    p = conveyor("ingest", str(rec), str(store), "--allow-duplicates")
    assert p.returncode == 0 and "10 new episode(s), 6 already in store" in p.stdout
    assert Store.open(store).version.total_episodes == 26
    assert json.loads((store / DUPLICATES).read_text()) == {}


def test_a_copy_of_a_dropped_episode_does_not_bring_it_back(tmp_path):
    """Curation dropped store episode 0 (from the copy); the original's episode 0 has the same content."""
    from conveyor import curate

    rec = write_recording(tmp_path / "rec", episodes=4, lengths=5)
    copy = copy_first(rec, tmp_path / "elsewhere" / "copy", 2)
    store = tmp_path / "S"
    assert conveyor("convert", str(copy), str(store)).returncode == 0
    curate.drop(store, [0], "blurry camera")
    p = conveyor("ingest", str(rec), str(store))
    assert p.returncode == 0, p.stderr
    assert "2 new episode(s), 0 already in store, 2 already present from another path" in p.stdout
    assert f"{rec} episode 0 has the content of {copy} episode 0, which a curation dropped" in p.stdout
    assert Store.open(store).version.total_episodes == 3
    assert conveyor("ingest", str(rec), str(store)).stdout.count("already present:") == 2  # fast path too
