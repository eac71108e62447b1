"""Object storage ("a repo"): one small interface, two backends chosen by URL.

* ``file:///path`` — a local folder laid out like a bucket (`conveyor.repo.file`).
* ``s3://bucket/prefix`` — boto3 against S3 or any S3-compatible server (`conveyor.repo.s3`).

Uploads go through boto3's transfer manager (multipart, parallel, `TransferSettings`) with SHA-256:
single-part uploads send the whole-object ``ChecksumSHA256`` (the server rejects bytes that do not match),
multipart uploads send per-part SHA-256 checksums; every object also carries its hex sha256 as metadata.
Downloads are hashed and compared before they are renamed into place. Transient failures (connection
refused/reset, timeouts, 5xx, throttling) are retried by botocore's "standard" retry mode (exponential
backoff with jitter; attempts from ``AWS_MAX_ATTEMPTS``, default 3) and then raised as
`TransientStorageError`, which the Prefect tasks retry; every other failure is a plain `ConveyorError`.
Messages carry the URL, the key and the S3 error code only — never credentials.

The word "store" means the dataset store (`conveyor.store`); the object-storage side is always a "repo".
"""
from conveyor.repo.base import ObjectInfo, Repo
from conveyor.repo.errors import CorruptObject, MissingObject, TransientStorageError
from conveyor.repo.file import FileRepo
from conveyor.repo.open import open_repo
from conveyor.repo.s3 import S3Repo

__all__ = ["CorruptObject", "FileRepo", "MissingObject", "ObjectInfo", "Repo", "S3Repo", "TransientStorageError",
           "open_repo"]
