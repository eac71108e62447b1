"""`curate` flow (deployment `curate` on work pool `cpu`): drop, undrop, trim, retask or rename, from the UI form.

One commit under the store's writer slot, so a new dataset version; the run is renamed after what it did, shows
before -> after and the new version (published, so a train run can pin it), and refreshes the store picture.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from conveyor.curate_request import CurateRequest
from conveyor.settings import load_settings
from tasks.curate import curate_run_name, curate_store, curation_artifact
from tasks.datasets import publish_task
from tasks.ingest import record_version
from tasks.views import rename_this_run, store_overview


@flow(name="curate", flow_run_name="curate-{request.store}-{request.action}")
def curate(request: CurateRequest, config: str | None = None) -> dict[str, Any]:
    """Change a store's episodes as one commit: a new dataset version; every earlier one stays.

    Args:
        request: the store, the action and what it needs (episodes, reason, task, start/end).
        config: conveyor.toml on the worker (empty: $CONVEYOR_CONFIG, else ./conveyor.toml).
    """
    log = get_run_logger()
    settings = load_settings(config)
    store = settings.store_path(request.store)
    report = curate_store(request.store, store, request)
    rename_this_run(curate_run_name(request.store, request, report))
    curation_artifact(request.store, request, report)
    record_version(request.store, store, report.version)
    publish_task(request.store, store, config)  # the train form pins published versions
    try:
        store_overview(request.store, store)
    except Exception as e:  # noqa: BLE001 - a picture must never fail a curation
        log.warning("store overview artifact not updated: %s", e)
    return {"store": str(store), "action": request.action, **report.to_dict(),
            "run_id": str(flow_run.get_id() or "")}
