"""`conveyor up`: run the whole service on one machine and take it all down again on Ctrl-C / SIGTERM.

Order: Prefect server (SQLite under a project-local PREFECT_HOME; or join a running one, `--api-url`) ->
work pools `cpu` and `gpu` (process pools: on one machine the GPU is a local process too) -> one global
concurrency limit per store -> deployments from prefect.yaml -> the `rescue lost runs` automation -> one
worker per pool -> a run of the `watch` deployment, restarted whenever it ends. While up: a server that
dies is restarted on the same port and database, dead workers are restarted, a watch run whose process
is gone is marked crashed and replaced. Shutdown goes the other way: cancel the watch run, stop workers
(SIGTERM, then SIGKILL: a worker can ignore one SIGTERM), stop the server, then kill any process still
carrying this run's marker in its environment (flow-run processes live in their own sessions, so killing
a worker's process group does not reach them).

Talks to Prefect through Prefect's own client (`SyncPrefectClient`: concurrency limits, deployments,
automations), its CLI (work pools, `prefect deploy`), and, for the watch run it keeps alive, the small REST helper
`api()` below: the supervise loop runs across `_restart_server`, and `api()` retries refused connections with
backoff while the server comes back.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path

import yaml

from conveyor.errors import ConveyorError, mask_userinfo
from conveyor.service.deployments import deployment_spec, flow_of, remove_or_name_unserved
from conveyor.service.prefect_api import api
from conveyor.service.prefect_server import PrefectServer, start_prefect_server, wait_healthy
from conveyor.service.rescue import RESCUE, replace_rescue  # noqa: F401 - RESCUE: tests
from conveyor.processes import marked_pids, port_in_use, stop_process, sweep
from conveyor.settings import Settings, SourceSettings
from conveyor.service.worker import (MARKER, PROJECT_DIR, cache_dir, deployment_name, flow_env, machine_queue,
                                     start_worker)

POOLS = ("cpu", "gpu")
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
DEMO_SOURCE = "demo"


class Supervisor:
    """One `conveyor up`. `run()` blocks until a signal (or `request_stop()`), then shuts down."""

    def __init__(self, settings: Settings, *, port: int | None = None, demo: bool = False,
                 out: Callable[[str], None] = print, project_dir: Path = PROJECT_DIR, api_url: str | None = None,
                 pools: tuple[str, ...] = POOLS):
        self.settings, self.demo, self.out, self.project = settings, demo, out, project_dir
        unknown = set(pools) - set(POOLS)
        if unknown or not pools:
            raise ConveyorError("--pools", f"pools are {', '.join(POOLS)}, not {', '.join(sorted(unknown)) or 'none'}")
        self.pools = tuple(p for p in POOLS if p in pools)
        self.host = settings.prefect.host
        self.port = port or settings.prefect.port
        self.home = settings.prefect.home
        self.token = uuid.uuid4().hex
        self.server: PrefectServer | None = None
        self.api_url = (api_url or settings.prefect.api_url or "").rstrip("/") or None
        self.joined = bool(self.api_url)
        self.ui_url = ""
        self.workers: dict[str, subprocess.Popen] = {}
        self.watch_run: str | None = None
        self._stop = threading.Event()
        self._lock_file = None
        self._demo_thread: threading.Thread | None = None
        self._restarts: list[float] = []
        self._server_restarts: list[float] = []
        self._watch_runs_started = 0
        self._watch_gone_since: float | None = None
        self._watch_seen_here: str | None = None

    # -- public -------------------------------------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def run(self) -> int:
        old = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            for line in self.where():
                self.out(line)
            self.out(f"conveyor is up. Prefect UI: {self.ui_url}  (Ctrl-C stops everything)")
            while not self._stop.wait(2.0):
                try:
                    self.supervise()
                except (OSError, ConveyorError) as e:  # a busy/restarting API: try again in 2 s
                    self.out(f"conveyor: supervise: {e}")
            return 0
        finally:
            self.out("conveyor: shutting down ...")
            self.shutdown()
            for s, h in old.items():
                signal.signal(s, h)
            self.out("conveyor: stopped")

    # -- start --------------------------------------------------------------------------------------

    def start(self) -> None:
        self._take_home_lock()
        if self.api_url:
            if not wait_healthy(self.api_url):
                raise ConveyorError(self.settings.config_path or "prefect.api_url",
                                    f"Prefect server at {self.api_url} is not answering /health")
            self.ui_url = self.api_url.removesuffix("/api")
            self.out(f"joining the Prefect server at {self.api_url}")
        else:
            if port_in_use(self.host, self.port):
                raise ConveyorError(f"{self.host}:{self.port}", "port is already in use (another `conveyor up` "
                                    "or Prefect server?); stop it or pass --port N")
            self.out(f"starting Prefect server on {self.host}:{self.port} (PREFECT_HOME={self.home}) ...")
            os.environ[MARKER] = self.token  # the server inherits the marker, so `sweep` finds it too
            try:
                self.server = start_prefect_server(self.home, self.host, self.port)
            finally:
                os.environ.pop(MARKER, None)
            self.api_url, self.ui_url = self.server.api_url, self.server.ui_url
        self._check_stop()
        self.env = self._child_env()
        self._create_pools()
        self._create_limits()
        self._check_stop()
        self._deploy()
        self._create_rescue()
        self._check_stop()
        for pool in self.pools:
            self._start_worker(pool)
        if self.demo:
            self._start_demo()
        self._start_watch()

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise KeyboardInterrupt

    def _take_home_lock(self) -> None:
        """Two `up`s on one PREFECT_HOME would share one SQLite file: refuse the second clearly."""
        self.home.mkdir(parents=True, exist_ok=True)
        path = self.home / "conveyor-up.lock"
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise ConveyorError(path, f"another `conveyor up` uses this PREFECT_HOME ({f.read().strip()})") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, port {self.port}\n")
        f.flush()
        self._lock_file = f

    def _sources(self) -> list[SourceSettings]:
        srcs = list(self.settings.sources)
        if self.demo and not any(s.name == DEMO_SOURCE for s in srcs):
            srcs.append(SourceSettings(name=DEMO_SOURCE, path=self.demo_dir, task="pick the cube"))
        return srcs

    @property
    def demo_dir(self) -> Path:
        return self.settings.work_dir / "demo" / "recording"

    def _child_env(self) -> dict[str, str]:
        env = flow_env(self.settings, self.api_url or "", self.home, self.token, self.project)
        if not self.api_url:
            env.pop("PREFECT_API_URL", None)
        if self.demo:  # the environment beats the file, so the flows see the demo source too
            env["CONVEYOR_SOURCES"] = json.dumps([s.model_dump(mode="json") for s in self._sources()])
        return env

    def where(self) -> list[str]:
        """Where this service keeps things, for the terminal (README "Where files go")."""
        s = self.settings
        names = ", ".join(x.name for x in self._sources()) or "no [[sources]] configured"
        logs = [self.home / f"worker-{p}.log" for p in self.pools]
        if self.server:
            logs.insert(0, self.server.log_path)
        return [f"  stores:       {s.store_root}  ({names})",
                f"  work folder:  {s.work_dir}",
                f"  objects:      {mask_userinfo(s.storage_url)}",
                f"  cache:        {cache_dir(s)}",
                f"  logs:         {', '.join(map(str, logs))}",
                f"  config:       {s.config_path or '(none: defaults + CONVEYOR_* environment)'}"]

    def _prefect(self, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> str:
        exe = str(Path(sys.executable).with_name("prefect"))
        p = subprocess.run([exe, "--no-prompt", *args], env=env or self.env, cwd=self.project, capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            tail = (p.stdout + p.stderr).strip().splitlines()[-15:]
            raise ConveyorError(f"prefect {' '.join(args)}", "failed:\n" + "\n".join(tail))
        return p.stdout

    def _create_pools(self) -> None:
        """Process pools `cpu` and `gpu`. On a shared server an existing pool is kept as it is (the lab's
        `gpu` pool may be a Kubernetes one)."""
        template = self.project / "deployments" / "process-pool.json"
        exe = str(Path(sys.executable).with_name("prefect"))
        wanted = [p for p in POOLS if not (self.joined and api(self.api_url, "GET", f"/work_pools/{p}")[0] == 200)]
        procs = {pool: subprocess.Popen([exe, "--no-prompt", "work-pool", "create", pool, "--type", "process",
                                         "--base-job-template", str(template), "--overwrite"],
                                        env=self.env, cwd=self.project, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
                 for pool in wanted}
        for pool, p in procs.items():
            output, _ = p.communicate(timeout=120)
            if p.returncode != 0:
                raise ConveyorError(f"work pool {pool}", "could not be created:\n" + output[-2000:])
        if "cpu" in wanted:   # cpu runs go to each machine's own queue: the unpolled default one would show red
            api(self.api_url, "PATCH", "/work_pools/cpu/queues/default",
                {"is_paused": True, "description": "Not used: conveyor sends each machine's cpu runs to its own "
                                                   "queue (named after the machine)."})
        self.out(f"work pools: {', '.join(POOLS)}" + (f" (kept as found: {', '.join(sorted(set(POOLS) - set(wanted)))})"
                                                      if len(wanted) < len(POOLS) else "")
                 + f"; workers here: {', '.join(self.pools)}")

    def _client(self):
        """Prefect's own client against this `up`'s server (imported here, once the server is healthy: the prefect
        import costs seconds that `conveyor up --help` and the server start need not wait for)."""
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)

    def _create_limits(self) -> None:
        """One global concurrency limit (1 slot) per store: one writer at a time across all workers."""
        from tasks.limits import store_limit

        with self._client() as client:
            for s in self._sources():
                client.upsert_global_concurrency_limit_by_name(store_limit(s.name), 1)

    def _deploy(self) -> None:
        """Register prefect.yaml's deployments, with this checkout as the pull directory and the nightly and
        backup schedules from settings; deployments whose flow file does not exist yet are skipped (and said so).

        The `cpu` flows (watch, ingest, curate, nightly, backup) need this machine's recordings and stores, so they are
        registered as `<flow>/<flow> on <machine>` on this machine's work queue, which only this machine's cpu worker
        polls: two recording PCs on one server each get their own watcher, schedules and UI runs."""
        spec, skipped = deployment_spec(self.settings, self.project)
        kept = spec["deployments"]
        generated = self.home / "prefect.yaml"
        generated.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        # the pull step keeps `{{ $CONVEYOR_PROJECT_DIR }}`: each worker (this one's, `conveyor worker`s on
        # other machines) resolves it to its own checkout when a run starts
        self._prefect("deploy", "--all", "--prefect-file", str(generated), timeout=300,
                      env={k: v for k, v in self.env.items() if k != "CONVEYOR_PROJECT_DIR"})
        self.out(f"deployments: {', '.join(flow_of(d) + '/' + d['name'] for d in kept)}"
                 + (f" (skipped, flow file missing: {', '.join(skipped)})" if skipped else ""))
        self._warn_unserved(kept)

    def _warn_unserved(self, kept: list[dict]) -> None:
        """A cpu deployment of the cpu flows on the pool's default queue (an older conveyor's `<flow>/<flow>`, or
        prefect.yaml deployed by hand) is served by no `conveyor up` worker. On this `up`'s own server it is a
        leftover: removed, and said so; on a shared server it is named, with how to delete it. Deployments on
        another machine's queue are that machine's, even on this `up`'s server (another PC may have joined it)."""
        remove_or_name_unserved(self._client, self.settings, kept, own_server=not self.joined, out=self.out)

    def _create_rescue(self) -> None:
        """The rescue automation (conveyor/service/rescue.py), replaced on every start (the deployment id may
        have changed)."""
        replace_rescue(self._client, self.out)

    def _start_worker(self, pool: str) -> None:
        with open(self.home / f"worker-{pool}.log", "ab") as log:
            self.workers[pool] = start_worker(pool, self.env, self.project, log,
                                              name=f"conveyor-{pool}-{self.settings.prefect.machine}",
                                              queue=machine_queue(self.settings, pool))

    def _start_demo(self) -> None:
        from conveyor.synthetic.demo import record_demo

        self.out(f"demo: recording into {self.demo_dir} (store {self.settings.store_path(DEMO_SOURCE)})")
        self._demo_thread = threading.Thread(target=record_demo, args=(self.demo_dir,),
                                             kwargs={"stop": self._stop, "out": self.out}, daemon=True)
        self._demo_thread.start()

    def _start_watch(self) -> None:
        name = f"watch/{deployment_name('watch', self.settings.prefect.machine)}"
        status, dep = api(self.api_url, "GET", f"/deployments/name/{urllib.parse.quote(name)}")
        if status != 200:
            raise ConveyorError(f"deployment {name}", f"not registered (HTTP {status})")
        self._watch_runs_started += 1
        key = f"conveyor-up-{self.token}-watch-{self._watch_runs_started}"  # makes api()'s retries safe
        status, run = api(self.api_url, "POST", f"/deployments/{dep['id']}/create_flow_run",
                          {"parameters": {}, "idempotency_key": key})
        if status not in (200, 201):
            raise ConveyorError(f"deployment {name}", f"could not start a run: HTTP {status} {run}")
        self.watch_run = run["id"]
        self.out(f"watch flow run {run['name']} ({self.ui_url}/runs/flow-run/{run['id']})")

    # -- supervise ----------------------------------------------------------------------------------

    def supervise(self) -> None:
        """Called every 2 s: restart a dead server, dead workers and an ended or vanished watch run."""
        if self.server and self.server.process.poll() is not None:
            self._restart_server()
        for pool, proc in list(self.workers.items()):
            if proc.poll() is not None:
                self.out(f"worker for pool {pool} exited with code {proc.returncode}; restarting it")
                self._start_worker(pool)
        if self.watch_run:
            status, run = api(self.api_url, "GET", f"/flow_runs/{self.watch_run}")
            state = (run.get("state") or {}).get("type") if status == 200 else None
            if state == "RUNNING" and self._watch_process_gone():
                self.out("the watch run's process is gone; marking the run crashed")
                api(self.api_url, "POST", f"/flow_runs/{self.watch_run}/set_state",
                    {"state": {"type": "CRASHED", "name": "Crashed",
                               "message": "its process is gone (seen by conveyor up)"}, "force": True})
                state = "CRASHED"
            if state in FINAL:
                now = time.monotonic()
                self._restarts = [t for t in self._restarts if now - t < 300]
                if len(self._restarts) >= 5:  # crash loop: keep trying, but not faster than once a minute
                    if now - self._restarts[-1] < 60:
                        return
                self._restarts.append(now)
                self.out(f"watch run ended {state}; starting a new one")
                self._start_watch()

    def _watch_process_gone(self) -> bool:
        """True once the running watch run, seen running on this machine before, has had no process here for
        10 s (a worker reports a crashed child, but not while its server is down, nor after it was killed
        itself). A run some other machine's cpu worker took is never seen here and left alone."""
        if marked_pids(self.watch_run, "PREFECT__FLOW_RUN_ID"):
            self._watch_seen_here, self._watch_gone_since = self.watch_run, None
            return False
        if self._watch_seen_here != self.watch_run:
            return False
        now = time.monotonic()
        if self._watch_gone_since is None:
            self._watch_gone_since = now
        return now - self._watch_gone_since >= 10

    def _restart_server(self) -> None:
        """The server died: start it again on the same port and database (SQLite under PREFECT_HOME keeps
        every run, deployment and limit). Workers and the watch run reconnect by themselves; the next
        supervise() replaces whichever did not. More than 5 deaths in 10 minutes: give up and stop."""
        assert self.server is not None
        code = self.server.process.returncode
        now = time.monotonic()
        self._server_restarts = [t for t in self._server_restarts if now - t < 600] + [now]
        if len(self._server_restarts) > 5:
            self.out(f"conveyor: Prefect server exited (code {code}) 6 times in 10 minutes; see "
                     f"{self.server.log_path}. Stopping.")
            self._stop.set()
            return
        self.out(f"conveyor: Prefect server exited (code {code}); restarting it on port {self.port} "
                 f"(log {self.server.log_path})")
        os.environ[MARKER] = self.token
        try:
            self.server = self.server.restart()
        finally:
            os.environ.pop(MARKER, None)
        self.out(f"conveyor: Prefect server is back at {self.api_url}")

    # -- shutdown -----------------------------------------------------------------------------------

    def shutdown(self) -> None:
        self._stop.set()
        if self.watch_run and self.api_url and self.workers:
            self._cancel_watch()
        for proc in self.workers.values():
            stop_process(proc, timeout=10)
        if self._demo_thread:
            self._demo_thread.join(timeout=10)
        if self.server:
            self.server.stop()
        sweep(self.token, MARKER)
        if self._lock_file:
            self._lock_file.close()

    def _cancel_watch(self) -> None:
        """Ask the worker to cancel the watch run (it kills the flow process), so the UI shows Cancelled."""
        try:
            api(self.api_url, "POST", f"/flow_runs/{self.watch_run}/set_state",
                {"state": {"type": "CANCELLING", "name": "Cancelling", "message": "conveyor up is stopping"},
                 "force": True})
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                status, run = api(self.api_url, "GET", f"/flow_runs/{self.watch_run}")
                if status != 200 or (run.get("state") or {}).get("type") in FINAL:
                    return
                time.sleep(0.5)
        except OSError:
            return
