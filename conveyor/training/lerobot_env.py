"""The lerobot environment a run trains with: which `lerobot-train`, which lerobot version, and what that
version calls things.

A lab often trains with its own environment on the GPU machine (a fork with its robot and policy code), so
`training.lerobot_train` names the executable; the default is the one next to conveyor's interpreter. The
version is read from the interpreter that runs that executable; options, refusals and resume are built for
it. Supported: lerobot 0.4.4 up to 0.6.x (0.4.4 and 0.6.1 are tested).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel

from conveyor.errors import ConveyorError
from conveyor.training import lerobot_probe

# what every lerobot process conveyor starts runs with: nothing is downloaded at run time
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "SVT_LOG": "1", "WANDB_MODE": "disabled"}
OLDEST = (0, 4, 4)
NEWEST_MINOR = (0, 6)          # every 0.6.x patch
SUPPORTED = "0.4.4 to 0.6.x"
_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)")
# options lerobot 0.6 renamed: old name -> new name (passed under the name the lab's version knows)
RENAMED_IN_06 = {"eval_freq": "env_eval_freq"}
# 0.4.4's RA-BC flags became `sample_weighting.*` in 0.6 (not a plain rename: refused with the new form)
RABC_044 = ("use_rabc", "rabc_progress_path", "rabc_kappa", "rabc_epsilon", "rabc_head_mode")
PYAV_HOOK = Path(__file__).with_name("pyav_hook")


def pyav_only(env: dict[str, str]) -> dict[str, str]:
    """`env` for a lerobot process that decodes with PyAV: torchcodec marked absent in it and its children
    (pyav_hook/sitecustomize.py), so lerobot never tries to load a decoder it cannot load."""
    path = env.get("PYTHONPATH")
    return {**env, "PYTHONPATH": str(PYAV_HOOK) + (os.pathsep + path if path else "")}


class LerobotEnv(BaseModel):
    """A resolved lerobot environment (plain data: it travels inside the TrainPlan)."""

    executable: Path            # lerobot-train
    python: Path                # the interpreter that runs it
    version: str                # lerobot's version there, e.g. "0.6.1"
    same_as_conveyor: bool      # True when it is conveyor's own interpreter (lerobot importable here)

    @property
    def release(self) -> tuple[int, int, int]:
        return release(self.version)

    @property
    def uses_06_names(self) -> bool:
        """0.6's config names (`env_eval_freq`, `sample_weighting.*`) rather than 0.4.4's."""
        return self.release[:2] >= (0, 6)

    def accelerate(self) -> Path:
        return self.executable.parent / "accelerate"


def release(version: str) -> tuple[int, int, int]:
    m = _VERSION.match(version)
    return (int(m[1]), int(m[2]), int(m[3])) if m else (0, 0, 0)


def supported(version: str) -> bool:
    r = release(version)
    return OLDEST <= r and r[:2] <= NEWEST_MINOR


def default_executable() -> Path:
    return Path(sys.executable).parent / "lerobot-train"


def configured_executable(settings) -> Path:
    """`training.lerobot_train` from settings (relative to the config file's folder), else the default."""
    value = getattr(getattr(settings, "training", None), "lerobot_train", None)
    if not value:
        return default_executable()
    p = Path(value).expanduser()
    if not p.is_absolute():
        base = settings.config_path.parent if getattr(settings, "config_path", None) else Path.cwd()
        p = base / p
    return p


def interpreter_of(executable: Path) -> Path:
    """The Python that runs a console script: its `#!` line, else the `python` next to it."""
    try:
        with open(executable, "rb") as f:
            first = f.readline(512).decode("utf-8", "replace").strip()
    except OSError:
        first = ""
    if first.startswith("#!"):
        cand = first[2:].strip().split()[0] if first[2:].strip() else ""
        if cand and Path(cand).name.startswith("python") and Path(cand).is_file():
            return Path(cand)
    return executable.parent / "python"


def _same_interpreter(python: Path) -> bool:
    """Same bin folder as conveyor's interpreter (not resolved: two venvs share one base Python)."""
    return python.absolute().parent == Path(sys.executable).absolute().parent


@lru_cache(maxsize=32)
def _read_version(python: str, _stamp: int) -> str | None:
    code = "import importlib.metadata as m; print(m.version('lerobot'))"
    try:
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else None


def lerobot_version(executable: Path) -> str | None:
    """lerobot's version in the executable's environment; cached per path until the script changes
    (pip rewrites console scripts on every install)."""
    python = interpreter_of(executable)
    try:
        stamp = executable.stat().st_mtime_ns
    except OSError:
        return None
    return _read_version(str(python), stamp)


def resolve(settings) -> LerobotEnv:
    """The run's lerobot environment, refused in one sentence when missing or outside the supported range."""
    return for_executable(configured_executable(settings))


def for_executable(exe: Path) -> LerobotEnv:
    """The environment of one `lerobot-train` (the configured one, or the one a past run recorded)."""
    if not exe.is_file():
        raise ConveyorError(exe, "no lerobot-train here; set training.lerobot_train to the lab's lerobot-train "
                                 "executable or install lerobot next to conveyor.")
    python = interpreter_of(exe)
    version = lerobot_version(exe)
    if version is None:
        raise ConveyorError(exe, f"could not read lerobot's version with {python}; is lerobot installed in "
                                 "that environment?")
    if not supported(version):
        raise ConveyorError(exe, f"lerobot {version} is outside the supported range ({SUPPORTED}); install a "
                                 "supported lerobot in that environment.")
    return LerobotEnv(executable=exe, python=python, version=version, same_as_conveyor=_same_interpreter(python))


def probe(env: LerobotEnv, args: list[str], extra_env: dict[str, str] | None = None) -> dict:
    """Ask the environment (see lerobot_probe): in-process when it is conveyor's own, else in its interpreter,
    since the lab's lerobot need not be importable here (another version, another Python)."""
    if env.same_as_conveyor:
        return lerobot_probe.check(args)
    return run_script(env, Path(lerobot_probe.__file__), {"args": args}, "the preflight check", 300, extra_env)


def run_script(env: LerobotEnv, script: Path, request: dict, what: str, timeout: float,
               extra_env: dict[str, str] | None = None) -> dict:
    """Run one of conveyor's standalone scripts (`lerobot_probe`, `lerobot_eval`) in the environment's
    interpreter: the request as JSON on stdin, one JSON object back on stdout's last line."""
    code = (f"import runpy, sys; sys.argv = [{script.stem!r}]; "
            f"runpy.run_path({str(script)!r}, run_name='__main__')")
    try:
        r = subprocess.run([str(env.python), "-c", code], input=json.dumps(request), capture_output=True,
                           text=True, timeout=timeout, env={**os.environ, **(extra_env or {})})
    except (OSError, subprocess.SubprocessError) as e:
        raise ConveyorError(env.python, f"could not run {what} in the lab's environment: {e}") from None
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    try:
        return json.loads(last)
    except ValueError:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConveyorError(env.python, f"{what} in the lab's environment failed: {tail}") from None
