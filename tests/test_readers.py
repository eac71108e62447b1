"""A lerobot reader that opened the previous version keeps reading while the store is compacted under it
(issue 21 item 4): compaction retains the files it replaces until `vacuum`. The long measurement with ingests
and compactions racing a reopen loop is bench/readers.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conveyor.compact import compact
from conveyor.ingest import ingest
from conveyor.scrub import scrub
from conveyor.store import Store
from conveyor.synthetic.recording import RecordingSpec, RecordingWriter
from conveyor.validate import validate_fast

ROOT = Path(__file__).resolve().parents[1]

READER = """
import sys
from lerobot.datasets.lerobot_dataset import LeRobotDataset
ds = LeRobotDataset("local/store", root=sys.argv[1], video_backend="pyav")
print(len(ds), flush=True)
sys.stdin.readline()  # the store is compacted meanwhile
n = 0
for i in range(len(ds)):
    item = ds[i]
    assert item["observation.images.laptop"].shape[0] == 3
    n += 1
print(n, flush=True)
"""


@pytest.mark.lerobot
def test_a_reader_of_the_previous_version_reads_every_item_after_compaction(tmp_path):
    rec, store = tmp_path / "rec", tmp_path / "store"
    w = RecordingWriter(rec, RecordingSpec())
    for ep in range(5):
        w.write_episode(ep, 6)
        ingest(rec, store)  # one set of files per commit
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    p = subprocess.Popen([sys.executable, "-c", READER, str(store)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "30", p.stderr.read()
    r = compact(store)
    assert r.rewritten and all(rel in Store.open(store).retained() for rel in r.rewritten)
    assert all((store / rel).is_file() for rel in r.rewritten if rel.startswith("videos/"))  # at their paths
    assert not any((store / rel).exists() for rel in r.rewritten if not rel.startswith("videos/"))  # not globbed
    out, err = p.communicate("go\n", timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert out.strip() == "30"

    assert scrub(store).ok and validate_fast(store, against=rec).ok  # retained files are neither EXTRA nor orphans
    s = Store.open(store)
    with s.lock():
        assert s.vacuum(3600) == (0, 0)  # younger than the retention period: kept
        files, size = s.vacuum(0)
    assert files == len(r.rewritten) and size > 0 and s.retained() == {}
    assert not (store / ".conveyor" / "retained").exists() or not any((store / ".conveyor/retained").iterdir())
    assert scrub(store).ok and validate_fast(store, against=rec).ok
    w.write_episode(5, 6)
    assert ingest(rec, store).new_episodes == 1 and validate_fast(store, against=rec).ok


@pytest.mark.parametrize("point", ["swapped:data/chunk-000", "swapped:meta/episodes/chunk-000", "head"])
def test_compaction_killed_mid_swap_rolls_forward(tmp_path, point):
    """The folder swap is part of the recorded commit's roll-forward: a kill -9 right after a folder was
    exchanged leaves a store that opens as the compacted version, validates and scrubs clean."""
    import signal

    from conveyor.store import CRASH_ENV

    rec, store = tmp_path / "rec", tmp_path / "store"
    w = RecordingWriter(rec, RecordingSpec())
    for ep in range(4):
        w.write_episode(ep, 5)
        ingest(rec, store)
    p = subprocess.run([sys.executable, "-m", "conveyor.cli", "compact", str(store)], capture_output=True,
                       text=True, env=dict(os.environ, **{CRASH_ENV: point}), cwd=ROOT, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    s = Store.open(store)  # rolls the recorded commit forward
    assert s.version.commit == 5 and s.version.total_episodes == 4
    assert sorted(x.name for x in (store / "data/chunk-000").iterdir()) == ["file-004.parquet"]
    assert scrub(store).ok and validate_fast(store, against=rec).ok
