"""A lerobot 0.6.1 session killed before finalize() and left alone is pointed at `conveyor salvage`.

Real killed recordings (`conveyor.synthetic.v30_session --end kill`); "left alone for 11 minutes" is an
old mtime on every file (os.utime), not a wait.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conveyor.ingest import ingest
from conveyor.source_v3 import ABANDONED_AFTER_S
from conveyor.watcher import EpisodeWatcher

pytestmark = pytest.mark.lerobot

ENV = dict(os.environ, HF_HUB_OFFLINE="1", SVT_LOG="1")


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """A session whose recorder was SIGKILLed after its 2nd save_episode (tests copy it)."""
    root = tmp_path_factory.mktemp("killed") / "session"
    p = subprocess.run([sys.executable, "-m", "conveyor.synthetic.v30_session", str(root), "--cameras", "1",
                        "--length", "10", "--episodes", "2", "--end", "kill"],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == -signal.SIGKILL and "saved 1" in p.stdout, p.stdout
    return root


def age(root: Path, seconds: float) -> None:
    t = time.time() - seconds
    for f in root.rglob("*"):
        os.utime(f, (t, t))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conveyor.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=ENV)


def test_a_killed_session_idle_past_the_limit_is_quarantined_with_the_salvage_command(killed, tmp_path):
    session, store = tmp_path / "killed", tmp_path / "store"
    shutil.copytree(killed, session)
    session = session.resolve()
    # just killed (or a recorder between episodes): still being recorded, nothing quarantined
    age(session, ABANDONED_AFTER_S - 120)
    r = ingest(session, store)
    assert r.added == [] and r.incomplete == [0, 1] and r.quarantined == []

    age(session, ABANDONED_AFTER_S + 60)
    reason = (f"looks abandoned (no change for {(ABANDONED_AFTER_S + 60) // 60} min): recover it with "
              f"`conveyor salvage {session} OUT`, then ingest OUT")
    p = cli("ingest", session, store)
    assert f"quarantined source episode 0: {reason}" in p.stdout + p.stderr
    assert f"quarantined source episode 1: {reason}" in p.stdout + p.stderr
    assert "still being recorded" not in p.stdout + p.stderr
    show = cli("show", store)
    assert "looks abandoned" in show.stdout and "conveyor salvage" in show.stdout, show.stdout + show.stderr

    # following the pointer lands both episodes
    out = tmp_path / "out"
    assert cli("salvage", session, out).returncode == 0
    r = ingest(out, store)
    assert [m.source_episode_index for m in r.added] == [0, 1]


def test_a_finalized_session_is_never_called_abandoned(tmp_path):
    root = tmp_path / "done"
    p = subprocess.run([sys.executable, "-m", "conveyor.synthetic.v30_session", str(root), "--cameras", "1",
                        "--length", "10", "--episodes", "2"], capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == 0, p.stderr
    age(root, 10 * ABANDONED_AFTER_S)
    r = ingest(root, tmp_path / "store")
    assert [m.source_episode_index for m in r.added] == [0, 1] and r.quarantined == [] and r.incomplete == []


def test_the_watcher_hands_an_abandoned_session_over_but_not_a_fresh_one(killed, tmp_path):
    lab = tmp_path / "lab"
    lab.mkdir()
    shutil.copytree(killed, lab / "fresh")
    shutil.copytree(killed, lab / "old")
    age(lab / "fresh", 60)  # killed a minute ago, or recording between episodes: wait
    age(lab / "old", ABANDONED_AFTER_S + 60)
    seen: list[list[int]] = []
    w = EpisodeWatcher({"lab": lab}, on_ready=lambda name, eps: seen.append(eps), rescan_seconds=60)
    stop = threading.Event()
    t = threading.Thread(target=w.run, kwargs={"stop": stop, "max_seconds": 20}, daemon=True)
    t.start()
    deadline = time.monotonic() + 15
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    stop.set()
    t.join(timeout=10)
    assert seen == [[0, 1]]  # the old session's two episodes, for ingest to quarantine with the pointer
