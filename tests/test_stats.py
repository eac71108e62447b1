"""meta/stats.json of numeric features is exact over every row (issue 18 item 4): checked against numpy over
every data row of real stores, after one-shot converts, one-episode appends, compaction and a store whose
sorted values went stale; a wrong quantile fails the fast validation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conveyor import layout, quantiles, stats as st
from conveyor.compact import compact
from conveyor.ingest import convert, ingest
from conveyor.store import Store
from conveyor.synthetic.recording import CameraSpec, RecordingSpec, write_recording
from conveyor.validate import validate_fast

SPEC = RecordingSpec(cameras=(CameraSpec("observation.images.top"),))
LENGTHS = [24, 30, 40, 28, 36]  # the issue's store: short episodes, each covering its own part of the range
NUMERIC = ("action", "observation.state", "timestamp", "frame_index", "episode_index", "index", "task_index")


def _set_column(path: Path, key: str, values: np.ndarray) -> None:
    t = pq.read_table(path)
    i = t.schema.get_field_index(key)
    arr = pa.FixedSizeListArray.from_arrays(pa.array(values.astype(np.float32).ravel()), values.shape[1])
    pq.write_table(t.set_column(i, t.schema.field(i), arr), path)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Episode e's state sweeps [e/5, (e+1)/5] (joint j shifted by j): every episode its own slice of the range."""
    src = write_recording(tmp_path_factory.mktemp("stats") / "src", episodes=len(LENGTHS), lengths=LENGTHS, spec=SPEC)
    for e, n in enumerate(LENGTHS):
        sweep = np.linspace(e / 5, (e + 1) / 5, n)[:, None] + np.arange(6)[None, :]
        _set_column(src / f"data/chunk-000/episode_{e:06d}.parquet", "observation.state", sweep)
    return src


def every_row(store: Path) -> dict[str, np.ndarray]:
    """Each numeric feature over every data row of the store, as (rows, width) float64."""
    t = pa.concat_tables([pq.ParquetFile(p).read() for p in sorted((store / "data").rglob("*.parquet"))])
    out = {}
    for k in NUMERIC:
        col = t.column(k).to_pylist()
        out[k] = np.asarray(col, dtype=np.float64).reshape(len(col), -1)
    return out


def assert_exact(store: Path) -> None:
    """min/max/mean/std and q01..q99 of stats.json equal numpy over every row, for every numeric feature."""
    stats = json.loads((store / layout.STATS).read_text())
    for k, v in every_row(store).items():
        s = stats[k]
        assert s["count"] == [len(v)]
        for name, want in (("min", v.min(0)), ("max", v.max(0)), ("mean", v.mean(0)), ("std", v.std(0))):
            np.testing.assert_allclose(s[name], want, rtol=1e-9, atol=1e-9, err_msg=f"{k}/{name}")
        for q, p in st.QUANTILES.items():  # exact order statistics, interpolated as numpy does
            np.testing.assert_array_equal(s[q], np.quantile(v, p, axis=0), err_msg=f"{k}/{q}")


def test_the_issue_store_has_exact_quantiles(source, tmp_path):
    store = tmp_path / "store"
    convert(source, store)
    assert_exact(store)
    state = every_row(store)["observation.state"][:, 0]
    stats = json.loads((store / layout.STATS).read_text())["observation.state"]
    assert stats["q99"][0] == np.quantile(state, 0.99) > 0.98 and stats["q90"][0] == np.quantile(state, 0.90) > 0.9
    # what the count-weighted mean of per-episode quantiles said (the bug): far below the top of the range
    per_episode = [st.numeric_stats_many({"s": state[a:a + n]})["s"]
                   for a, n in zip(np.cumsum([0] + LENGTHS[:-1]), LENGTHS)]
    assert st.aggregate([{"s": p} for p in per_episode])["s"]["q99"][0] < 0.8
    assert validate_fast(store, against=source).ok


def test_one_episode_appends_then_compaction(source, tmp_path, monkeypatch):
    """Each append merges its rows into the sorted values (a delta, folded into the base once large enough);
    every version's stats.json is exact, and equals a one-shot convert's after compaction."""
    monkeypatch.setattr(quantiles, "FOLD_FRACTION", 1.0)  # 5 short episodes: let the delta live across appends
    store = tmp_path / "store"
    seen_delta = False
    for n in range(1, len(LENGTHS) + 1):
        ingest(source, store, max_episodes=1)
        assert_exact(store)
        index = json.loads((store / quantiles.INDEX).read_text())
        assert index["base"] + index["delta"] == sum(LENGTHS[:n])
        seen_delta |= index["delta"] > 0
        assert validate_fast(store, episodes=[n - 1]).ok
    assert seen_delta  # the O(new) path ran, not only folds
    compact(store)
    assert_exact(store)
    assert json.loads((store / quantiles.INDEX).read_text())["delta"] == 0
    one_shot = tmp_path / "one_shot"
    convert(source, one_shot)
    grown, once = (json.loads((d / layout.STATS).read_text()) for d in (store, one_shot))
    assert not st.equal(st.from_json(grown), st.from_json(once), rtol=1e-12, atol=1e-12)  # moments: summation order
    assert all(grown[k][q] == once[k][q] for k in NUMERIC for q in st.QUANTILES)  # quantiles: the same numbers
    assert validate_fast(store, against=source).ok


def test_exact_quantiles_equal_numpy_on_random_data():
    """The selection in two sorted arrays is exact (no rank error at all): bit-equal to np.quantile over the
    union, with ties, integers, one side empty, and sizes where the delta outgrows the base."""
    rng = np.random.default_rng(18)
    for trial in range(400):
        d, na, nb = int(rng.integers(1, 4)), int(rng.integers(0, 300)), int(rng.integers(0, 300))
        if na + nb == 0:
            continue
        if trial % 2:
            a, b = rng.integers(-3, 4, (d, na)).astype(np.float64), rng.integers(-3, 4, (d, nb)).astype(np.float64)
        else:
            a, b = rng.normal(size=(d, na)), rng.normal(1.0, 3.0, size=(d, nb)).astype(np.float32).astype(np.float64)
        got = quantiles.exact_quantiles(np.sort(a, axis=1), np.sort(b, axis=1))
        want = np.quantile(np.concatenate([a, b], axis=1), list(st.QUANTILES.values()), axis=1)
        for i, q in enumerate(st.QUANTILES):
            np.testing.assert_array_equal(got[q], want[i], err_msg=f"trial {trial} {q}")


def _commit_stats(store: Path, stats: dict) -> None:
    """Write stats.json through the commit door, so only the stats check can notice."""
    s = Store.open(store)
    with s.lock(), s.transaction("test") as tx:
        tx.write(layout.STATS, json.dumps(stats, indent=4).encode())
        tx.set_totals(s.info["total_episodes"], s.info["total_frames"])


def test_a_wrong_quantile_fails_validation(source, tmp_path):
    store = tmp_path / "store"
    convert(source, store)
    stats = json.loads((store / layout.STATS).read_text())
    stats["observation.state"]["q99"][0] -= 0.01
    _commit_stats(store, stats)
    s = Store.open(store)  # a commit that wrote no values: they are still current (same data files)
    assert quantiles.is_current(s, s.info["features"])
    for episodes in ([4], None):  # a check of one episode (committed values) and a full one (every data row)
        report = validate_fast(store, episodes=episodes)
        failed = {c.name: c.detail for c in report.checks if not c.ok}
        assert list(failed) == ["stats.json equals a recomputation (exact quantiles)"], failed
        assert "observation.state/q99" in failed["stats.json equals a recomputation (exact quantiles)"]


def test_store_without_current_values_is_rebuilt_from_its_data(source, tmp_path):
    """A commit that changed data without the values (a store made before them) leaves a stale digest: the
    check reads the data files, the next append and compaction rebuild the values, stats stay exact."""
    store = tmp_path / "store"
    ingest(source, store, max_episodes=3)
    s = Store.open(store)
    with s.lock(), s.transaction("test") as tx:
        tx.delete([rel for rel in s.manifest() if rel.startswith(quantiles.VALUES_DIR)])
        tx.set_totals(s.info["total_episodes"], s.info["total_frames"])
    assert not (store / quantiles.INDEX).exists() and not quantiles.is_current(s, s.info["features"])
    assert validate_fast(store, episodes=[2]).ok  # recomputed from the data files
    stats = json.loads((store / layout.STATS).read_text())
    stats["action"]["q50"][3] += 1.0
    _commit_stats(store, stats)
    assert not validate_fast(store, episodes=[2]).ok
    ingest(source, store, max_episodes=1)  # rebuilds from the 3 committed episodes, adds the 4th
    assert quantiles.is_current(s, s.info["features"])
    assert_exact(store)
    ingest(source, store)
    assert_exact(store)
    assert validate_fast(store, against=source).ok


def test_curations_keep_stats_exact(source, tmp_path, monkeypatch):
    """Drop, trim and retask replace data files; stats.json stays exact over every row. Dropping the last
    episode reads only the data file it replaces (the committed values minus its rows), not every file."""
    from conveyor.curate import drop, retask, trim

    store = tmp_path / "store"
    for _ in LENGTHS:
        ingest(source, store, max_episodes=1)  # one data file per episode
    with monkeypatch.context() as m:
        m.setattr(quantiles, "episode_values", lambda *a: pytest.fail("read every live row"))
        drop(store, [4], reason="operator bumped the arm")
    assert_exact(store)
    trim(store, 1, 3, 20)
    assert_exact(store)
    retask(store, [0, 2], "stack the cups")
    assert_exact(store)
    assert validate_fast(store).ok
    s = Store.open(store)
    _commit_stats(store, json.loads((store / layout.STATS).read_text()))  # HEAD no longer wrote the values:
    assert quantiles.is_current(s, s.info["features"])  # their digest of the data files still matches
