"""`conveyor drop | undrop | trim | retask`: curation, each one commit (a new version) of the store.

EPISODES are store episode indices and ranges as `conveyor show` numbers them (`3 7 12-15`); undrop takes the
drop ids `conveyor show` lists under "dropped". Bad input exits 1 with one line and writes nothing."""
from __future__ import annotations

import argparse
from pathlib import Path

from conveyor.cli.store import collector_paused, lean_process, resolve_store
from conveyor.errors import ConveyorError


def _store(a: argparse.Namespace) -> Path:
    lean_process()
    return resolve_store(a, a.store)


def _episodes(a: argparse.Namespace, store: Path) -> list[int]:
    from conveyor.curate import parse_episodes

    try:
        return parse_episodes(a.episodes)
    except ValueError as e:
        raise ConveyorError(store, str(e)) from None


def _done(r) -> int:
    print(f"{r.store}: {r.summary()} ({r.seconds:.2f} s)")
    return 0


def _drop(a: argparse.Namespace) -> int:
    store = _store(a)
    with collector_paused():
        from conveyor.curate import drop
    return _done(drop(store, _episodes(a, store), a.reason, lock_timeout=a.lock_timeout))


def _undrop(a: argparse.Namespace) -> int:
    store = _store(a)
    with collector_paused():
        from conveyor.curate import undrop
    r = undrop(store, _episodes(a, store), a.reason, lock_timeout=a.lock_timeout)
    print(f"{r.store}: undrop {len(r.episodes)} episode(s), back as store episodes "
          f"{', '.join(map(str, r.added))}: {r.episodes_before} -> {r.episodes_after} episodes; "
          f"version {r.version.short} ({r.seconds:.2f} s)")
    return 0


def _trim(a: argparse.Namespace) -> int:
    store = _store(a)
    with collector_paused():
        from conveyor.curate import parse_episodes, parse_frame, trim
        from conveyor.store import Store
    try:
        (episode,) = parse_episodes(a.episode) if a.episode.isdigit() else (None,)
        if episode is None:
            raise ValueError(f"trim takes one episode index, not {a.episode!r}")
        fps = int(Store.open(store).info.get("fps") or 0)
        start = parse_frame(a.start, fps)
        end = parse_frame(a.end, fps) if a.end is not None else None
    except ValueError as e:
        raise ConveyorError(store, str(e)) from None
    if end is None:
        from conveyor.episodes import load_episodes

        rows = load_episodes(Store.open(store).root, columns=["episode_index", "length"])
        end = rows[episode]["length"] if episode < len(rows) else start + 1
    return _done(trim(store, episode, start, end, reason=a.reason or "", lock_timeout=a.lock_timeout))


def _retask(a: argparse.Namespace) -> int:
    store = _store(a)
    with collector_paused():
        from conveyor.curate import rename_task, retask
    if a.rename:
        if a.episodes or a.task is not None:
            raise ConveyorError(store, "--rename OLD NEW renames a task everywhere; give no EPISODES or --task")
        return _done(rename_task(store, a.rename[0], a.rename[1], reason=a.reason or "",
                                 lock_timeout=a.lock_timeout))
    if a.task is None:
        raise ConveyorError(store, "give --task TEXT (or --rename OLD NEW)")
    return _done(retask(store, _episodes(a, store), a.task, reason=a.reason or "", lock_timeout=a.lock_timeout))


def register(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("store", metavar="STORE", help="store name (under store_root) or store folder")
        p.add_argument("--lock-timeout", type=float, default=60.0, metavar="S",
                       help="seconds to wait for another writer (ingest, compact) to finish")

    p = sub.add_parser("drop", help="take episodes out of a store (a new version; sources are not touched)",
                       description="Take episodes out, as one new version. Their source episodes are never "
                                   "re-ingested until `conveyor undrop`; earlier versions keep them.")
    common(p)
    p.add_argument("episodes", nargs="+", metavar="EPISODES", help="episode indices and ranges: 3 7 12-15")
    p.add_argument("--reason", required=True, help="why (shown by `conveyor show`)")
    p.set_defaults(handler=_drop)

    p = sub.add_parser("undrop", help="bring dropped episodes back (read again from their source)")
    common(p)
    p.add_argument("episodes", nargs="+", metavar="IDS", help="drop ids as `conveyor show` lists them: 1 2 5-7")
    p.add_argument("--reason", help="why (shown by `conveyor show`)")
    p.set_defaults(handler=_undrop)

    p = sub.add_parser("trim", help="keep frames START..END-1 of one episode (a new version)")
    common(p)
    p.add_argument("episode", metavar="EPISODE", help="episode index")
    p.add_argument("--start", default="0", help="first frame kept: a frame number, or seconds written 1.5s")
    p.add_argument("--end", help="first frame dropped after the kept ones (frames or 1.5s; default: the "
                                 "episode's end)")
    p.add_argument("--reason", help="why (shown by `conveyor show`)")
    p.set_defaults(handler=_trim)

    p = sub.add_parser("retask", help="set the task text of episodes, or rename a task everywhere")
    common(p)
    p.add_argument("episodes", nargs="*", metavar="EPISODES", help="episode indices and ranges: 3 7 12-15")
    p.add_argument("--task", help="the task text to set")
    p.add_argument("--rename", nargs=2, metavar=("OLD", "NEW"), help="rename task OLD to NEW in every episode")
    p.add_argument("--reason", help="why (shown by `conveyor show`)")
    p.set_defaults(handler=_retask)
