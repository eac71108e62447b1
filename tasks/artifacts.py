"""Prefect artifacts: what an ingest landed where and what it quarantined, dataset versions, and the one
throttled progress artifact that ingest, compaction and training feed."""
from __future__ import annotations

import re
import time

from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)

from conveyor.reports import IngestReport, md_text
from conveyor.version import DatasetVersion


def slug(name: str) -> str:
    """Artifact keys allow only lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "store"


def episode_table(name: str, report: IngestReport) -> None:
    """One row per landed episode: source episode -> store episode, frames, duration, camera files, task."""
    rows = [{"source episode": m.source_episode_index, "store episode": m.episode_index, "frames": m.length,
             "duration (s)": round(m.duration_s, 3), "camera files": ", ".join(sorted(m.videos.values())),
             "task": " | ".join(m.tasks)} for m in report.added]
    create_table_artifact(table=rows, key=f"ingest-{slug(name)}",
                          description=f"{len(rows)} new episode(s) from {report.source} into {report.store} "
                                      f"(commit {report.version.commit}, {report.version.total_episodes} episodes)")


def quarantine_summary(name: str, report: IngestReport) -> None:
    """Markdown list of episodes that did not land (and ingested ones whose source changed since)."""
    if not report.quarantined and not report.changed:
        return
    lines = [f"# Quarantined episodes of `{name}` (`{report.source}`)", "",
             "The source files are untouched; fix or re-record them, the next ingest picks them up.", "",
             "| source episode | reason |", "| --- | --- |"]
    lines += [f"| {q.source_episode_index} | {md_text(q.reason)} |" for q in report.quarantined]
    if report.changed:
        lines += ["", "## Already ingested, but the source changed since", "",
                  "| source episode | detail |", "| --- | --- |"]
        lines += [f"| {q.source_episode_index} | {md_text(q.reason)} |" for q in report.changed]
    create_markdown_artifact("\n".join(lines), key=f"quarantine-{slug(name)}",
                             description=f"{len(report.quarantined)} quarantined episode(s) in {name}")


def version_record(store_name: str, store_path: str, version: DatasetVersion) -> None:
    md = (f"# `{store_name}` dataset version\n\n| field | value |\n| --- | --- |\n"
          f"| store | `{store_path}` |\n| commit | {version.commit} |\n| commit id | `{version.commit_id}` |\n"
          f"| episodes | {version.total_episodes} |\n| frames | {version.total_frames} |\n"
          f"| content hash | `{version.content_hash}` |\n")
    create_markdown_artifact(md, key=f"version-{slug(store_name)}",
                             description=f"{store_name} at commit {version.commit}")




class Progress:
    """Feeds a `progress(done, total, description)` callback into one progress artifact.

    Created on the first call, updated at most every `every` seconds (each update is an API call) and always
    at the end; a failing update never fails the work it reports on.
    """

    def __init__(self, key: str, every: float = 0.5):
        self.key, self.every = key, every
        self.artifact_id = None
        self._last = 0.0

    def __call__(self, done: int, total: int, description: str) -> None:
        pct = min(100.0, 100.0 * done / total) if total else 100.0
        now = time.monotonic()
        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(pct, key=self.key, description=description)
            elif done >= total or now - self._last >= self.every:
                update_progress_artifact(self.artifact_id, pct, description=description)
            else:
                return
        except Exception:  # noqa: BLE001 - a progress display must never fail the work
            return
        self._last = now
