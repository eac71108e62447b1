"""Prefect tasks around `conveyor.scrub` and `conveyor.repair`: scrub a store, heal it from backups,
publish what was damaged, repaired and lost. The work is in the domain modules; here are retries,
the store's writer slot for a repair, logging and the artifact."""
from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.concurrency.sync import concurrency

from conveyor.errors import ConveyorError
from conveyor.repair import RepairReport, has_snapshots, repair, scrub_then_repair
from conveyor.scrub import ScrubReport, scrub
from conveyor.settings import load_settings
from tasks.artifacts import Progress, slug
from conveyor.repo import open_repo
from tasks.repo import load_storage_settings
from tasks.retry import retry_transient
from tasks.limits import store_limit
from tasks.retry import RETRY


@task(name="scrub-store", **RETRY)
def scrub_store(store_name: str, store_path: Path, workers: int = 2) -> ScrubReport:
    """Read every committed file against its sha256; safe while the watcher appends (no slot needed)."""
    r = scrub(Path(store_path), workers=workers, progress=Progress(f"scrub-progress-{slug(store_name)}"))
    log = get_run_logger()
    for d in r.problems:
        log.error("%s: %s", store_name, d.line())
    log.info("%s", r.summary())
    return r


@task(name="repair-store", retries=3, retry_delay_seconds=[5, 30, 120], retry_condition_fn=retry_transient)
def repair_store(store_name: str, store_path: Path, url: str, config: str | None,
                 found: ScrubReport) -> RepairReport:
    """Heal damaged or missing files from the repository's snapshots, holding the store's writer slot."""
    log = get_run_logger()
    with open_repo(url, load_storage_settings(config)) as repo, concurrency(store_limit(store_name), occupy=1):
        r = repair(Path(store_path), repo, found=found)
    for h in r.healed:
        log.warning("%s: healed %s from %s@%s", store_name, h.path, url, h.snapshot)
    for d in r.lost:
        log.error("%s: LOST %s: %s", store_name, d.path, d.holds())
    return r


def wants_repair(config: str | None, url: str) -> bool:
    """`scrub.repair` from settings; unset means: repair when the repository holds a snapshot."""
    setting = load_settings(config).scrub.repair
    if setting is not None:
        return setting
    try:
        with open_repo(url, load_storage_settings(config)) as repo:
            return has_snapshots(repo)
    except ConveyorError:
        return False  # unreachable storage: nothing to repair from; the damage is still reported


def scrub_report(store_name: str, found: ScrubReport, repaired: RepairReport | None) -> str:
    """Markdown artifact `scrub-<store>`: damaged / repaired / lost files and the episodes they hold."""
    healed = {h.path: h for h in repaired.healed} if repaired else {}
    lost = {d.path for d in repaired.lost} if repaired else set()
    lines = [f"# Scrub of `{store_name}`", "", found.summary(), ""]
    if found.problems:
        lines += ["| file | found | holds | outcome |", "| --- | --- | --- | --- |"]
        for d in found.problems:
            if d.path in healed:
                outcome = f"repaired from `{healed[d.path].snapshot}`"
            elif d.path in lost:
                outcome = "**LOST**: no snapshot holds the committed bytes"
            elif d.problem == "extra":
                outcome = "left in place"
            else:
                outcome = "**not repaired**"
            lines.append(f"| `{d.path}` | {d.problem} | {d.holds()} | {outcome} |")
    md = "\n".join(lines)
    create_markdown_artifact(md, key=f"scrub-{slug(store_name)}", description=found.summary())
    return md


def scrub_and_repair(store_name: str, store_path: Path, config: str | None, url: str) -> dict:
    """conveyor.repair's scrub -> repair -> verdict, each step a task here (repair only when settings allow);
    publish the artifact; raise (one line) if damage remains."""
    settings = load_settings(config)
    v = scrub_then_repair(
        store_path, scrub_with=lambda: scrub_store(store_name, store_path, settings.scrub.workers),
        repair_with=lambda found: repair_store(store_name, store_path, url, config, found)
        if wants_repair(config, url) else None)  # asked only when there is damage
    scrub_report(store_name, v.found, v.repaired)
    if not v.ok:
        raise ConveyorError(store_path, v.line())
    return {"files": v.found.files, "damaged": len(v.found.damaged),
            "repaired": len(v.repaired.healed) if v.repaired else 0, "extra": len(v.found.extra)}
