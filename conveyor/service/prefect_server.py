"""Start and stop a local Prefect server as a child process (used by `conveyor up` and the test session).

Plain subprocess management, no Prefect import: the server runs in its own interpreter with a
project-local PREFECT_HOME so it never touches the user's ~/.prefect.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from conveyor.errors import ConveyorError
from conveyor.processes import free_port, port_in_use, stop_process


def prefect_env(home: Path, api_url: str | None = None, base: dict | None = None) -> dict[str, str]:
    """Environment for every Prefect process of one local deployment (server, workers, CLI calls)."""
    env = dict(os.environ if base is None else base)
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false", PREFECT_LOGGING_LEVEL="INFO")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def wait_healthy(api_url: str, seconds: float = 30.0) -> bool:
    """A busy server (a deploy, a loaded machine) can miss one 2 s health check: ask again until `seconds`.
    Nothing listening (connection refused) is an answer at once."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except urllib.error.URLError as e:
            if isinstance(e.reason, ConnectionRefusedError):
                return False
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(1.0)


@dataclass
class PrefectServer:
    """A running `prefect server start` child; `stop()` ends it (SIGTERM, then SIGKILL)."""

    process: subprocess.Popen
    api_url: str
    ui_url: str
    home: Path
    log_path: Path
    host: str = "127.0.0.1"
    port: int = 4200
    database_url: str | None = None

    def stop(self, timeout: float = 15.0) -> None:
        stop_process(self.process, timeout)

    def restart(self, timeout: float = 90.0) -> PrefectServer:
        """A new server on the same port, PREFECT_HOME and database (after this one died or was stopped)."""
        self.stop(5.0)
        return start_prefect_server(self.home, self.host, self.port, timeout=timeout, database_url=self.database_url)


def start_prefect_server(home: Path, host: str = "127.0.0.1", port: int | None = None,
                         timeout: float = 90.0, database_url: str | None = None) -> PrefectServer:
    """Start a server and wait until /api/health answers. Its database is SQLite under `home`, or
    `database_url` (e.g. `postgresql+asyncpg://user@host:5432/prefect`)."""
    port = port or free_port(host)
    if port_in_use(host, port):
        raise ConveyorError(f"{host}:{port}", "port is already in use (another `conveyor up` or Prefect server?)")
    home.mkdir(parents=True, exist_ok=True)
    api_url = f"http://{host}:{port}/api"
    log_path = home / "server.log"
    prefect = Path(sys.executable).with_name("prefect")
    env = prefect_env(home, api_url)
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([str(prefect), "server", "start", "--host", host, "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConveyorError(log_path, f"Prefect server exited with code {proc.returncode}; see this log")
        if healthy(api_url):
            return PrefectServer(proc, api_url, f"http://{host}:{port}", home, log_path, host, port, database_url)
        time.sleep(0.5)
    stop_process(proc)
    raise ConveyorError(log_path, f"Prefect server not healthy after {timeout:.0f} s")
