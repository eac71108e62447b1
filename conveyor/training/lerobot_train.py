"""Run `lerobot-train` as a child process: stream its output line by line, keep a log file, parse metrics.

A subprocess (not `train()` in-process) because lerobot's `train` seeds globally, configures the root logger,
reads `sys.argv` in `validate()` and must be killable without taking the Prefect worker down.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from conveyor.processes import stop_process

_NUM = r"[-+0-9.eE]+"
# MetricsTracker.__str__, the same fields in 0.4.4 and 0.6.x:
#   "step:1K smpl:2K ep:3 epch:0.05 loss:0.123 grdn:4.567 lr:1.0e-04 updt_s:0.300 data_s:0.020"
# 0.6 appends "smp/s:22" and the policy's sub-losses ("l1_loss:0.8 kld_loss:7.1", SmolVLA "losses_after_*"),
# and prints it right after tqdm's "\rTraining: 25%|...| 1/4 [...]" on the same physical line (both versions).
METRICS_RE = re.compile(
    rf"step:(?P<step>{_NUM})(?P<sfx>[KMBTQ]?) smpl:\S+ ep:\S+ epch:(?P<epoch>{_NUM}) loss:(?P<loss>{_NUM}|nan) "
    rf"grdn:(?P<grad>{_NUM}|nan|inf) lr:(?P<lr>{_NUM}) updt_s:(?P<updt>{_NUM}) data_s:(?P<data>{_NUM})")
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12, "Q": 10**15}
_TQDM = re.compile(r"^\s*Training:\s+\d+%\|")
_TQDM_STEP = re.compile(r"\|\s*(\d+)/\d+ \[")     # "...| 3/20 [09:35<51:57, 183.41s/step]"
_LEVEL = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) \d{4}-\d\d-\d\d ")


@dataclass
class StepMetrics:
    step: int
    loss: float
    grad_norm: float
    lr: float
    update_s: float
    data_s: float
    samples_per_s: float
    epoch: float


def parse_metrics(line: str, batch_size: int, expected_step: int | None = None) -> StepMetrics | None:
    """One lerobot log line -> metrics. lerobot prints steps >= 1000 rounded ("1K"), so the caller passes
    the step it expects (start step + log_freq multiples) and it is used when it agrees with the rounding."""
    m = METRICS_RE.search(line)
    if not m:
        return None
    shown = float(m["step"]) * _SUFFIX[m["sfx"]]
    step = int(shown)
    if expected_step is not None and (not m["sfx"] or abs(expected_step - shown) <= 0.5 * _SUFFIX[m["sfx"]]):
        step = expected_step if m["sfx"] else step
    per_step = float(m["updt"]) + float(m["data"])
    return StepMetrics(step=step, loss=float(m["loss"]), grad_norm=float(m["grad"]), lr=float(m["lr"]),
                       update_s=float(m["updt"]), data_s=float(m["data"]),
                       samples_per_s=batch_size / per_step if per_step > 0 else 0.0, epoch=float(m["epoch"]))


@dataclass
class RunResult:
    returncode: int
    log_path: Path
    metrics: list[StepMetrics] = field(default_factory=list)
    seconds: float = 0.0
    ended_cleanly: bool = False    # "End of training" seen and exit 0

    @property
    def signal(self) -> int | None:
        return -self.returncode if self.returncode < 0 else None


def lerobot_command(args: list[str], executable: Path, gpus: int = 1) -> list[str]:
    """`executable` (the lab's lerobot-train); `accelerate launch` from the same environment for several GPUs."""
    if gpus > 1:
        return [str(executable.parent / "accelerate"), "launch", "--multi_gpu", f"--num_processes={gpus}",
                str(executable), *args]
    return [str(executable), *args]


def run_lerobot_train(cmd: list[str], env: dict[str, str], log_dir: Path, *, batch_size: int, log_freq: int,
                      start_step: int = 0, on_line: Callable[[str], None] | None = None,
                      on_metrics: Callable[[StepMetrics], None] | None = None,
                      on_step: Callable[[int], None] | None = None,
                      pid_file: Path | None = None) -> RunResult:
    """Start `cmd`, tee every output line to `log_dir/train-<timestamp>.log` and `on_line`, return at exit.

    tqdm's carriage-return progress bar is kept in the file but not passed to `on_line` (it is noise in
    Prefect's log view; the progress artifact replaces it); its step count goes to `on_step`, which hears
    every step even when log_freq is longer than the run. The child runs in its own session so a cancel
    or crash of this process can kill its whole group.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"train-{datetime.now():%Y%m%d-%H%M%S-%f}.log"
    env = {**env, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    result = RunResult(returncode=-1, log_path=log_path)
    next_step = (start_step // log_freq + 1) * log_freq
    with open(log_path, "w", encoding="utf-8", buffering=1) as log:
        log.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, bufsize=0)
        if pid_file:
            pid_file.write_text(f"{proc.pid}\n")
        try:
            buf = b""
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            while chunk := os.read(fd, 65536):
                buf += chunk
                *lines, buf = re.split(rb"\r\n|\r|\n", buf)
                for raw in lines:
                    next_step = _handle(raw.decode("utf-8", "replace"), log, result, batch_size, log_freq,
                                        next_step, on_line, on_metrics, on_step)
            if buf:
                _handle(buf.decode("utf-8", "replace"), log, result, batch_size, log_freq, next_step, on_line,
                        on_metrics, on_step)
            proc.wait()
        except BaseException:
            stop_process(proc, timeout=10)
            raise
        finally:
            if pid_file:
                pid_file.unlink(missing_ok=True)
        result.returncode = proc.returncode
        result.ended_cleanly = result.ended_cleanly and proc.returncode == 0
        result.seconds = time.monotonic() - t0
        log.write(f"[conveyor] lerobot-train exited with code {proc.returncode} after {result.seconds:.1f} s\n")
    return result


def _handle(line: str, log, result: RunResult, batch_size: int, log_freq: int, next_step: int,
            on_line, on_metrics, on_step=None) -> int:
    if not line.strip():
        return next_step
    if _TQDM.match(line):
        if on_step and (t := _TQDM_STEP.search(line)):
            on_step(int(t[1]))
        m = _LEVEL.search(line)      # a log record printed right after a bar fragment, same physical line
        if not m:
            log.write(line + "\n")
            return next_step
        log.write(line[:m.start()] + "\n")
        line = line[m.start():]
    log.write(line + "\n")
    if on_line:
        on_line(line)
    if "End of training" in line:
        result.ended_cleanly = True
    m = parse_metrics(line, batch_size, next_step)
    if m:
        result.metrics.append(m)
        if on_metrics:
            on_metrics(m)
        return (m.step // log_freq + 1) * log_freq
    return next_step
