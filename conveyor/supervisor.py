"""`conveyor up`: run the whole service on one machine and take it all down again on Ctrl-C / SIGTERM.

Order: Prefect server (SQLite under a project-local PREFECT_HOME) -> work pools `cpu` and `gpu` (process
pools: on one machine the GPU is a local process too) -> one global concurrency limit per store ->
deployments from prefect.yaml -> one worker per pool -> a run of the `watch` deployment, restarted
whenever it ends. Shutdown goes the other way: cancel the watch run, stop workers (SIGTERM, then
SIGKILL: a worker can ignore one SIGTERM), stop the server, then kill any process still carrying this
run's marker in its environment (flow-run processes live in their own sessions, so killing a worker's
process group does not reach them).

Talks to Prefect through its CLI and REST API only (no `import prefect`), like any other client.
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
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import yaml

from conveyor.errors import ConveyorError
from conveyor.prefect_server import PrefectServer, healthy, prefect_env, start_prefect_server
from conveyor.processes import port_in_use, stop_process
from conveyor.settings import Settings, SourceSettings

PROJECT_DIR = Path(__file__).resolve().parent.parent
POOLS = ("cpu", "gpu")
MARKER = "CONVEYOR_UP_TOKEN"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
DEMO_SOURCE = "demo"


class Supervisor:
    """One `conveyor up`. `run()` blocks until a signal (or `request_stop()`), then shuts down."""

    def __init__(self, settings: Settings, *, port: int | None = None, demo: bool = False,
                 out: Callable[[str], None] = print, project_dir: Path = PROJECT_DIR):
        self.settings, self.demo, self.out, self.project = settings, demo, out, project_dir
        self.host = settings.prefect.host
        self.port = port or settings.prefect.port
        self.home = settings.prefect.home
        self.token = uuid.uuid4().hex
        self.server: PrefectServer | None = None
        self.api_url = settings.prefect.api_url
        self.ui_url = ""
        self.workers: dict[str, subprocess.Popen] = {}
        self.watch_run: str | None = None
        self._stop = threading.Event()
        self._lock_file = None
        self._demo_thread: threading.Thread | None = None
        self._restarts: list[float] = []
        self._watch_runs_started = 0

    # -- public -------------------------------------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def run(self) -> int:
        old = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
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
            if not healthy(self.api_url):
                raise ConveyorError(self.settings.config_path or "prefect.api_url",
                                    f"Prefect server at {self.api_url} is not answering /health")
            self.ui_url = self.api_url.removesuffix("/api")
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
        self._check_stop()
        for pool in POOLS:
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
        env = prefect_env(self.home, self.api_url)
        env.update({MARKER: self.token, "CONVEYOR_PROJECT_DIR": str(self.project),
                    "PREFECT_WORKER_QUERY_SECONDS": str(self.settings.prefect.worker_query_seconds),
                    "PREFECT_WORKER_PREFETCH_SECONDS": "5",
                    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "SVT_LOG": "1"})
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        if self.settings.config_path:
            env["CONVEYOR_CONFIG"] = str(self.settings.config_path)
        # paths as resolved here: flow runs start in the checkout, not in the folder `up` was run from
        env.update(CONVEYOR_STORE_ROOT=str(self.settings.store_root), CONVEYOR_WORK_DIR=str(self.settings.work_dir),
                   CONVEYOR_CACHE_DIR=str(self.settings.cache_dir),
                   CONVEYOR_STORAGE_URL=self.settings.storage_url)
        if self.demo:  # the environment beats the file, so the flows see the demo source too
            env["CONVEYOR_SOURCES"] = json.dumps([s.model_dump(mode="json") for s in self._sources()])
        return env

    def _prefect(self, *args: str, timeout: float = 120) -> str:
        exe = str(Path(sys.executable).with_name("prefect"))
        p = subprocess.run([exe, "--no-prompt", *args], env=self.env, cwd=self.project, capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            tail = (p.stdout + p.stderr).strip().splitlines()[-15:]
            raise ConveyorError(f"prefect {' '.join(args)}", "failed:\n" + "\n".join(tail))
        return p.stdout

    def _create_pools(self) -> None:
        template = self.project / "deployments" / "process-pool.json"
        exe = str(Path(sys.executable).with_name("prefect"))
        procs = {pool: subprocess.Popen([exe, "--no-prompt", "work-pool", "create", pool, "--type", "process",
                                         "--base-job-template", str(template), "--overwrite"],
                                        env=self.env, cwd=self.project, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
                 for pool in POOLS}
        for pool, p in procs.items():
            output, _ = p.communicate(timeout=120)
            if p.returncode != 0:
                raise ConveyorError(f"work pool {pool}", "could not be created:\n" + output[-2000:])
        self.out(f"work pools: {', '.join(POOLS)}")

    def _create_limits(self) -> None:
        """One global concurrency limit (1 slot) per store: one writer at a time across all workers."""
        for s in self._sources():
            status, body = api(self.api_url, "POST", "/v2/concurrency_limits/", {"name": f"store-{s.name}",
                                                                                "limit": 1})
            if status not in (200, 201, 409):
                raise ConveyorError(f"concurrency limit store-{s.name}", f"HTTP {status}: {body}")

    def _deploy(self) -> None:
        """Register prefect.yaml's deployments, with this checkout as the pull directory and the nightly and
        backup schedules from settings; deployments whose flow file does not exist yet are skipped (and said so)."""
        spec = yaml.safe_load((self.project / "prefect.yaml").read_text(encoding="utf-8"))
        spec["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": str(self.project)}}]
        kept, skipped = [], []
        for d in spec["deployments"]:
            if not (self.project / d["entrypoint"].split(":")[0]).is_file():
                skipped.append(d["name"])
                continue
            cron = {"nightly": self.settings.schedules.nightly_cron, "backup": self.settings.backup.cron}
            if d["name"] in cron:
                d["schedules"] = [{"cron": cron[d["name"]], "timezone": self.settings.schedules.timezone}]
            kept.append(d)
        spec["deployments"] = kept
        generated = self.home / "prefect.yaml"
        generated.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        self._prefect("deploy", "--all", "--prefect-file", str(generated), timeout=300)
        self.out(f"deployments: {', '.join(d['name'] for d in kept)}"
                 + (f" (skipped, flow file missing: {', '.join(skipped)})" if skipped else ""))

    def _start_worker(self, pool: str) -> None:
        exe = str(Path(sys.executable).with_name("prefect"))
        log = open(self.home / f"worker-{pool}.log", "ab")
        self.workers[pool] = subprocess.Popen(
            [exe, "worker", "start", "--pool", pool, "--type", "process",
             "--name", f"conveyor-{pool}-{socket.gethostname()}"],
            env=self.env, cwd=self.project, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        log.close()

    def _start_demo(self) -> None:
        from conveyor.synthetic.demo import record_demo

        self.out(f"demo: recording into {self.demo_dir} (store {self.settings.store_path(DEMO_SOURCE)})")
        self._demo_thread = threading.Thread(target=record_demo, args=(self.demo_dir,),
                                             kwargs={"stop": self._stop, "out": self.out}, daemon=True)
        self._demo_thread.start()

    def _start_watch(self) -> None:
        status, dep = api(self.api_url, "GET", "/deployments/name/watch/watch")
        if status != 200:
            raise ConveyorError("deployment watch/watch", f"not registered (HTTP {status})")
        self._watch_runs_started += 1
        key = f"conveyor-up-{self.token}-watch-{self._watch_runs_started}"  # makes api()'s retries safe
        status, run = api(self.api_url, "POST", f"/deployments/{dep['id']}/create_flow_run",
                          {"parameters": {}, "idempotency_key": key})
        if status not in (200, 201):
            raise ConveyorError("deployment watch/watch", f"could not start a run: HTTP {status} {run}")
        self.watch_run = run["id"]
        self.out(f"watch flow run {run['name']} ({self.ui_url}/runs/flow-run/{run['id']})")

    # -- supervise ----------------------------------------------------------------------------------

    def supervise(self) -> None:
        """Called every 2 s: restart dead workers and an ended watch run; stop if the server died."""
        if self.server and self.server.process.poll() is not None:
            self.out(f"conveyor: Prefect server exited (code {self.server.process.returncode}); "
                     f"see {self.server.log_path}")
            self._stop.set()
            return
        for pool, proc in list(self.workers.items()):
            if proc.poll() is not None:
                self.out(f"worker for pool {pool} exited with code {proc.returncode}; restarting it")
                self._start_worker(pool)
        if self.watch_run:
            status, run = api(self.api_url, "GET", f"/flow_runs/{self.watch_run}")
            state = (run.get("state") or {}).get("type") if status == 200 else None
            if state in FINAL:
                now = time.monotonic()
                self._restarts = [t for t in self._restarts if now - t < 300]
                if len(self._restarts) >= 5:  # crash loop: keep trying, but not faster than once a minute
                    if now - self._restarts[-1] < 60:
                        return
                self._restarts.append(now)
                self.out(f"watch run ended {state}; starting a new one")
                self._start_watch()

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
        sweep(self.token)
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


RETRY_STATUS = (429, 502, 503, 504)  # what a busy server (SQLite lock timeouts) answers; Prefect's client retries these too


def api(api_url: str, method: str, path: str, body: dict | None = None, timeout: float = 30,
        attempts: int = 6) -> tuple[int, dict]:
    """Tiny JSON client for the Prefect REST API; returns (HTTP status, decoded body or {}).

    Busy-server answers and refused connections are retried with backoff (1, 2, 4, 8, 8 s), so callers
    creating objects should make that safe (idempotency key, or tolerate 409).
    """
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(attempts):
        req = urllib.request.Request(api_url.rstrip("/") + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        last = attempt == attempts - 1
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else {})
        except urllib.error.HTTPError as e:
            raw = e.read()
            if e.code in RETRY_STATUS and not last:
                time.sleep(min(8, 2 ** attempt))
                continue
            try:
                return e.code, json.loads(raw) if raw else {}
            except json.JSONDecodeError:
                return e.code, {"detail": raw.decode(errors="replace")}
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if last:
                raise
            time.sleep(min(8, 2 ** attempt))
    raise AssertionError("unreachable")


def marked_pids(token: str) -> list[int]:
    """Processes (other than this one) whose environment carries `CONVEYOR_UP_TOKEN=<token>`."""
    needle = f"{MARKER}={token}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                out.append(int(d.name))
        except OSError:
            continue
    return out


def sweep(token: str, timeout: float = 5.0) -> list[int]:
    """Kill whatever this `up` started and is still alive (SIGTERM, then SIGKILL); returns those pids."""
    pids = marked_pids(token)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        if not any(_alive(p) for p in pids):
            break
    return pids


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap our own zombies
    except ChildProcessError:
        pass
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().split(")")[-1].split()[0]
        return state != "Z"
    except OSError:
        return False
