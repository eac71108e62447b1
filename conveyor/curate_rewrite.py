"""The one rewrite every curation but undrop shares: from an `Edit` (which episodes stay, trimmed, re-tasked),
stage the new data and meta/episodes files (from the first that changes, renumbered), and info/stats/tasks.

lerobot reads every parquet under `data/` and `meta/episodes/` in path order and indexes both by position, so
`episode_index` runs 0..N-1 and `index` 0..total-1 in file order: files before the first change stay; from it
on, each old file becomes one new file (new numbers, so path order stays episode order) holding the episodes
it keeps. Videos are never rewritten: a trimmed episode's span moves to its first kept frame, found from the
file's packets."""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conveyor import episodes as eps, layout, stats as st
from conveyor.errors import ConveyorError
from conveyor.ledger import LedgerState
from conveyor.store import Commit, Store
from conveyor.tables import data_schema, int64_array, numeric_stats, stacked_stats
from conveyor.video import VideoProbe, camera_frames, frame_ticks, probe

RENUMBERED = ("episode_index", "index")  # columns whose stats follow an episode's position


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
class Ctx:
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


def rewrite(tx: Commit, c: Ctx, edit: Edit) -> list[dict] | None:
    """Stage the new data (from the first file that changes), meta/episodes (likewise), info/stats/tasks.
    None when nothing would change."""
    from conveyor.ingest_writers import DataWriter, write_meta

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
        # regroups a store exactly as a one-shot convert of the kept episodes would); the file's rows are
        # renumbered in one pass and written in one call (per-episode writes cost ~1 ms each)
        linear, schema = s.next_linear("data"), data_schema(features)
        reader = _Rows(s.root)
        moved: dict[int, dict[tuple[int, str], np.ndarray]] = {}  # episode length -> (new index, column) -> values
        by_file: dict[str, list[tuple[int, int]]] = {}
        for new, old in enumerate(edit.keep):
            rel = layout.episode_data_path(light[old])
            if rel in in_tail:
                by_file.setdefault(rel, []).append((new, old))
        for rel in tail:
            parts = []
            for new, old in by_file.get(rel, []):
                t = reader.episode(rel, old)
                if old in edit.trims or edit.rows_change(old):
                    t = _renumber(t, rows[new], edit, old, fps)
                    refresh = features if old in edit.trims else {k: features[k] for k in (
                        *RENUMBERED, "task_index") if k in features}
                    updates.setdefault(new, {}).update(numeric_stats(t, refresh))
                elif new != old or rows[new]["dataset_from_index"] != light[old]["dataset_from_index"]:
                    a, n = rows[new]["dataset_from_index"], t.num_rows
                    moved.setdefault(n, {}).update({(new, "episode_index"): np.full(n, new, dtype=np.int64),
                                                    (new, "index"): np.arange(a, a + n, dtype=np.int64)})
                parts.append(t)
                rows[new].update(layout.file_columns("data", linear))
            if not parts:
                continue
            table = pa.concat_tables(parts)
            kept = by_file[rel]
            lengths = [p.num_rows for p in parts]
            first = rows[kept[0][0]]["dataset_from_index"]
            table = _put(table, "episode_index", int64_array(np.repeat([new for new, _ in kept], lengths)))
            table = _put(table, "index", int64_array(np.arange(first, first + table.num_rows)))
            writer = DataWriter(tx, linear, schema, 1e12)  # never full: one file for one file
            writer.write(table.combine_chunks())
            writer.close()
            linear += 1
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


def _put(t: pa.Table, name: str, values: pa.Array) -> pa.Table:
    """`t` with column `name` replaced by `values` (cast to the column's type when it differs)."""
    i = t.schema.get_field_index(name)
    f = t.schema.field(i)
    return t.set_column(i, f, values if values.type == f.type else values.cast(f.type))


def _renumber(t: pa.Table, row: dict, edit: Edit, old: int, fps: int) -> pa.Table:
    """An episode's rows at its new place: episode_index, index; trimmed: frame_index and timestamp from 0."""
    if old in edit.trims:
        a, b = edit.trims[old]
        t = t.slice(a, b - a)
    n = t.num_rows

    def put(name: str, values: pa.Array) -> None:
        nonlocal t
        t = _put(t, name, values)

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
    lo, hi = row[f"videos/{key}/from_timestamp"], row[f"videos/{key}/to_timestamp"]
    pr = _window_probe(root / rel, lo, hi)
    seg = _segment(pr, lo, hi)
    if len(seg) != row["length"]:  # the window missed packets (an odd file): read them all
        pr = probe(root / rel)
        seg = _segment(pr, lo, hi)
    n = len(seg)
    if n < b:
        raise ConveyorError(root / rel, f"episode {row['episode_index']}: {n} frames of camera {key} in the file, "
                                        f"fewer than the {b} the trim keeps")
    kept = seg[a:b]
    start = float(kept[0] * pr.time_base)
    end = float(seg[b] * pr.time_base) if b < len(seg) else row[f"videos/{key}/to_timestamp"]
    return start, end, st.image_stats(camera_frames(root / rel, pr, kept, st.CAMERA_SAMPLES))


def _window_probe(path: Path, a: float, b: float) -> VideoProbe:
    """`probe` of the packets around [a, b) only: from the keyframe before `a` to the first keyframe at or after
    `b` (a file holds many episodes; demuxing all of it was most of a trim)."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        tb = Fraction(s.time_base.numerator, s.time_base.denominator)
        c.seek(int(a * tb.denominator / tb.numerator), stream=s, backward=True, any_frame=False)
        pts, dts, keys = [], [], set()
        for pk in c.demux(s):
            if not pk.size or pk.pts is None:
                continue
            if pk.is_keyframe and pk.pts * tb >= Fraction(b) - Fraction(1, 10**6):
                break  # the next episode's (or trimmed-away) frames: nothing later is in the span
            pts.append(pk.pts)
            dts.append(pk.dts if pk.dts is not None else pk.pts)
            if pk.is_keyframe:
                keys.add(pk.pts)
        rate = s.average_rate or s.guessed_rate
        return VideoProbe(len(pts), tuple(sorted(pts)), tb, s.codec_context.name, s.codec_context.width,
                          s.codec_context.height, frame_ticks(rate, tb) if rate else 1, frozenset(keys),
                          min(dts, default=0))


def _segment(pr: VideoProbe, a: float, b: float) -> tuple[int, ...]:
    """The pts whose time lies in [a, b) (as validate reads an episode's span)."""
    tb = pr.time_base
    times = np.asarray(pr.pts, dtype=np.int64) * tb.numerator / tb.denominator
    lo, hi = np.searchsorted(times, [a - 1e-6, b - 1e-6], side="left")
    return tuple(pr.pts[int(lo):int(hi)])


def _write_meta_tail(tx: Commit, s: Store, c: Ctx, edit: Edit, rows: list[dict],
                     updates: dict[int, dict[str, st.Stats]], head: int) -> None:
    """Rows head.. of the new store, in new metadata files grouped by the size policy."""
    from conveyor.tables import episodes_schema

    features = c.info["features"]
    schema = episodes_schema(features)
    part = _rows_of(c.table, edit.keep[head:])
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


def _rows_of(table: pa.Table, keep: list[int]) -> pa.Table:
    """The rows `keep` (ascending) of `table`, as zero-copy slices of its consecutive runs (`Table.take` would
    import pyarrow.compute: ~0.3 s of a curation command)."""
    runs: list[list[int]] = []
    for i in keep:
        if runs and runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, i + 1])
    return pa.concat_tables([table.slice(a, b - a) for a, b in runs]) if runs else table.slice(0, 0)


def read_episodes_table(root: Path) -> pa.Table:
    """Every committed meta/episodes row in episode order: the files in path order are episode order (a commit
    writes new files with higher numbers), so no sort (which imports pyarrow.compute)."""
    tables = [pq.ParquetFile(f).read() for f in sorted((root / "meta" / "episodes").glob("*/*.parquet"))]
    return pa.concat_tables(tables) if tables else pa.table({"episode_index": pa.array([], pa.int64())})


def episodes_table_of(tx: Commit, c: Ctx, head: int) -> pa.Table:
    """The new store's meta/episodes rows: the unchanged head plus the staged tail."""
    staged = [pq.ParquetFile(tx.dir / rel).read() for rel in sorted(tx.add) if rel.startswith("meta/episodes/")]
    return pa.concat_tables([c.table.slice(0, head), *staged]) if staged else c.table.slice(0, head)


def global_stats(tx: Commit, features: dict, table: pa.Table, rows: list[dict]) -> dict[str, st.Stats]:
    """meta/stats.json of the new version: min/max/mean/std aggregated from its per-episode rows (`table`),
    quantiles exact over every live row of the data files `rows` point into (`quantiles.version_stats`, which
    stages the sorted values the next append extends)."""
    from conveyor import quantiles

    return quantiles.version_stats(tx, features, rows, stacked_stats(features, table))
