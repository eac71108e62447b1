"""Read the row groups of a parquet file whose writer never closed it (no footer).

A killed `pq.ParquetWriter` leaves `PAR1`, then each finished row group's column chunks, each a run of pages
(a Thrift page header, then the page), and nothing after: the footer that says where the row groups are and
what the schema is was to be written at `close()`. The schema comes from the caller (lerobot's data schema is
a function of `info.json`'s features); the row groups are found by walking the page headers with fastparquet's
Thrift structures. The rebuilt footer is appended to a copy of the bytes in memory (the file is only read),
and pyarrow then reads the row groups as from any parquet file.

A column chunk ends where its values add up: the first column's chunk runs until the next dictionary page
(the writer dictionary-encodes, so every chunk of a non-boolean column opens with one), which gives the row
group's row count; every later column then holds exactly rows x its values per row. A row group cut short
(the writer died inside `write_table`) or anything that does not add up ends the walk: the row groups before
it are returned, the bytes after it are reported as the torn tail.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MAGIC = b"PAR1"
_DICTIONARY_PAGE, _DATA_PAGE, _DATA_PAGE_V2 = 2, 0, 3
_PAD = 1 << 16


@dataclass
class Rescued:
    """What a footer-less file gave back: a readable parquet file (bytes) and how much of the input it used."""

    parquet: bytes
    row_groups: int
    used_bytes: int  # up to the end of the last whole row group
    total_bytes: int

    def open(self) -> pq.ParquetFile:
        return pq.ParquetFile(pa.BufferReader(self.parquet))


def has_footer(path: Path) -> bool:
    """A closed parquet file ends with its footer's length and the magic again."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 12:
            return False
        f.seek(size - 4)
        return f.read(4) == MAGIC


def _template(schema: pa.Schema):
    """The footer pyarrow writes for `schema` (lerobot's writer options), parsed: its schema elements and
    key-value metadata are the ones the lost footer had."""
    from fastparquet.cencoding import ThriftObject

    sink = io.BytesIO()
    pq.ParquetWriter(sink, schema, compression="snappy", use_dictionary=True).close()
    raw = sink.getvalue()
    n = struct.unpack("<I", raw[-8:-4])[0]
    return ThriftObject.from_buffer(np.frombuffer(raw[-8 - n:-8], dtype=np.uint8), "FileMetaData")


def _leaves(schema_elements, fixed: dict[tuple[str, ...], int]) -> list[tuple[list[str], int, int]]:
    """(path_in_schema, physical type, values per row) of every leaf column, in file order. Values per row
    multiplies the fixed sizes of the lists above the leaf (arrow's fixed_size_list: every row has them)."""
    out: list[tuple[list[str], int, int]] = []
    pos = 1  # element 0 is the root

    def walk(prefix: list[str], mult: int) -> None:
        nonlocal pos
        el = schema_elements[pos]
        pos += 1
        name = el.name.decode() if isinstance(el.name, bytes) else el.name
        path = prefix + [name]
        if not el.num_children:
            out.append((path, el.type, mult))
            return
        for _ in range(el.num_children):
            walk(path, mult * fixed.get(tuple(path), 1))

    for _ in range(schema_elements[0].num_children or 0):
        walk([], 1)
    return out


def _fixed_sizes(schema: pa.Schema) -> dict[tuple[str, ...], int]:
    """Parquet path of each fixed-size list's repeated group -> its list size."""
    sizes: dict[tuple[str, ...], int] = {}

    def visit(path: tuple[str, ...], t: pa.DataType) -> None:
        if pa.types.is_fixed_size_list(t):
            sizes[path + ("list",)] = t.list_size
            visit(path + ("list", "element"), t.value_type)
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            visit(path + ("list", "element"), t.value_type)
        elif pa.types.is_struct(t):
            for f in t:
                visit(path + (f.name,), f.type)

    for f in schema:
        visit((f.name,), f.type)
    return sizes


def rescue(path: Path, schema: pa.Schema) -> Rescued:
    """Rebuild the footer of a footer-less parquet file written with `schema` (see the module docstring)."""
    from fastparquet.cencoding import NumpyIO, ThriftObject

    raw = np.fromfile(path, dtype=np.uint8)
    total = len(raw)
    # zeros after the end: a header torn at the end of the file then parses into a short struct (0 = stop)
    # instead of the Thrift reader (no bounds checks) running on past the buffer
    buf = np.concatenate([raw, np.zeros(_PAD, dtype=np.uint8)])
    if total < 4 or bytes(buf[:4]) != MAGIC:
        raise ValueError("does not start with the parquet magic PAR1")
    meta = _template(schema)
    leaves = _leaves(meta.schema, _fixed_sizes(schema))
    rio = NumpyIO(buf)

    def page_at(pos: int):
        """(header, header end, page end) of the page at `pos`, or None if it does not fit in the file."""
        if pos >= total:
            return None
        rio.seek(pos)
        try:
            ph = ThriftObject.from_buffer(rio, "PageHeader")
        except Exception:
            return None
        end = rio.tell() + (ph.compressed_page_size or 0)
        if ph.type is None or ph.compressed_page_size is None or ph.compressed_page_size < 0 \
                or rio.tell() > total or end > total:
            return None
        return ph, rio.tell(), end

    def values(ph) -> int:
        if ph.type == _DATA_PAGE:
            return ph.data_page_header.num_values
        if ph.type == _DATA_PAGE_V2:
            return ph.data_page_header_v2.num_values
        return 0

    row_groups, pos, used = [], 4, 4
    while pos < total:
        start, chunks, rows, ok = pos, [], None, True
        for c, (col_path, ptype, mult) in enumerate(leaves):
            chunk_start, nvals, comp, uncomp = pos, 0, 0, 0
            dict_off, data_off, encodings = None, None, set()
            while True:
                got = page_at(pos)
                if got is None:
                    if c == 0 and rows is None and nvals and pos == total:
                        break  # the first column's chunk ends at the end of the file only if nothing follows it
                    ok = False
                    break
                ph, body, end = got
                if ph.type == _DICTIONARY_PAGE:
                    if nvals or dict_off is not None:  # the next column's chunk begins
                        break
                    dict_off = pos
                    encodings.add(ph.dictionary_page_header.encoding)
                elif ph.type in (_DATA_PAGE, _DATA_PAGE_V2):
                    if data_off is None:
                        data_off = pos
                    dh = ph.data_page_header or ph.data_page_header_v2
                    encodings.add(dh.encoding)
                    for attr in ("definition_level_encoding", "repetition_level_encoding"):
                        if getattr(dh, attr, None) is not None:
                            encodings.add(getattr(dh, attr))
                    nvals += values(ph)
                else:
                    ok = False
                    break
                comp += end - pos
                uncomp += body - pos + ph.uncompressed_page_size
                pos = end
                if rows is not None and nvals >= rows * mult:
                    break
            if not ok or data_off is None:
                ok = False
                break
            if rows is None:
                rows, rem = divmod(nvals, mult)
                ok = rem == 0
            if not ok or nvals != rows * mult:
                ok = False
                break
            cmd = ThriftObject.from_fields(
                "ColumnMetaData", type=ptype, encodings=sorted(encodings), path_in_schema=col_path, codec=1,
                num_values=nvals, total_uncompressed_size=uncomp, total_compressed_size=comp,
                data_page_offset=data_off, dictionary_page_offset=dict_off, i32list=[1, 4])
            chunks.append(ThriftObject.from_fields("ColumnChunk", file_offset=chunk_start, meta_data=cmd))
        if not ok:
            pos = start
            break
        size = pos - start
        row_groups.append(ThriftObject.from_fields(
            "RowGroup", columns=chunks, total_byte_size=size, num_rows=rows, file_offset=start,
            total_compressed_size=size))
        used = pos
    meta.row_groups = row_groups
    meta.num_rows = sum(rg.num_rows for rg in row_groups)
    footer = bytes(meta.to_bytes())
    body = raw[:used].tobytes()
    return Rescued(body + footer + struct.pack("<I", len(footer)) + MAGIC, len(row_groups), used, total)
