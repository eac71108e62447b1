"""File helpers every layer shares: one sha256 of a file, one atomic write.

Kept apart from the dataset store and the object-storage code so both (and backup, publishing and the
cache) hash and write files the same way without importing each other.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomic(path: Path, data: bytes, *, fsync: bool = True, mtime_ns: int | None = None) -> None:
    """Write `data` to a hidden temp file beside `path`, then rename it over `path`: readers see the old
    bytes or the new ones, never a torn file. `fsync` makes it durable (commit records, HEAD);
    `mtime_ns` sets the file's times (a restored file keeps its original mtime)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if mtime_ns is not None:
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
