"""`ingest` flow: land a source's complete new episodes in its store, validate, record, maybe train.

Runs from the UI/CLI through the `ingest` deployment (a worker on pool `cpu`), and in-process as a
subflow of the `watch` flow, which is how a finished episode lands within seconds.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from conveyor.settings import load_settings
from conveyor.trigger import training_due
from tasks.artifacts import episode_table, quarantine_summary
from tasks.datasets import publish_task
from tasks.review import review_sheet
from tasks.views import (ingest_run_name, rename_this_run, store_overview, validation_failed,
                         validation_summary)
from tasks.ingest import append_episodes, record_version, trigger_training
from tasks.validate import validate_deep_task, validate_fast_task


@flow(name="ingest", flow_run_name="ingest-{source}")
def ingest(source: str, config: str | None = None, deep: bool = True, train: bool | None = None,
           nightly: bool = False, store_slot: bool = True, review: bool = True) -> dict[str, Any]:
    """Ingest a source's complete new episodes into its store (the store of the same name under store_root).

    Args:
        source: the `[[sources]]` name in conveyor.toml.
        config: conveyor.toml on the worker (empty: $CONVEYOR_CONFIG, else ./conveyor.toml).
        deep: also load the new episodes through lerobot (its own task).
        train: empty follows the `training.policy` setting; true always starts training, false never.
        nightly: the caller is the nightly run (for `policy = "nightly"`).
        store_slot: take the store's Prefect concurrency slot while appending (false: the caller is the
            store's one writer, as the watch flow is; the store's own file lock still applies).
        review: make the new episodes' review sheet here (false: the caller attaches it to this run later,
            as the watch flow does, so that ~0.3 s per episode does not hold back the next episode's commit).
    """
    log = get_run_logger()
    settings = load_settings(config)
    src = settings.source(source)
    store = settings.store_path(source)

    report = append_episodes(src.name, src.path, store, src.task, settings.data_files_size_in_mb,
                             settings.video_files_size_in_mb, store_slot)
    if report.added:
        episode_table(src.name, report)
    quarantine_summary(src.name, report)

    version = report.version
    new = [m.episode_index for m in report.added]
    rename_this_run(ingest_run_name(src.name, report))
    if new:
        try:
            fast = validate_fast_task(store, src.path, new)
            deep_report = validate_deep_task(store, src.path, new) if deep else None
        except Exception as e:
            validation_failed(src.name, version.commit, e)
            raise
        validation_summary(src.name, version.commit, fast, deep_report,
                           "" if deep else "Deep check (lerobot load): not run here; when the watch flow "
                                           "started this run, it adds the deep verdict here when done.")
        record_version(src.name, store, version)
        publish_task(src.name, store, config)  # before any trigger: a worker elsewhere trains on this version

    if new or report.quarantined:
        try:
            store_overview(src.name, store)
        except Exception as e:  # noqa: BLE001 - a picture must never fail an ingest
            log.warning("store overview artifact not updated: %s", e)
    if new and review:
        try:
            review_sheet(src.name, store, new)
        except Exception as e:  # noqa: BLE001 - a picture must never fail an ingest
            log.warning("review sheet artifact not made: %s", e)

    run_id = None
    before = version.total_episodes - len(new)
    due = train if train is not None else training_due(settings.training, before, version.total_episodes,
                                                        nightly=nightly)
    if due and version.total_episodes:
        run_id = trigger_training(settings.training, src.name, store, version)
    if report.quarantined:
        log.warning("%d episode(s) of %s quarantined; see the quarantine artifact", len(report.quarantined),
                    src.name)
    return {"source": src.name, "store": str(store), "added": new,
            "quarantined": {q.source_episode_index: q.reason for q in report.quarantined},
            "incomplete": report.incomplete, "version": version.to_dict(), "training_run": run_id,
            "run_id": str(flow_run.get_id() or "")}
