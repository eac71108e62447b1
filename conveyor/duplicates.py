"""The store's duplicate record (`.conveyor/duplicates.json`): source episodes the latest ingest of each source
did not add because the store already holds their exact content from another path (a copied or moved recording).

Like the quarantine record, a note rather than store content: rewritten atomically under the writer lock but
outside the commit, never backed up or published. It lets the next ingest (and the nothing-new fast path,
`conveyor.pending`) skip such an episode with stat calls while its files are unchanged, instead of hashing it
again, and still report it."""
from __future__ import annotations

import json
from pathlib import Path

from conveyor.fileio import write_atomic
from conveyor.reports import Duplicate
from conveyor.store import DOT

DUPLICATES = f"{DOT}/duplicates.json"


def _load(store_root: Path) -> dict[str, dict[str, dict]]:
    p = Path(store_root) / DUPLICATES
    try:
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    except (OSError, ValueError):
        return {}


def known_duplicates(store_root: Path, source: str, store_hashes: set[str]
                     ) -> dict[int, tuple[Duplicate, dict[str, list[int]]]]:
    """`source`'s recorded duplicates whose content the store still holds: episode -> (duplicate, the
    fingerprint its files had; a different one now means the episode must be looked at again)."""
    out = {}
    for ep, e in _load(store_root).get(source, {}).items():
        try:
            d = Duplicate(source, int(ep), e["content_hash"], *e["of"])
            files = e["files"]
        except (KeyError, TypeError, ValueError):
            continue
        if d.content_hash in store_hashes:
            out[d.source_episode_index] = (d, files)
    return out


def record_duplicates(store_root: Path, source: str, entries: list[tuple[Duplicate, dict[str, list[int]]]]
                      ) -> None:
    """Replace `source`'s duplicates with the latest ingest's (the caller holds the store's lock)."""
    data = _load(store_root)
    mine = {str(d.source_episode_index): {"content_hash": d.content_hash, "files": files,
                                          "of": [d.store_episode_index, d.store_source,
                                                 d.store_source_episode_index]}
            for d, files in entries}
    if mine == data.get(source, {}):
        return
    if mine:
        data[source] = mine
    else:
        data.pop(source, None)
    write_atomic(Path(store_root) / DUPLICATES, json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8"),
                 fsync=False)
