"""The validation tasks: `validate-fast` and the one `validate-deep` (the ingest flow, nightly, and the watch
flow's deferred deep check), each logging every check and failing, in one line, on any failed one."""
from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from conveyor.errors import ConveyorError
from conveyor.reports import ValidationReport
from tasks.retry import RETRY


def log_checks_fail_on_any(report: ValidationReport, store_path: Path, kind: str) -> ValidationReport:
    """Log each check of `report` (errors for the failed ones); raise one line naming them all if any failed."""
    log = get_run_logger()
    for c in report.checks:
        (log.info if c.ok else log.error)("%s %s: %s %s", kind, c.name, "ok" if c.ok else "FAILED", c.detail)
    if not report.ok:
        detail = "; ".join(f"{c.name}: {c.detail}" for c in report.failures)
        raise ConveyorError(store_path, f"{kind} validation failed: {detail}")
    return report


@task(name="validate-fast", **RETRY)
def validate_fast_task(store_path: Path, against: Path | None = None,
                       episodes: list[int] | None = None) -> ValidationReport:
    """Cheap structural check of what was just committed (no lerobot import)."""
    from conveyor.validate import validate_fast

    return log_checks_fail_on_any(validate_fast(Path(store_path), against=against, episodes=episodes),
                                  store_path, "fast")


@task(name="validate-deep", **RETRY)
def validate_deep_task(store_path: Path, against: Path | None = None, episodes: list[int] | None = None,
                       lerobot_only: bool = False) -> ValidationReport:
    """Load the episodes through lerobot's own LeRobotDataset (decodes frames; lerobot in a niced child process);
    slow, so its own task. `lerobot_only`: only lerobot's part, for episodes whose fast check already ran in
    their ingest run (the watch flow's deferred deep check)."""
    if lerobot_only:
        from conveyor.lerobot_check import validate_lerobot

        report = validate_lerobot(Path(store_path), episodes=episodes)
    else:
        from conveyor.validate import validate_deep

        report = validate_deep(Path(store_path), against=against, episodes=episodes)
    return log_checks_fail_on_any(report, store_path, "deep")
