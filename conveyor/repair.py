"""Repair: bring back damaged or missing committed files, byte for byte, from backup snapshots.

For each file a scrub found damaged or missing, the newest snapshot that holds exactly the committed
bytes (same path and sha256; failing that, the same sha256 under another path) supplies them. They are
written into the store's staging folder, fsynced, re-hashed from disk, and renamed over the damaged file
under the writer lock and the apply lock: the crash safety of a commit (a `kill -9` leaves the damaged
file or the healed one; opening the store drops the staging folder). A repair is not a new dataset
version: the bytes are the committed ones, so HEAD, ledger and manifest stay as they are. A file that no
snapshot holds with the committed sha256 is lost: reported with its episodes and left as it is, never
replaced by another version. Files that scrub passed are never opened for writing.
"""
from __future__ import annotations

import errno
import os
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import BaseModel, Field

from conveyor import layout
from conveyor.errors import ConveyorError
from conveyor.version import DatasetVersion
from conveyor.scrub import (FileDamage, Progress, ScrubReport, _check, attribute, format_episodes, hash_file, scrub,
                            verify_files)
from conveyor.store import Store, crashpoint
# the backup internals repair relies on, all in one place: list snapshots, read one, fetch a file's bytes
from conveyor.backup import ManifestFile, read_manifest, snapshot_ids
from conveyor.backup.objects import fetch as fetch_files
from conveyor.repo import CorruptObject, MissingObject, Repo


class Healed(BaseModel):
    path: str
    snapshot: str = Field(description="backup snapshot the bytes came from")
    episodes: list[int] = Field(default_factory=list)
    whole_store: bool = False
    camera: str | None = None
    problem: str = Field("damaged", description="what the scrub found: damaged | missing")


class RepairReport(BaseModel):
    store: str
    repository: str
    version: DatasetVersion | None = None
    healed: list[Healed] = Field(default_factory=list)
    lost: list[FileDamage] = Field(default_factory=list)
    extra: list[FileDamage] = Field(default_factory=list, description="reported, left in place")
    found: ScrubReport | None = Field(None, description="the scrub that found the damage")
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.lost


# --------------------------------------------------------------------------------------------------
# finding committed bytes in the backup repository


def find_copies(repo: Repo, wanted: dict[str, str]) -> dict[str, list[tuple[str, ManifestFile]]]:
    """path -> [(snapshot id, entry)] holding the wanted sha256, best first: same path before another
    path, newer snapshot before older. Every snapshot manifest of the repository is read (a few KB each)."""
    ids = list(reversed(snapshot_ids(repo)))  # newest first
    shas = set(wanted.values())
    with ThreadPoolExecutor(8) as pool:
        manifests = list(pool.map(lambda i: read_manifest(repo, i), ids))
    found: dict[str, list[tuple[int, int, str, ManifestFile]]] = {p: [] for p in wanted}
    by_sha: dict[str, list[str]] = {}
    for p, sha in wanted.items():
        by_sha.setdefault(sha, []).append(p)
    for age, m in enumerate(manifests):
        for f in m.files:
            if f.sha256 in shas:
                for p in by_sha[f.sha256]:
                    found[p].append((f.path != p, age, m.id, f))
    return {p: [(sid, f) for _, _, sid, f in sorted(c, key=lambda x: (x[0], x[1]))] for p, c in found.items()}


def fetch(repo: Repo, f: ManifestFile, dst: Path) -> None:
    """Write one file's bytes from the repository to `dst` (sha256-checked by the fetch, then fsynced)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fetch_files(repo, [f.model_copy(update={"path": dst.name})], dst.parent, where="manifest", set_mtime=False)
    with open(dst, "rb") as fd:
        os.fsync(fd.fileno())


def has_snapshots(repo: Repo) -> bool:
    """Whether the repository holds any snapshot (what `scrub.repair` defaults on)."""
    return bool(snapshot_ids(repo))


def still_damaged(found: ScrubReport, repaired: RepairReport | None) -> list[FileDamage]:
    """What a scrub found and no repair healed: damaged, missing, lost (extras are reported, not failed on)."""
    healed = {h.path for h in repaired.healed} if repaired else set()
    return [d for d in found.damaged if d.path not in healed]


class ScrubVerdict(BaseModel):
    """The outcome of the one scrub -> repair -> verdict sequence (`scrub_then_repair`)."""

    found: ScrubReport
    repaired: RepairReport | None = None
    rechecked: int = Field(0, description="healed files read again against their sha256 after the repair")
    left: list[FileDamage] = Field(default_factory=list, description="damaged, missing or lost after all")

    @property
    def ok(self) -> bool:
        return not self.left

    def line(self) -> str:
        """One line: what is still damaged and what it affects (empty when ok)."""
        if self.ok:
            return ""
        how = "lost" if self.repaired else "damaged (repair off or no backup)"
        eps = sorted({e for d in self.left for e in d.episodes})
        whole = any(d.whole_store for d in self.left)
        names = ", ".join(d.path for d in self.left[:3]) + (" ..." if len(self.left) > 3 else "")
        return (f"scrub: {len(self.left)} file(s) {how}: {names}; affects "
                f"{'the whole store' if whole else 'episodes ' + format_episodes(eps)}")


def scrub_then_repair(store: str | Path, *, scrub_with: Callable[[], ScrubReport],
                      repair_with: Callable[[ScrubReport], RepairReport | None] | None) -> ScrubVerdict:
    """The one scrub -> repair -> verdict sequence, for `conveyor repair` and the nightly flow.

    `scrub_with()` scrubs the store; `repair_with(found)` heals it from a repository (None, or returning None:
    repair is off or there is nothing to repair from). The callers bring their own ways to run each step (progress bar; Prefect
    tasks with retries and the store's writer slot). Every healed file is read again against its committed
    sha256 before the verdict: a repair is trusted only as far as the bytes on disk."""
    found = scrub_with()
    repaired = repair_with(found) if found.damaged and repair_with is not None else None
    left = still_damaged(found, repaired)
    rechecked = 0
    if repaired and repaired.healed:
        s = Store.open(store)
        problems, rechecked, _, _ = verify_files(s, [h.path for h in repaired.healed])
        left += attribute(s, problems)
    return ScrubVerdict(found=found, repaired=repaired, rechecked=rechecked, left=left)


# --------------------------------------------------------------------------------------------------


def repair(store: str | Path, repo: Repo, *, found: ScrubReport | None = None,
           progress: Progress | None = None, lock_timeout: float | None = 60.0) -> RepairReport:
    """Heal what `found` (default: a fresh scrub) lists as damaged or missing; see the module doc."""
    t0 = time.perf_counter()
    s = Store.open(store)
    found = found or scrub(s, progress=progress)
    report = RepairReport(store=str(s.root), repository=repo.url, version=found.version, extra=found.extra,
                          found=found)
    if not found.damaged:
        report.seconds = time.perf_counter() - t0
        return report
    manifest = s.manifest()
    copies = find_copies(repo, {d.path: manifest[d.path].sha256 for d in found.damaged if d.path in manifest})
    stage = s.root / layout.STAGING / f"repair-{uuid.uuid4().hex}"  # no commit record: recovery drops it
    with s.lock(timeout=lock_timeout):
        manifest = s.manifest()  # as of now: a commit since the scrub may have replaced or removed files
        report.version = s.version
        try:
            for i, d in enumerate(found.damaged):
                entry = manifest.get(d.path)
                if entry is None:
                    continue  # removed by a later commit (compaction): nothing to bring back
                now = _check(s.root, d.path, entry)
                if now is None:
                    continue  # a later commit wrote good bytes there
                staged = stage / d.path
                source, why = None, []
                for snap_id, f in copies.get(d.path, []):
                    try:
                        fetch(repo, f, staged)
                        if hash_file(staged) != entry.sha256:
                            raise CorruptObject(staged, "staged copy does not hash to the committed sha256")
                        source = snap_id
                        break
                    except (MissingObject, CorruptObject) as e:
                        why.append(f"{snap_id}: {e.problem}")
                        staged.unlink(missing_ok=True)
                    except OSError as e:
                        raise ConveyorError(s.root / d.path, f"cannot stage the backup copy: {e.strerror or e} "
                                                             "(nothing replaced)") from None
                if source is None:
                    d.detail = "; ".join([d.detail] + (why or [f"no snapshot in {repo.url} holds sha256 "
                                                               f"{entry.sha256[:12]}…"])).strip("; ")
                    report.lost.append(d)
                    continue
                crashpoint("repair:staged")
                s.restore_committed(d.path, staged)
                crashpoint("repair:renamed")
                report.healed.append(Healed(path=d.path, snapshot=source, episodes=d.episodes,
                                            whole_store=d.whole_store, camera=d.camera, problem=d.problem))
                if progress:
                    progress(i + 1, len(found.damaged), "repairing")
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise ConveyorError(s.root, f"no space left while repairing: {e.strerror}") from None
            raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    report.seconds = time.perf_counter() - t0
    return report
