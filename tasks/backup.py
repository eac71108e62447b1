"""Prefect tasks around `conveyor.backup`: one snapshot per target, a sampled verify, retention. Work lives
in `conveyor.backup`; here are retries (transient storage errors only, `tasks.retry`), logging and progress
artifacts."""
from __future__ import annotations

import threading
from pathlib import Path

from prefect import get_run_logger, task

from conveyor.backup import BackupReport, PruneReport, VerifyReport
from conveyor.backup import backup as core_backup
from conveyor.backup import prune as core_prune
from conveyor.backup import verify as core_verify
from conveyor.datasets.retention import prune_versions
from conveyor.errors import ConveyorError
from conveyor.settings import load_settings
from tasks.artifacts import Progress, slug
from conveyor.repo import open_repo
from tasks.repo import load_storage_settings
from tasks.retry import retry_transient

DELAYS = [5.0, 30.0, 120.0]


def _this_thread_only(cb):
    """Transfers report progress from worker threads; Prefect artifacts need the task's own thread."""
    owner = threading.get_ident()

    def forward(done: int, total: int, desc: str) -> None:
        if threading.get_ident() == owner:
            cb(done, total, desc)
    return forward


@task(name="backup-target", retries=len(DELAYS), retry_delay_seconds=DELAYS, retry_condition_fn=retry_transient)
def backup_target(name: str, path: Path, url: str, config: str | None = None) -> BackupReport:
    """One snapshot of a store or recording. A retry starts over; objects already sent are not re-sent."""
    log = get_run_logger()
    settings = load_settings(config)
    with open_repo(url, load_storage_settings(config)) as repo:
        r = core_backup(path, repo, name=name, index_dir=settings.work_dir / "backup-index",
                        progress=_this_thread_only(Progress(key=f"backup-progress-{slug(name)}")),
                        concurrency=settings.transfer.max_concurrency)
    log.info("%s -> %s@%s: %d files (%d sent, %d already stored), %.1f MB sent in %.2f s",
             path, url, r.snapshot, r.files_total, r.files_sent, r.files_skipped, r.bytes_sent / 1e6, r.seconds)
    for rel in r.changed:
        log.warning("%s: changed while being read; not in this snapshot, the next backup takes it", path / rel)
    return r


@task(name="verify-snapshot", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
def verify_snapshot(url: str, snapshot: str, sample: int, config: str | None = None) -> VerifyReport:
    with open_repo(url, load_storage_settings(config)) as repo:
        r = core_verify(repo, snapshot, sample=sample)
    if not r.ok:
        raise ConveyorError(f"{url}@{snapshot}", "verification failed: " + "; ".join(r.failures[:5]))
    get_run_logger().info("%s@%s verified: %d objects present, %d re-read", url, snapshot, r.objects_total,
                          r.objects_read)
    return r


@task(name="apply-retention", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
def apply_retention(url: str, keep_daily: int, keep_weekly: int, config: str | None = None) -> PruneReport:
    """Published dataset versions past their retention first, then snapshots, then unreferenced objects."""
    log = get_run_logger()
    with open_repo(url, load_storage_settings(config)) as repo:
        v = prune_versions(repo, load_settings(config).datasets.keep_days)
        r = core_prune(repo, keep_daily, keep_weekly)
    if v.deleted:
        log.info("%s: deleted %d expired published dataset version(s), kept %d (%d pinned by unfinished runs)", url,
                 len(v.deleted), len(v.kept), len(v.pinned))
    log.info("%s: kept %d snapshot(s), deleted %d snapshot(s) and %d unreferenced object(s)", url, len(r.kept),
             len(r.deleted_snapshots), r.deleted_objects)
    if r.gc_skipped:
        log.warning(r.gc_skipped)
    return r
