"""`verify()`: every object a snapshot names exists with a plausible size; re-read a sample (or all)."""
from __future__ import annotations

import hashlib
import random
import time
from concurrent.futures import ThreadPoolExecutor

from conveyor.backup.format import ManifestFile, VerifyReport
from conveyor.backup.manifests import read_manifest, resolve
from conveyor.fileio import sha256_bytes
from conveyor.repo import MissingObject, Repo


def verify(repo: Repo, ref: str | None, *, full: bool = False, sample: int = 16, seed: int | None = None,
           concurrency: int = 8) -> VerifyReport:
    """`full` re-reads and re-hashes every object, otherwise a random sample of `sample`. Failures name
    the object."""
    t0 = time.perf_counter()
    snap_id = resolve(repo, ref)
    m = read_manifest(repo, snap_id)
    present = {o.key: o.size for prefix in ("blobs/", "packs/") for o in repo.list(prefix)}
    need: dict[str, int] = {}  # object key -> minimum size
    for f in m.files:
        k = f.object_key
        need[k] = max(need.get(k, 0), f.offset + f.size)
    failures = []
    for k, size in sorted(need.items()):
        if k not in present:
            failures.append(f"{repo.url}/{k}: missing")
        elif (k.startswith("blobs/") and present[k] != size) or present[k] < size:
            failures.append(f"{repo.url}/{k}: size {present[k]}, expected "
                            f"{'at least ' if k.startswith('packs/') else ''}{size}")
    candidates = [k for k in sorted(need) if k in present]
    chosen = candidates if full else random.Random(seed).sample(candidates, min(sample, len(candidates)))
    by_pack: dict[str, list[ManifestFile]] = {}
    for f in m.files:
        if f.pack:
            by_pack.setdefault(f.pack, []).append(f)

    def check(key: str) -> tuple[int, list[str]]:
        sha = key.rsplit("/", 1)[1]
        try:
            if key.startswith("packs/"):
                data = repo.get_bytes(key)
                bad = [] if sha256_bytes(data) == sha else [f"{repo.url}/{key}: content hashes to {sha256_bytes(data)}"]
                for f in by_pack.get(sha, []):
                    if sha256_bytes(data[f.offset:f.offset + f.size]) != f.sha256:
                        bad.append(f"{repo.url}/{key}: bytes of {f.path} do not match the manifest")
                return len(data), bad
            h, n = hashlib.sha256(), 0
            for buf in repo.read_chunks(key):
                h.update(buf)
                n += len(buf)
            return n, [] if h.hexdigest() == sha else [f"{repo.url}/{key}: content hashes to {h.hexdigest()}"]
        except MissingObject:
            return 0, [f"{repo.url}/{key}: missing"]

    read = 0
    with ThreadPoolExecutor(max(1, min(concurrency, 8))) as pool:
        for n, bad in pool.map(check, chosen):
            read += n
            failures += bad
    return VerifyReport(snapshot=snap_id, full=full, objects_total=len(need), objects_read=len(chosen),
                        bytes_read=read, failures=failures, seconds=time.perf_counter() - t0)
