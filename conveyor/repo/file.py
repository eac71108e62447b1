"""``file:///path``: a local folder laid out exactly like a bucket (key ``a/b`` is file ``/path/a/b``).

Writes go to ``/path/.tmp/`` first and are renamed into place, so a key is either whole or absent.
"""
from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from conveyor.errors import ConveyorError
from conveyor.fileio import sha256_bytes
from conveyor.repo.base import CHUNK, TMP_STALE_S, ObjectInfo, Repo, check_key, writer_gone
from conveyor.repo.errors import CorruptObject, MissingObject


_HOST = socket.gethostname()


class FileRepo(Repo):
    """A folder laid out like a bucket. Temp files live in `<root>/.tmp/` and are never listed."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.url = "file://" + str(self.root)
        self.tmp = self.root / ".tmp"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write(self, key: str, write: Callable[[Any], str], sha256: str | None) -> ObjectInfo:
        dst = self._path(key)
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            tmp = self.tmp / f"{uuid.uuid4().hex}.{os.getpid()}.{_HOST}"  # whose it is: prune removes a dead one's
            try:
                with open(tmp, "wb") as f:
                    digest = write(f)
                if sha256 and digest != sha256:
                    raise CorruptObject(f"{self.url}/{key}", f"content hashes to {digest}, expected {sha256}")
                dst.parent.mkdir(parents=True, exist_ok=True)
                size = tmp.stat().st_size
                os.replace(tmp, dst)
            finally:
                tmp.unlink(missing_ok=True)
        except ConveyorError:
            raise
        except OSError as e:
            raise ConveyorError(f"{self.url}/{key}", f"cannot write: {e.strerror or e}") from None
        return ObjectInfo(key, size, digest)

    def put_file(self, local, key, sha256=None):
        def copy(out):
            h = hashlib.sha256()
            with open(local, "rb") as f:
                while buf := f.read(CHUNK):
                    h.update(buf)
                    out.write(buf)
            return h.hexdigest()
        return self._write(key, copy, sha256)

    def put_bytes(self, key, data, sha256=None):
        def write(out):
            out.write(data)
            return sha256_bytes(data)
        return self._write(key, write, sha256)

    def get_bytes(self, key, expected_sha256=None):
        data = b"".join(self.read_chunks(key))
        if expected_sha256 and sha256_bytes(data) != expected_sha256:
            raise CorruptObject(f"{self.url}/{key}", f"content hashes to {sha256_bytes(data)}, expected {expected_sha256}")
        return data

    def read_chunks(self, key):
        try:
            f = open(self._path(key), "rb")
        except FileNotFoundError:
            raise MissingObject(f"{self.url}/{key}", "no such object") from None
        except OSError as e:
            raise ConveyorError(f"{self.url}/{key}", f"cannot read: {e.strerror or e}") from None
        with f:
            while buf := f.read(CHUNK):
                yield buf

    def head(self, key):
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(key, st.st_size, None, datetime.fromtimestamp(st.st_mtime, timezone.utc))

    def list(self, prefix=""):
        base = self.root / prefix if prefix else self.root
        start = base if base.is_dir() else base.parent
        if not start.is_dir():
            return
        stack = [start]
        while stack:
            d = stack.pop()
            try:
                entries = list(os.scandir(d))
            except FileNotFoundError:
                continue
            for e in entries:
                rel = os.path.relpath(e.path, self.root).replace(os.sep, "/")
                if rel == ".tmp" or rel.startswith(".tmp/"):
                    continue
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif rel.startswith(prefix):
                    st = e.stat()
                    yield ObjectInfo(rel, st.st_size, None, datetime.fromtimestamp(st.st_mtime, timezone.utc))

    def delete(self, keys):
        n = 0
        for key in keys:
            n += 1
            p = self._path(key)
            p.unlink(missing_ok=True)
            parent = p.parent
            while parent != self.root:  # keep the tree tidy like a bucket (no empty "folders")
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent
        return n

    def cleanup_incomplete(self, older_than_s=TMP_STALE_S, now=None):
        n, cutoff = 0, (now.timestamp() if now else time.time()) - older_than_s
        if self.tmp.is_dir():
            for p in self.tmp.iterdir():
                _, pid, host = (p.name.split(".", 2) + ["", ""])[:3]
                try:
                    if writer_gone(host, pid) or p.stat().st_mtime < cutoff:
                        p.unlink()
                        n += 1
                except FileNotFoundError:  # its writer renamed it into place meanwhile
                    pass
        return n
