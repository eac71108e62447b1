"""The store's quarantine record (`.conveyor/quarantine.json`): the source episodes the latest ingest of each
source refused, and why. A note for people (`conveyor show`, the store artifact), not store content: it is
rewritten atomically under the writer lock but outside the commit, and never backed up or published."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from conveyor.fileio import write_atomic
from conveyor.store import DOT

QUARANTINE = f"{DOT}/quarantine.json"


def _load(store_root: Path) -> dict[str, list[dict[str, Any]]]:
    """Source -> its quarantined episodes (a missing or unreadable record is empty)."""
    p = Path(store_root) / QUARANTINE
    try:
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    except (OSError, ValueError):
        return {}


def read_quarantine_entries(store_root: Path) -> list[dict[str, Any]]:
    """Every source's quarantined episodes as plain dicts."""
    return [q for entries in _load(store_root).values() for q in entries]


def record_quarantine(store_root: Path, source: str, quarantined: list[tuple[int, str]]) -> None:
    """Replace `source`'s quarantined episodes (source episode index, reason) with the latest ingest's (the
    caller holds the store's lock). Per source and current: an episode fixed and ingested later drops out."""
    data = _load(store_root)
    now = datetime.now().astimezone().isoformat(timespec="seconds")
    entries = [{"source": source, "source_episode_index": ep, "reason": reason, "time": now}
               for ep, reason in quarantined]
    if entries:
        data[source] = entries
    elif source in data:
        del data[source]
    else:
        return
    text = json.dumps(data, ensure_ascii=False, indent=1)
    write_atomic(Path(store_root) / QUARANTINE, text.encode("utf-8"), fsync=False)
