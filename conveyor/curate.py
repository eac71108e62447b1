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
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conveyor import episodes as eps, layout, stats as st
from conveyor.errors import ConveyorError
from conveyor.ledger import Curation, LedgerRecord, LedgerState
from conveyor.reports import CurationReport
from conveyor.store import Commit, Store, is_store
from conveyor.tables import column_array, data_schema, int64_array, numeric_stats, read_tasks
from conveyor.video import VideoProbe, camera_frames, probe

ACTIONS = ("drop", "undrop", "trim", "retask", "rename")
RENUMBERED = ("episode_index", "index")  # columns whose stats follow an episode's position


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
    def plan(c: _Ctx) -> Edit:
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
    def plan(c: _Ctx) -> Edit:
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
    def plan(c: _Ctx) -> Edit:
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
    def plan(c: _Ctx) -> Edit:
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


# -- the one rewrite every curation but undrop shares ---------------------------------------------------

@dataclass
class Edit:
    """What a curation does, in the parent version's episode indices."""

    keep: list[int]  # parent indices, in order, that stay
    trims: dict[int, tuple[int, int]] = field(default_factory=dict)  # parent index -> kept frames [a, b)
    task_of: dict[int, int] = field(default_factory=dict)  # parent index -> task_index of every row
    task_map: dict[int, int] = field(default_factory=dict)  # task_index -> task_index, rows of `mapped`
    mapped: set[int] = field(default_factory=set)
    tasks: list[str] | None = None  # the new task table (None: unchanged)
    rename: dict[str, str] = field(default_factory=dict)  # task text renamed in meta/episodes rows

    def rows_change(self, old: int) -> bool:
        return old in self.trims or old in self.task_of or old in self.mapped


@dataclass
class _Ctx:
    s: Store
    info: dict
    table: pa.Table  # every meta/episodes row, in order
    light: list[dict]  # the same rows without stats columns
    tasks: list[str]
    state: LedgerState
    episodes: list[int] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.light)

    def known(self, episodes: list[int]) -> None:
        if not episodes:
            raise ConveyorError(self.s.root, "no episodes given")
        bad = [e for e in episodes if not 0 <= e < self.n]
        if bad:
            raise ConveyorError(self.s.root, f"no episode {bad[0]}: the store has episodes 0..{self.n - 1}")
        self.episodes = sorted(set(episodes))


def _check_task(c: _Ctx, task: str) -> None:
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
        table = episodes_table(s.root)
        light = table.select([n for n in table.column_names if not n.startswith("stats/")]).to_pylist()
        c = _Ctx(s, info, table, light, read_tasks(s.root / layout.TASKS), s.ledger_state())
        edit = plan(c)
        parent = s.version
        report = CurationReport(store=str(s.root), action=action, episodes=c.episodes, version=parent,
                                parent=parent, episodes_before=c.n, frames_before=info["total_frames"],
                                fps=int(info["fps"]), reason=reason)
        with s.transaction(action) as tx:
            rows = _rewrite(tx, c, edit)
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


def _changed_records(c: _Ctx, edit: Edit, detail: dict) -> list[LedgerRecord]:
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


def _rewrite(tx: Commit, c: _Ctx, edit: Edit) -> list[dict] | None:
    """Stage the new data (from the first file that changes), meta/episodes (likewise), info/stats/tasks.
    None when nothing would change."""
    from conveyor.ingest import DataWriter, write_meta

    s, info, light = c.s, c.info, c.light
    features, fps = info["features"], int(info["fps"])
    video_keys = [k for k, f in features.items() if f["dtype"] == "video"]
    tasks = edit.tasks if edit.tasks is not None else c.tasks
    rows: list[dict] = []
    updates: dict[int, dict[str, st.Stats]] = {}  # new index -> recomputed stats
    frame = 0
    for new, old in enumerate(edit.keep):
        r = dict(light[old], episode_index=new)
        if old in edit.trims:
            a, b = edit.trims[old]
            r["length"] = b - a
            updates[new] = {}
            for k in video_keys:
                r[f"videos/{k}/from_timestamp"], r[f"videos/{k}/to_timestamp"], cam = _trim_video(s.root, r, k, a, b)
                updates[new][k] = cam
        if old in edit.task_of:
            r["tasks"] = [tasks[edit.task_of[old]]]
        elif edit.rename:
            r["tasks"] = list(dict.fromkeys(edit.rename.get(t, t) for t in r["tasks"]))
        r["dataset_from_index"], r["dataset_to_index"] = frame, frame + r["length"]
        frame += r["length"]
        rows.append(r)

    # data: every file from the first that holds a changed episode is rewritten, in order
    changed = ({i for i in range(c.n)} - set(edit.keep)) | {old for new, old in enumerate(edit.keep)
                                                           if new != old or edit.rows_change(old)
                                                           or rows[new]["dataset_from_index"]
                                                           != light[old]["dataset_from_index"]}
    if changed:
        files = list(dict.fromkeys(layout.episode_data_path(r) for r in light))
        tail = files[files.index(layout.episode_data_path(light[min(changed)])):]
        in_tail = set(tail)
        # one new file per old file with the episodes it keeps: the file boundaries stay (compaction later
        # regroups a store exactly as a one-shot convert of the kept episodes would)
        linear, schema = s.next_linear("data"), data_schema(features)
        writer, current = None, None
        reader = _Rows(s.root)
        moved: dict[int, dict[tuple[int, str], np.ndarray]] = {}  # episode length -> (new index, column) -> values
        for new, old in enumerate(edit.keep):
            rel = layout.episode_data_path(light[old])
            if rel not in in_tail:
                continue
            if rel != current:
                if writer is not None:
                    writer.close()
                    linear += 1
                writer, current = DataWriter(tx, linear, schema, 1e12), rel  # never full
            t = reader.episode(rel, old)
            if new != old or edit.rows_change(old) or rows[new]["dataset_from_index"] != light[old]["dataset_from_index"]:
                t = _renumber(t, rows[new], edit, old, fps)
                if old in edit.trims or edit.rows_change(old):
                    refresh = features if old in edit.trims else {k: features[k] for k in (
                        *RENUMBERED, "task_index") if k in features}
                    updates.setdefault(new, {}).update(numeric_stats(t, refresh))
                else:
                    moved.setdefault(t.num_rows, {}).update({(new, k): column_array(t, k) for k in RENUMBERED
                                                             if k in features})
            rows[new].update(layout.file_columns("data", writer.write(t)))
        if writer is not None:
            writer.close()
        tx.delete(tail)
        # the renumbered columns' stats of moved episodes, one numpy call per episode length (a column's stats do
        # not depend on the columns beside it: the same values as one call per episode, at 1,000 episodes ~20x less)
        for columns in moved.values():
            for (new, k), v in st.numeric_stats_many(columns).items():
                updates.setdefault(new, {})[k] = v

    # meta/episodes: every file from the first that holds a changed row is rewritten, in order
    new_of = {old: new for new, old in enumerate(edit.keep)}
    first = next((i for i in range(c.n) if i not in new_of or rows[new_of[i]] != light[i] or new_of[i] in updates),
                 None)
    if first is None and tasks == c.tasks:
        return None
    head = c.n  # nothing before it changes
    if first is not None:
        metas = list(dict.fromkeys(layout.episode_meta_path(r) for r in light))
        tail_meta = metas[metas.index(layout.episode_meta_path(light[first])):]
        head = next(i for i, r in enumerate(light) if layout.episode_meta_path(r) in set(tail_meta))
        _write_meta_tail(tx, s, c, edit, rows, updates, head)
        tx.delete(tail_meta)
    table = episodes_table_of(tx, c, head)
    info = dict(info, total_episodes=len(rows), total_frames=frame, total_tasks=len(tasks),
                splits={"train": f"0:{len(rows)}"})
    write_meta(tx, info, tasks, global_stats(tx, features, table, rows))
    tx.set_totals(len(rows), frame)
    return rows


class _Rows:
    """One data file at a time (episodes are visited in file order), sliced per episode."""

    def __init__(self, root: Path):
        self.root, self.rel, self.table, self.eps = root, None, None, None

    def episode(self, rel: str, ep: int) -> pa.Table:
        if rel != self.rel:
            self.rel, self.table = rel, pq.ParquetFile(self.root / rel).read()
            self.eps = self.table.column("episode_index").to_numpy()
        lo, hi = np.searchsorted(self.eps, [ep, ep + 1])
        return self.table.slice(int(lo), int(hi - lo))


def _renumber(t: pa.Table, row: dict, edit: Edit, old: int, fps: int) -> pa.Table:
    """An episode's rows at its new place: episode_index, index; trimmed: frame_index and timestamp from 0."""
    if old in edit.trims:
        a, b = edit.trims[old]
        t = t.slice(a, b - a)
    n = t.num_rows

    def put(name: str, values: pa.Array) -> None:
        nonlocal t
        i = t.schema.get_field_index(name)
        t = t.set_column(i, t.schema.field(i), values.cast(t.schema.field(i).type))

    put("episode_index", int64_array(np.full(n, row["episode_index"])))
    put("index", int64_array(np.arange(row["dataset_from_index"], row["dataset_from_index"] + n)))
    if old in edit.trims:
        put("frame_index", int64_array(np.arange(n)))
        put("timestamp", pa.array((np.arange(n) / fps).astype(np.float32)))
    if old in edit.task_of:
        put("task_index", int64_array(np.full(n, edit.task_of[old])))
    elif old in edit.mapped:
        ti = t.column("task_index").to_numpy()
        put("task_index", int64_array(np.vectorize(lambda x: edit.task_map.get(int(x), int(x)), otypes=[np.int64])(ti)))
    return t


def _trim_video(root: Path, row: dict, key: str, a: int, b: int) -> tuple[float, float, st.Stats]:
    """The kept span of one camera, exact from the file's packets (no decode), and its camera stats from a few
    kept frames."""
    rel = layout.episode_video_path(row, key)
    pr = probe(root / rel)
    seg = _segment(pr, row[f"videos/{key}/from_timestamp"], row[f"videos/{key}/to_timestamp"])
    n = len(seg)
    if n < b:
        raise ConveyorError(root / rel, f"episode {row['episode_index']}: {n} frames of camera {key} in the file, "
                                        f"fewer than the {b} the trim keeps")
    kept = seg[a:b]
    start = float(kept[0] * pr.time_base)
    end = float(seg[b] * pr.time_base) if b < len(seg) else row[f"videos/{key}/to_timestamp"]
    return start, end, st.image_stats(camera_frames(root / rel, pr, kept, st.CAMERA_SAMPLES))


def _segment(pr: VideoProbe, a: float, b: float) -> tuple[int, ...]:
    """The pts whose time lies in [a, b) (as validate reads an episode's span)."""
    tb = pr.time_base
    times = np.asarray(pr.pts, dtype=np.int64) * tb.numerator / tb.denominator
    lo, hi = np.searchsorted(times, [a - 1e-6, b - 1e-6], side="left")
    return tuple(pr.pts[int(lo):int(hi)])


def _write_meta_tail(tx: Commit, s: Store, c: _Ctx, edit: Edit, rows: list[dict],
                     updates: dict[int, dict[str, st.Stats]], head: int) -> None:
    """Rows head.. of the new store, in new metadata files grouped by the size policy."""
    from conveyor.tables import episodes_schema

    features = c.info["features"]
    schema = episodes_schema(features)
    part = c.table.take(pa.array(edit.keep[head:], pa.int64())) if head < len(rows) else c.table.slice(0, 0)
    names = [n for n in part.column_names if not n.startswith("stats/")]
    for name in names:
        i = part.schema.get_field_index(name)
        part = part.set_column(i, part.schema.field(i), pa.array([r[name] for r in rows[head:]],
                                                                 part.schema.field(i).type))
    for key in features:  # recomputed stats replace the rows' old ones
        for stat in st.STAT_KEYS:
            name = f"stats/{key}/{stat}"
            touched = {n: u[key][stat] for n, u in updates.items() if n >= head and key in u}
            if not touched:
                continue
            values = part.column(name).to_pylist()
            for n, v in touched.items():
                values[n - head] = np.asarray(v).tolist()
            i = part.schema.get_field_index(name)
            part = part.set_column(i, part.schema.field(i), pa.array(values, schema.field(name).type))
    linear = s.next_linear("meta")
    for group in eps._groups(part, c.info["data_files_size_in_mb"]):
        cols = layout.file_columns("meta/episodes", linear)
        piece = part.slice(group[0], len(group))
        for name, value in cols.items():
            piece = piece.set_column(piece.schema.get_field_index(name), name,
                                     pa.array([value] * len(group), pa.int64()))
        for j in group:
            rows[head + j].update(cols)
        rel = layout.episodes_path(linear)
        pq.write_table(piece, tx.path(rel), compression="snappy")
        tx.staged(rel)
        linear += 1


def episodes_table(root: Path) -> pa.Table:
    """Every committed meta/episodes row in order (files in path order are episode order)."""
    from conveyor.validate import episodes_table as read

    return read(root)


def episodes_table_of(tx: Commit, c: _Ctx, head: int) -> pa.Table:
    """The new store's meta/episodes rows: the unchanged head plus the staged tail."""
    staged = [pq.ParquetFile(tx.dir / rel).read() for rel in sorted(tx.add) if rel.startswith("meta/episodes/")]
    return pa.concat_tables([c.table.slice(0, head), *staged]) if staged else c.table.slice(0, head)


def global_stats(tx: Commit, features: dict, table: pa.Table, rows: list[dict]) -> dict[str, st.Stats]:
    """meta/stats.json of the new version: min/max/mean/std aggregated from its per-episode rows (`table`),
    quantiles exact over every live row of the data files `rows` point into (`quantiles.version_stats`, which
    stages the sorted values the next append extends)."""
    from conveyor import quantiles
    from conveyor.validate import stacked_stats

    return quantiles.version_stats(tx, features, rows, stacked_stats(features, table))
