"""`conveyor scrub STORE` and `conveyor repair STORE [--from URL]` (see `conveyor.scrub`, `conveyor.repair`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conveyor.cli.store import progress_bar
from conveyor.errors import ConveyorError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scrub", help="re-read every committed file of STORE against its sha256 (exit 1 on damage)")
    p.add_argument("store", metavar="STORE", help="store folder, or the name of a store under store_root")
    p.add_argument("--workers", type=int, default=2, help="hashing threads")
    p.set_defaults(handler=_scrub)

    r = sub.add_parser("repair", help="restore STORE's damaged or missing files from backup snapshots")
    r.add_argument("store", metavar="STORE", help="store folder, or the name of a store under store_root")
    r.add_argument("--from", dest="url", metavar="URL", help="backup repository (default: storage_url)")
    r.add_argument("--lock-timeout", type=float, default=60.0, help="seconds to wait for another writer")
    r.set_defaults(handler=_repair)


def store_folder(spec: str, config: str | None) -> Path:
    """STORE by the one rule of conveyor/stores.py; scrub and repair need a store there."""
    from conveyor.settings import load_settings
    from conveyor.store import is_store
    from conveyor.stores import resolve_store

    folder = resolve_store(spec, lambda: load_settings(config).store_root)
    if not is_store(folder):
        raise ConveyorError(spec, "not a conveyor store (no .conveyor/ folder)")
    return folder.resolve()


def print_problems(problems) -> None:
    for d in problems:
        print(f"  {d.line()}")


def _scrub(a: argparse.Namespace) -> int:
    from conveyor.scrub import scrub

    folder = store_folder(a.store, a.config)
    with progress_bar("scrubbing", transfer=True) as cb:
        r = scrub(folder, progress=cb, workers=a.workers)
    print_problems(r.problems)
    print(r.summary())
    return 0 if r.ok else 1


def _repair(a: argparse.Namespace) -> int:
    from conveyor.repair import repair, scrub_then_repair
    from conveyor.repo import open_repo
    from conveyor.scrub import format_episodes, scrub
    from tasks.repo import load_storage_settings

    folder = store_folder(a.store, a.config)
    settings = load_storage_settings(a.config)
    url = a.url or settings.storage_url

    def scrub_with():
        with progress_bar("scrubbing", transfer=True) as cb:
            found = scrub(folder, progress=cb)
        print_problems(found.problems)
        print(found.summary())
        return found

    def repair_with(found):
        with open_repo(url, settings) as repo:
            return repair(folder, repo, found=found, lock_timeout=a.lock_timeout)

    v = scrub_then_repair(folder, scrub_with=scrub_with, repair_with=repair_with)
    if v.repaired is None:
        return 0 if v.found.ok else 1
    r = v.repaired
    for h in r.healed:
        what = "whole store" if h.whole_store else f"episodes {format_episodes(h.episodes)}" + (
            f", camera {h.camera}" if h.camera else "")
        print(f"  HEALED {h.path} ({what}) from {url}@{h.snapshot}")
    for d in v.left:
        print(f"conveyor: error: {folder / d.path}: {'LOST' if d in r.lost else 'still damaged'}, {d.holds()}; "
              f"left as is ({d.detail})", file=sys.stderr)
    print(f"repaired {len(r.healed)} of {len(v.found.damaged)} file(s) from {url}, {len(r.lost)} lost; "
          f"{r.seconds:.2f} s; then {v.rechecked} healed file(s) read again: "
          f"{'every byte as committed' if v.ok else v.line()}")
    return 0 if v.ok else 1
