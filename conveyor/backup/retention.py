"""Retention: which snapshots stay (restic-style daily/weekly), and garbage collection of objects.

Objects are roots of garbage collection while any retained snapshot manifest or any published dataset
version manifest (`datasets/<store>/versions/`, see `conveyor.datasets`; its own retention rule deletes
those manifests) names them.
"""
from __future__ import annotations

import gzip
import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

from conveyor.backup.format import ManifestFile, PruneReport, manifest_key
from conveyor.backup.manifests import read_manifest, snapshot_ids, time_of
from conveyor.backup.objects import ACTIVE_LOCKS
from conveyor.errors import ConveyorError
from conveyor.repo import MissingObject, Repo
from conveyor.repo.base import TMP_STALE_S, writer_gone

LOCK_STALE_S = 6 * 3600  # a writer lock older than this is a leftover even when its writer's host cannot tell
PUBLISHED_PREFIX = "datasets/"


def select_retained(ids: list[str], keep_daily: int, keep_weekly: int) -> set[str]:
    """restic-style: per target, the newest snapshot of each of the last `keep_daily` days that have one and
    of each of the last `keep_weekly` ISO weeks that have one; the newest snapshot is always kept."""
    keep: set[str] = set()
    by_target: dict[str, list[str]] = {}
    for i in ids:
        by_target.setdefault(i.split("/", 1)[0], []).append(i)
    for snaps in by_target.values():
        snaps = sorted(snaps, key=time_of, reverse=True)
        keep.add(snaps[0])
        for n, bucket in ((keep_daily, lambda t: t.date()), (keep_weekly, lambda t: t.isocalendar()[:2])):
            seen = []
            for s in snaps:
                b = bucket(time_of(s))
                if b not in seen:
                    if len(seen) >= n:
                        break
                    seen.append(b)
                    keep.add(s)
    return keep


def writer_locks(repo: Repo, now: datetime) -> tuple[list[str], list[str]]:
    """(live, stale) writer locks. Stale: its writer is gone (same host, pid gone; or this very process and no
    longer held), it is older than LOCK_STALE_S, or it is unreadable and older than that."""
    live, stale = [], []
    for o in repo.list("locks/"):
        try:
            info = json.loads(repo.get_bytes(o.key))
            t = datetime.fromisoformat(info["time"])
        except MissingObject:
            continue  # its writer finished meanwhile
        except (ConveyorError, ValueError, KeyError, TypeError):
            old = o.modified is not None and now - o.modified > timedelta(seconds=LOCK_STALE_S)
            (stale if old else live).append(o.key)  # a lock being written, or a damaged one: judged by age
            continue
        if now - t > timedelta(seconds=LOCK_STALE_S):
            stale.append(o.key)
        elif info.get("host") == socket.gethostname() and int(info.get("pid", -1)) == os.getpid():
            (live if o.key in ACTIVE_LOCKS else stale).append(o.key)  # else: a failed writer of this process
        elif writer_gone(info.get("host"), info.get("pid", -1)):
            stale.append(o.key)  # the writer died (e.g. SIGKILL); its lock means nothing
        else:
            live.append(o.key)
    return live, stale


def live_locks(repo: Repo, now: datetime) -> list[str]:
    """Writer locks of backups/publishes still running (a dead writer's lock is ignored)."""
    return writer_locks(repo, now)[0]


def published_roots(repo: Repo) -> set[str]:
    """Object keys named by every published dataset version manifest in the repository."""
    keys = [o.key for o in repo.list(PUBLISHED_PREFIX) if "/versions/" in o.key and o.key.endswith(".json.gz")]

    def one(key: str) -> set[str]:
        try:
            doc = json.loads(gzip.decompress(repo.get_bytes(key)))
            return {ManifestFile.model_validate(f).object_key for f in doc["files"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConveyorError(f"{repo.url}/{key}", f"damaged dataset version manifest ({e}); garbage "
                                                     "collection stopped so nothing it may name is deleted") from None

    with ThreadPoolExecutor(8) as pool:
        return set().union(*pool.map(one, keys)) if keys else set()


def prune(repo: Repo, keep_daily: int, keep_weekly: int, *, now: datetime | None = None,
          dry_run: bool = False) -> PruneReport:
    """Apply retention: delete expired manifests first, then every object no remaining manifest names
    (never the reverse, so a crash in between leaves only garbage, never a broken snapshot)."""
    now = now or datetime.now(timezone.utc)
    ids = snapshot_ids(repo)
    keep = select_retained(ids, keep_daily, keep_weekly)
    expired = [i for i in ids if i not in keep]
    report = PruneReport(url=repo.url, kept=sorted(keep, key=time_of), deleted_snapshots=expired, deleted_objects=0)
    if dry_run:
        return report
    repo.delete([manifest_key(i) for i in expired])
    locks, stale = writer_locks(repo, now)
    report.locks_removed = repo.delete(stale) if stale else 0
    report.incomplete_cleaned = repo.cleanup_incomplete(TMP_STALE_S, now)
    if locks:
        report.gc_skipped = f"a backup is running ({locks[0]}); unreferenced objects are collected next time"
        return report
    with ThreadPoolExecutor(8) as pool:
        manifests = list(pool.map(lambda i: read_manifest(repo, i), sorted(keep)))
    referenced = set().union(*(m.object_keys() for m in manifests)) if manifests else set()
    referenced |= published_roots(repo)
    garbage = [o.key for prefix in ("blobs/", "packs/") for o in repo.list(prefix) if o.key not in referenced]
    repo.delete(garbage)
    report.deleted_objects = len(garbage)
    return report
