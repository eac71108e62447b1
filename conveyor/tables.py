"""Arrow schemas and small metadata tables exactly as lerobot 0.4.4 writes and reads them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conveyor.stats import QUANTILES, STAT_KEYS, Stats, aggregate_stacked, numeric_stats_many

_ARROW = {"float32": pa.float32(), "float64": pa.float64(), "int64": pa.int64(), "int32": pa.int32(),
          "int16": pa.int16(), "int8": pa.int8(), "uint8": pa.uint8(), "bool": pa.bool_(), "string": pa.string()}
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def data_schema(features: dict) -> pa.Schema:
    """The data parquet schema lerobot itself writes (`get_hf_features_from_features`), with HF metadata."""
    fields, hf = [], {}
    for key, ft in features.items():
        dtype, shape = ft["dtype"], tuple(ft["shape"])
        if dtype == "video":
            continue
        if dtype == "image":
            fields.append(pa.field(key, IMAGE_TYPE))
            hf[key] = {"_type": "Image"}
        elif shape == (1,):
            fields.append(pa.field(key, _ARROW[dtype]))
            hf[key] = {"dtype": dtype, "_type": "Value"}
        elif len(shape) == 1:
            fields.append(pa.field(key, pa.list_(_ARROW[dtype], shape[0])))
            hf[key] = {"feature": {"dtype": dtype, "_type": "Value"}, "length": shape[0], "_type": "List"}
        else:
            raise ValueError(f"feature {key}: shape {shape} is not supported by conveyor yet")
    meta = {b"huggingface": json.dumps({"info": {"features": hf}}).encode()}
    return pa.schema(fields, metadata=meta)


def int64_array(values: np.ndarray) -> pa.Array:
    """An int64 Arrow array over a numpy array's buffer. `pa.array(ndarray)` would be the same array, but it
    asks whether the input is a numpy masked array, which imports numpy.ma (~10 ms of a 0.3 s append)."""
    values = np.ascontiguousarray(values, dtype=np.int64)
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])


def numeric_stats(table: pa.Table, features: dict) -> dict[str, Stats]:
    """One episode's rows: the stats of every feature that is neither a video nor an image."""
    return numeric_stats_many({key: column_array(table, key) for key, ft in features.items()
                               if ft["dtype"] not in ("video", "image")})


def column_array(table: pa.Table, key: str) -> np.ndarray:
    """(n,) or (n, d) numpy view of a scalar or vector column."""
    col = table.column(key).combine_chunks()
    if pa.types.is_fixed_size_list(col.type) and not col.null_count:
        # the child values sliced by hand: FixedSizeListArray.flatten() imports pyarrow.compute (~50 ms)
        size = col.type.list_size
        flat = col.values.slice(col.offset * size, len(col) * size).to_numpy(zero_copy_only=False)
        return flat.reshape(len(col), -1)
    if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type):
        flat = col.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(col), -1)
    return col.to_numpy(zero_copy_only=False)


# -- meta/tasks.parquet ---------------------------------------------------------------------------------

_PANDAS_META = {
    "index_columns": ["__index_level_0__"],
    "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "str",
                        "metadata": {"encoding": "UTF-8"}}],
    "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                 "numpy_type": "int64", "metadata": None},
                {"name": None, "field_name": "__index_level_0__", "pandas_type": "object",
                 "numpy_type": "str", "metadata": None}],
    "attributes": {}, "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "3.1.1",
}


def tasks_table(tasks: list[str]) -> pa.Table:
    """A pandas-indexed table (index = task string, row position = task_index) without importing pandas."""
    schema = pa.schema([("task_index", pa.int64()), ("__index_level_0__", pa.large_string())],
                       metadata={b"pandas": json.dumps(_PANDAS_META).encode()})
    return pa.table({"task_index": list(range(len(tasks))), "__index_level_0__": tasks}, schema=schema)


def read_tasks(path: Path) -> list[str]:
    if not path.exists():
        return []
    t = pq.ParquetFile(path).read()
    order = t.column("task_index").to_pylist()
    names = t.column("__index_level_0__").to_pylist()
    return [n for _, n in sorted(zip(order, names))]


# -- meta/episodes -------------------------------------------------------------------------------------

def _stat_type(feature: dict, stat: str) -> pa.DataType:
    dt = feature["dtype"]
    if dt in ("image", "video"):
        return pa.list_(pa.int64()) if stat == "count" else pa.list_(pa.list_(pa.list_(pa.float64())))
    if stat == "count" or (stat in ("min", "max") and dt.startswith("int")):
        return pa.list_(pa.int64())
    if stat in ("min", "max") and dt == "bool":
        return pa.list_(pa.bool_())
    return pa.list_(pa.float64())


def episodes_schema(features: dict) -> pa.Schema:
    """One schema for every meta/episodes file (lerobot's load_episodes fails on mixed schemas)."""
    video_keys = [k for k, f in features.items() if f["dtype"] == "video"]
    fields = [("episode_index", pa.int64()), ("tasks", pa.list_(pa.string())), ("length", pa.int64()),
              ("data/chunk_index", pa.int64()), ("data/file_index", pa.int64()),
              ("dataset_from_index", pa.int64()), ("dataset_to_index", pa.int64())]
    for k in video_keys:
        fields += [(f"videos/{k}/chunk_index", pa.int64()), (f"videos/{k}/file_index", pa.int64()),
                   (f"videos/{k}/from_timestamp", pa.float64()), (f"videos/{k}/to_timestamp", pa.float64())]
    for k, f in features.items():
        fields += [(f"stats/{k}/{s}", _stat_type(f, s)) for s in STAT_KEYS]
    fields += [("meta/episodes/chunk_index", pa.int64()), ("meta/episodes/file_index", pa.int64())]
    return pa.schema(fields)


def stats_columns(features: dict, stats: dict[str, dict[str, np.ndarray]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k in features:
        for s in STAT_KEYS:
            out[f"stats/{k}/{s}"] = np.asarray(stats[k][s]).tolist()
    return out


def stats_from_row(features: dict, row: dict) -> dict[str, dict[str, np.ndarray]]:
    return {k: {s: np.asarray(row[f"stats/{k}/{s}"]) for s in STAT_KEYS} for k in features}


assert set(QUANTILES) <= set(STAT_KEYS)


# -- the store's episodes table (validate, curate) ----------------------------------------------------

def read_table(path) -> pa.Table:
    """`pq.ParquetFile(...).read()`: same table as `pq.read_table` without importing pandas (0.4 s)."""
    return pq.ParquetFile(path).read()


def episodes_table(root: Path) -> pa.Table:
    """Every meta/episodes row, sorted by episode_index, as one arrow table."""
    tables = [read_table(f) for f in sorted((root / "meta" / "episodes").glob("*/*.parquet"))]
    if not tables:
        return pa.table({"episode_index": pa.array([], pa.int64())})
    return pa.concat_tables(tables).sort_by("episode_index")


def _stacked(col: pa.ChunkedArray) -> np.ndarray:
    """(n, *shape) numpy array of a list column whose rows all have one shape (the stats columns)."""
    arr = col.combine_chunks()
    n = len(arr)
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        arr = arr.flatten()
    flat = arr.to_numpy(zero_copy_only=False)
    shape = np.asarray(col[0].as_py()).shape if n else ()
    return flat.reshape((n, *shape))


def stacked_stats(features: dict, table: pa.Table) -> dict[str, Stats]:
    """The whole store's stats aggregated from the metadata columns (vectorised `st.aggregate`)."""
    return {k: aggregate_stacked({s: _stacked(table.column(f"stats/{k}/{s}")) for s in STAT_KEYS})
            for k in sorted(features)}
