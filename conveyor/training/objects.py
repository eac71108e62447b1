"""Open the object storage that checkpoints are archived to (conveyor.storage is the one implementation)."""
from __future__ import annotations

from conveyor.storage import ObjectStore, hash_file, open_store

__all__ = ["ObjectStore", "hash_file", "open_objects"]


def open_objects(url: str, settings=None) -> ObjectStore:
    """`file:///...` or `s3://bucket/prefix`, with the S3 and transfer settings when given."""
    return open_store(url, settings=getattr(settings, "s3", None), transfer=getattr(settings, "transfer", None))
