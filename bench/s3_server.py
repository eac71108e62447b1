"""The S3 side of the object-storage benchmarks: moto's standalone server in its own process on 127.0.0.1,
and the environment every timed tool (conveyor, restic, boto3) gets for it."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from conveyor.processes import free_port

ROOT = Path(__file__).resolve().parents[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    """(process, endpoint URL) once the server accepts connections; the caller terminates it."""
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


def bench_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Test credentials for moto (also set in this process, for boto3 here) plus restic's password and cache."""
    creds = dict(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1")
    os.environ.update(creds)
    return dict(os.environ, **creds, RESTIC_PASSWORD="bench", RESTIC_CACHE_DIR=str(tmp / "restic-cache"),
                PYTHONPATH=str(ROOT), NO_PROXY="127.0.0.1", **extra)
