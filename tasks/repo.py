"""Opening a repository from the Prefect layer: settings plus, when one is named, a prefect-aws credentials
block turned into a boto3 session (the domain side, `conveyor.repo.open_configured_repo`, never imports
prefect; this module imports it only when a block is named)."""
from __future__ import annotations

from typing import Any

from conveyor.errors import ConveyorError
from conveyor.repo import Repo, open_configured_repo
from conveyor.settings import Settings, load_settings


def boto3_session_from_block(name: str) -> tuple[Any, str | None]:
    """A prefect-aws `AwsCredentials` block (or an `S3Bucket` block, using its credentials) -> a boto3
    Session and the block's endpoint_url. `name` may be `block-type-slug/name` for any such block."""
    from prefect.blocks.core import Block
    from prefect_aws import AwsCredentials, S3Bucket

    try:
        block = Block.load(name) if "/" in name else AwsCredentials.load(name)
    except ValueError as e:
        raise ConveyorError(f"block {name!r}", f"cannot load the AWS credentials block: {e}") from None
    if isinstance(block, S3Bucket):
        block = block.credentials
    if not hasattr(block, "get_boto3_session"):
        raise ConveyorError(f"block {name!r}", "not an AwsCredentials or S3Bucket block")
    params = getattr(block, "aws_client_parameters", None)
    return block.get_boto3_session(), getattr(params, "endpoint_url", None)


def repo_from_settings(settings: Settings, url: str | None = None) -> Repo:
    """The repository at `url` (default storage_url), with the credentials block applied when one is named."""
    url = url or settings.storage_url
    session = endpoint = None
    if url.startswith("s3://") and settings.s3.aws_credentials_block:
        session, endpoint = boto3_session_from_block(settings.s3.aws_credentials_block)
    return open_configured_repo(settings, url, session=session, endpoint_url=endpoint)


def open_repo_for(config: str | None, url: str | None = None) -> Repo:
    return repo_from_settings(load_settings(config), url)
