"""Prefect tasks around `conveyor.datasets`: publish a store's new version, release a finished run's pin.
Work lives in `conveyor.datasets`; here are retries (transient storage errors only) and logging."""
from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from conveyor.datasets.publish import PublishReport, publish
from conveyor.datasets.resolve import release_pin
from conveyor.repo import open_repo
from tasks.repo import load_storage_settings
from tasks.retry import RETRY


@task(name="publish-version", **RETRY)
def publish_task(store_name: str, store_path: Path, config: str | None = None) -> PublishReport | None:
    """Publish the store's committed version to storage_url (incremental; a no-op when already there)."""
    settings = load_storage_settings(config)
    log = get_run_logger()
    if not settings.storage_url:
        log.warning("%s: no storage_url set, the new version is not published (other machines cannot train on it)",
                    store_name)
        return None
    with open_repo(None, settings) as repo:
        r = publish(Path(store_path), repo, name=store_name, concurrency=settings.transfer.max_concurrency)
    if r.published:
        log.info("published %s %s to %s: %d files (%d new, %.1f MB sent) in %.2f s", store_name, r.version.short,
                 r.url, r.files_total, r.files_sent, r.bytes_sent / 1e6, r.seconds)
    else:
        log.info("%s %s is already published to %s", store_name, r.version.short, r.url)
    return r


@task(name="release-dataset-pin", **RETRY)
def release_pin_task(run_name: str, run_dir: Path, archive_url: str | None, config: str | None = None) -> None:
    """The run finished: its dataset version no longer has to outlive the retention rule."""
    pin = release_pin(load_storage_settings(config), run_name, Path(run_dir), archive_url)
    if pin is not None:
        get_run_logger().info("run %s finished on %s %s; pin released", run_name, pin.store, pin.version.short)
