"""Which sources a path names: one dataset (v2.1 or v3.0, by its info.json) or a folder of recording
sessions, each its own dataset. Apart from `source_v3.py` because it picks between both source kinds, and
ingest, the watcher, `pending` and validation all start here.
"""
from __future__ import annotations

import json
from pathlib import Path

from conveyor.source import INFO_SETTLE_S, V21Source
from conveyor.source_v3 import KIND, V30Source


def session_paths(path: str | Path) -> list[Path]:
    """The datasets a source path names: itself when it is one (has meta/info.json), else its subfolders that
    are (a folder of recording sessions, one dataset each, in name order). An empty list: neither."""
    root = Path(path).resolve()
    if (root / "meta" / "info.json").is_file():
        return [root]
    try:
        subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and (p / "meta" / "info.json").is_file() and not (p / ".conveyor").is_dir())  # not a store
    except (FileNotFoundError, NotADirectoryError):
        return []
    return subs


def is_session_folder(path: str | Path) -> bool:
    """A folder of session datasets (not itself a dataset)."""
    root = Path(path)
    return not (root / "meta" / "info.json").is_file() and bool(session_paths(root))


def open_source(path: str | Path, info_settle_s: float = INFO_SETTLE_S) -> V21Source | V30Source:
    """The v2.1 or v3.0 source at `path`, by its info.json's `codebase_version` (anything else: V21Source's
    one-line refusal)."""
    root = Path(path).resolve()
    info_path = root / "meta" / "info.json"
    if info_path.is_file():
        try:
            version = json.loads(info_path.read_text(encoding="utf-8")).get("codebase_version")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            version = None  # torn or odd: the opener below waits it out or names the problem
        if version == KIND:
            return V30Source.open(root, info_settle_s)
    return V21Source.open(root, info_settle_s)


def open_sources(path: str | Path, info_settle_s: float = INFO_SETTLE_S) -> list[V21Source | V30Source]:
    """Every source a path names (one dataset, or each session of a session folder)."""
    paths = session_paths(path)
    return [open_source(p, info_settle_s) for p in paths] if paths else [open_source(path, info_settle_s)]
