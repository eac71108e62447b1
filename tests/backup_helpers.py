"""Helpers for the storage/backup tests: repositories on both backends, tree hashes, a TCP proxy."""
from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import boto3

from conveyor.settings import S3Settings, TransferSettings
from conveyor.repo import open_repo

SECRET = "conveyor-test-secret-do-not-log"


def new_bucket(endpoint: str) -> str:
    name = "t-" + uuid.uuid4().hex[:12]
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def make_repo(backend: str, tmp: Path, endpoint: str | None, transfer: TransferSettings | None = None):
    """(url, S3Settings, Repo) for a fresh, empty repository on `backend` ('file' or 's3')."""
    if backend == "file":
        url = f"file://{tmp / 'repo'}"
        s3 = S3Settings()
    else:
        url = f"s3://{new_bucket(endpoint)}/backups"
        s3 = S3Settings(endpoint_url=endpoint)
    return url, s3, open_repo(url, s3, transfer)


def raw_object(backend: str, url: str, endpoint: str | None, key: str, data: bytes | None = None) -> bytes:
    """Read (or overwrite, when `data` is given) an object behind conveyor's back."""
    if backend == "file":
        p = Path(url[len("file://"):]) / key
        if data is not None:
            p.write_bytes(data)
        return p.read_bytes()
    bucket, _, prefix = url[len("s3://"):].partition("/")
    c = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    if data is not None:
        c.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)
    return c.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()


def tree(root: Path, skip=()) -> dict[str, str]:
    """relative path -> sha256 of every regular file under root."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not p.is_symlink() and not any(rel.startswith(s) for s in skip):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def random_folder(root: Path, small: int = 30, big: int = 2, big_mb: float = 1.5, seed: int = 0) -> Path:
    """A folder with `small` files of a few KB (packed) and `big` files over 1 MiB (blobs)."""
    import random
    rnd = random.Random(seed)
    for i in range(small):
        p = root / f"d{i % 4}" / f"small_{i:03d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rnd.randbytes(rnd.randint(0, 8000)))
    for i in range(big):
        (root / f"big_{i}.bin").write_bytes(rnd.randbytes(int(big_mb * (1 << 20))))
    return root


class TcpProxy:
    """127.0.0.1 TCP forwarder that can slow traffic, drop every connection and refuse new ones.

    `fail_after`: once this many client->server bytes went through, the proxy goes down by itself."""

    def __init__(self, upstream_port: int, delay_per_chunk: float = 0.0, fail_after: int | None = None):
        self.upstream = upstream_port
        self.delay = delay_per_chunk
        self.fail_after = fail_after
        self.sent = 0
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self):
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def down(self):
        """Close the listener (new connections are refused) and reset every open connection."""
        ls, self._listener = self._listener, None
        if ls:
            try:
                ls.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            ls.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, ls: socket.socket):
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            if self._listener is not ls:
                client.close()
                return
            self.accepted += 1
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool):
        try:
            while data := src.recv(65536):
                if upstream:
                    self.sent += len(data)
                    if self.fail_after is not None and self.sent > self.fail_after:
                        threading.Thread(target=self.down, daemon=True).start()
                        return
                    if self.delay:
                        time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def moto_port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def env_without_proxy() -> dict:
    env = dict(os.environ)
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env.pop(k, None)
    env["NO_PROXY"] = "127.0.0.1,localhost"
    return env
