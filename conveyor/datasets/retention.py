"""Which published versions stay, and the pins of training runs that need one.

The rule (dated, per store): keep every version published within the last `keep_days` days, the newest
version, and every version a pin names. A run writes its pin when it resolves its version and removes it
when it finishes, so an unfinished run (running, failed and waiting for a retry, or resumable) keeps its
version. Objects of a deleted version go at the next backup prune's garbage collection (unless a backup or
another version still names them). A run asking for a version that is gone is refused in one sentence
(`format.find_version`).
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from pydantic import BaseModel, Field

from conveyor.datasets.format import PREFIX, list_versions, pin_key, version_name
from conveyor.models import DatasetVersion
from conveyor.repo import Repo


class VersionPruneReport(BaseModel):
    url: str
    kept: list[str] = Field(default_factory=list)
    deleted: list[str] = Field(default_factory=list)
    pinned: list[str] = Field(default_factory=list)


def pin(repo: Repo, store: str, run: str, version: DatasetVersion) -> None:
    repo.put_bytes(pin_key(store, run), json.dumps({"run": run, "store": store, "version": version_name(version),
                                                    "time": datetime.now(timezone.utc).isoformat()}).encode())


def unpin(repo: Repo, store: str, run: str) -> None:
    repo.delete([pin_key(store, run)])


def pinned_versions(repo: Repo) -> dict[str, set[str]]:
    """store -> names of the versions that pins of unfinished runs need."""
    out: dict[str, set[str]] = {}
    for o in repo.list(PREFIX):
        parts = o.key.split("/")
        if len(parts) == 4 and parts[2] == "pins" and parts[3].endswith(".json"):
            try:
                out.setdefault(parts[1], set()).add(json.loads(repo.get_bytes(o.key))["version"])
            except (ValueError, KeyError, TypeError):
                continue
    return out


def prune_versions(repo: Repo, keep_days: int, *, now: datetime | None = None,
                   dry_run: bool = False) -> VersionPruneReport:
    now = now or datetime.now(timezone.utc)
    cutoff = now - timedelta(days=keep_days)
    pins = pinned_versions(repo)
    report = VersionPruneReport(url=repo.url)
    by_store: dict[str, list] = {}
    for r in list_versions(repo):
        by_store.setdefault(r.store, []).append(r)
    for store, refs in by_store.items():
        newest = refs[-1]
        for r in refs:
            name = r.key.rsplit("/", 1)[1][:-len(".json.gz")]
            is_pinned = name in pins.get(store, set())
            young = r.modified is not None and r.modified >= cutoff
            if r is newest or young or is_pinned:
                report.kept.append(r.key)
                if is_pinned:
                    report.pinned.append(r.key)
            else:
                report.deleted.append(r.key)
    if not dry_run and report.deleted:
        repo.delete(report.deleted)
    return report
