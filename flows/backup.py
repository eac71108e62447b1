"""`backup` flow: snapshot every store (and raw recording) into object storage, verify a sample, apply
retention, publish a table. Deployment `backup` (pool `cpu`, cron `backup.cron`, default 30 3 * * *).

A failing target does not stop the others; the run ends Failed, naming them, if any failed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from conveyor.errors import ConveyorError, mask_userinfo
from conveyor.settings import Settings, load_settings
from conveyor.store import is_store
from tasks.backup import DELAYS, apply_retention, backup_target, verify_snapshot


def backup_targets(settings: Settings, include_sources: bool | None = None) -> list[tuple[str, Path]]:
    """(target name, folder): every store under store_root, plus every configured source as `<name>.source`."""
    out = []
    if settings.store_root.is_dir():
        out += [(p.name, p) for p in sorted(settings.store_root.iterdir()) if p.is_dir() and is_store(p)]
    if settings.backup.include_sources if include_sources is None else include_sources:
        out += [(f"{s.name}.source", s.path) for s in settings.sources]
    return out


@flow(name="backup", flow_run_name="backup")
def backup(config: str | None = None, url: str | None = None, targets: list[str] | None = None,
           verify_sample: int | None = None, retention: bool = True,
           retry_delay_seconds: list[float] | None = None) -> list[dict[str, Any]]:
    """Back up every store and source (or only `targets`, by target name) to `url` (default storage_url)."""
    log = get_run_logger()
    settings = load_settings(config)
    url = url or settings.storage_url
    plan = backup_targets(settings)
    if targets:
        unknown = set(targets) - {n for n, _ in plan}
        if unknown:
            raise ConveyorError(settings.config_path or "settings", f"unknown backup target(s): {sorted(unknown)}")
        plan = [(n, p) for n, p in plan if n in targets]
    delays = DELAYS if retry_delay_seconds is None else retry_delay_seconds
    task = backup_target.with_options(retries=len(delays), retry_delay_seconds=delays)
    verify_task = verify_snapshot.with_options(retries=len(delays[:2]), retry_delay_seconds=delays[:2] or 0)
    retention_task = apply_retention.with_options(retries=len(delays[:2]), retry_delay_seconds=delays[:2] or 0)
    sample = settings.backup.verify_sample if verify_sample is None else verify_sample

    rows, failed = [], []
    for name, path in plan:
        state = task(name, path, url, config, return_state=True)
        if not state.is_completed():
            err = state.result(raise_on_failure=False)
            failed.append(f"{name}: {err}")
            rows.append({"target": name, "status": "FAILED", "snapshot": "", "files sent": 0, "files skipped": 0,
                         "MB sent": 0.0, "MB total": 0.0, "seconds": 0.0, "MB/s": 0.0, "verified": "",
                         "error": str(err)})
            continue
        r = state.result()
        v = verify_task(url, r.snapshot, sample, config, return_state=True) if sample else None
        if v is not None and not v.is_completed():
            failed.append(f"{name}: {v.result(raise_on_failure=False)}")
        rows.append({"target": name, "status": "ok" if v is None or v.is_completed() else "VERIFY FAILED",
                     "snapshot": r.snapshot, "files sent": r.files_sent, "files skipped": r.files_skipped,
                     "MB sent": round(r.bytes_sent / 1e6, 2), "MB total": round(r.bytes_total / 1e6, 2),
                     "seconds": round(r.seconds, 2), "MB/s": round(r.throughput_mb_s, 1),
                     "verified": "" if v is None else (f"{v.result().objects_read} objects" if v.is_completed()
                                                       else "FAILED"),
                     "error": "; ".join(r.changed[:3]) and f"changed while read: {', '.join(r.changed[:3])}"})
    if retention and len(failed) < len(plan):  # when every target failed, the storage is likely unreachable
        p = retention_task(url, settings.backup.keep_daily, settings.backup.keep_weekly, config, return_state=True)
        if not p.is_completed():
            failed.append(f"retention: {p.result(raise_on_failure=False)}")
    create_table_artifact(table=rows, key="backup",
                          description=f"{len(plan) - len([r for r in rows if r['status'] != 'ok'])} of {len(plan)} "
                                      f"target(s) backed up to {mask_userinfo(url)}")
    if failed:
        log.error("backup failed (%d problem(s)): %s", len(failed), " | ".join(failed))
        raise RuntimeError(f"backup failed ({len(failed)} problem(s)): " + " | ".join(failed))
    return rows
