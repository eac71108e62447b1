"""Prefect tasks around the core store: append, compact, validate, record the version, trigger training.

Each is a thin wrapper: the work is in `conveyor.*`; here are retries (transient I/O only), the
one-writer-per-store global concurrency limit, artifacts and logging.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from prefect import get_run_logger, task
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment

from conveyor import sizing
from conveyor.reports import IngestReport
from conveyor.version import DatasetVersion
from conveyor.settings import TrainTriggerSettings
from conveyor.trigger import idempotency_key, render_parameters
from tasks.artifacts import Progress, slug, version_record
from tasks.limits import store_limit
from tasks.retry import RETRY
from tasks.views import ingest_done_text


@task(name="append-episodes", **RETRY)
def append_episodes(source_name: str, source_path: Path, store_path: Path, task_text: str | None = None,
                    data_mb: float = sizing.DATA_MB, video_mb: float = sizing.VIDEO_MB,
                    store_slot: bool = True) -> IngestReport:
    """Append the source's complete new episodes to the store; bad episodes are quarantined by the core,
    the rest still lands. Holds the store's Prefect concurrency slot (unless `store_slot` is false), then the
    store's own file lock, which alone already makes writers take turns."""
    from conveyor.ingest import ingest as core_ingest

    log = get_run_logger()
    progress = Progress(key=f"ingest-progress-{slug(source_name)}")
    # Prefect's slot costs ~2 s per use in 3.9 (its lease-renewal thread is joined with a 2 s timeout on
    # exit): the watcher, the one writer of its sources, skips it and relies on the store's file lock
    with concurrency(store_limit(source_name), occupy=1) if store_slot else nullcontext():
        report = core_ingest(Path(source_path), Path(store_path), task=task_text, data_mb=data_mb,
                             video_mb=video_mb, progress=progress)
    progress(1, 1, ingest_done_text(report))
    log.info("%s: %d new episode(s), %d already in the store, %d quarantined, %d still recording -> commit %s "
             "(%d episodes, %.2f s)", source_name, len(report.added), report.already, len(report.quarantined),
             len(report.incomplete), report.version.commit, report.version.total_episodes, report.seconds)
    for q in report.quarantined:
        log.warning("quarantined source episode %d: %s", q.source_episode_index, q.reason)
    return report


@task(name="compact-store", **RETRY)
def compact_store(store_name: str, store_path: Path):
    """Merge small files into few large ones, as one atomic commit, under the store's writer slot."""
    from conveyor.compact import compact

    with concurrency(store_limit(store_name), occupy=1):
        return compact(Path(store_path), progress=Progress(f"compact-progress-{slug(store_name)}"))


@task(name="record-version")
def record_version(store_name: str, store_path: Path, version: DatasetVersion) -> DatasetVersion:
    """Publish the committed version (commit id, totals, content hash) as a keyed, versioned artifact."""
    version_record(store_name, str(store_path), version)
    get_run_logger().info("%s is at commit %d (%s): %d episodes, %d frames, content %s", store_name,
                          version.commit, version.commit_id, version.total_episodes, version.total_frames,
                          version.content_hash)
    return version


@task(name="trigger-training", **RETRY)
def trigger_training(training: TrainTriggerSettings, store_name: str, store_path: Path,
                     version: DatasetVersion) -> str:
    """Fire-and-forget the training deployment with `training.parameters` rendered for this store version;
    the idempotency key (store + content hash) makes a retried ingest return the existing run instead of
    creating a second one. The one trigger of the ingest and nightly flows."""
    parameters = render_parameters(training.parameters, store=store_name, store_path=str(store_path),
                                   version=version)
    key = idempotency_key(store_name, version)
    run = run_deployment(training.deployment, parameters=parameters, timeout=0, idempotency_key=key)
    get_run_logger().info("training run %s (%s) for %s at commit %d (key %s)", run.name, run.id, store_name,
                          version.commit, key)
    return str(run.id)
