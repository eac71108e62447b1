"""The Prefect service: watcher, ingest flow, training trigger, `conveyor up` -- on real servers and files.

A simulated recorder (`conveyor.synthetic.recording.RecordingWriter`) writes episodes exactly as the old recorder does:
parquet and mp4s first, the jsonl lines last; `finish=False` leaves an episode half-written.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conveyor.processes import free_port, marked_pids, port_in_use
from conveyor.settings import Settings
from conveyor.store import Store
from conveyor.service.supervisor import api
from conveyor.synthetic.recording import CameraSpec, RecordingSpec, RecordingWriter
from conveyor.watcher import EpisodeWatcher

ROOT = Path(__file__).resolve().parent.parent
SPEC = RecordingSpec(fps=30, cameras=(CameraSpec("observation.images.laptop"), CameraSpec("observation.images.phone")))
LEN = 8


# -- helpers ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _drain_prefect_workers():
    """Send this module's queued Prefect logs/events while the session server still runs: drained at exit
    instead, they retry against a stopped server for about a minute."""
    yield
    if "prefect.logging.handlers" in sys.modules:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=20)
        EventsWorker.drain_all(timeout=20)


def wait_for(cond, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def write_config(tmp: Path, name: str, *, extra: str = "") -> Path:
    cfg = tmp / "conveyor.toml"
    cfg.write_text(f"""
store_root = "stores"
work_dir = "work"
[[sources]]
name = "{name}"
path = "rec"
task = "pick the cube"
[watch]
settle_seconds = 0.3
debounce_seconds = 0.1
rescan_seconds = 5
{extra}
""", encoding="utf-8")
    return cfg


def store_sources(store: Path) -> list[int]:
    """Source episode indices in the store, in store order (duplicates would show twice)."""
    if not (store / ".conveyor").is_dir():
        return []
    return [r.source_episode_index for r in Store.open(store).ledger()]


def corrupt_episode(w: RecordingWriter, ep: int) -> None:
    """Write an episode whose parquet is truncated, then its jsonl line (the recorder 'finished' it)."""
    files = w.write_episode(ep, LEN, "pick the cube", finish=False)
    files.parquet.write_bytes(files.parquet.read_bytes()[: files.parquet.stat().st_size // 2])
    w.finish_episode(ep)


def flow_runs(api_url: str, flow: str, **params) -> list[dict]:
    status, runs = api(api_url, "POST", "/flow_runs/filter",
                       {"flows": {"name": {"any_": [flow]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 200})
    assert status == 200, runs
    return [r for r in runs if all(r["parameters"].get(k) == v for k, v in params.items())]


def artifacts(api_url: str, key: str) -> list[dict]:
    status, arts = api(api_url, "POST", "/artifacts/filter", {"artifacts": {"key": {"any_": [key]}},
                                                              "sort": "CREATED_DESC"})
    assert status == 200, arts
    return arts[::-1]  # oldest first: [-1] is the newest


# -- watcher, no Prefect ------------------------------------------------------------------------------------

def test_watcher_hands_over_only_complete_settled_episodes(tmp_path):
    rec = tmp_path / "rec"
    w = RecordingWriter(rec, SPEC)
    w.write_episode(0, LEN)
    w.write_episode(1, LEN, finish=False)  # still recording: files there, no jsonl line
    calls: list[tuple[str, list[int], float]] = []
    fail_once = {"armed": False}

    def on_ready(name, eps):
        if fail_once["armed"]:
            fail_once["armed"] = False
            raise OSError("flaky ingest")
        calls.append((name, eps, time.time()))

    watcher = EpisodeWatcher({"rec": rec}, on_ready=on_ready, settle_seconds=0.5, debounce_seconds=0.1,
                             rescan_seconds=2.0, on_error=lambda n, e: None)
    stop = threading.Event()
    t = threading.Thread(target=watcher.run, kwargs={"stop": stop}, daemon=True)
    t.start()
    try:
        wait_for(lambda: calls, 10, "episode 0")
        time.sleep(1.0)
        assert [c[1] for c in calls] == [[0]], "the half-written episode must not be handed over"

        w.finish_episode(1)
        wait_for(lambda: len(calls) == 2, 5, "episode 1 once finished")
        assert calls[1][1] == [1]

        # a finished episode whose files prove they are final is handed over without waiting to settle
        w.write_episode(2, LEN)
        finished = time.time()
        wait_for(lambda: len(calls) == 3, 5, "episode 2")
        assert calls[2][1] == [2] and calls[2][2] - finished < 0.5

        # a broken episode is handed over too (ingest quarantines it), but only once its files have been
        # quiet for settle_seconds (it may be a copy still landing); a failing callback is retried
        fail_once["armed"] = True
        corrupt_episode(w, 3)
        finished = time.time()
        wait_for(lambda: len(calls) == 4, 8, "episode 3 again after the callback failed once")
        assert calls[3][1] == [3] and not fail_once["armed"] and calls[3][2] - finished >= 0.4
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()


def test_watcher_survives_a_source_that_appears_later(tmp_path):
    rec = tmp_path / "later"
    calls, errors = [], []
    watcher = EpisodeWatcher({"later": rec}, on_ready=lambda n, e: calls.append(e), settle_seconds=0.0,
                             debounce_seconds=0.05, rescan_seconds=0.5, on_error=lambda n, e: errors.append(str(e)))
    stop = threading.Event()
    t = threading.Thread(target=watcher.run, kwargs={"stop": stop}, daemon=True)
    t.start()
    try:
        wait_for(lambda: errors, 5, "the missing folder to be reported")
        RecordingWriter(rec, SPEC).write_episode(0, LEN)
        wait_for(lambda: calls == [[0]], 10, "episode 0 of a folder created after the watcher started")
        assert len(errors) <= 2  # reported once per distinct problem, not on every rescan
    finally:
        stop.set()
        t.join(10)


# -- ingest flow on the session's Prefect server ----------------------------------------------------------

@pytest.fixture
def prefect_api(prefect_server) -> str:
    """The session server's API URL, made current for in-process flows.

    Prefect snapshots the environment into its settings context at import; this module imports prefect
    at collection time, before the `prefect_server` fixture sets PREFECT_API_URL, so refresh it here.
    """
    import prefect.context

    prefect.context.refresh_global_settings_context()
    return prefect_server.api_url


@pytest.mark.lerobot
def test_ingest_flow_lands_good_episodes_quarantines_bad_and_records_artifacts(prefect_api, tmp_path):
    from flows.ingest import ingest

    name = "q-src"
    cfg = write_config(tmp_path, name)
    w = RecordingWriter(tmp_path / "rec", SPEC)
    w.write_episode(0, LEN)
    corrupt_episode(w, 1)
    w.write_episode(2, LEN + 2)
    w.write_episode(3, LEN, finish=False)  # still being recorded
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "rec").rglob("*") if p.is_file()}

    res = ingest(source=name, config=str(cfg), deep=True)

    store = tmp_path / "stores" / name
    assert store_sources(store) == [0, 2]
    assert sorted(res["quarantined"]) == [1] and "parquet" in res["quarantined"][1]
    assert res["incomplete"] == [3] and res["version"]["total_episodes"] == 2
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "rec").rglob("*") if p.is_file()} == before

    api_url = prefect_api
    [run] = flow_runs(api_url, "ingest", source=name)
    assert run["state"]["type"] == "COMPLETED"
    status, tasks = api(api_url, "POST", "/task_runs/filter",
                        {"task_runs": {"flow_run_id": {"any_": [run["id"]]}}})
    names = {t["name"].rsplit("-", 1)[0]: t["state"]["type"] for t in tasks}
    assert names == {"append-episodes": "COMPLETED", "validate-fast": "COMPLETED", "validate-deep": "COMPLETED",
                     "record-version": "COMPLETED", "publish-version": "COMPLETED", "review-sheet": "COMPLETED"}, names
    [table] = artifacts(api_url, f"ingest-{name}")
    assert table["type"] == "table" and table["flow_run_id"] == run["id"]
    rows = json.loads(table["data"])
    assert [(r["source episode"], r["store episode"], r["frames"]) for r in rows] == [(0, 0, LEN), (2, 1, LEN + 2)]
    assert rows[1]["task"] == "pick the cube" and rows[1]["camera files"].count(".mp4") == 2
    [quarantine] = artifacts(api_url, f"quarantine-{name}")
    assert quarantine["type"] == "markdown" and "| 1 |" in quarantine["data"]
    [progress] = artifacts(api_url, f"ingest-progress-{name}")
    assert progress["type"] == "progress" and float(progress["data"]) == 100.0
    [version] = artifacts(api_url, f"version-{name}")
    assert Store.open(store).version.content_hash in version["data"]

    # the half-written episode lands once finished; a second run adds nothing twice
    w.finish_episode(3)
    res = ingest(source=name, config=str(cfg), deep=False)
    assert res["added"] == [2] and store_sources(store) == [0, 2, 3]
    ingest(source=name, config=str(cfg), deep=False)
    assert store_sources(store) == [0, 2, 3]


def test_overlapping_ingest_runs_never_corrupt_the_store(prefect_api, tmp_path):
    from conveyor.validate import validate_fast

    name = "overlap-src"
    cfg = write_config(tmp_path, name)
    w = RecordingWriter(tmp_path / "rec", SPEC)
    for ep in range(6):
        w.write_episode(ep, LEN + ep)
    status, _ = api(prefect_api, "POST", "/v2/concurrency_limits/", {"name": f"store-{name}", "limit": 1})
    assert status in (200, 201)
    code = f"from flows.ingest import ingest; ingest(source={name!r}, config={str(cfg)!r}, deep=False)"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=os.environ.copy(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    store = tmp_path / "stores" / name
    assert store_sources(store) == list(range(6))
    report = validate_fast(store, against=tmp_path / "rec")
    assert report.ok, report.failures
    runs = flow_runs(prefect_api, "ingest", source=name)
    assert [r["state"]["type"] for r in runs] == ["COMPLETED", "COMPLETED"]
    added = sorted(len(r) for r in (json.loads(a["data"]) for a in artifacts(prefect_api, f"ingest-{name}")))
    assert added == [6], "exactly one of the two runs lands the episodes, the other finds nothing new"


# -- training trigger -------------------------------------------------------------------------------------

def deploy_train_stub() -> None:
    """Register `train-stub/stub`, standing in for the training deployment: its runs' parameters are the
    record (no worker runs them). Defined lazily: importing prefect at collection time, before the
    `prefect_server` fixture sets PREFECT_API_URL, would point other modules' flows at no server."""
    from prefect import flow

    @flow(name="train-stub")
    def train_stub(store: str, dataset: str, content_hash: str, episodes: int) -> None:
        pass

    train_stub.to_deployment(name="stub").apply()


def test_training_trigger_is_idempotent_per_dataset_version(prefect_api, tmp_path):
    from flows.ingest import ingest

    deploy_train_stub()
    name = "train-src"
    cfg = write_config(tmp_path, name, extra="""
[training]
policy = "every_n"
every_n = 2
deployment = "train-stub/stub"
parameters = { store = "{store}", dataset = "{store_path}", content_hash = "{content_hash}", episodes = "{total_episodes}" }
""")
    w = RecordingWriter(tmp_path / "rec", SPEC)
    for ep in range(3):
        w.write_episode(ep, LEN)
    api_url = prefect_api
    store = tmp_path / "stores" / name

    first = ingest(source=name, config=str(cfg), deep=False)  # 0 -> 3 episodes crosses 2: trigger
    v1 = Store.open(store).version
    assert first["training_run"]
    runs = flow_runs(api_url, "train-stub", store=name)
    assert len(runs) == 1
    assert runs[0]["id"] == first["training_run"]
    assert runs[0]["parameters"] == {"store": name, "dataset": str(store), "content_hash": v1.content_hash,
                                     "episodes": 3}

    # nothing new: the policy does not fire; forcing it (what a retried ingest does) reuses the same run
    assert ingest(source=name, config=str(cfg), deep=False)["training_run"] is None
    again = ingest(source=name, config=str(cfg), deep=False, train=True)
    assert again["training_run"] == first["training_run"]
    assert len(flow_runs(api_url, "train-stub", store=name)) == 1

    w.write_episode(3, LEN)  # 3 -> 4 crosses 4: a new version, a new training run
    fourth = ingest(source=name, config=str(cfg), deep=False)
    runs = flow_runs(api_url, "train-stub", store=name)
    assert len(runs) == 2 and fourth["training_run"] == runs[1]["id"]
    assert runs[1]["parameters"]["content_hash"] == Store.open(store).version.content_hash != v1.content_hash


# -- the watch flow, end to end ---------------------------------------------------------------------------

def test_watch_flow_lands_finished_episodes_as_child_ingest_runs(prefect_api, tmp_path):
    from flows.watch import stop_watching, watch

    name = "watch-src"
    cfg = write_config(tmp_path, name)
    rec, store = tmp_path / "rec", tmp_path / "stores" / name
    w = RecordingWriter(rec, SPEC)
    w.write_episode(0, LEN)
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("runs", watch(config=str(cfg), deep=True,
                                                                        max_seconds=240)), daemon=True)
    t.start()
    try:
        wait_for(lambda: store_sources(store) == [0], 60, "episode 0 (written before the watcher started)")
        w.write_episode(1, LEN)
        w.write_episode(2, LEN, finish=False)  # recorder still busy with episode 2
        corrupt_episode(w, 3)
        w.write_episode(4, LEN)
        wait_for(lambda: store_sources(store) == [0, 1, 4], 30, "episodes 1 and 4")
        time.sleep(1.5)
        assert store_sources(store) == [0, 1, 4], "half-written episode 2 must not land"
        w.finish_episode(2)
        wait_for(lambda: store_sources(store) == [0, 1, 4, 2], 30, "episode 2 once finished")
    finally:
        stop_watching()
        t.join(60)
    assert not t.is_alive() and result["runs"] >= 2

    [watch_run] = flow_runs(prefect_api, "watch", config=str(cfg))
    assert watch_run["state"]["type"] == "COMPLETED"
    runs = flow_runs(prefect_api, "ingest", source=name)
    assert runs and all(r["state"]["type"] == "COMPLETED" for r in runs)
    assert all(r["parent_task_run_id"] for r in runs), "ingest runs are subflows of the watch run"
    status, tasks = api(prefect_api, "POST", "/task_runs/filter",
                        {"task_runs": {"flow_run_id": {"any_": [watch_run["id"]]}}})
    deep = [t for t in tasks if t["name"].startswith("validate-deep")]
    assert deep and all(t["state"]["type"] == "COMPLETED" for t in deep), "deep checks run in the watch run"
    # review sheets: made by tasks of the watch run (off the latency path), attached to the ingest runs
    made = [t for t in tasks if t["name"].startswith("review-sheet")]
    assert made and all(t["state"]["type"] == "COMPLETED" for t in made), "review sheets run in the watch run"
    reviews = artifacts(prefect_api, f"review-{name}")
    assert {a["flow_run_id"] for a in reviews} <= {r["id"] for r in runs}
    assert sum(int(re.search(r"review (\d+) new episode", a["description"])[1]) for a in reviews) == 4
    quarantines = artifacts(prefect_api, f"quarantine-{name}")
    assert quarantines and all("| 3 |" in a["data"] for a in quarantines)
    from conveyor.validate import validate_fast
    assert validate_fast(store, against=rec).ok


# -- conveyor up ------------------------------------------------------------------------------------------

def _pids_with_env(needle: str) -> list[int]:
    """Processes whose environment carries `needle` (`KEY=VALUE`)."""
    key, _, value = needle.partition("=")
    return marked_pids(value, key)


@pytest.mark.prefect
@pytest.mark.slow
def test_conveyor_up_runs_the_service_and_stops_cleanly(tmp_path):
    name = "up-src"
    port = free_port()
    home = tmp_path / "phome"
    cfg = write_config(tmp_path, name, extra=f'[prefect]\nhome = "phome"\nport = {port}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    cmd = [sys.executable, "-m", "conveyor.cli", "--config", str(cfg), "up"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        wait_for(lambda: any("conveyor is up" in x for x in lines) or proc.poll() is not None, 180, "conveyor up")
        assert proc.poll() is None, "".join(lines)
        assert any(f"http://127.0.0.1:{port}" in x for x in lines)

        # a second `up` on the busy port, or on the same PREFECT_HOME, is refused with a clear message
        (tmp_path / "other").mkdir()
        other = write_config(tmp_path / "other", name, extra=f'[prefect]\nhome = "phome2"\nport = {port}\n')
        busy = subprocess.run([sys.executable, "-m", "conveyor.cli", "--config", str(other), "up"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert busy.returncode == 1 and f"127.0.0.1:{port}: port is already in use" in busy.stderr, busy.stderr
        same_home = subprocess.run(cmd + ["--port", str(free_port())], env=env, capture_output=True, text=True,
                                   timeout=60)
        assert same_home.returncode == 1 and "another `conveyor up` uses this PREFECT_HOME" in same_home.stderr

        # episodes recorded while the service runs land in the store through the worker-started watch run
        w = RecordingWriter(tmp_path / "rec", SPEC)
        w.write_episode(0, LEN)
        w.write_episode(1, LEN, finish=False)
        store = tmp_path / "stores" / name
        wait_for(lambda: store_sources(store) == [0], 120, "episode 0 in the store")
        w.finish_episode(1)
        wait_for(lambda: store_sources(store) == [0, 1], 60, "episode 1 in the store")
        [watch_run] = flow_runs(api_url, "watch")
        assert watch_run["state"]["type"] == "RUNNING" and watch_run["deployment_id"]
        seen: list = []

        def ingests_completed() -> bool:
            seen[:] = [(r["name"], r["state"]["type"], r["state"].get("message"))
                       for r in flow_runs(api_url, "ingest", source=name)]
            return bool(seen) and all(s == "COMPLETED" for _, s, _ in seen)

        try:
            wait_for(ingests_completed, 120, "the ingest runs (validation after the commit) to complete")
        except AssertionError as e:
            raise AssertionError(f"{e}: {seen}\n{''.join(lines)}") from None
        ingest_runs = flow_runs(api_url, "ingest", source=name)
        assert ingest_runs and all(r["parent_task_run_id"] for r in ingest_runs)
        status, pools = api(api_url, "POST", "/work_pools/filter", {})
        assert {"cpu", "gpu"} <= {p["name"] for p in pools}
        # the cpu flows are this machine's: `<flow>/<flow> on <machine>` on its own work queue, which its cpu
        # worker polls (the pool's default queue, which nobody polls, is paused: no red warning in the UI)
        status, deps = api(api_url, "POST", "/deployments/filter", {})
        status, flows = api(api_url, "POST", "/flows/filter", {})
        flow_name = {f["id"]: f["name"] for f in flows}
        by_flow = {flow_name[d["flow_id"]]: d for d in deps}
        machine = Settings().prefect.machine
        assert {f: (d["name"], d["work_pool_name"], d["work_queue_name"]) for f, d in by_flow.items()} == {
            **{f: (f"{f} on {machine}", "cpu", machine) for f in ("watch", "ingest", "curate", "nightly", "backup")},
            "train": ("train", "gpu", "default"), "evaluate": ("evaluate", "gpu", "default")}
        assert by_flow["nightly"]["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
        assert flow_runs(api_url, "watch")[0]["work_queue_name"] == machine
        assert any(f"deployments: watch/watch on {machine}, ingest/ingest on {machine}" in x for x in lines), \
            "".join(lines)
        status, queue = api(api_url, "GET", "/work_pools/cpu/queues/default")
        assert queue["is_paused"] and queue["status"] == "PAUSED", queue
        assert _pids_with_env(f"PREFECT_HOME={home}"), "server and workers run with the project-local home"

        # the watcher process dies: Prefect shows the run as crashed and `conveyor up` starts a new one
        for pid in _pids_with_env(f"PREFECT__FLOW_RUN_ID={watch_run['id']}"):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: [r["state"]["type"] for r in flow_runs(api_url, "watch")][:1] in (["CRASHED"], ["FAILED"])
                 and [r["state"]["type"] for r in flow_runs(api_url, "watch")][1:] == ["RUNNING"], 90,
                 "a crashed watch run and a new running one")
        w.write_episode(2, LEN)
        wait_for(lambda: store_sources(store) == [0, 1, 2], 60, "episode 2 through the restarted watcher")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        reader.join(5)
    assert rc == 0, "".join(lines)
    assert "conveyor: stopped" in "".join(lines)
    assert _pids_with_env(f"PREFECT_HOME={home}") == [], "no orphan processes"
    assert not port_in_use("127.0.0.1", port)
    assert (home / "prefect.db").exists()


class Up:
    """A `conveyor up` subprocess with its output collected line by line."""

    def __init__(self, cwd: Path, *args: str, env: dict | None = None):
        env = env or {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.proc = subprocess.Popen([sys.executable, "-m", "conveyor.cli", *args], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")),
                                       daemon=True)
        self.reader.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_up(self, timeout: float = 180) -> None:
        wait_for(lambda: "conveyor is up" in self.text or self.proc.poll() is not None, timeout, "conveyor up")
        assert self.proc.poll() is None, self.text

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.reader.join(5)
        return rc


def record(w: RecordingWriter, episodes: range, interval: float, stop: threading.Event) -> threading.Thread:
    """The recorder keeps going in the background: one finished episode every `interval` seconds."""
    def go():
        for ep in episodes:
            if stop.wait(interval):
                return
            w.write_episode(ep, LEN)
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


@pytest.mark.prefect
@pytest.mark.slow
def test_up_restarts_its_killed_prefect_server_and_lands_every_episode_once(tmp_path):
    """Hostile: SIGKILL the server of `conveyor up` while the recorder keeps writing. `up` restarts it on the
    same port and database; the watcher rides out the outage (a failed ingest is offered again); every
    episode lands exactly once."""
    from conveyor.validate import validate_fast

    name, port, home = "hostile-src", free_port(), tmp_path / "phome"
    cfg = write_config(tmp_path, name, extra=f'[prefect]\nhome = "phome"\nport = {port}\n')
    api_url = f"http://127.0.0.1:{port}/api"
    rec, store = tmp_path / "rec", tmp_path / "stores" / name
    w = RecordingWriter(rec, SPEC)
    w.write_episode(0, LEN)
    up = Up(tmp_path, "--config", str(cfg), "up")
    stop = threading.Event()
    try:
        up.wait_up()
        for where in ("stores:", "work folder:", "objects:", "cache:", "logs:"):
            assert where in up.text, up.text
        assert f"{tmp_path / 'stores'}  ({name})" in up.text and str(home / "server.log") in up.text
        wait_for(lambda: store_sources(store) == [0], 120, "episode 0 in the store")
        recorder = record(w, range(1, 13), 0.7, stop)
        wait_for(lambda: len(store_sources(store)) >= 3, 60, "episodes landing before the kill")
        [server] = [p for p in _pids_with_env(f"PREFECT_HOME={home}")
                    if b"server" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")]
        os.kill(server, signal.SIGKILL)
        wait_for(lambda: "Prefect server is back" in up.text or up.proc.poll() is not None, 120, "the restart")
        assert up.proc.poll() is None and "Prefect server exited (code -9); restarting it" in up.text, up.text
        recorder.join(30)
        try:
            wait_for(lambda: store_sources(store) == list(range(13)), 120, "all 13 episodes, once each")
        except AssertionError as e:
            log = (home / "worker-cpu.log").read_text(errors="replace")[-6000:]
            raise AssertionError(f"{e}; store has {store_sources(store)}\n{up.text}\n{log}") from None
        time.sleep(3)  # nothing more lands late (a duplicate would show here)
        assert store_sources(store) == list(range(13))
        assert Store.open(store).version.total_episodes == 13
        assert validate_fast(store, against=rec).ok
        [new_server] = [p for p in _pids_with_env(f"PREFECT_HOME={home}")
                        if b"server" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")]
        assert new_server != server
        running = [r for r in flow_runs(api_url, "watch") if r["state"]["type"] == "RUNNING"]
        assert len(running) == 1, "one watcher, not two"
    finally:
        stop.set()
        rc = up.stop()
    assert rc == 0, up.text
    assert _pids_with_env(f"PREFECT_HOME={home}") == [], "no orphan processes"
    assert not port_in_use("127.0.0.1", port)


@pytest.mark.slow
def test_up_joins_an_existing_server(prefect_api, tmp_path):
    """`conveyor up --api-url URL --pools cpu` starts no server: it registers pools, limits and deployments on
    the given one (here the session's SQLite server) and runs the watcher and a cpu worker here."""
    name = "join-src"
    cfg = write_config(tmp_path, name, extra='[prefect]\nhome = "phome"\n')
    w = RecordingWriter(tmp_path / "rec", SPEC)
    w.write_episode(0, LEN)
    store = tmp_path / "stores" / name
    up = Up(tmp_path, "--config", str(cfg), "up", "--api-url", prefect_api, "--pools", "cpu")
    try:
        up.wait_up()
        assert f"joining the Prefect server at {prefect_api}" in up.text and "starting Prefect server" not in up.text
        assert "workers here: cpu" in up.text
        wait_for(lambda: store_sources(store) == [0], 120, "episode 0 through the joined server")
        w.write_episode(1, LEN)
        wait_for(lambda: store_sources(store) == [0, 1], 60, "episode 1")
        [watch_run] = [r for r in flow_runs(prefect_api, "watch") if r["state"]["type"] == "RUNNING"]
        assert watch_run["deployment_id"]
        assert api(prefect_api, "GET", f"/v2/concurrency_limits/store-{name}")[0] == 200
        status, automations = api(prefect_api, "POST", "/automations/filter", {})
        assert "conveyor: rescue lost train runs" in {a["name"] for a in automations}
        status, dep = api(prefect_api, "GET", "/deployments/name/train/train")
        step = dep["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
        assert step["directory"] == "{{ $CONVEYOR_PROJECT_DIR }}", "each worker resolves its own checkout"
        status, workers = api(prefect_api, "POST", "/work_pools/gpu/workers/filter", {})
        assert not [x for x in workers if x["status"] == "ONLINE" and "conveyor-gpu" in x["name"]]
    finally:
        rc = up.stop()
    assert rc == 0, up.text
    assert [r["state"]["type"] for r in flow_runs(prefect_api, "watch") if r["id"] == watch_run["id"]] == ["CANCELLED"]
    assert _pids_with_env(f"PREFECT_HOME={tmp_path / 'phome'}") == [], "no orphan processes"
    assert api(prefect_api, "GET", "/health")[0] == 200, "the joined server keeps running"


def test_worker_joins_a_server_serves_a_pool_and_stops_cleanly(prefect_api, tmp_path):
    """`conveyor worker --pool gpu --api-url URL`: one command joins this machine; it says what it serves,
    shows up in the pool, and SIGTERM stops it and everything it started."""
    cfg = write_config(tmp_path, "w-src")
    cfg.write_text('storage_url = "file://objects"\ncache_dir = "cache"\n' + cfg.read_text(), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CONVEYOR_"))}
    cmd = [sys.executable, "-m", "conveyor.cli", "worker", "--pool", "gpu", "--config", str(cfg)]
    missing = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "pass --api-url URL" in missing.stderr
    nobody = f"http://127.0.0.1:{free_port()}/api"
    gone = subprocess.run(cmd + ["--api-url", nobody], env=env, capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1 and f"{nobody}: no Prefect server answers" in gone.stderr, gone.stderr

    proc = subprocess.Popen(cmd + ["--api-url", prefect_api, "--name", "w-test"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        def online():
            status, ws = api(prefect_api, "POST", "/work_pools/gpu/workers/filter", {})
            return status == 200 and any(w["name"] == "w-test" and w["status"] == "ONLINE" for w in ws)
        wait_for(lambda: online() or proc.poll() is not None, 90, "the worker online in pool gpu")
        assert proc.poll() is None, "".join(lines)
        said = " ".join("".join(lines).split())
        for part in ("serving pool gpu", f"Prefect API: {prefect_api}", f"config: {cfg}",
                     f"store_root: {tmp_path / 'stores'}", f"work_dir: {tmp_path / 'work'}",
                     f"cache_dir: {tmp_path / 'cache'}", f"storage: file://{tmp_path / 'objects'}",
                     f"project: {ROOT}"):
            assert part in said, said
        assert _pids_with_env(f"CONVEYOR_CACHE_DIR={tmp_path / 'cache'}"), "the worker carries the resolved paths"
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        reader.join(5)
    assert rc == 0 and "conveyor worker: stopped" in "".join(lines), "".join(lines)
    assert _pids_with_env(f"CONVEYOR_CONFIG={cfg}") == [], "no orphan processes"


# -- shipped Prefect configuration ------------------------------------------------------------------------

def _prefect_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "--no-prompt", *args], cwd=ROOT,
                            env=env or os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_shipped_pool_templates_and_prefect_yaml_register(prefect_api):
    """Every file in deployments/ is accepted as a base job template; `prefect deploy --all` registers all."""
    types = {"process-pool.json": "process", "kubernetes-gpu.json": "kubernetes", "docker-gpu.json": "docker"}
    files = sorted((ROOT / "deployments").glob("*.json"))
    assert {f.name for f in files} == set(types)
    procs = {f: _prefect_cli("work-pool", "create", f"tmpl-{f.stem}", "--type", types[f.name],
                             "--base-job-template", str(f), "--overwrite") for f in files}
    procs["cpu"] = _prefect_cli("work-pool", "create", "cpu", "--type", "process", "--overwrite")
    procs["gpu"] = _prefect_cli("work-pool", "create", "gpu", "--type", "process", "--overwrite")
    for key, p in procs.items():
        out = p.communicate(timeout=120)[0]
        assert p.returncode == 0, f"{key}: {out}"
    for f in files:
        status, pool = api(prefect_api, "GET", f"/work_pools/tmpl-{f.stem}")
        assert status == 200 and pool["base_job_template"] == json.loads(f.read_text())
    k8s = json.loads((ROOT / "deployments" / "kubernetes-gpu.json").read_text())
    container = k8s["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    # the dataset cache lives on a volume mounted at the cache_dir the flows are told about
    assert {"name": "cache", "mountPath": "{{ cache_mount }}"} in container["volumeMounts"]
    props = k8s["variables"]["properties"]
    assert props["env"]["default"]["CONVEYOR_CACHE_DIR"] == props["cache_mount"]["default"] == "/cache"

    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_PROJECT_DIR"}
    p = _prefect_cli("deploy", "--all", env=env)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out
    status, deps = api(prefect_api, "POST", "/deployments/filter", {"flows": {"name": {"any_": [
        "watch", "ingest", "nightly", "train", "backup"]}}})
    by_name = {d["name"]: d for d in deps}
    assert {n: by_name[n]["work_pool_name"] for n in ("watch", "ingest", "nightly", "train", "backup")} == \
        {"watch": "cpu", "ingest": "cpu", "nightly": "cpu", "train": "gpu", "backup": "cpu"}
    assert by_name["train"]["entrypoint"] == "flows/train.py:train"
    assert by_name["backup"]["entrypoint"] == "flows/backup.py:backup"
    sched = by_name["nightly"]["schedules"][0]["schedule"]
    assert (sched["cron"], sched["timezone"]) == ("0 2 * * *", "UTC")
    assert by_name["backup"]["schedules"][0]["schedule"]["cron"] == "30 3 * * *"
    # without CONVEYOR_PROJECT_DIR at deploy time, each worker resolves its own checkout at run time
    step = by_name["watch"]["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
    assert step["directory"] == "{{ $CONVEYOR_PROJECT_DIR }}"


def test_a_cpu_deployment_on_the_default_queue_is_replaced_on_an_own_server_and_named_on_a_shared_one(prefect_api):
    """`conveyor up` registers the cpu flows as `<flow>/<flow> on <machine>`; a `backup/backup` left from an older conveyor
    would send its runs to a queue no conveyor worker polls. On the server `up` started it is removed; on a
    server it joined it is named, with the command that removes it."""
    from conveyor.service.supervisor import Supervisor

    api(prefect_api, "POST", "/work_pools/", {"name": "cpu", "type": "process"})  # 409 when it exists
    status, flow = api(prefect_api, "POST", "/flows/", {"name": "backup"})
    status, legacy = api(prefect_api, "POST", "/deployments/", {"name": "backup", "flow_id": flow["id"],
                                                                "work_pool_name": "cpu"})
    assert status in (200, 201) and legacy["work_queue_name"] == "default", legacy
    status, other = api(prefect_api, "POST", "/deployments/", {"name": "rig-old", "flow_id": flow["id"],
                                                               "work_pool_name": "cpu", "work_queue_name": "rig-old"})
    assert status in (200, 201) and other["work_queue_name"] == "rig-old", other
    kept = [{"entrypoint": "flows/backup.py:backup", "work_pool": {"name": "cpu"}}]
    said: list[str] = []
    joined = Supervisor(Settings(prefect={"machine": "rig-x"}), api_url=prefect_api, out=said.append)
    joined._warn_unserved(kept)
    assert said == ["note: deployment backup/backup sends its runs to pool cpu's default queue, which no "
                    "`conveyor up` worker polls (each takes its own machine's queue); delete it with "
                    "`prefect deployment delete backup/backup`"], "another machine's backup/rig-old is left alone"
    assert [api(prefect_api, "GET", f"/deployments/{d['id']}")[0] for d in (legacy, other)] == [200, 200]
    own = Supervisor(Settings(prefect={"machine": "rig-x"}), api_url=prefect_api, out=said.append)
    own.joined = False  # as if this `up` had started the server (another PC may have joined it)
    own._warn_unserved(kept)
    assert said[1:] == ["deployment backup/backup removed: replaced by backup/backup on rig-x"]
    assert [api(prefect_api, "GET", f"/deployments/{d['id']}")[0] for d in (legacy, other)] == [404, 200]


# -- nightly and demo -------------------------------------------------------------------------------------

@pytest.mark.lerobot
def test_nightly_catches_up_compacts_deep_checks_and_trains_once_per_version(prefect_api, tmp_path):
    from flows.ingest import ingest
    from flows.nightly import nightly

    deploy_train_stub()
    name = "nightly-src"
    cfg = write_config(tmp_path, name, extra="""
[training]
policy = "nightly"
deployment = "train-stub/stub"
parameters = { store = "{store}", dataset = "{store_path}", content_hash = "{content_hash}", episodes = "{total_episodes}" }
""")
    w = RecordingWriter(tmp_path / "rec", SPEC)
    store = tmp_path / "stores" / name
    w.write_episode(0, LEN)
    ingest(source=name, config=str(cfg), deep=False)          # daytime: one file per commit
    assert flow_runs(prefect_api, "train-stub", store=name) == [], "policy nightly: daytime ingest never trains"
    w.write_episode(1, LEN)                                  # the watcher "missed" this one
    def committed_files() -> int:  # what the version holds (compaction's replaced files stay on disk for readers)
        return sum(rel.endswith((".parquet", ".mp4")) for rel in Store.open(store).manifest())

    files_before = committed_files()

    rows = nightly(config=str(cfg))
    assert rows[name]["added"] == 1 and rows[name]["deep"] == "ok"
    assert rows[name]["files_after"] < rows[name]["files_before"]
    assert store_sources(store) == [0, 1]
    assert committed_files() < files_before + 3
    [run] = flow_runs(prefect_api, "train-stub", store=name)
    assert run["parameters"]["content_hash"] == Store.open(store).version.content_hash
    assert run["parameters"]["episodes"] == 2

    nightly(config=str(cfg))  # nothing new tonight: same version, so no second training run
    assert len(flow_runs(prefect_api, "train-stub", store=name)) == 1
    [report] = artifacts(prefect_api, "nightly-report")[-1:]
    assert name in report["data"]


def test_demo_recorder_writes_complete_episodes(tmp_path):
    from conveyor.synthetic.demo import record_demo
    from conveyor.source import scan_source

    said: list[str] = []
    assert record_demo(tmp_path / "demo", episodes=2, interval=0.05, length=5, out=said.append) == 2
    scan = scan_source(tmp_path / "demo")
    assert scan.complete == [0, 1] and not scan.incomplete and not scan.bad
    stop = threading.Event()
    stop.set()
    assert record_demo(tmp_path / "demo", episodes=3, stop=stop) == 0  # Ctrl-C during the pause: nothing more
    assert record_demo(tmp_path / "demo", episodes=1, interval=0.05, length=5, out=said.append) == 1
    assert scan_source(tmp_path / "demo").complete == [0, 1, 2]
    assert sum("recorded episode" in x for x in said) == 3


# -- retries ----------------------------------------------------------------------------------------------

def test_transient_errors_retry_and_bad_input_does_not(prefect_api, tmp_path):
    import errno

    from prefect import flow, task

    from conveyor.errors import ConveyorError
    from flows.ingest import ingest
    from tasks.retry import RETRY, retry_transient

    calls = {"io": 0, "bad": 0}

    @task(retries=3, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def flaky_io() -> str:
        calls["io"] += 1
        if calls["io"] < 3:
            raise OSError(errno.EIO, "Input/output error")
        return "ok"

    @task(retries=3, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def bad_input() -> None:
        calls["bad"] += 1
        raise ConveyorError("x.parquet", "corrupt parquet")

    @flow
    def probe() -> str:
        out = flaky_io()
        try:
            bad_input()
        except ConveyorError:
            pass
        return out

    assert probe() == "ok" and calls == {"io": 3, "bad": 1}
    assert RETRY["retry_condition_fn"] is retry_transient and RETRY["retries"] >= 1

    # the real ingest task: a source folder that is not a recording is bad input -> one attempt, flow fails
    name = "missing-src"
    cfg = write_config(tmp_path, name)
    with pytest.raises(ConveyorError, match="source folder does not exist"):
        ingest(source=name, config=str(cfg), deep=False)
    [run] = flow_runs(prefect_api, "ingest", source=name)
    assert run["state"]["type"] == "FAILED"
    status, tasks = api(prefect_api, "POST", "/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [run["id"]]}}})
    [append] = [t for t in tasks if t["name"].startswith("append-episodes")]
    assert append["run_count"] == 1 and append["state"]["type"] == "FAILED"
