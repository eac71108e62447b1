"""Prefect side of curation: one `conveyor.curate` commit under the store's writer slot, its run name and its
artifact (what changed, before -> after, and the version the train form can pin)."""
from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.concurrency.sync import concurrency

from conveyor.curate_request import CurateRequest
from conveyor.errors import ConveyorError
from conveyor.reports import CurationReport
from tasks.artifacts import slug
from tasks.limits import store_limit
from tasks.views import md_text


# no retries: a curation names episodes by their current numbers, so running it again after it committed would
# act on other episodes; a busy store is waited for (the slot, then the store's own lock)
@task(name="curate-store")
def curate_store(store_name: str, store_path: Path, request: CurateRequest,
                 lock_timeout: float | None = 60.0) -> CurationReport:
    """Apply the request as one commit, holding the store's `store-<name>` slot like ingest and compaction."""
    from conveyor import curate
    from conveyor.store import Store

    store_path = Path(store_path)
    reason = request.reason or ""
    with concurrency(store_limit(store_name), occupy=1):
        if request.action == "drop":
            report = curate.drop(store_path, request.episode_list(), reason, lock_timeout=lock_timeout)
        elif request.action == "undrop":
            report = curate.undrop(store_path, request.episode_list(), request.reason, lock_timeout=lock_timeout)
        elif request.action == "trim":
            fps = int(Store.open(store_path).info.get("fps") or 0)
            [episode] = request.episode_list()
            try:
                start, end = curate.parse_frame(request.start, fps), curate.parse_frame(request.end, fps)
            except ValueError as e:
                raise ConveyorError(store_path, str(e)) from None
            report = curate.trim(store_path, episode, start, end, reason=reason, lock_timeout=lock_timeout)
        elif request.action == "retask":
            report = curate.retask(store_path, request.episode_list(), request.task, reason=reason,
                                   lock_timeout=lock_timeout)
        else:
            report = curate.rename_task(store_path, request.old_task, request.task, reason=reason,
                                        lock_timeout=lock_timeout)
    get_run_logger().info("%s: %s (%.2f s, %.1f MB written)", store_name, report.summary(), report.seconds,
                          report.bytes_written / 1e6)
    return report


def curate_run_name(store_name: str, request: CurateRequest, report: CurationReport) -> str:
    """`koch_grasp drop 2 ep -> c14`: the runs list reads as the store's history."""
    what = {"drop": f"drop {len(report.episodes)} ep", "undrop": f"undrop {len(report.episodes)} ep",
            "trim": f"trim ep {report.episodes[0] if report.episodes else '?'}",
            "retask": f"retask {len(report.episodes)} ep", "rename": "rename task"}[request.action]
    return f"{store_name} {what} -> c{report.version.commit}"


def curation_artifact(store_name: str, request: CurateRequest, report: CurationReport) -> str:
    """Markdown artifact (key `curate-<store>`): before -> after and the new version to pin; returns the key."""
    old, new = report.parent, report.version
    acted = {"undrop": "drop ids", "rename": None}.get(request.action, "store episodes (numbered as before)")
    lines = [f"# `{store_name}`: {request.action} -> version `{new.short}`", ""]
    if report.reason:
        lines += [f"Reason: {md_text(report.reason)}", ""]
    if acted and report.episodes:
        lines += [f"Acted on {acted}: {', '.join(map(str, report.episodes))}"
                  + (f"; back as store episodes {', '.join(map(str, report.added))}" if report.added else "") + ".",
                  ""]
    if request.action == "trim":
        lines += [f"Kept frames {md_text(str(request.start))} to {md_text(str(request.end))} (end excluded).", ""]
    if request.action == "retask":
        lines += [f"Task set to: {md_text(request.task or '')}", ""]
    if request.action == "rename":
        lines += [f"Task renamed: {md_text(request.old_task or '')} -> {md_text(request.task or '')}", ""]
    lines += ["| | before | after |", "| --- | --- | --- |",
              f"| episodes | {report.episodes_before} | {report.episodes_after} |",
              f"| frames | {report.frames_before} | {report.frames_after} |",
              f"| minutes | {report.minutes_before:.2f} | {report.minutes_after:.2f} |",
              f"| version | `{old.short}` | `{new.short}` |", "",
              f"Train on it: Dataset version `{new.commit}` in the train form (`conveyor train --store "
              f"{store_name} --dataset-version {new.commit}`). The previous version `{old.commit}` stays "
              f"pinnable: curation never deletes a version.", "",
              f"{report.bytes_written / 1e6:.2f} MB written in {report.seconds:.2f} s; no video re-encoded."]
    key = f"curate-{slug(store_name)}"
    create_markdown_artifact("\n".join(lines), key=key, description=f"{store_name}: {report.summary()}")
    return key
