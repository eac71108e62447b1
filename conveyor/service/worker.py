"""Prefect workers that run conveyor's flows: the environment they need and `conveyor worker`.

A flow run started by a worker gets the worker's environment. So the worker carries what the flows need
on its machine: CONVEYOR_CONFIG, the project folder for the deployments' `set_working_directory` pull step,
and the paths resolved from this machine's settings (store_root, work_dir, storage_url, cache_dir), so a
flow that starts in the checkout reads the same folders as the command that started the worker.
`conveyor up` starts its own workers with the same environment; `conveyor worker` joins one machine to a
shared server with one command.

Plain subprocesses, no Prefect import.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

from conveyor.errors import ConveyorError, mask_userinfo
from conveyor.service.prefect_server import prefect_env, wait_healthy
from conveyor.processes import stop_process, sweep
from conveyor.settings import Settings

PROJECT_DIR = Path(__file__).resolve().parents[2]  # the repository root (prefect.yaml, flows/, tasks/)
MARKER = "CONVEYOR_UP_TOKEN"  # every process a `conveyor up` / `conveyor worker` starts carries it
HEARTBEAT_SECONDS = 30  # flow-run heartbeats: the server notices a run whose machine died (Prefect's minimum)


def cache_dir(settings: Settings) -> Path:
    """Where this machine keeps materialized dataset versions (the `cache_dir` setting)."""
    return settings.cache_dir


def flow_env(settings: Settings, api_url: str, home: Path, token: str,
             project: Path = PROJECT_DIR, base: dict | None = None) -> dict[str, str]:
    """Environment of a Prefect worker (and so of its flow runs) for these settings on this machine."""
    env = prefect_env(home, api_url, base)
    env.update({MARKER: token, "CONVEYOR_PROJECT_DIR": str(project),
                "PREFECT_WORKER_QUERY_SECONDS": str(settings.prefect.worker_query_seconds),
                "PREFECT_WORKER_PREFETCH_SECONDS": "5",
                "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS),
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "SVT_LOG": "1"})
    if settings.config_path:
        env["CONVEYOR_CONFIG"] = str(settings.config_path)
    # paths as resolved here: flow runs start in the checkout, not in the folder the command was run from
    env.update(CONVEYOR_STORE_ROOT=str(settings.store_root), CONVEYOR_WORK_DIR=str(settings.work_dir),
               CONVEYOR_STORAGE_URL=settings.storage_url)
    env["CONVEYOR_CACHE_DIR"] = str(settings.cache_dir)
    return env


def start_worker(pool: str, env: dict[str, str], project: Path = PROJECT_DIR, log: IO | int | None = None,
                 name: str | None = None, queue: str | None = None) -> subprocess.Popen:
    """`prefect worker start` for a process pool, in its own session (stopped with its process group);
    `queue`: take only that work queue's runs (a machine's own, see `machine_queue`)."""
    exe = str(Path(sys.executable).with_name("prefect"))
    return subprocess.Popen([exe, "worker", "start", "--pool", pool, "--type", "process",
                             "--name", name or f"conveyor-{pool}-{socket.gethostname()}-{os.getpid()}",
                             *(["--work-queue", queue] if queue else [])],
                            env=env, cwd=project, stdout=log, stderr=subprocess.STDOUT if log else None,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def deployment_name(flow: str, machine: str) -> str:
    """A cpu flow's deployment on one machine, `ingest on rig-a`: a Deployments page row reads by itself
    (not four rows named after the machine told apart by the small flow name)."""
    return f"{flow} on {machine}"


def machine_queue(settings: Settings, pool: str) -> str | None:
    """The work queue a worker of this machine polls: for `cpu`, the machine's own (its runs need this machine's
    recordings and stores); for `gpu`, every queue (any GPU box may train any run)."""
    return settings.prefect.machine if pool == "cpu" else None


def served(settings: Settings, pool: str, api_url: str) -> list[tuple[str, str]]:
    """What a worker of this machine serves, as (label, value) lines for the terminal."""
    queue = machine_queue(settings, pool)
    return [("pool", pool + (f", work queue {queue} (this machine's runs only)" if queue else "")),
            ("Prefect API", mask_userinfo(api_url)),
            ("config", str(settings.config_path or "(none: defaults + CONVEYOR_* environment)")),
            ("store_root", str(settings.store_root)), ("work_dir", str(settings.work_dir)),
            ("cache_dir", str(cache_dir(settings))), ("storage", mask_userinfo(settings.storage_url)),
            ("project", str(PROJECT_DIR))]


class Worker:
    """One `conveyor worker`: a Prefect worker for `pool` against `api_url`, until Ctrl-C / SIGTERM.

    Stopping ends the worker's process group and then every process carrying this worker's marker (its
    flow runs live in their own sessions), so nothing is left running; an interrupted flow run is taken
    up again by a worker elsewhere (see the `rescue lost runs` automation of `conveyor up`).
    """

    def __init__(self, settings: Settings, pool: str, api_url: str, *, name: str | None = None,
                 out: Callable[[str], None] = print):
        self.settings, self.pool, self.api_url, self.name, self.out = settings, pool, api_url.rstrip("/"), name, out
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def run(self) -> int:
        if not wait_healthy(self.api_url):
            raise ConveyorError(self.api_url, "no Prefect server answers /health there (30 s); check --api-url")
        home = self.settings.prefect.home
        home.mkdir(parents=True, exist_ok=True)
        env = flow_env(self.settings, self.api_url, home, self.token)
        self.out(f"conveyor worker: serving pool {self.pool}")
        for label, value in served(self.settings, self.pool, self.api_url):
            self.out(f"  {label + ':':<13}{value}")
        old = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        proc = start_worker(self.pool, env, name=self.name, queue=machine_queue(self.settings, self.pool))
        try:
            while not self._stop.wait(1.0):
                if proc.poll() is not None:
                    self.out(f"conveyor worker: the Prefect worker exited with code {proc.returncode}")
                    return proc.returncode or 1
            self.out("conveyor worker: stopping ...")
            return 0
        finally:
            stop_process(proc, timeout=10)
            left = sweep(self.token, MARKER)
            for s, h in old.items():
                signal.signal(s, h)
            self.out("conveyor worker: stopped" + (f" (ended {len(left)} flow-run process(es))" if left else ""))

