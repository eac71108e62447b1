"""Benchmark for issue 3: episode finished -> committed (and fast-validated) latency of the `watch` flow.

Not a test. Starts its own Prefect server (temp PREFECT_HOME, free port), runs the `watch` flow in this
process (as `conveyor up`'s worker does, with the service's settings defaults unless overridden), and a
simulated recorder (`conveyor.synthetic.recording.RecordingWriter`) that writes N episodes one every --interval
seconds, media first and the jsonl line last. For each episode it measures from the moment its last
file landed (the recorder's `finish_episode` returned) to
  * committed: the episode appears in the store's ledger (polled every 20 ms), and
  * fast-validated: the end of the first `validate-fast` task run that ends after that commit
    (end_time from the Prefect API).
Prints median / p95 / max and writes the `## watch latency` section of bench/README.md.

Usage: .venv/bin/python bench/watch_latency.py [--episodes 20] [--interval 4] [--length 90]
       [--size 240x320] [--no-deep] [--settle S] [--no-readme]
       .venv/bin/python bench/watch_latency.py --v30 [--sessions 8] [--episodes 3] [--length 30] [--size 96x128]

`--v30`: the source is a folder of v3.0 sessions, each recorded by lerobot 0.6.1's own recorder
(`conveyor.synthetic.v30_session` in a child process, one after the other); latency is from `finalize()`
returning (the child prints `done`) to the last of the session's episodes in the store's ledger, and goes to
the `## watch latency (v3.0 sessions)` section.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from readme_section import write_section  # bench/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "## watch latency"
SECTION_V30 = "## watch latency (v3.0 sessions)"

from conveyor.service.prefect_server import prefect_env, start_prefect_server  # noqa: E402
from conveyor.processes import free_port  # noqa: E402


def pctl(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _ts(iso: str | None) -> float | None:
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() if iso else None


def _all(api_url: str, path: str, body: dict) -> list[dict]:
    from conveyor.service.supervisor import api

    out, offset = [], 0
    while True:
        status, page = api(api_url, "POST", path, dict(body, limit=200, offset=offset))
        if status != 200 or not page:
            return out
        out += page
        offset += len(page)


READY = re.compile(r"episode\(s\) \[([\d, ]+)\] complete, ingesting")
STAGES = (  # (label, from, to): consecutive moments of one episode's way into the store
    ("detect: finished -> watcher hands it over (debounce + settle + scan)", "finished", "ready"),
    ("subflow start: hand-over -> ingest run running", "ready", "flow_start"),
    ("ingest run start -> append task running", "flow_start", "append_start"),
    ("append task (open, scan, load, write, commit) -> in the ledger", "append_start", "committed"),
    ("committed -> validate-fast running (task end, artifacts)", "committed", "validate_start"),
    ("validate-fast", "validate_start", "validated"),
    ("finished -> committed", "finished", "committed"),
)


def breakdown(api_url: str, finished: dict[int, float], committed: dict[int, float]) -> dict[int, dict]:
    """Each episode's moments, from Prefect's own records: the watch run's hand-over log line, the child
    ingest run that started next, and its append-episodes / validate-fast task runs."""
    watch_runs = _all(api_url, "/flow_runs/filter", {"flows": {"name": {"any_": ["watch"]}}})
    logs = _all(api_url, "/logs/filter", {"logs": {"flow_run_id": {"any_": [r["id"] for r in watch_runs]}}})
    handovers = sorted(_ts(lg["timestamp"]) for lg in logs if READY.search(lg["message"]))
    runs = sorted((r for r in _all(api_url, "/flow_runs/filter", {"flows": {"name": {"any_": ["ingest"]}}})
                   if r.get("start_time")), key=lambda r: _ts(r["start_time"]))
    tasks = _all(api_url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [r["id"] for r in runs]}}})
    by_run: dict[str, dict[str, dict]] = {}
    for t in tasks:
        by_run.setdefault(t["flow_run_id"], {})[t["name"].rsplit("-", 1)[0]] = t  # "validate-fast-0" -> task
    out: dict[int, dict] = {}
    for ep, t0 in finished.items():
        m: dict[str, float] = {"finished": t0}
        if ep not in committed:
            out[ep] = m
            continue
        m["committed"] = committed[ep]
        # the run that committed it (an ingest run takes every complete episode, not only the one handed
        # over), and the hand-over that started that run
        run = next((r for r in reversed(runs) if _ts(r["start_time"]) <= committed[ep]), None)
        if run is not None:
            start = _ts(run["start_time"])
            tr = by_run.get(run["id"], {})
            before = [h for h in handovers if h <= start]
            moments = {"ready": before[-1] if before else None, "flow_start": start,
                       "append_start": _ts(tr.get("append-episodes", {}).get("start_time"))}
            fast = tr.get("validate-fast")
            if fast and fast["state"]["type"] == "COMPLETED":
                moments |= {"validate_start": _ts(fast.get("start_time")), "validated": _ts(fast.get("end_time"))}
            # an episode finished after its run's earlier steps waited for nothing there: clip to finished
            m |= {k: max(v, t0) for k, v in moments.items() if v is not None}
        out[ep] = m
    return out


def stage_table(stages: dict[int, dict], finished: dict[int, float]) -> list[str]:
    lines = ["Where the time goes (per episode, from the watch run's hand-over log line and the child ingest "
             "run's task runs in the Prefect API):", "",
             "| stage | median (s) | p95 (s) | episodes |", "| --- | --- | --- | --- |"]
    for label, a, b in STAGES:
        v = [m[b] - m[a] for m in stages.values() if a in m and b in m]
        if v:
            lines.append(f"| {label} | {statistics.median(v):.2f} | {pctl(v, 0.95):.2f} | {len(v)} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--interval", type=float, default=4.0, help="seconds between finished episodes")
    p.add_argument("--length", type=int, default=90, help="frames per episode (30 fps)")
    p.add_argument("--size", default="240x320", help="HEIGHTxWIDTH of both cameras")
    p.add_argument("--no-deep", action="store_true", help="skip the deep (lerobot) check in the watcher's runs")
    p.add_argument("--settle", type=float, default=None, help="override watch.settle_seconds")
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--v30", action="store_true", help="a folder of lerobot 0.6.1 v3.0 sessions as the source")
    p.add_argument("--sessions", type=int, default=8, help="--v30: sessions to record")
    a = p.parse_args(argv)

    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", SVT_LOG="1")
    work = Path(tempfile.mkdtemp(prefix="watch-latency-"))
    server = start_prefect_server(work / "prefect", port=free_port())
    os.environ.update(prefect_env(work / "prefect", server.api_url, base={}))
    try:
        return run_v30(a, work) if a.v30 else run(a, work, server.api_url)
    finally:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=20)  # ship queued logs before the server goes away
        EventsWorker.drain_all(timeout=20)
        server.stop()


def run(a, work: Path, api_url: str) -> int:
    # imported after PREFECT_API_URL is set: Prefect snapshots its settings at import
    from conveyor.settings import WatchSettings
    from conveyor.store import Store
    from conveyor.synthetic.recording import CameraSpec, RecordingSpec, RecordingWriter
    from flows.watch import stop_watching, watch

    defaults = WatchSettings()
    settle = defaults.settle_seconds if a.settle is None else a.settle
    cfg = work / "conveyor.toml"
    cfg.write_text(f'store_root = "stores"\n[[sources]]\nname = "bench"\npath = "rec"\n'
                   f'[watch]\nsettle_seconds = {settle}\ndebounce_seconds = {defaults.debounce_seconds}\n',
                   encoding="utf-8")
    h, w = (int(v) for v in a.size.lower().split("x"))
    spec = RecordingSpec(fps=30, cameras=tuple(CameraSpec(k, h, w) for k in
                                               ("observation.images.laptop", "observation.images.phone")))
    writer = RecordingWriter(work / "rec", spec)
    store = work / "stores" / "bench"

    committed: dict[int, float] = {}
    stop_poll = threading.Event()

    def poll() -> None:
        while not stop_poll.is_set():
            if (store / ".conveyor").is_dir():
                now = time.time()
                for r in Store.open(store).ledger():
                    committed.setdefault(r.source_episode_index, now)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, kwargs={"config": str(cfg), "deep": not a.no_deep}, daemon=True)
    watcher.start()
    time.sleep(8.0)  # let the flow start and its first (empty) scan happen; imports are not what we measure
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()

    finished: dict[int, float] = {}
    for ep in range(a.episodes):
        t_next = time.monotonic() + a.interval
        writer.write_episode(ep, a.length, "pick the cube", finish=False)  # media (the slow part) first
        writer.finish_episode(ep)                                          # then the jsonl lines
        finished[ep] = time.time()
        time.sleep(max(0.0, t_next - time.monotonic()))
    deadline = time.monotonic() + 120
    while len(committed) < a.episodes and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3.0 if a.no_deep else 15.0)  # let the last run validate
    stop_watching()
    watcher.join(120)
    stop_poll.set()

    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=20)  # the hand-over log lines must be in the API before we read them
    lat_commit, lat_fast = [], []
    stages = breakdown(api_url, finished, committed)
    for ep, t0 in finished.items():
        if ep not in committed:
            continue
        lat_commit.append(committed[ep] - t0)
        if ep in stages and "validated" in stages[ep]:
            lat_fast.append(stages[ep]["validated"] - t0)
    missing = sorted(set(finished) - set(committed))
    def row(label: str, v: list[float]) -> str:
        if not v:
            return f"| {label} | - | - | - | 0 |"
        return f"| {label} | {statistics.median(v):.2f} | {pctl(v, 0.95):.2f} | {max(v):.2f} | {len(v)} |"

    text = "\n".join([
        SECTION, "",
        "`python bench/watch_latency.py` runs the `watch` flow in-process (as the worker started by `conveyor up`",
        "does) against its own Prefect server while a simulated recorder finishes one episode every "
        f"{a.interval:g} s", f"({a.episodes} episodes, {a.length} frames at 30 fps, two {h}x{w} AV1 cameras, media "
        "first, jsonl line last). Latency is from the recorder's last file landing to the episode in the store "
        "(ledger, polled every 20 ms) and to the end of the `validate-fast` task that covered it.",
        "",
        f"Settings: settle {settle:g} s (waited only when an episode's files do not prove they are final), "
        f"debounce {defaults.debounce_seconds:g} s (none for a change of episodes.jsonl), deep validation "
        f"{'off' if a.no_deep else 'on (a concurrent `validate-deep` task of the watch run, lerobot in a niced child process, off the latency path)'}. "
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, shared; "
        f"{datetime.date.today().isoformat()}.",
        "",
        "| latency (s) | median | p95 | max | episodes |",
        "| --- | --- | --- | --- | --- |",
        row("finished -> committed", lat_commit),
        row("finished -> committed + fast-validated", lat_fast),
        "",
        (f"Not landed within the run: {missing}." if missing else "Every episode landed."),
        "",
        *stage_table(stages, finished),
    ])
    print(text)
    keys = ["finished", "ready", "flow_start", "append_start", "committed", "validate_start", "validated"]
    print("per episode, seconds after finished: " + " ".join(keys[1:]))
    for ep, m in sorted(stages.items()):
        print(ep, " ".join(f"{m[k] - m['finished']:6.2f}" if k in m else "     -" for k in keys[1:]))
    if not a.no_readme:
        write_section(SECTION, text)
    return 0 if not missing else 1


def run_v30(a, work: Path) -> int:
    """Sessions finalized one after the other by lerobot's recorder; finalize -> the whole session committed."""
    import subprocess

    from conveyor.settings import WatchSettings
    from conveyor.store import Store
    from flows.watch import stop_watching, watch

    defaults = WatchSettings()
    cfg = work / "conveyor.toml"
    cfg.write_text('store_root = "stores"\n[[sources]]\nname = "bench"\npath = "rec"\n', encoding="utf-8")
    rec, store = work / "rec", work / "stores" / "bench"
    rec.mkdir()
    committed: dict[str, float] = {}  # session -> when its last episode was in the ledger
    want: dict[str, int] = {}
    stop_poll = threading.Event()

    def poll() -> None:
        while not stop_poll.is_set():
            if (store / ".conveyor").is_dir():
                now = time.time()
                counts: dict[str, int] = {}
                for r in Store.open(store).ledger():
                    counts[r.source] = counts.get(r.source, 0) + 1
                for src, n in counts.items():
                    if n >= want.get(src, 1 << 30):
                        committed.setdefault(src, now)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, kwargs={"config": str(cfg), "deep": not a.no_deep}, daemon=True)
    watcher.start()
    time.sleep(8.0)
    threading.Thread(target=poll, daemon=True).start()
    finished: dict[str, float] = {}
    length = a.length if a.length != 90 else 30
    size = a.size if a.size != "240x320" else "96x128"
    for i in range(a.sessions):
        session = rec / f"session-{i:03d}"
        want[str(session.resolve())] = a.episodes
        child = subprocess.Popen([sys.executable, "-m", "conveyor.synthetic.v30_session", str(session),
                                  "--episodes", str(a.episodes), "--length", str(length), "--size", size,
                                  "--cameras", "2", "--seed", str(i)], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        for line in child.stdout:
            if line.strip() == "done":
                finished[str(session.resolve())] = time.time()
        child.wait()
        time.sleep(a.interval)
    deadline = time.monotonic() + 120
    while len(committed) < len(finished) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3.0 if a.no_deep else 15.0)
    stop_watching()
    watcher.join(120)
    stop_poll.set()
    lat = [committed[s] - t0 for s, t0 in finished.items() if s in committed]
    missing = sorted(Path(s).name for s in set(finished) - set(committed))
    text = "\n".join([
        SECTION_V30, "",
        "`python bench/watch_latency.py --v30` runs the `watch` flow in-process against its own Prefect server, "
        "its source a folder of v3.0 sessions", f"recorded one after the other by lerobot 0.6.1's own recorder "
        f"in a child process ({a.sessions} sessions x {a.episodes} episodes x {length} frames at 30 fps, two "
        f"{size} SVT-AV1 cameras). Latency is from the recorder's `finalize()` returning to the session's last "
        "episode in the store (ledger, polled every 20 ms): a running session's episodes cannot land earlier, "
        "because lerobot keeps `meta/episodes` footer-less until `finalize()` (conveyor/source_v3.py).", "",
        f"Settings: debounce {defaults.debounce_seconds:g} s (none for a change under meta/episodes), no settle "
        f"(closed, finalized files are the evidence), deep validation {'off' if a.no_deep else 'on (off the latency path)'}. "
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, shared with 7 other sessions' work (busy); "
        f"{datetime.date.today().isoformat()}.", "",
        "| latency (s) | median | p95 | max | sessions |", "| --- | --- | --- | --- | --- |",
        (f"| finalize() -> session committed | {statistics.median(lat):.2f} | {pctl(lat, 0.95):.2f} | "
         f"{max(lat):.2f} | {len(lat)} |" if lat else "| finalize() -> session committed | - | - | - | 0 |"),
        "", (f"Not landed within the run: {missing}." if missing else "Every session landed."), ""])
    print(text)
    if not a.no_readme:
        write_section(SECTION_V30, text)
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())
