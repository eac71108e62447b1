"""Evidence that an episode's files are final, so the watcher need not wait for them to go quiet.

The core rules (`V21Source.check_episode`) already prove that the jsonl line, the parquet footer's row
count and every mp4's packet count agree. What they cannot prove alone is that an mp4 is not still
being copied: a fast-start mp4 (index first) opens and demuxes while its media data is half there, and a
packet cut in the middle still counts. An mp4 whose top-level boxes all end inside the file (the index
included) is final; anything else (another container, a box running past the end) is not evidence, and
the watcher falls back to waiting `settle_seconds`.
"""
from __future__ import annotations

import struct
from pathlib import Path

MP4_BRANDS = (b"ftyp", b"styp")


def mp4_finalized(path: Path) -> bool:
    """True if `path` is an mp4 whose top-level boxes (moov and mdat included) are all complete."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            pos, seen = 0, set()
            while pos < size:
                f.seek(pos)
                head = f.read(16)
                if len(head) < 8:
                    return False
                box_size, kind = struct.unpack(">I4s", head[:8])
                if box_size == 1:  # 64-bit size follows
                    if len(head) < 16:
                        return False
                    box_size = struct.unpack(">Q", head[8:16])[0]
                elif box_size == 0:  # "runs to the end of the file": a writer that never went back
                    return False
                if box_size < 8 or pos + box_size > size:
                    return False
                if pos == 0 and kind not in MP4_BRANDS:
                    return False
                seen.add(kind)
                pos += box_size
            return b"moov" in seen and b"mdat" in seen
    except OSError:
        return False


def episode_final(videos: list[Path]) -> bool:
    """Every camera file of an episode the core rules call complete is a finalized mp4."""
    return all(mp4_finalized(p) for p in videos)
