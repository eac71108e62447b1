"""The one repository opener: a URL, with conveyor's settings (S3 endpoint, credentials, transfer knobs)."""
from __future__ import annotations

from pathlib import Path

from conveyor.errors import ConveyorError, mask_userinfo
from conveyor.repo.base import Repo
from conveyor.repo.file import FileRepo
from conveyor.repo.s3 import S3Repo
from conveyor.settings import S3Settings, Settings, TransferSettings


def open_repo(url: str | None = None, settings: Settings | S3Settings | None = None,
              transfer: TransferSettings | None = None) -> Repo:
    """The one way to open a repository: `file:///abs/path` or `s3://bucket[/prefix]`.

    `settings`: conveyor's Settings (its S3 endpoint, credentials and transfer knobs; `url` defaults to its
    storage_url; a named Prefect credentials block must already be applied, `tasks.repo.storage_settings`: the
    Prefect layer's job), or only the S3 part, or None (boto3's own chain). Credentials in the URL are refused
    (the message masks them): they belong in `[s3]`, the AWS_* environment, a profile or a credentials block,
    never in a URL that ends up in logs, run parameters and artifacts."""
    s3 = settings
    if isinstance(settings, Settings):
        s3, transfer = settings.s3, transfer or settings.transfer
        url = url or settings.storage_url
        if not url:
            raise ConveyorError(settings.config_path or "settings",
                                "no storage_url is set; set storage_url to file:///path or s3://bucket/prefix")
    if not url:
        raise ConveyorError("storage URL", "no storage URL given: use file:///path or s3://bucket/prefix")
    if "@" in url.partition("://")[2].partition("/")[0]:
        raise ConveyorError(mask_userinfo(url), "credentials do not belong in a storage URL: put them in [s3] "
                                                "access_key_id / secret_access_key, the AWS_* environment or a "
                                                "profile, and name only s3://bucket/prefix")
    if url.startswith("file://"):
        path = url[len("file://"):]
        if not path:
            raise ConveyorError(url, "file:// URL needs a path, e.g. file:///srv/backups")
        return FileRepo(Path(path).expanduser().resolve())
    if url.startswith("s3://"):
        rest = url[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ConveyorError(url, "s3:// URL needs a bucket, e.g. s3://my-bucket/conveyor")
        if s3 is not None and s3.aws_credentials_block:  # never silently use other credentials
            raise ConveyorError(url, f"s3.aws_credentials_block `{s3.aws_credentials_block}` is named but "
                                     "was not applied: this code path opened storage without the Prefect layer's "
                                     "tasks.repo.storage_settings (a conveyor bug; please report it)")
        return S3Repo(bucket, prefix, s3, transfer)
    raise ConveyorError(url, "unsupported storage URL: use file:///path or s3://bucket/prefix")
