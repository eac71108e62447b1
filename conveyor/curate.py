"""Curation: drop, undrop, trim and re-task episodes, each one commit (a new version) through `Store.transaction`.

Cheap by design: no frame is decoded for the data, re-encoded, or copied, and no video file is rewritten. A
dropped or trimmed span stays as unreferenced bytes in its mp4 (meta/episodes rows point into video files by
from/to timestamps) until `conveyor compact` reclaims it by stream copy. lerobot reads every parquet under
`data/` and `meta/episodes/` in path order and indexes both by position, so `episode_index` must run 0..N-1 and
`index` 0..total-1 in file order: the data and metadata files from the first one that changes onwards are
rewritten with renumbered rows (new file numbers, so path order stays episode order); earlier files stay.

Naming episodes: store indices as `conveyor show` numbers them (`3 7 12-15`). A dropped episode is named by
its drop id: drops are numbered 1, 2, ... in the order they happened (a store's whole history, never reused),
and `conveyor show` lists each dropped episode with its id. `undrop` re-adds the source episode as recorded
(untrimmed, its source task) at the end of the store, read from its source folder, in one commit.
"""
from __future__ import annotations

import re
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from conveyor import layout
from conveyor.curate_rewrite import Ctx, Edit, read_episodes_table, rewrite
from conveyor.errors import ConveyorError
from conveyor.ledger import Curation, LedgerRecord, LedgerState
from conveyor.reports import CurationReport
from conveyor.store import Store, is_store
from conveyor.tables import read_tasks

ACTIONS = ("drop", "undrop", "trim", "retask", "rename")


def parse_episodes(text: str | list[str]) -> list[int]:
    """`"3 7 12-15"` (or its words as a list; commas allowed) -> [3, 7, 12, 13, 14, 15], sorted, unique."""
    words = text.replace(",", " ").split() if isinstance(text, str) else [w for t in text for w in
                                                                          t.replace(",", " ").split()]
    out: set[int] = set()
    for w in words:
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", w)
        if not m:
            raise ValueError(f"not an episode or range: {w!r} (write e.g. 3 7 12-15)")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise ValueError(f"empty range {w!r}")
        out.update(range(a, b + 1))
    if not out:
        raise ValueError("no episodes given")
    return sorted(out)


def parse_frame(text: str | int, fps: int) -> int:
    """A frame number (`12`) or seconds (`1.5s`) -> a frame number at `fps` (seconds round to the nearest)."""
    if isinstance(text, int):
        return text
    t = text.strip()
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)s", t)
    if m:
        return round(float(m.group(1)) * fps)
    if re.fullmatch(r"\d+", t):
        return int(t)
    raise ValueError(f"not a frame number or seconds: {text!r} (write e.g. 30 or 1.5s)")


# -- the operations -------------------------------------------------------------------------------------

def drop(store_path, episodes: list[int], reason: str, *, lock_timeout: float | None = 60.0) -> CurationReport:
    """Take `episodes` out of the store; their source episodes are never re-ingested until undropped."""
    def plan(c: Ctx) -> Edit:
        c.known(episodes)
        if not reason or not reason.strip():
            raise ConveyorError(c.s.root, "a drop needs a reason (--reason TEXT)")
        if len(set(episodes)) >= c.n:
            raise ConveyorError(c.s.root, f"dropping every episode ({c.n}) would leave an empty store; drop fewer")
        gone = set(episodes)
        return Edit(keep=[i for i in range(c.n) if i not in gone])
    return _curate(store_path, "drop", episodes, reason, {}, plan, lock_timeout)


def trim(store_path, episode: int, start: int, end: int, *, reason: str = "",
         lock_timeout: float | None = 60.0) -> CurationReport:
    """Keep frames start..end-1 of one episode."""
    def plan(c: Ctx) -> Edit:
        c.known([episode])
        n = c.light[episode]["length"]
        if not (0 <= start < end <= n) or (start, end) == (0, n):
            raise ConveyorError(c.s.root, f"episode {episode} has frames 0..{n - 1}: --start {start} --end {end} "
                                          f"{'keeps every frame' if (start, end) == (0, n) else 'is outside it'}; "
                                          f"give 0 <= start < end <= {n}")
        return Edit(keep=list(range(c.n)), trims={episode: (start, end)})
    return _curate(store_path, "trim", [episode], reason, {"start": start, "end": end}, plan, lock_timeout)


def retask(store_path, episodes: list[int], task: str, *, reason: str = "",
           lock_timeout: float | None = 60.0) -> CurationReport:
    """Set the task text of `episodes` (every frame)."""
    def plan(c: Ctx) -> Edit:
        c.known(episodes)
        _check_task(c, task)
        tasks = list(c.tasks)
        if task not in tasks:
            tasks.append(task)
        ti = tasks.index(task)
        return Edit(keep=list(range(c.n)), task_of={e: ti for e in episodes if c.light[e]["tasks"] != [task]},
                    tasks=tasks)
    return _curate(store_path, "retask", episodes, reason, {"task": task}, plan, lock_timeout)


def rename_task(store_path, old: str, new: str, *, reason: str = "",
                lock_timeout: float | None = 60.0) -> CurationReport:
    """Rename a task everywhere: in place in meta/tasks.parquet (no data file changes), or, when `new` is already
    a task, by moving the rows of `old` to it (their data files are rewritten; `old` stays, unused, in the
    task table so no other task index moves)."""
    def plan(c: Ctx) -> Edit:
        _check_task(c, new)
        if old not in c.tasks:
            raise ConveyorError(c.s.root / layout.TASKS, f"no task {old!r} in the store (tasks: "
                                                         f"{', '.join(map(repr, c.tasks[:5]))})")
        if old == new:
            raise ConveyorError(c.s.root / layout.TASKS, f"task {old!r} already has that name")
        users = [i for i, r in enumerate(c.light) if old in r["tasks"]]
        c.episodes = users
        if new in c.tasks:
            return Edit(keep=list(range(c.n)), task_map={c.tasks.index(old): c.tasks.index(new)},
                        mapped=set(users), rename={old: new})
        tasks = [new if t == old else t for t in c.tasks]
        return Edit(keep=list(range(c.n)), tasks=tasks, rename={old: new})
    return _curate(store_path, "rename", [], reason, {"old": old, "new": new}, plan, lock_timeout)


def undrop(store_path, episodes: list[int], reason: str | None = None, *, lock_timeout: float | None = 60.0
           ) -> CurationReport:
    """Bring dropped episodes (by drop id, as `conveyor show` lists them) back from their source folder, as
    recorded (untrimmed, the source's task), appended at the end of the store in one commit."""
    from conveyor.undrop import undrop_locked

    t0 = time.monotonic()
    s = open_store(store_path)
    with s.lock(timeout=lock_timeout):
        state = s.ledger_state()
        ids = drop_ids(state)
        by_id = {v: k for k, v in ids.items()}
        unknown = [e for e in episodes if e not in by_id]
        if unknown or not episodes:
            have = ", ".join(str(ids[k]) for k in state.dropped if k in ids) or "none"
            raise ConveyorError(s.root, f"no dropped episode with id {unknown[0] if unknown else '?'} "
                                        f"(dropped ids: {have}; `conveyor show` lists them)")
        back = [e for e in episodes if by_id[e] not in state.dropped]
        if back:
            raise ConveyorError(s.root, f"drop {back[0]} was undone already (its episode is in the store)")
        keys = [by_id[e] for e in episodes]
        parent, info = s.version, s.info
        report = undrop_locked(s, keys, state, _curation("undrop", episodes, keys, reason or "", {}, state, []))
        report.episodes, report.parent, report.reason = list(episodes), parent, reason or ""
        report.episodes_before, report.frames_before = info["total_episodes"], info["total_frames"]
        report.fps = int(info["fps"])
        report.seconds = time.monotonic() - t0
        return report


# -- naming ---------------------------------------------------------------------------------------------

def open_store(store_path) -> Store:
    root = Path(store_path).expanduser()
    if not is_store(root):
        Store.open(root)  # raises the one-line reason (a recording, a plain v3.0 dataset, no store)
    return Store.open(root)


def drop_ids(state: LedgerState) -> dict[tuple[str, int], int]:
    """Source episode -> the id of its latest drop: drops numbered 1, 2, ... over the store's history."""
    out: dict[tuple[str, int], int] = {}
    n = 0
    for c in state.curations:
        if c.action == "drop":
            for k in c.touched:
                n += 1
                out[tuple(k)] = n
    return out


# -- one curation commit -------------------------------------------------------------------------------

def _check_task(c: Ctx, task: str) -> None:
    if not task or not task.strip():
        raise ConveyorError(c.s.root, "the task text is empty; give the text the episodes show")


def _curate(store_path, action: str, episodes: list[int], reason: str, detail: dict, plan, lock_timeout
            ) -> CurationReport:
    t0 = time.monotonic()
    s = open_store(store_path)
    with s.lock(timeout=lock_timeout):
        info = s.info
        if not info or not info.get("total_episodes"):
            raise ConveyorError(s.root, "the store has no episodes yet")
        table = read_episodes_table(s.root)
        light = table.select([n for n in table.column_names if not n.startswith("stats/")]).to_pylist()
        c = Ctx(s, info, table, light, read_tasks(s.root / layout.TASKS), s.ledger_state())
        edit = plan(c)
        parent = s.version
        report = CurationReport(store=str(s.root), action=action, episodes=c.episodes, version=parent,
                                parent=parent, episodes_before=c.n, frames_before=info["total_frames"],
                                fps=int(info["fps"]), reason=reason)
        with s.transaction(action) as tx:
            rows = rewrite(tx, c, edit)
            if rows is None:
                tx.cancel()
            else:
                keys = [c.state.records[e].key for e in c.episodes]
                tx.record([_curation(action, c.episodes, keys, reason, detail, c.state, edit.keep),
                           *_changed_records(c, edit, detail)])
        report.version = tx.version or parent
        report.episodes_after, report.frames_after = (report.version.total_episodes, report.version.total_frames) \
            if tx.version else (report.episodes_before, report.frames_before)
        report.bytes_written = sum(e.size for e in tx.add.values()) if tx.version else 0
        report.seconds = time.monotonic() - t0
        return report


def _curation(action: str, episodes: list[int], keys: list[tuple[str, int]], reason: str, detail: dict,
              state: LedgerState, keep: list[int] | None) -> Curation:
    """The ledger line: the store's order of source episodes after the commit."""
    order_keys = [state.records[i].key for i in (keep if keep else range(len(state.records)))]
    sources = sorted({k[0] for k in order_keys} | {k[0] for k in keys})
    at = {src: i for i, src in enumerate(sources)}
    return Curation(action=action, episodes=list(episodes), touched=[tuple(k) for k in keys], reason=reason,
                    time=datetime.now(timezone.utc).isoformat(timespec="seconds"), detail=detail, sources=sources,
                    order=[(at[src], e) for src, e in order_keys])


def _changed_records(c: Ctx, edit: Edit, detail: dict) -> list[LedgerRecord]:
    """Ledger records of episodes whose own entry changes: trimmed (start, length) and re-tasked (task)."""
    out = []
    new_of = {old: new for new, old in enumerate(edit.keep)}
    tasks = edit.tasks if edit.tasks is not None else c.tasks
    for old in sorted(set(edit.trims) | set(edit.task_of) | {i for i, r in enumerate(c.state.records)
                                                           if r.task is not None and r.task in edit.rename}):
        r = c.state.records[old]
        if old in edit.trims:
            a, b = edit.trims[old]
            r = replace(r, start=r.start + a, length=b - a)
        if old in edit.task_of:
            r = replace(r, task=tasks[edit.task_of[old]])
        elif r.task in edit.rename:
            r = replace(r, task=edit.rename[r.task])
        out.append(replace(r, episode_index=new_of[old]))
    return out
