"""A throwaway PostgreSQL 15 cluster for tests (the Prefect server of the multi-machine test runs on it).

PostgreSQL refuses to run as root, so initdb/pg_ctl run as an unprivileged user through `runuser`: the
`postgres` system user where it exists, else `nobody`, else a `conveyor-pg` user created with `useradd`.
The data folder and the unix socket live in one temporary folder owned by that user (not under pytest's
0700 tmp folder, which that user could not enter); the server listens on 127.0.0.1 on a free port.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from conveyor.processes import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _pg_user() -> str:
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "conveyor-pg"], check=True)
    return "conveyor-pg"


def available() -> str | None:
    """None when a cluster can be started here, else why not (the caller skips)."""
    if not (PG_BIN / "initdb").exists():
        return f"PostgreSQL 15 binaries not found under {PG_BIN}"
    if os.geteuid() != 0 or not shutil.which("runuser"):
        return "starting PostgreSQL as an unprivileged user needs root and runuser"
    return None


@dataclass
class PostgresCluster:
    folder: Path
    port: int
    user: str

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def url(self, database: str = "prefect", driver: str = "postgresql+asyncpg") -> str:
        return f"{driver}://prefect@127.0.0.1:{self.port}/{database}"

    def _as_user(self, *cmd: str, timeout: float = 60) -> None:
        p = subprocess.run(["runuser", "-u", self.user, "--", *cmd], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            log = self.folder / "log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd[:2])} failed: {p.stdout}{p.stderr}\n{tail}")

    def createdb(self, name: str) -> str:
        self._as_user(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "prefect", name)
        return self.url(name)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._as_user(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)


def start_cluster() -> PostgresCluster:
    """initdb + start (trust auth, superuser `prefect`) + a `prefect` database; about a second."""
    user = _pg_user()
    folder = Path(tempfile.mkdtemp(prefix="conveyor-pg-"))
    shutil.chown(folder, user)
    cluster = PostgresCluster(folder, free_port(), user)
    try:
        cluster._as_user(str(PG_BIN / "initdb"), "-D", str(cluster.data), "-A", "trust", "-U", "prefect",
                         "--no-sync", "-E", "UTF8")
        opts = f"-p {cluster.port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        cluster._as_user(str(PG_BIN / "pg_ctl"), "-D", str(cluster.data), "-o", opts, "-l", str(folder / "log"),
                         "-w", "start")
        cluster.createdb("prefect")
    except BaseException:
        cluster.stop()
        raise
    return cluster
