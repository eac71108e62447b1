"""`watch` flow: long-running; lands each finished episode within seconds.

Runs the `ingest` flow in this same process as a subflow (a child run with its own logs and artifacts in
the UI) instead of launching a deployment run per episode: a worker-launched run costs 9-12 s here, an
in-process subflow about 1 s. Started by `conveyor up` through the `watch` deployment (pool `cpu`).

The deep check (lerobot load, seconds per batch) is kept off the latency path: the child ingest run
commits and fast-validates, and the deep check of the new episodes runs as a `validate-deep` task of this
watch run, concurrently, one at a time per store, batching whatever landed meanwhile; its lerobot part runs
in a niced child process (`conveyor.lerobot_check`), so torch is never imported here and never holds this
process's GIL while the next episode lands.

The review sheet of each ingest run's new episodes (~0.3 s CPU per episode) is kept off it too: a
`review-sheet` task of this watch run, one at a time, attached to the ingest run that landed them; the
watch run waits for the last ones before it ends.
"""
from __future__ import annotations

import threading
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture

from conveyor.errors import ConveyorError
from conveyor.settings import load_settings
from conveyor.watcher import EpisodeWatcher
from flows.ingest import ingest
from tasks.review import review_sheet
from tasks.validate import validate_deep_task
from tasks.views import report_deep_check

_STOP = threading.Event()


def stop_watching() -> None:
    """End a watch flow running in this process (embedding code and tests; the service cancels the run)."""
    _STOP.set()


class _DeepChecks:
    """At most one deep check per store in flight; episodes that land meanwhile wait for the next one."""

    def __init__(self, log):
        self.log = log
        self.pending: dict[str, tuple[Path, Path, list[int]]] = {}
        self.running: dict[str, PrefectFuture] = {}
        # (ingest run, the commit it made) whose episodes a store's next/current check covers
        self.runs: dict[str, list[tuple[str, int]]] = {}
        self.checking: dict[str, list[tuple[str, int]]] = {}
        self.failed = 0

    def add(self, name: str, store: Path, source: Path, episodes: list[int], ingest_run: str = "",
            commit: int = 0) -> None:
        _, _, eps = self.pending.get(name, (store, source, []))
        self.pending[name] = (store, source, eps + episodes)
        self.runs.setdefault(name, []).extend([(ingest_run, commit)] if ingest_run else [])
        self.tick()

    def tick(self) -> None:
        for name, fut in list(self.running.items()):
            if fut.state.is_final():
                del self.running[name]
                report_deep_check(name, fut, self.checking.pop(name, []), self.log)
                if not fut.state.is_completed():
                    self.failed += 1
                    self.log.error("%s: deep validation failed: %s", name, fut.state.message)
        for name in [n for n in self.pending if n not in self.running]:
            store, source, eps = self.pending.pop(name)
            self.checking[name] = self.runs.pop(name, [])
            self.running[name] = validate_deep_task.submit(store, episodes=eps, lerobot_only=True)

    def drain(self) -> None:
        while self.pending or self.running:
            for fut in list(self.running.values()):
                fut.wait()
            self.tick()


class _Reviews:
    """Review sheets for ingest runs, made one at a time after the run returned (the next ingest goes on)."""

    def __init__(self, log):
        self.log = log
        self.pending: list[tuple[str, Path, list[int], str]] = []  # (source, store, episodes, ingest run)
        self.running: PrefectFuture | None = None

    def add(self, name: str, store: Path, episodes: list[int], ingest_run: str) -> None:
        self.pending.append((name, store, episodes, ingest_run))
        self.tick()

    def tick(self) -> None:
        if self.running is not None and self.running.state.is_final():
            if not self.running.state.is_completed():  # a picture must never fail the watch
                self.log.warning("review sheet not made: %s", self.running.state.message)
            self.running = None
        if self.running is None and self.pending:
            name, store, eps, run = self.pending.pop(0)
            self.running = review_sheet.submit(name, store, eps, flow_run_id=run or None)

    def drain(self) -> None:
        while self.pending or self.running is not None:
            if self.running is not None:
                self.running.wait()
            self.tick()


@flow(name="watch")
def watch(config: str | None = None, sources: list[str] | None = None, deep: bool = True,
          max_seconds: float | None = None) -> int:
    """Watch the configured sources (or just `sources`); returns how many ingest runs it started.

    deep: deep-check newly landed episodes (concurrently, see module doc). max_seconds ends the watch
    (tests, benchmarks); the service runs it without a limit.
    """
    log = get_run_logger()
    settings = load_settings(config)
    chosen = [s for s in settings.sources if not sources or s.name in sources]
    if not chosen:
        raise ConveyorError(settings.config_path or "settings", "no [[sources]] to watch")
    by_name = {s.name: s for s in chosen}
    deep_checks = _DeepChecks(log)
    reviews = _Reviews(log)
    runs = 0
    _STOP.clear()

    def on_ready(name: str, episodes: list[int]) -> None:
        nonlocal runs
        log.info("%s: episode(s) %s complete, ingesting", name, episodes)  # bench/watch_latency.py parses this
        runs += 1
        res = ingest(source=name, config=config, deep=False, store_slot=False,  # a failure raises: offered again
                     review=False)
        if res["added"]:
            reviews.add(name, settings.store_path(name), res["added"], res.get("run_id", ""))
        if deep and res["added"]:
            deep_checks.add(name, settings.store_path(name), by_name[name].path, res["added"], res.get("run_id", ""),
                            res["version"]["commit"])

    def on_error(name: str, e: Exception) -> None:
        log.warning("%s: %s", name, e)

    # import the append/validate code now, not when the first episode lands (~0.5 s of that episode's latency)
    import conveyor.ingest  # noqa: F401
    import conveyor.validate  # noqa: F401

    w = settings.watch
    log.info("watching %s (settle %.1f s, rescan every %.0f s)",
             ", ".join(f"{s.name}={s.path}" for s in chosen), w.settle_seconds, w.rescan_seconds)
    try:
        EpisodeWatcher({s.name: s.path for s in chosen}, on_ready=on_ready, on_error=on_error,
                       settle_seconds=w.settle_seconds, debounce_seconds=w.debounce_seconds,
                       rescan_seconds=w.rescan_seconds).run(stop=_STOP, max_seconds=max_seconds,
                                                            on_tick=lambda: (deep_checks.tick(), reviews.tick()))
    finally:
        reviews.drain()
        deep_checks.drain()
    if deep_checks.failed:
        raise ConveyorError(settings.config_path or "settings",
                            f"{deep_checks.failed} deep validation(s) failed; see the validate-deep task runs")
    return runs
