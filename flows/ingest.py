"""`ingest` flow: land a source's complete new episodes in its store, validate, record, maybe train.

Runs from the UI/CLI through the `ingest` deployment (a worker on pool `cpu`), and in-process as a
subflow of the `watch` flow, which is how a finished episode lands within seconds.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from conveyor.settings import load_settings
from conveyor.trigger import render_parameters, training_due
from tasks.artifacts import episode_table, quarantine_summary
from tasks.datasets import publish_task
from tasks.ingest import (append_episodes, record_version, trigger_training, validate_deep_task,
                          validate_fast_task)


@flow(name="ingest", flow_run_name="ingest-{source}")
def ingest(source: str, config: str | None = None, deep: bool = True, train: bool | None = None,
           nightly: bool = False) -> dict[str, Any]:
    """Ingest source `source` (a `[[sources]]` name) into `<store_root>/<source>`.

    deep: also load the new episodes through lerobot (its own task). train: None follows the
    `training.policy` setting, True forces a trigger, False never triggers. nightly: the caller is the
    nightly run (for `policy = "nightly"`).
    """
    log = get_run_logger()
    settings = load_settings(config)
    src = settings.source(source)
    store = settings.store_path(source)

    report = append_episodes(src.name, src.path, store, src.task, settings.data_files_size_in_mb,
                             settings.video_files_size_in_mb)
    if report.added:
        episode_table(src.name, report)
    quarantine_summary(src.name, report)

    version = report.version
    new = [m.episode_index for m in report.added]
    if new:
        validate_fast_task(store, src.path, new)
        if deep:
            validate_deep_task(store, src.path, new)
        record_version(src.name, store, version)
        publish_task(src.name, store, config)  # before any trigger: a worker elsewhere trains on this version

    run_id = None
    before = version.total_episodes - len(new)
    due = train if train is not None else training_due(settings.training, before, version.total_episodes,
                                                        nightly=nightly)
    if due and version.total_episodes:
        params = render_parameters(settings.training.parameters, store=src.name, store_path=str(store),
                                   version=version)
        run_id = trigger_training(src.name, version, settings.training.deployment, params)
    if report.quarantined:
        log.warning("%d episode(s) of %s quarantined; see the quarantine artifact", len(report.quarantined),
                    src.name)
    return {"source": src.name, "store": str(store), "added": new,
            "quarantined": {q.source_episode_index: q.reason for q in report.quarantined},
            "incomplete": report.incomplete, "version": version.model_dump(), "training_run": run_id}
