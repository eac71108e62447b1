"""lerobot 0.4.4's v3.0 on-disk layout (`lerobot/datasets/utils.py`), without importing lerobot."""
from __future__ import annotations

import re

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000  # files per chunk folder
INFO = "meta/info.json"
STATS = "meta/stats.json"
TASKS = "meta/tasks.parquet"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
META_FILES = (TASKS, STATS, INFO)  # rewritten by every commit; info.json last

# conveyor's own bookkeeping inside a store, beside lerobot's files (store.py's commit protocol: staged files,
# then the commit record, then the renames, the ledger, and HEAD last)
DOT = ".conveyor"
HEAD = f"{DOT}/HEAD"  # the committed DatasetVersion: moves last
MANIFEST = f"{DOT}/manifest.json"  # every committed file with size and sha256
LEDGER = f"{DOT}/ledger.jsonl"  # which source episode became which store episode, per commit
COMMITS = f"{DOT}/commits"  # commit records, `COMMIT_RECORD`
COMMIT_RECORD = COMMITS + "/{commit:08d}.json"
STAGING = f"{DOT}/staging"  # a commit's files before the renames, one folder per transaction
SNAPSHOTS = f"{DOT}/snapshots"  # hard-linked committed views (backup, publish)
LOCK = f"{DOT}/lock"  # the one-writer lock
APPLY_LOCK = f"{DOT}/apply.lock"  # held while a commit renames files (shared by readers of the manifest)
RETAINED = f"{DOT}/retained"  # parquet a commit replaced, kept (out of lerobot's globs) until vacuum, per commit
VACUUMED = f"{DOT}/vacuumed"  # the last commit whose replaced files vacuum has removed
BOOKKEEPING = (HEAD, LEDGER, MANIFEST)  # what a snapshot copies beside the commit records

_FILE_RE = re.compile(r"chunk-(\d{3,})/file-(\d{3,})\.(parquet|mp4)$")


def split_index(linear: int, chunks_size: int = CHUNKS_SIZE) -> tuple[int, int]:
    return divmod(linear, chunks_size)


def linear_index(path: str, chunks_size: int = CHUNKS_SIZE) -> int | None:
    m = _FILE_RE.search(path)
    return int(m.group(1)) * chunks_size + int(m.group(2)) if m else None


def data_path(linear: int) -> str:
    c, f = split_index(linear)
    return DATA_PATH.format(chunk_index=c, file_index=f)


def video_path(key: str, linear: int) -> str:
    c, f = split_index(linear)
    return VIDEO_PATH.format(video_key=key, chunk_index=c, file_index=f)


def episodes_path(linear: int) -> str:
    c, f = split_index(linear)
    return EPISODES_PATH.format(chunk_index=c, file_index=f)


def file_columns(prefix: str, linear: int) -> dict[str, int]:
    """The `<prefix>/chunk_index` and `<prefix>/file_index` columns of an episode row for file number `linear`,
    prefix 'data', 'videos/<key>' or 'meta/episodes'."""
    c, f = split_index(linear)
    return {f"{prefix}/chunk_index": c, f"{prefix}/file_index": f}


def _file_of(row: dict, prefix: str) -> dict[str, int]:
    return {"chunk_index": row[f"{prefix}/chunk_index"], "file_index": row[f"{prefix}/file_index"]}


def episode_data_path(row: dict) -> str:
    """The data file that holds the episode of a meta/episodes row."""
    return DATA_PATH.format(**_file_of(row, "data"))


def episode_video_path(row: dict, key: str) -> str:
    """The camera `key` video file that holds the episode of a meta/episodes row."""
    return VIDEO_PATH.format(video_key=key, **_file_of(row, f"videos/{key}"))


def episode_meta_path(row: dict) -> str:
    """The meta/episodes file that holds the row itself."""
    return EPISODES_PATH.format(**_file_of(row, "meta/episodes"))


def kind_of(path: str) -> str | None:
    """'data', 'meta', or 'videos/<key>' for a chunked file; None for anything else."""
    if path.startswith("data/"):
        return "data"
    if path.startswith("meta/episodes/"):
        return "meta"
    if path.startswith("videos/"):
        return "videos/" + path.split("/")[1]
    return None
