"""Child-process and port helpers shared by the Prefect server launcher, `conveyor up` and the lerobot-train
runner: plain OS calls, so every layer can use them without pulling in the others."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop a child and its process group; escalate to SIGKILL (a Prefect worker can ignore one SIGTERM)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def marked_pids(token: str, marker: str) -> list[int]:
    """Processes (other than this one) whose environment carries `<marker>=<token>`."""
    needle = f"{marker}={token}".encode()
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


def sweep(token: str, marker: str, timeout: float = 5.0) -> list[int]:
    """Kill every process still carrying `<marker>=<token>` (SIGTERM, then SIGKILL); returns their pids.

    Flow-run processes live in their own sessions, so ending a worker's process group does not reach them."""
    pids = marked_pids(token, marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.1)
        if not any(alive(p) for p in pids):
            break
    return pids


def alive(pid: int) -> bool:
    """True while `pid` runs (our own zombie children are reaped on the way)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().split(")")[-1].split()[0]
        return state != "Z"
    except OSError:
        return False
