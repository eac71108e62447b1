"""Exact q01..q99 of a store version's numeric features, over every row of its live episodes.

Per-episode quantiles cannot be combined: their count-weighted mean (lerobot's aggregation, and conveyor's
until now) is not a quantile of the union (issue 18 measured q99 0.77 where the exact value is 0.998). So
every commit keeps, beside the data, each numeric column's values sorted, in two files under
`.conveyor/values/` written through the commit (`tx.path` + `tx.staged`), so they are never half-written:

- `base.npy` (D, Nb) and `delta.npy` (D, Nd): one row per feature dimension (float64, which holds float32 and
  int64 below 2**53 exactly), each row sorted. An append writes only a new delta (old delta + its rows) and
  folds the delta into the base once it outgrows a quarter of it: O(new + delta) bytes per append, amortised
  O(1) rewrites per row, instead of reading every data file (1,000 small files: ~1-2 s).
- `index.json`: the column layout, the row counts and a digest of the committed data files the values were
  read from. A commit that changed rows (curation, compaction) without `version_stats` leaves a digest that
  no longer matches: the next writer rebuilds from the data files instead of trusting stale values.

Data files are immutable, so a commit changes rows only by replacing whole data files: `version_stats` (drop,
trim, retask, compaction) takes the replaced files' rows out of the committed values and puts the staged
files' rows in, reading only those files, or reads every live row when they are most of the data.

The quantiles are exact order statistics of the union of the two sorted arrays, found by bisection (the base
memory-mapped: O(D log N) pages read) and interpolated exactly like `np.quantile`'s default ("linear"), so they
equal numpy over every row, bit for bit: no rank error at all (tests/test_stats.py, bench/stats.py). min/max/mean/std/count stay the aggregation of the
per-episode stats (min of mins, pooled moments: exact up to float rounding). Camera features keep their
sampled per-episode stats, aggregated (count-weighted quantiles): exactness is for numeric features.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conveyor import layout, stats as st
from conveyor.tables import column_array

if TYPE_CHECKING:
    from conveyor.store import Commit, Store

VALUES_DIR = ".conveyor/values"
BASE, DELTA, INDEX = f"{VALUES_DIR}/base.npy", f"{VALUES_DIR}/delta.npy", f"{VALUES_DIR}/index.json"
FOLD_FRACTION = 0.25  # the delta is folded into the base once it holds more than this share of the base


# -- layout and values ----------------------------------------------------------------------------------

def numeric_columns(features: dict) -> list[tuple[str, int]]:
    """(feature, width) of every numeric feature (neither video nor image), in info.json order."""
    return [(k, int(np.prod(f["shape"]))) for k, f in features.items() if f["dtype"] not in ("video", "image")]


def table_values(features: dict, table: pa.Table) -> np.ndarray:
    """(D, n) float64: the numeric columns of `table`'s rows, one row per feature dimension."""
    cols = [column_array(table, k).reshape(table.num_rows, -1) for k, _ in numeric_columns(features)]
    if not cols:
        return np.empty((0, table.num_rows))
    return np.concatenate([c.astype(np.float64) for c in cols], axis=1).T.copy()


def episode_values(features: dict, rows: list[dict], path_of: Callable[[str], Path]) -> np.ndarray:
    """(D, N) float64 values of every row of the episodes `rows` (meta/episodes rows), read from the data files
    (`path_of(rel)` -> file), reading only the numeric columns, and of each file only the episodes' rows."""
    keys = [k for k, _ in numeric_columns(features)]
    spans: dict[str, list[tuple[int, int]]] = {}
    for r in rows:
        spans.setdefault(layout.episode_data_path(r), []).append((r["dataset_from_index"], r["dataset_to_index"]))
    parts = []
    for rel, ranges in spans.items():
        t = pq.ParquetFile(path_of(rel)).read(columns=list(dict.fromkeys(keys + ["index"])))
        index = column_array(t, "index").reshape(-1)
        starts, ends = np.array(sorted(ranges)).T
        at = np.searchsorted(starts, index, side="right") - 1
        keep = (at >= 0) & (index < ends[np.maximum(at, 0)])
        want = int((ends - starts).sum())
        if int(keep.sum()) != want:
            raise ValueError(f"{rel}: {int(keep.sum())} rows in the episodes' index ranges, metadata says {want}")
        parts.append(table_values(features, t)[:, keep])
    return np.concatenate(parts, axis=1) if parts else np.empty((sum(w for _, w in numeric_columns(features)), 0))


# -- exact quantiles of two sorted arrays -----------------------------------------------------------------

def _kth(a: np.ndarray, b: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """(D, K): the ks-th smallest (0-based) of each row of the union of a (D, Na) and b (D, Nb), rows sorted.

    Bisection on i, how many of the k+1 smallest come from a: the smallest i with a[i] >= b[k-i]
    (monotone in i) splits them; the k-th is then max(a[i-1], b[k-i])."""
    na, nb = a.shape[1], b.shape[1]
    if nb == 0:
        return np.asarray(a[:, ks])
    if na == 0:
        return np.asarray(b[:, ks])
    d = np.arange(a.shape[0])[:, None]
    k = np.broadcast_to(ks, (a.shape[0], len(ks)))
    lo, hi = np.maximum(0, k + 1 - nb), np.minimum(k + 1, na)
    while True:
        open_ = lo < hi
        if not open_.any():
            break
        mid = np.where(open_, (lo + hi) // 2, 0)
        j = np.clip(k - mid, 0, nb - 1)
        right = np.asarray(a[d, np.minimum(mid, na - 1)]) >= b[d, j]
        hi = np.where(open_ & right, mid, hi)
        lo = np.where(open_ & ~right, mid + 1, lo)
    j = k + 1 - lo
    from_a = np.where(lo > 0, np.asarray(a[d, np.maximum(lo - 1, 0)]), -np.inf)
    from_b = np.where(j > 0, b[d, np.clip(j - 1, 0, nb - 1)], -np.inf)
    return np.maximum(from_a, from_b)


def exact_quantiles(base: np.ndarray, delta: np.ndarray) -> dict[str, np.ndarray]:
    """{q01: (D,), ...} of the union of base and delta (rows sorted): np.quantile(..., axis=1) over every value,
    method "linear", computed the way numpy computes it (virtual index, then its `_lerp`)."""
    n = base.shape[1] + delta.shape[1]
    if n == 0:
        return {}
    qs = np.array(list(st.QUANTILES.values()))
    virtual = (n - 1) * qs  # numpy's virtual index for "linear"
    prev = np.floor(virtual)
    gamma = virtual - prev
    lo = np.clip(prev, 0, n - 1).astype(np.int64)
    hi = np.clip(prev + 1, 0, n - 1).astype(np.int64)
    vals = _kth(base, delta, np.concatenate([lo, hi]))
    a, b = vals[:, : len(qs)], vals[:, len(qs):]
    diff = b - a
    out = np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)
    return {name: out[:, i] for i, name in enumerate(st.QUANTILES)}


def with_quantiles(features: dict, stats: dict[str, st.Stats], qs: dict[str, np.ndarray]) -> dict[str, st.Stats]:
    """`stats` (aggregated per-episode stats) with each numeric feature's quantiles replaced by the exact ones."""
    out = dict(stats)
    col = 0
    for key, width in numeric_columns(features):
        shape = np.shape(stats[key]["mean"]) if key in stats else (width,)
        out[key] = dict(stats.get(key, {})) | {q: v[col: col + width].reshape(shape) for q, v in qs.items()}
        col += width
    return out


# -- the committed values ---------------------------------------------------------------------------------

def _key(rel: str) -> int:
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")


def data_digest(rels: Iterable[str]) -> str:
    """An order-free digest of a set of data files (a sum of their names' hashes), so a commit can move it by
    the files it adds and removes without listing the store's other files."""
    return f"{sum(_key(r) for r in set(rels)) % 2**64:016x}"


def _committed_data(manifest: dict) -> list[str]:
    return [rel for rel in manifest if layout.kind_of(rel) == "data"]


def load_values(root: Path, features: dict) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """(base memory-mapped, delta, index) as committed, or None where the store has none or another layout."""
    index_path = root / INDEX
    if not index_path.exists():
        return None
    index = json.loads(index_path.read_text())
    if [tuple(c) for c in index["columns"]] != numeric_columns(features):
        return None
    d = sum(w for _, w in numeric_columns(features))
    base = np.load(root / BASE, mmap_mode="r") if index["base"] else np.empty((d, 0))
    delta = np.load(root / DELTA) if index["delta"] else np.empty((d, 0))
    if base.shape != (d, index["base"]) or delta.shape != (d, index["delta"]):
        return None
    return base, delta, index


def _current(store: Store, features: dict, frames: int, manifest: dict | None = None
             ) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(base, delta, data digest) as committed, if they cover exactly the committed data files and `frames`
    rows. Written by the commit at HEAD: current without reading the manifest (thousands of entries cost ms
    per append); else the digest must match the committed data files."""
    got = load_values(store.root, features)
    if got is None:
        return None
    base, delta, index = got
    if base.shape[1] + delta.shape[1] != frames:
        return None
    if index.get("commit_id") != store.version.commit_id:
        manifest = store.manifest() if manifest is None else manifest
        if index["data_digest"] != data_digest(_committed_data(manifest)):
            return None
    return base, delta, index["data_digest"]


def is_current(store: Store, features: dict) -> bool:
    """Whether the committed sorted values cover exactly the committed data files and rows."""
    return _current(store, features, int((store.info or {}).get("total_frames", 0))) is not None


def _write(tx: Commit, features: dict, base: np.ndarray, delta: np.ndarray, *, base_changed: bool,
           digest: str) -> None:
    """Stage the delta (and the base, when it changed: a fold or a rebuild) and the index through the commit;
    an empty array's file is removed. `digest`: the committed data files' digest, moved here by the data files
    this commit adds and removes (call once they are staged)."""
    root = tx.store.root
    for rel, arr, changed in ((BASE, base, base_changed), (DELTA, delta, True)):
        if not changed:
            continue
        if arr.shape[1] == 0:
            if (root / rel).exists():
                tx.delete([rel])
            continue
        with open(tx.path(rel), "wb") as f:
            np.save(f, np.ascontiguousarray(arr))
        tx.staged(rel)
    added = {r for r in tx.add if layout.kind_of(r) == "data" and not (root / r).exists()}
    removed = {r for r in tx.remove if layout.kind_of(r) == "data"}
    moved = (int(digest, 16) + sum(map(_key, added)) - sum(map(_key, removed))) % 2**64
    index = {"columns": numeric_columns(features), "base": base.shape[1], "delta": delta.shape[1],
             "data_digest": f"{moved:016x}", "commit_id": tx.id}
    tx.write(INDEX, json.dumps(index).encode())


def _path_of(tx: Commit) -> Callable[[str], Path]:
    """A data file as this commit will leave it: staged in it, else committed."""
    return lambda rel: tx.dir / rel if rel in tx.add else tx.store.root / rel


# -- entry points -----------------------------------------------------------------------------------------

def version_stats(tx: Commit, features: dict, rows: list[dict], aggregated: dict[str, st.Stats] | None = None
                  ) -> dict[str, st.Stats]:
    """The stats.json of the version `tx` makes, whose episodes are `rows` (every meta/episodes row of it, with
    data locations and `stats/...` columns), and its sorted values, staged in `tx`. For any commit that changes
    rows (drop, trim, retask, compaction); call it once the commit's data files are staged and the replaced
    ones `tx.delete`d. Reads only the data files the commit replaces and stages when they are the smaller part
    of the data (`_edited`), else every live row of the new version.
    `aggregated`: the per-episode aggregate, when the caller has it (else aggregated from `rows`)."""
    if aggregated is None:
        aggregated = aggregate_rows(features, rows)
    manifest = tx.store.manifest()
    base = _edited(tx, features, manifest)
    if base is None or base.shape[1] != sum(r["length"] for r in rows):
        base = episode_values(features, rows, _path_of(tx))
        base.sort(axis=1)
    _write(tx, features, base, base[:, :0], base_changed=True, digest=data_digest(_committed_data(manifest)))
    return with_quantiles(features, aggregated, exact_quantiles(base, base[:, :0]))


def _edited(tx: Commit, features: dict, manifest: dict) -> np.ndarray | None:
    """The committed values with the rows of the data files `tx` removes taken out and the rows of those it
    stages put in (files are immutable, so a commit changes rows only by replacing whole data files). None
    where the committed values are not current, or the replaced and staged files outweigh half the data (then
    reading every live row is cheaper), or the removed rows are not among the values."""
    s = tx.store
    cur = _current(s, features, int((s.info or {}).get("total_frames", 0)), manifest)
    if cur is None:
        return None
    gone = [r for r in dict.fromkeys(tx.remove) if layout.kind_of(r) == "data" and r in manifest]
    new = [r for r in tx.add if layout.kind_of(r) == "data"]
    changed = sum(manifest[r].size for r in gone) + sum(tx.add[r].size for r in new)
    live = sum(manifest[r].size for r in _committed_data(manifest) if r not in set(gone)) + sum(tx.add[r].size for r in new)
    if changed > live / 2:
        return None
    values = np.sort(np.concatenate(cur[:2], axis=1), axis=1, kind="stable")
    if gone:
        values = _without(values, np.sort(_file_values(features, [s.root / r for r in gone]), axis=1))
        if values is None:
            return None
    if new:
        added = _file_values(features, [tx.dir / r for r in new])
        values = np.sort(np.concatenate([values, added], axis=1), axis=1, kind="stable")
    return values


def _file_values(features: dict, paths: list[Path]) -> np.ndarray:
    """(D, n) values of every row of these data files (numeric columns only)."""
    keys = [k for k, _ in numeric_columns(features)]
    return np.concatenate([table_values(features, pq.ParquetFile(p).read(columns=keys)) for p in paths], axis=1)


def _without(values: np.ndarray, gone: np.ndarray) -> np.ndarray | None:
    """Each row of sorted `values` minus the multiset in the same row of sorted `gone` (None: not a subset)."""
    n, m = values.shape[1], gone.shape[1]
    out = np.empty((values.shape[0], n - m))
    ranks = np.arange(m)
    for d in range(values.shape[0]):
        a, r = values[d], gone[d]
        at = np.searchsorted(a, r, "left") + ranks - np.searchsorted(r, r, "left")  # k-th copy of a value
        if m and (at[-1] >= n or not np.array_equal(a[at], r)):
            return None
        out[d] = np.delete(a, at)
    return out


def appended_stats(tx: Commit, features: dict, aggregated: dict[str, st.Stats], new: list[np.ndarray],
                   frames_before: int) -> dict[str, st.Stats]:
    """The stats.json after an append: `aggregated` (previous stats + the new episodes' stats) with exact
    quantiles over the committed values plus `new` ((D, n) arrays from `table_values`): O(new + delta) work.
    A store without current values (made before them, or changed without them) is read once from its data."""
    s = tx.store
    width = sum(w for _, w in numeric_columns(features))
    added = np.concatenate(new, axis=1) if new else np.empty((width, 0))
    cur = _current(s, features, frames_before) if frames_before else (added[:, :0], added[:, :0], data_digest([]))
    rebuilt = cur is None
    if rebuilt:
        from conveyor.episodes import load_episodes  # noqa: PLC0415 - only for a store without current values

        old = episode_values(features, load_episodes(s.root), lambda rel: s.root / rel)
        cur = (np.sort(old, axis=1), old[:, :0], data_digest(_committed_data(s.manifest())))
    base, delta, digest = cur
    delta = np.sort(np.concatenate([delta, added], axis=1), axis=1, kind="stable")
    fold = rebuilt or delta.shape[1] > FOLD_FRACTION * base.shape[1]
    if fold:
        base, delta = np.sort(np.concatenate([base, delta], axis=1), axis=1, kind="stable"), delta[:, :0]
    _write(tx, features, base, delta, base_changed=fold, digest=digest)
    return with_quantiles(features, aggregated, exact_quantiles(base, delta))


def recomputed_stats(store: Store, features: dict, aggregated: dict[str, st.Stats], rows: list[dict], *,
                     every_row: bool) -> dict[str, st.Stats]:
    """What stats.json must hold for the committed version whose episodes are `rows`, for validation: the
    per-episode aggregate with exact quantiles, over every row of the data files when `every_row` (or when the
    committed values are missing or stale), else over the committed sorted values (hash-checked with the
    metadata), so a check of one new episode does not read every data file."""
    cur = None if every_row else _current(store, features, sum(r["length"] for r in rows))
    if cur is None:
        values = episode_values(features, rows, lambda rel: store.root / rel)
        values.sort(axis=1)
        cur = (values, values[:, :0])
    return with_quantiles(features, aggregated, exact_quantiles(*cur[:2]))


def aggregate_rows(features: dict, rows: list[dict]) -> dict[str, st.Stats]:
    """The per-episode stats columns of meta/episodes rows, aggregated (lerobot's rules) per feature."""
    return {k: st.aggregate_stacked({s: np.stack([np.asarray(r[f"stats/{k}/{s}"]) for r in rows])
                                     for s in st.STAT_KEYS}) for k in features if rows}
