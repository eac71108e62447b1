"""Deep validation's lerobot part, started from here in a niced child process (conveyor/lerobot_loader.py): the
caller never imports torch or datasets. The child's checks come back as JSON; a child that dies is one line, the
exception's, never traceback text.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conveyor.reports import ValidationReport
from conveyor.store import Store


def validate_lerobot(store: str | Path, *, episodes: list[int] | None = None) -> ValidationReport:
    """Only the lerobot part of the deep check, for episodes the fast check already covered (the watch
    flow fast-validates every commit, so its deep check need not redo that work in its own process)."""
    t0 = time.monotonic()
    s = Store.open(store)
    report = ValidationReport(store=str(s.root), deep=True, version=s.version)
    if not s.info:
        report.add("store has committed data", False, "no meta/info.json (empty store)")
        return report
    n = int(s.info["total_episodes"])
    report.episodes_checked = list(range(n)) if episodes is None else [e for e in episodes if 0 <= e < n]
    run_lerobot_check(s.root, report.episodes_checked, report)
    report.seconds = time.monotonic() - t0
    return report


def run_lerobot_check(root: Path, todo: list[int], report: ValidationReport) -> None:
    """Run the lerobot part (conveyor/lerobot_loader.py) in a niced child process: its imports (torch, datasets:
    ~7 s and ~1 GB) then never hold this process's GIL or memory, which matters in the long-running
    watch/worker process. A check the fast part already reported word for word is not repeated."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="conveyor-deep-") as tmp:
        out = Path(tmp) / "checks.json"
        here = str(Path(__file__).resolve().parents[1])  # the child imports this very conveyor
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
        proc = subprocess.run([sys.executable, "-m", "conveyor.lerobot_loader", str(root), json.dumps(todo),
                               str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0 or not out.exists():
            report.add("lerobot deep check ran", False,
                       f"exit {proc.returncode}: {last_error_line(proc.stdout.decode(errors='replace'))}")
            return
        child = json.loads(out.read_text())
        seen = {(c.name, c.ok, c.detail) for c in report.checks}
        for c in child["checks"]:
            if (c["name"], c["ok"], c["detail"]) not in seen:
                report.add(c["name"], c["ok"], c["detail"])
        report.frames_compared += child["frames_compared"]
        report.pixel_identical += child["pixel_identical"]


def last_error_line(output: str) -> str:
    """The exception line of a child's output (`OSError: Unexpected end of stream`), never traceback text."""
    lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", ln):
            return ln
    frames = ("Traceback", "File ", "^", "~")
    rest = [ln for ln in lines if not ln.startswith(frames)]
    return rest[-1] if rest else "no output"
