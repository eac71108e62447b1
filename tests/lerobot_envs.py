"""A second lerobot environment for cross-version checks: lerobot 0.4.4 (the last release for Python 3.11) in
a Python 3.11 venv, cached between runs.

Where: `$CONVEYOR_LEROBOT_044_VENV`, else `~/.cache/conveyor/envs/lerobot-0.4.4`. Built on first use with
`python3.11 -m venv` + `pip install "lerobot[smolvla]==0.4.4"` (a few minutes, once per machine; a file lock
keeps two sessions from building it at once). `python -m lerobot_envs` (from tests/) builds it ahead of time.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

VERSION = "0.4.4"
ENV_VAR = "CONVEYOR_LEROBOT_044_VENV"
REQUIREMENT = f"lerobot[smolvla]=={VERSION}"


def venv_path() -> Path:
    override = os.environ.get(ENV_VAR)
    return Path(override).expanduser() if override else Path.home() / ".cache/conveyor/envs" / f"lerobot-{VERSION}"


def installed_version(venv: Path) -> str | None:
    py = venv / "bin/python"
    if not (py.exists() and (venv / "bin/lerobot-train").exists()):
        return None
    r = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('lerobot'))"],
                       capture_output=True, text=True, timeout=120)
    return r.stdout.strip() if r.returncode == 0 else None


def python311() -> str | None:
    return shutil.which("python3.11")


def ensure(venv: Path | None = None, log=print) -> Path:
    """The 0.4.4 venv, built when missing or broken; raises RuntimeError (with pip's last lines) on failure."""
    venv = venv or venv_path()
    if installed_version(venv) == VERSION:
        return venv
    py = python311()
    if py is None:
        raise FileNotFoundError("python3.11 is not on PATH")
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                # another session may be building it right now
        if installed_version(venv) == VERSION:
            return venv
        if venv.exists():
            shutil.rmtree(venv)                          # half-built by an interrupted run
        log(f"building the lerobot {VERSION} venv at {venv} (a few minutes, once per machine)")
        for cmd in ([py, "-m", "venv", str(venv)],
                    [str(venv / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                     REQUIREMENT]):
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            if r.returncode != 0:
                tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-5:])
                raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{tail}")
    if installed_version(venv) != VERSION:
        raise RuntimeError(f"{venv} has no working lerobot {VERSION} after install")
    return venv


if __name__ == "__main__":
    print(ensure(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
