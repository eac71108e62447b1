"""`nightly` flow (deployment `nightly`, cron from settings): catch up, compact, scrub (and repair), deep-check,
report.

Catches anything the watcher missed, merges the day's many small files, and runs the full lerobot load
over the whole store, one source after the other; one failing source does not stop the others.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from conveyor.errors import ConveyorError
from conveyor.settings import load_settings
from flows.ingest import ingest
from conveyor.trigger import training_due
from tasks.datasets import publish_task
from tasks.ingest import compact_store, trigger_training
from tasks.validate import validate_deep_task
from tasks.scrub import scrub_and_repair
from tasks.views import store_overview


@flow(name="nightly")
def nightly(config: str | None = None, compact: bool = True, deep: bool = True) -> dict[str, Any]:
    log = get_run_logger()
    settings = load_settings(config)
    rows: dict[str, Any] = {}
    failed = []
    for src in settings.sources:
        row: dict[str, Any] = {}
        try:
            res = ingest(source=src.name, config=config, deep=False, train=False)
            row.update(added=len(res["added"]), quarantined=len(res["quarantined"]),
                       episodes=res["version"]["total_episodes"])
            store = settings.store_path(src.name)
            if compact and res["version"]["total_episodes"]:
                rep = compact_store(src.name, store)
                row.update(files_before=rep.files_before, files_after=rep.files_after)
                publish_task(src.name, store, config)  # the compacted commit is a version too
                if rep.rewritten:
                    store_overview(src.name, store)  # a compaction is a commit: the store artifact follows
            if settings.scrub.enabled and res["version"]["total_episodes"]:  # after compaction, before training
                row["scrub"] = scrub_and_repair(src.name, store, config, settings.storage_url)
            if deep and res["version"]["total_episodes"]:
                validate_deep_task(store, src.path, None)
                row["deep"] = "ok"
            n = res["version"]["total_episodes"]
            if training_due(settings.training, n, n, nightly=True):
                from conveyor.store import Store

                version = Store.open(store).version  # after compaction: train on what is committed now
                row["training_run"] = trigger_training(settings.training, src.name, store, version)
        except Exception as e:  # noqa: BLE001 - reported below, the flow still fails at the end
            log.error("%s: %s", src.name, e)
            row["error"] = str(e)
            failed.append(src.name)
        rows[src.name] = row
    lines = ["# Nightly report", "", "| source | result |", "| --- | --- |"]
    lines += [f"| {n} | {', '.join(f'{k}={v}' for k, v in r.items())} |" for n, r in rows.items()]
    create_markdown_artifact("\n".join(lines), key="nightly-report", description="nightly catch-up run")
    if failed:
        raise ConveyorError(settings.config_path or "settings",
                            "nightly run failed: " + " | ".join(f"{n}: {rows[n]['error']}" for n in failed))
    return rows
