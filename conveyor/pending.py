"""Does a source have anything the store lacks? Answered from json and stat calls alone.

`conveyor ingest` runs on every recorder tick; most runs find nothing new. This answers that case
without importing pyarrow, numpy or PyAV (~0.2 s of a ~0.3 s run): every recorded episode is already in
the store's ledger and none of their files changed (size + mtime as the ledger recorded them). Anything
else (a new, broken or changed episode, a store to create, a feature mismatch) returns None and the full
ingest handles and reports it, under the store lock.
"""
from __future__ import annotations

import time
from pathlib import Path

from conveyor.duplicates import known_duplicates
from conveyor.reports import IngestReport
from conveyor.source import V21Source, comparable_features
from conveyor.sessions import is_session_folder, open_source, session_paths
from conveyor.source_v3 import V30Source, fingerprint_files
from conveyor.store import Store, is_store


def nothing_new(source: str | Path | V21Source | V30Source, store: str | Path) -> IngestReport | None:
    """The report a full ingest would return when there is nothing to add, or None if there may be."""
    t0 = time.monotonic()
    if not isinstance(source, (V21Source, V30Source)) and is_session_folder(source):
        return _sessions_nothing_new(source, store, t0)
    src = source if isinstance(source, (V21Source, V30Source)) else open_source(source)
    if isinstance(src, V30Source):
        return _v30_nothing_new(src, store, t0)
    found = _store_for(src, store)
    if found is None:
        return None
    root, s, key, state, mine = found
    records = src.episode_records()
    dups = known_duplicates(root, key, {r.content_hash for r in [*state.records, *state.dropped.values()]})
    if set(records) - set(mine) - set(dups) - {ep for k, ep in state.dropped if k == key}:  # dropped: not new
        return None
    for ep, files in [(ep, r.files) for ep, r in mine.items()] + [(ep, d[1]) for ep, d in dups.items()]:
        try:
            if src.fingerprint(ep) != files:
                return None  # maybe changed: the full ingest compares content hashes and reports it
        except FileNotFoundError:  # the full ingest skips such an episode too
            continue
    report = IngestReport(source=key, store=str(root), version=s.version, already=len(mine),
                          incomplete=src.unrecorded(records),
                          duplicates=[d for ep, (d, _) in sorted(dups.items()) if ep not in mine])
    report.seconds = time.monotonic() - t0
    return report


def _store_for(src: V21Source | V30Source, store: str | Path):
    """(root, Store, source key, ledger state, this source's ledger records by source episode) when the store
    exists and fits the source; None sends the caller to the full ingest (a store to create, a mismatch)."""
    root = Path(store).resolve()
    if not is_store(root):
        return None
    s = Store.open(root)
    info = s.info
    if not info or int(info["fps"]) != src.fps or comparable_features(info["features"]) != comparable_features(src.features):
        return None
    key = str(src.root)
    state = s.ledger_state()
    return root, s, key, state, {r.source_episode_index: r for r in state.records if r.source == key}


def _v30_nothing_new(src: V30Source, store: str | Path, t0: float) -> IngestReport | None:
    """A v3.0 session: nothing new when every episode info.json counts is in the ledger with its files
    unchanged (stat calls), or when the missing ones can only be in metadata files the recorder has not
    closed yet (no footer: still recording; 4 bytes read per file)."""
    found = _store_for(src, store)
    if found is None:
        return None
    root, s, key, state, mine = found
    missing = [ep for ep in range(src.saved_episodes()) if ep not in mine and (key, ep) not in state.dropped]
    if missing and any(closed for _, closed in src.meta_files()):
        return None  # a closed metadata file may hold rows the store lacks
    for ep, r in mine.items():
        try:
            if fingerprint_files(src.root, list(r.files)) != r.files:
                return None
        except FileNotFoundError:
            continue
    report = IngestReport(source=key, store=str(root), version=s.version, already=len(mine), incomplete=missing)
    report.seconds = time.monotonic() - t0
    return report


def _sessions_nothing_new(folder: str | Path, store: str | Path, t0: float) -> IngestReport | None:
    """A folder of sessions: nothing new in any of them (one report for the folder)."""
    total = None
    for path in session_paths(folder):
        r = nothing_new(path, store)
        if r is None:
            return None
        if total is None:
            total = r
            total.source = str(Path(folder).resolve())
        else:
            total.already += r.already
            total.incomplete += r.incomplete
    if total is not None:
        total.seconds = time.monotonic() - t0
    return total
