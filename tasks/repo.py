"""Settings and repositories from the Prefect layer: a named prefect-aws credentials block resolved into plain
S3 settings (the domain side, `conveyor.repo.open_repo(url, settings)`, never imports prefect; this module imports
it only when a block is named).

Every task hands the domain code settings from `storage_settings`, so each repository it opens uses the block:
backups and scrubs, and also a training run's dataset versions, pins and checkpoint archive."""
from __future__ import annotations

from pydantic import SecretStr

from conveyor.errors import ConveyorError
from conveyor.settings import S3Settings, Settings, load_settings


def s3_from_block(name: str, s3: S3Settings) -> S3Settings:
    """`s3` with a prefect-aws `AwsCredentials` block's credentials, region and endpoint (or an `S3Bucket`
    block's credentials; `name` may be `block-type-slug/name` for any such block). Fields set in conveyor's
    own settings win over the block's."""
    from prefect.blocks.core import Block
    from prefect_aws import AwsCredentials, S3Bucket

    try:
        block = Block.load(name) if "/" in name else AwsCredentials.load(name)
    except ValueError as e:
        raise ConveyorError(f"block {name!r}", f"cannot load the AWS credentials block: {e}") from None
    if isinstance(block, S3Bucket):
        block = block.credentials
    if not isinstance(block, AwsCredentials):
        raise ConveyorError(f"block {name!r}", "not an AwsCredentials or S3Bucket block")

    def secret(value) -> SecretStr | None:
        plain = value.get_secret_value() if isinstance(value, SecretStr) else value
        return SecretStr(plain) if plain else None

    params = block.aws_client_parameters
    from_block = {"access_key_id": secret(block.aws_access_key_id),
                  "secret_access_key": secret(block.aws_secret_access_key),
                  "session_token": secret(block.aws_session_token), "profile": block.profile_name,
                  "region": block.region_name, "endpoint_url": params.endpoint_url if params else None}
    mine = {k for k, v in s3.model_dump().items() if v is not None}
    return s3.model_copy(update={**{k: v for k, v in from_block.items() if v is not None and k not in mine},
                                 "aws_credentials_block": None})


def storage_settings(settings: Settings) -> Settings:
    """`settings` with its credentials block (if one is named) applied, so the domain code needs no Prefect."""
    if not settings.s3.aws_credentials_block:
        return settings
    return settings.model_copy(update={"s3": s3_from_block(settings.s3.aws_credentials_block, settings.s3)})


def load_storage_settings(config: str | None) -> Settings:
    return storage_settings(load_settings(config))
