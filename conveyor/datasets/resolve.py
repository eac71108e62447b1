"""A training run's dataset: one pinned version for the run's whole life, materialized on this machine.

The first attempt resolves the version once (the request's `dataset_version`, else the store's current
version, else the newest published one) and records it as `runs/<run>/dataset.json` in the run's archive
(and in the local run folder). Every later attempt, retry or resume, on any machine, reads that pin first
and trains on exactly that version. lerobot-train always reads a materialized folder in the worker's cache,
never the live store: appends and compaction can no longer pull files from under a running training.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel

from conveyor.backup.format import ManifestFile
from conveyor.datasets.format import (PublishedVersion, find_version, list_versions, matches, read_version,
                                      version_key)
from conveyor.datasets.materialize import MaterializeReport, materialize
from conveyor.datasets.publish import publish
from conveyor.datasets.retention import pin as pin_in_repo
from conveyor.datasets.retention import unpin
from conveyor.errors import ConveyorError
from conveyor.fileio import write_atomic
from conveyor.version import DatasetVersion
from conveyor.repo import MissingObject, Repo, open_repo
from conveyor.store import DOT, Store, is_store
from conveyor.stores import find_store, name_problem, unknown_store

PIN_FILE = "dataset.json"


class DatasetPin(BaseModel):
    """What `runs/<run>/dataset.json` holds."""

    run: str
    store: str
    version: DatasetVersion
    url: str | None = None          # the repository the version is published to (None: this machine only)
    pinned_at: datetime


class ResolvedDataset(BaseModel):
    root: Path                      # what lerobot-train reads
    store: str
    version: DatasetVersion | None  # None: a plain v3.0 folder, not a conveyor store
    pin: DatasetPin | None = None
    new_pin: bool = False           # resolved now: `record_pin` once every other check has passed
    materialized: MaterializeReport | None = None


def pin_key(run: str) -> str:
    return f"runs/{run}/{PIN_FILE}"


def local_store(store: str, settings) -> Path | None:
    """The store's folder when this machine sees it (by the one STORE rule, conveyor/stores.py), else None."""
    found = find_store(store, settings.store_root)
    return found.resolve() if found is not None else None


def versions_repo(settings) -> Repo | None:
    """The repository dataset versions are published to (settings.storage_url), or None when unset."""
    return open_repo(None, settings) if settings.storage_url else None


def read_pin(archive: Repo | None, run_dir: Path, run: str) -> DatasetPin | None:
    if archive is not None:
        try:
            return DatasetPin.model_validate_json(archive.get_bytes(pin_key(run)))
        except MissingObject:
            pass
        except ValueError as e:
            raise ConveyorError(f"{archive.url}/{pin_key(run)}", f"damaged dataset pin ({e}); delete it to "
                                                                 "re-pin the run, or use a new run_name") from None
    local = run_dir / PIN_FILE
    if local.is_file():
        return DatasetPin.model_validate_json(local.read_bytes())
    return None


def write_pin(pin: DatasetPin, archive: Repo | None, repo: Repo | None, run_dir: Path) -> None:
    data = pin.model_dump_json(indent=1).encode()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / PIN_FILE, data)
    if archive is not None:
        archive.put_bytes(pin_key(pin.run), data)
    if repo is not None and pin.url == repo.url:
        pin_in_repo(repo, pin.store, pin.run, pin.version)


def _local_version(root: Path, name: str) -> PublishedVersion:
    """The store's current version described from its own manifest (nothing published)."""
    with Store.open(root).snapshot() as snap:
        files = [ManifestFile(path=rel, size=e.size, sha256=e.sha256) for rel, e in sorted(snap.files.items())
                 if not rel.startswith(DOT + "/")]
        return PublishedVersion(store=name, version=snap.version, created=datetime.now(timezone.utc), files=files,
                                total_files=len(files), total_bytes=sum(f.size for f in files))


def _no_storage(settings, name: str) -> ConveyorError:
    return ConveyorError(settings.config_path or "settings",
                         f"store `{name}` is not under store_root ({settings.store_root}) and the settings have no "
                         "storage_url to fetch its published versions from; set storage_url to where it is published"
                         + (f" ({known})" if (known := unknown_store(name, settings.store_root).problem.partition("; ")[2])
                            else ""))


def _first_resolution(name: str, pin: str | None, live: Path | None, repo: Repo | None, settings,
                      log) -> PublishedVersion:
    if live is not None:
        current = Store.open(live).version
        if pin is None or matches(current, pin):
            if repo is None:
                return _local_version(live, name)
            try:
                r = publish(live, repo, name=name)  # a no-op when ingest already published this commit
            except OSError as e:  # this worker may only read the store: train on it from here, unpublished
                log(f"cannot publish {name} from this machine ({e}); pinning its current version locally")
                return _local_version(live, name)
            if r.published:
                log(f"published {name} {r.version.short} to {repo.url} ({r.files_sent} new files)")
            return read_version(repo, r.key)
        if repo is None:
            raise ConveyorError(live, f"the store is at version {current.short}, not the pinned `{pin}`, and the "
                                      "settings have no storage_url holding published versions; set storage_url or "
                                      "clear dataset_version")
        return find_version(repo, name, pin)
    if repo is None:
        raise _no_storage(settings, name)
    if not list_versions(repo, name):
        known = unknown_store(name, settings.store_root).problem.partition("; ")[2]  # the known stores, the nearest
        raise ConveyorError(name, f"no store named `{name}` under {settings.store_root} and none published to "
                                  f"{repo.url}; name a store this worker holds, or publish it with "
                                  f"`conveyor publish {name}` where it lives" + (f" ({known})." if known else "."))
    return find_version(repo, name, pin)


def resolve_dataset(store: str, dataset_version: str | None, settings, *, run: str, run_dir: Path,
                    archive_url: str | None, log=print) -> ResolvedDataset:
    """This run's pinned version, materialized in settings.cache_dir; one sentence on any problem."""
    live = local_store(store, settings)
    if live is not None and not is_store(live):  # a plain v3.0 folder: no versions to pin
        if dataset_version:
            raise ConveyorError(live, "dataset_version can only be pinned on a conveyor store (this folder has "
                                      "no ledger); clear dataset_version or train on a store.")
        return ResolvedDataset(root=live, store=live.name, version=None)
    name = live.name if live is not None else store
    if name_problem(name):
        raise ConveyorError(store, f"no store named `{store}` under {settings.store_root} and no such dataset "
                                   "folder; name a store or a v3.0 dataset folder on this worker.")
    repo = versions_repo(settings)
    archive = (repo if repo is not None and archive_url == repo.url else
               open_repo(archive_url, settings)) if archive_url else None

    pin = read_pin(archive, run_dir, run)
    if pin is None:
        pv = _first_resolution(name, dataset_version, live, repo, settings, log)
        pin = DatasetPin(run=run, store=name, version=pv.version, url=repo.url if repo is not None else None,
                         pinned_at=datetime.now(timezone.utc))
        new_pin = True
    else:
        new_pin = False
        log(f"run {run} keeps its pinned dataset {pin.store} {pin.version.short} (from {PIN_FILE})")
        name = pin.store
        if live is not None and Store.open(live).version == pin.version and repo is None:
            pv = _local_version(live, name)
        else:
            if pin.url and (repo is None or not repo.exists(version_key(name, pin.version))):
                repo = open_repo(pin.url, settings)  # where the first attempt found it
            if repo is None:
                raise _no_storage(settings, name)
            pv = read_version(repo, version_key(name, pin.version))
    report = materialize(pv, settings.cache_dir, repo=repo, live_store=live,
                         max_bytes=int(settings.cache_max_gb * 1e9), concurrency=settings.transfer.max_concurrency)
    how = ("already cached" if report.reused else
           f"{report.linked_store} hard-linked from the store, {report.linked_cache} from the cache, "
           f"{report.copied} copied, {report.fetched_files} fetched ({report.fetched_bytes / 1e6:.1f} MB)")
    log(f"dataset {name} {pin.version.short} materialized at {report.path}: {how}")
    return ResolvedDataset(root=Path(report.path), store=name, version=pin.version, pin=pin, new_pin=new_pin,
                           materialized=report)


def record_pin(ds: ResolvedDataset, settings, *, run_dir: Path, archive_url: str | None, log=print) -> None:
    """Make a newly resolved pin the run's for good (archive, run folder, retention pin). Called when the
    run is about to start, so a refused request leaves no pin behind."""
    if ds.pin is None or not ds.new_pin:
        return
    repo = open_repo(ds.pin.url, settings) if ds.pin.url else None
    archive = open_repo(archive_url, settings) if archive_url else None
    write_pin(ds.pin, archive, repo, run_dir)
    ds.new_pin = False
    log(f"run {ds.pin.run} pinned to {ds.store} {ds.version.short} ({ds.version.total_episodes} episodes)")


def release_pin(settings, run: str, run_dir: Path, archive_url: str | None) -> DatasetPin | None:
    """A finished run no longer needs its version kept: drop its pin from the repository's retention roots
    (`runs/<run>/dataset.json` stays, as the run's record)."""
    archive = open_repo(archive_url, settings) if archive_url else None
    pin = read_pin(archive, run_dir, run)
    if pin is not None and pin.url:
        repo = open_repo(pin.url, settings)
        unpin(repo, pin.store, run)
    return pin

