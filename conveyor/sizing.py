"""How big a store file is, when it is full, and which items share a file: one rule for ingest, compaction and
the episode metadata.

A file's size is its payload: the row-group bytes of a parquet file, the `mdat` bytes of an mp4. Rows and
packets are copied, never re-encoded, so the bytes an episode adds are the same whether it is written alone or
merged later: appending episodes one at a time and compacting then gives the same files as a one-shot convert.
A file is full once its payload reaches the target; the next item starts a new file (so a file passes its
target by less than one item, and one item larger than the target gets a file of its own).
"""
from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # stdlib only at import time: settings reads the defaults
    import pyarrow as pa

MB = 1024 * 1024
DATA_MB = 100  # lerobot's DEFAULT_DATA_FILE_SIZE_IN_MB (also the episode-metadata target, as in lerobot)
VIDEO_MB = 200  # lerobot's DEFAULT_VIDEO_FILE_SIZE_IN_MB
HELD_PACKETS_MB = 64  # demuxed video packets an ingest may hold between loading and copying an episode
PARQUET_MAGIC = 4  # b"PAR1" opens a parquet file; the footer, its length and the magic again close it

T = TypeVar("T")


def limit_bytes(mb: float) -> int:
    return int(mb * MB)


def is_full(size: int, limit: int) -> bool:
    return size >= limit


def group(items: Iterable[T], size_of: Callable[[T], int], limit: int) -> list[list[T]]:
    """Consecutive items packed into files: a file takes items until it is full."""
    groups: list[list[T]] = []
    cur: list[T] = []
    size = 0
    for item in items:
        cur.append(item)
        size += size_of(item)
        if is_full(size, limit):
            groups.append(cur)
            cur, size = [], 0
    if cur:
        groups.append(cur)
    return groups


def parquet_bytes(path: Path) -> int:
    """Row-group bytes of a closed parquet file (file size minus magic, footer and footer length)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(size - 8)
        footer = struct.unpack("<I", f.read(4))[0]
    return size - PARQUET_MAGIC - footer - 8


def open_parquet_bytes(path: Path) -> int:
    """Row-group bytes written so far by a `pq.ParquetWriter` that is still open (no footer yet)."""
    return os.path.getsize(path) - PARQUET_MAGIC


def mp4_bytes(path: Path) -> int:
    """Packet bytes of an mp4 (its `mdat` payload), read from the top-level box headers only."""
    total = 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        pos = 0
        while pos + 8 <= size:
            f.seek(pos)
            n, kind = struct.unpack(">I4s", f.read(8))
            header = 8
            if n == 1:  # 64-bit box size follows
                n, header = struct.unpack(">Q", f.read(8))[0], 16
            elif n == 0:  # box runs to the end of the file
                n = size - pos
            if n < header:
                return size  # not a box structure we understand: count the whole file
            if kind == b"mdat":
                total += n - header
            pos += n
    return total


def file_bytes(path: Path) -> int:
    """The payload of a committed data, video or episode-metadata file."""
    return mp4_bytes(path) if path.suffix == ".mp4" else parquet_bytes(path)


def row_bytes(table: pa.Table) -> list[int]:
    """Arrow bytes of each row's values (list and string offsets included, validity bitmaps not): what a
    metadata row weighs, the same wherever the row sits, so one batch and a whole store measure it alike."""
    import numpy as np

    total = np.zeros(table.num_rows, dtype=np.int64)
    for column in table.columns:
        total += _value_bytes(column.combine_chunks())
    return total.tolist()


def _value_bytes(arr: pa.Array):
    """Per element: its values' bytes, plus one offset for variable-length types (lists of lists recurse)."""
    import numpy as np
    import pyarrow as pa

    t, types = arr.type, pa.types
    if types.is_list(t) or types.is_large_list(t):
        offsets = arr.offsets.to_numpy().astype(np.int64)
        cum = np.concatenate([[0], np.cumsum(_value_bytes(arr.values))])
        return cum[offsets[1:]] - cum[offsets[:-1]] + (8 if types.is_large_list(t) else 4)
    if types.is_string(t) or types.is_large_string(t) or types.is_binary(t) or types.is_large_binary(t):
        large = types.is_large_string(t) or types.is_large_binary(t)
        # from the offsets (pyarrow.compute's binary_length would cost a 30 ms import on the append path)
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64 if large else np.int32)
        lengths = np.diff(offsets[arr.offset:arr.offset + len(arr) + 1].astype(np.int64))
        if arr.null_count:
            bits = np.unpackbits(np.frombuffer(arr.buffers()[0], dtype=np.uint8), bitorder="little")
            lengths[bits[arr.offset:arr.offset + len(arr)] == 0] = 0
        return lengths + (8 if large else 4)
    return np.full(len(arr), max(1, t.bit_width // 8), dtype=np.int64)  # fixed width; booleans count a byte
